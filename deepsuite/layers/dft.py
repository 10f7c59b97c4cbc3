"""Differentiable DFT in matrix form: full, real-input (rfft-style) and an STFT front end.

Shapes: x (..., L) signal along the last dim; N = n_fft; K = N // 2 + 1 one-sided bins;
frames T. F_kn = exp(-2 pi i k n / N), so F F^H = N I.

The matrix form is O(N^2) per transform: its point is a DFT whose matrix can be learned
(``learnable=True`` starts at the exact DFT) and one that runs as plain matmuls. torch.fft is
the reference it is tested against. Outputs are native complex tensors, as torch.fft returns.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["backward", "ortho", "forward"]
_NORMS = ("backward", "ortho", "forward")


def _check_n(n_fft: int) -> int:
    if isinstance(n_fft, bool) or not isinstance(n_fft, int) or n_fft < 1:
        raise ValueError(f"n_fft must be a positive int, got {n_fft!r}")
    return n_fft


def _scales(n: int, norm: str) -> tuple[float, float]:
    """(forward scale, inverse scale) for torch.fft's ``norm`` modes."""
    if norm == "backward":
        return 1.0, 1.0 / n
    if norm == "ortho":
        return n**-0.5, n**-0.5
    if norm == "forward":
        return 1.0 / n, 1.0
    raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")


def dft_matrix(n: int, n_rows: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Exact (cos, -sin) parts of F_kn = exp(-2 pi i k n / N) as a (2, n_rows, N) real tensor.

    k*n is reduced mod N in integers first, so the angle stays exact for large N.
    """
    rows = n if n_rows is None else n_rows
    k = torch.arange(rows, dtype=torch.int64)[:, None]
    m = torch.arange(n, dtype=torch.int64)[None, :]
    angle = (2.0 * math.pi / n) * ((k * m) % n).to(torch.float64)
    return torch.stack([torch.cos(angle), -torch.sin(angle)]).to(dtype)


def _fit(x: Tensor, n: int) -> Tensor:
    """Zero-pad or trim the last dim to n, as torch.fft does with its ``n`` argument."""
    length = x.shape[-1]
    if length > n:
        return x[..., :n]
    if length < n:
        return F.pad(x, (0, n - length))
    return x


def _real_dtype(x: Tensor) -> torch.dtype:
    if x.is_complex():
        return x.real.dtype
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _cmatmul(x: Tensor, w_re: Tensor, w_im: Tensor) -> Tensor:
    """sum_n x[..., n] * (w_re + i w_im)[k, n] for real or complex x; complex output (..., k)."""
    dtype = _real_dtype(x)
    w_re, w_im = w_re.to(dtype), w_im.to(dtype)
    if x.is_complex():
        xr, xi = x.real, x.imag
        return torch.complex(xr @ w_re.t() - xi @ w_im.t(), xr @ w_im.t() + xi @ w_re.t())
    x = x.to(dtype)
    return torch.complex(x @ w_re.t(), x @ w_im.t())


class DFT(nn.Module):
    """Matrix DFT: ``DFT(n)(x) == torch.fft.fft(x, n, dim=-1, norm=norm)``.

    x (..., L) real or complex (L is zero-padded or trimmed to n_fft) -> (..., N) complex.
    ``inverse(X)`` equals ``torch.fft.ifft(X, n_fft, dim=-1, norm=norm)`` and always uses the
    exact inverse matrix, also when the forward matrix is learnable and has moved.
    """

    def __init__(self, n_fft: int, norm: Norm = "backward", learnable: bool = False) -> None:
        super().__init__()
        self.n_fft = _check_n(n_fft)
        self.norm = norm
        fwd, inv = _scales(n_fft, norm)
        self.inverse_scale = inv
        w = dft_matrix(n_fft) * fwd  # (2, N, N), the exact scaled DFT
        if learnable:
            self.weight_real = nn.Parameter(w[0].float())
            self.weight_imag = nn.Parameter(w[1].float())
        else:
            # float64 buffers, cast to the input's precision per call (exact for float64 input).
            self.register_buffer("weight_real", w[0], persistent=False)
            self.register_buffer("weight_imag", w[1], persistent=False)
        self.register_buffer("inv_real", w[0] * (inv / fwd), persistent=False)
        self.register_buffer("inv_imag", -w[1] * (inv / fwd), persistent=False)  # conj(F)

    def forward(self, x: Tensor) -> Tensor:
        return _cmatmul(_fit(x, self.n_fft), self.weight_real, self.weight_imag)

    def inverse(self, X: Tensor) -> Tensor:
        """(..., L) spectrum (trimmed/padded to n_fft) -> (..., N) complex signal, as ifft."""
        return _cmatmul(_fit(X, self.n_fft), self.inv_real, self.inv_imag)

    def extra_repr(self) -> str:
        learn = isinstance(self.weight_real, nn.Parameter)
        return f"n_fft={self.n_fft}, norm={self.norm!r}, learnable={learn}"


class RDFT(nn.Module):
    """Real-input matrix DFT: ``RDFT(n)(x) == torch.fft.rfft(x, n, dim=-1, norm=norm)``.

    x (..., L) real -> (..., K) complex with K = n_fft // 2 + 1. ``inverse(X)`` equals
    ``torch.fft.irfft(X, n_fft, dim=-1, norm=norm)``: (..., K) -> (..., N) real; as irfft, it
    ignores the imaginary parts of the DC and (even n_fft) Nyquist bins.
    """

    def __init__(self, n_fft: int, norm: Norm = "backward", learnable: bool = False) -> None:
        super().__init__()
        self.n_fft = _check_n(n_fft)
        self.n_bins = n_fft // 2 + 1
        self.norm = norm
        fwd, inv = _scales(n_fft, norm)
        w = dft_matrix(n_fft, self.n_bins)  # (2, K, N)
        if learnable:
            self.weight_real = nn.Parameter((w[0] * fwd).float())
            self.weight_imag = nn.Parameter((w[1] * fwd).float())
        else:
            self.register_buffer("weight_real", w[0] * fwd, persistent=False)
            self.register_buffer("weight_imag", w[1] * fwd, persistent=False)
        # x_n = inv * sum_k c_k Re(X_k e^{+i theta_kn}), c_k = 2 for bins that stand for a
        # conjugate pair, 1 for DC and the Nyquist bin. With w = (cos, -sin):
        # x = Xr @ (c cos) + Xi @ (c * -sin)  -> (K, N) matrices.
        c = torch.full((self.n_bins, 1), 2.0, dtype=torch.float64)
        c[0] = 1.0
        if n_fft % 2 == 0:
            c[-1] = 1.0
        self.register_buffer("inv_real", c * w[0] * inv, persistent=False)
        self.register_buffer("inv_imag", c * w[1] * inv, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_complex():
            raise TypeError("RDFT expects a real x; use DFT for complex input")
        return _cmatmul(_fit(x, self.n_fft), self.weight_real, self.weight_imag)

    def inverse(self, X: Tensor) -> Tensor:
        """(..., K) complex one-sided spectrum -> (..., N) real signal, as torch.fft.irfft."""
        if not X.is_complex():
            raise TypeError(f"X must be a complex tensor, got dtype {X.dtype}")
        X = _fit(X, self.n_bins)
        dtype = X.real.dtype
        return X.real @ self.inv_real.to(dtype) + X.imag @ self.inv_imag.to(dtype)

    def extra_repr(self) -> str:
        return f"n_fft={self.n_fft}, norm={self.norm!r}"


class STFT(nn.Module):
    """STFT front end for audio, as matmuls: equals ``torch.stft(..., return_complex=True)``.

    x (B, L) or (L,) real waveform -> (B, K, T) (or (K, T)) complex, K = n_fft // 2 + 1.
    Frames of n_fft samples every ``hop_length``; the window (periodic Hann, or ones for
    ``window=None``) of ``win_length`` is zero-padded to n_fft in the centre, as torch.stft does.
    ``normalized`` multiplies by n_fft^-1/2. ``learnable`` makes the DFT matrix trainable.
    """

    def __init__(
        self,
        n_fft: int,
        hop_length: int | None = None,
        win_length: int | None = None,
        window: Literal["hann"] | None = "hann",
        center: bool = True,
        pad_mode: str = "reflect",
        normalized: bool = False,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        self.n_fft = _check_n(n_fft)
        self.hop_length = n_fft // 4 if hop_length is None else hop_length
        self.win_length = n_fft if win_length is None else win_length
        if not self.hop_length >= 1:
            raise ValueError(f"hop_length must be >= 1, got {self.hop_length}")
        if not 1 <= self.win_length <= n_fft:
            raise ValueError(f"win_length must be in [1, n_fft={n_fft}], got {self.win_length}")
        if window not in ("hann", None):
            raise ValueError(f"window must be 'hann' or None, got {window!r}")
        self.center, self.pad_mode, self.normalized = center, pad_mode, normalized
        win = (
            torch.hann_window(self.win_length, dtype=torch.float64)
            if window == "hann"
            else torch.ones(self.win_length, dtype=torch.float64)
        )
        left = (n_fft - self.win_length) // 2
        win = F.pad(win, (left, n_fft - self.win_length - left))
        self.register_buffer("window", win, persistent=False)
        self.dft = RDFT(n_fft, norm="ortho" if normalized else "backward", learnable=learnable)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (1, 2) or x.is_complex():
            raise ValueError(f"x must be a real (L,) or (B, L) waveform, got {tuple(x.shape)}")
        squeeze = x.dim() == 1
        x_BL = x[None] if squeeze else x
        if self.center:
            pad = self.n_fft // 2
            x_BL = F.pad(x_BL[:, None], (pad, pad), mode=self.pad_mode)[:, 0]
        if x_BL.shape[-1] < self.n_fft:
            raise ValueError(f"x is shorter than n_fft={self.n_fft} after padding")
        frames_BTN = x_BL.unfold(-1, self.n_fft, self.hop_length)
        spec_BTK = self.dft(frames_BTN * self.window.to(_real_dtype(x_BL)))
        spec_BKT = spec_BTK.transpose(-1, -2)
        return spec_BKT[0] if squeeze else spec_BKT

    def extra_repr(self) -> str:
        return (
            f"n_fft={self.n_fft}, hop_length={self.hop_length}, win_length={self.win_length}, "
            f"center={self.center}, normalized={self.normalized}"
        )
