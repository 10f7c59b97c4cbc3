"""Complex-valued layers (Trabelsi et al. 2018, "Deep Complex Networks") for audio and spectra.

One module over 400 lines on purpose: ``deepsuite.layers.complex`` is the seed package's public
path, and its layers share the split / merge / whitening helpers at the top.

Layout: (B, C, ..., 2) with the last dim [real, imag], or a native complex tensor (B, C, ...).
Every layer returns the same kind it was given. B batch, C channels, D features (last complex
dim of linear / layer-norm inputs). A complex weight W = A + iB acts on x + iy as
(A*x - B*y) + i(B*x + A*y).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Criterion = Literal["glorot", "he"]


# ---------------------------------------------------------------- layout and polar helpers
def split_complex(x: Tensor, name: str = "x") -> tuple[Tensor, Tensor, bool]:
    """(real, imag, was_native) from a native complex tensor or a (..., 2) real pair tensor."""
    if x.is_complex():
        return x.real, x.imag, True
    if x.dim() == 0 or x.shape[-1] != 2:
        raise ValueError(
            f"{name} must be a complex tensor or have last dim 2 ([real, imag]), "
            f"got shape {tuple(x.shape)}"
        )
    return x[..., 0], x[..., 1], False


def merge_complex(real: Tensor, imag: Tensor, native: bool) -> Tensor:
    """Inverse of :func:`split_complex`: a complex tensor if ``native`` else (..., 2)."""
    return torch.complex(real, imag) if native else torch.stack([real, imag], dim=-1)


def complex_magnitude(x: Tensor, eps: float = 0.0) -> Tensor:
    """|z| = sqrt(re^2 + im^2 + eps) of either layout; shape of the complex view."""
    re, im, _ = split_complex(x)
    return torch.sqrt(re * re + im * im + eps)


def complex_phase(x: Tensor) -> Tensor:
    """arg z = atan2(im, re) in radians, in (-pi, pi]; shape of the complex view."""
    re, im, _ = split_complex(x)
    return torch.atan2(im, re)


def complex_from_polar(magnitude: Tensor, phase: Tensor, native: bool = False) -> Tensor:
    """magnitude * exp(i phase), as (..., 2) pairs or (``native``) a complex tensor."""
    return merge_complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase), native)


def complex_rayleigh_init_(
    weight_real: Tensor,
    weight_imag: Tensor,
    fan_in: int,
    fan_out: int,
    criterion: Criterion = "glorot",
    generator: torch.Generator | None = None,
) -> None:
    """Complex init in place: modulus ~ Rayleigh(sigma), phase ~ U(-pi, pi).

    sigma = 1/sqrt(fan_in + fan_out) ("glorot") or 1/sqrt(fan_in) ("he"), so that
    Var(W) = E|W|^2 = 2 sigma^2 matches the real criteria (Trabelsi et al. 2018, sec. 3.6).
    """
    if criterion not in ("glorot", "he"):
        raise ValueError(f"criterion must be 'glorot' or 'he', got {criterion!r}")
    sigma = 1.0 / math.sqrt(fan_in + fan_out if criterion == "glorot" else fan_in)
    with torch.no_grad():
        u = torch.rand(weight_real.shape, generator=generator, dtype=torch.float64)
        modulus = sigma * torch.sqrt(-2.0 * torch.log1p(-u))  # inverse CDF of Rayleigh
        phase = (
            torch.rand(weight_real.shape, generator=generator, dtype=torch.float64) * 2 - 1
        ) * math.pi
        weight_real.copy_(modulus * torch.cos(phase))
        weight_imag.copy_(modulus * torch.sin(phase))


# ---------------------------------------------------------------- linear and convolutions
class _ComplexWeighted(nn.Module):
    """Holds A (weight_real), B (weight_imag) and a complex bias; Rayleigh/uniform-phase init."""

    def _make(
        self,
        shape: tuple[int, ...],
        out: int,
        bias: bool,
        fans: tuple[int, int],
        criterion: Criterion,
    ) -> None:
        self.weight_real = nn.Parameter(torch.empty(shape))
        self.weight_imag = nn.Parameter(torch.empty(shape))
        self.bias_real = nn.Parameter(torch.zeros(out)) if bias else None
        self.bias_imag = nn.Parameter(torch.zeros(out)) if bias else None
        self._fans, self.criterion = fans, criterion
        self.reset_parameters()

    def reset_parameters(self) -> None:
        complex_rayleigh_init_(self.weight_real, self.weight_imag, *self._fans, self.criterion)
        if self.bias_real is not None:
            nn.init.zeros_(self.bias_real)
            nn.init.zeros_(self.bias_imag)


class ComplexLinear(_ComplexWeighted):
    """(..., in_features, 2) or complex (..., in_features) -> same layout with out_features."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        criterion: Criterion = "glorot",
    ) -> None:
        super().__init__()
        _positive(in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self._make(
            (out_features, in_features), out_features, bias, (in_features, out_features), criterion
        )

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        if re.dim() == 0 or re.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} complex features "
                f"in its last complex dim, got shape {tuple(x.shape)}"
            )
        a, b = self.weight_real, self.weight_imag
        out_re = F.linear(re, a, self.bias_real) - F.linear(im, b)
        out_im = F.linear(re, b, self.bias_imag) + F.linear(im, a)
        return merge_complex(out_re, out_im, native)


class _ComplexConvNd(_ComplexWeighted):
    _nd: int
    _transposed: bool = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        output_padding: int | tuple[int, ...] = 0,
        criterion: Criterion = "glorot",
    ) -> None:
        super().__init__()
        _positive(in_channels=in_channels, out_channels=out_channels, groups=groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must "
                f"be divisible by groups={groups}"
            )
        k = (kernel_size,) * self._nd if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(k) != self._nd or min(k) < 1:
            raise ValueError(
                f"kernel_size must be a positive int or {self._nd} of them, got {kernel_size!r}"
            )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.output_padding = output_padding
        shape = (
            (in_channels, out_channels // groups)
            if self._transposed
            else (out_channels, in_channels // groups)
        ) + k
        rf = math.prod(k)
        fans = (in_channels // groups * rf, out_channels // groups * rf)
        self._make(shape, out_channels, bias, fans, criterion)

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        if self._transposed:
            return F.conv_transpose2d(
                x,
                w,
                None,
                self.stride,
                self.padding,
                self.output_padding,
                self.groups,
                self.dilation,
            )
        conv = F.conv1d if self._nd == 1 else F.conv2d
        return conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        if re.dim() != self._nd + 2 or re.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be (B, C{', L' if self._nd == 1 else ', H, W'}) complex with "
                f"C=in_channels={self.in_channels}, got shape {tuple(x.shape)}"
            )
        n = re.shape[0]
        both = torch.cat([re, im], dim=0)  # one conv per weight part over real and imag at once
        a, b = self._conv(both, self.weight_real), self._conv(both, self.weight_imag)
        out_re, out_im = a[:n] - b[n:], b[:n] + a[n:]
        if self.bias_real is not None:
            view = (1, -1) + (1,) * self._nd
            out_re = out_re + self.bias_real.view(view)
            out_im = out_im + self.bias_imag.view(view)
        return merge_complex(out_re, out_im, native)


class ComplexConv1d(_ComplexConvNd):
    """Complex 1-D conv: (B, C_in, L, 2) or complex (B, C_in, L) -> (B, C_out, L', ...)."""

    _nd = 1


class ComplexConv2d(_ComplexConvNd):
    """Complex 2-D conv: (B, C_in, H, W, 2) or complex (B, C_in, H, W) -> (B, C_out, H', W', ...).

    Arguments as nn.Conv2d; equals torch's native complex conv2d with weight A + iB.
    """

    _nd = 2


class ComplexConvTranspose2d(_ComplexConvNd):
    """Complex transposed 2-D conv, arguments as nn.ConvTranspose2d (weight (C_in, C_out/g, kh, kw))."""

    _nd = 2
    _transposed = True


# ---------------------------------------------------------------- normalisation
def whiten_2x2(
    re: Tensor, im: Tensor, vrr: Tensor, vri: Tensor, vii: Tensor
) -> tuple[Tensor, Tensor]:
    """Apply V^-1/2 for V = [[vrr, vri], [vri, vii]] (eps already on the diagonal) to centred parts.

    s = sqrt(det V), t = sqrt(vrr + vii + 2 s), V^-1/2 = [[vii + s, -vri], [-vri, vrr + s]] / (s t).
    """
    s = torch.sqrt(vrr * vii - vri * vri)
    t = torch.sqrt(vrr + vii + 2.0 * s)
    inv = 1.0 / (s * t)
    wrr, wii, wri = (vii + s) * inv, (vrr + s) * inv, -vri * inv
    return wrr * re + wri * im, wri * re + wii * im


class _ComplexAffine(nn.Module):
    """Symmetric 2x2 gamma (rr, ri, ii) and complex beta per feature (Trabelsi et al.)."""

    def _make_affine(self, n: int, affine: bool) -> None:
        self.affine = affine
        if affine:
            self.gamma_rr = nn.Parameter(torch.full((n,), 2**-0.5))
            self.gamma_ri = nn.Parameter(torch.zeros(n))
            self.gamma_ii = nn.Parameter(torch.full((n,), 2**-0.5))
            self.beta = nn.Parameter(torch.zeros(2, n))

    def _affine(self, re: Tensor, im: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        if not self.affine:
            return re, im
        g_rr, g_ri, g_ii = (g.view(shape) for g in (self.gamma_rr, self.gamma_ri, self.gamma_ii))
        return (
            g_rr * re + g_ri * im + self.beta[0].view(shape),
            g_ri * re + g_ii * im + self.beta[1].view(shape),
        )


class _ComplexBatchNorm(_ComplexAffine):
    _complex_dims: tuple[int, ...]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        _positive(num_features=num_features)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats = track_running_stats
        self._make_affine(num_features, affine)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(2, num_features))
            # rows Vrr, Vri, Vii; starts at the identity, as a per-part BN's running_var of 1
            self.register_buffer(
                "running_covar", torch.tensor([1.0, 0.0, 1.0])[:, None].repeat(1, num_features)
            )
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        if re.dim() not in self._complex_dims or re.shape[1] != self.num_features:
            raise ValueError(
                f"x must have {self._complex_dims} complex dims (B, C, ...) with "
                f"C=num_features={self.num_features}, got shape {tuple(x.shape)}"
            )
        dims = [0, *range(2, re.dim())]
        shape = (1, -1) + (1,) * (re.dim() - 2)
        if self.training or not self.track_running_stats:
            mr, mi = re.mean(dims), im.mean(dims)
            cr, ci = re - mr.view(shape), im - mi.view(shape)
            vrr, vri, vii = (cr * cr).mean(dims), (cr * ci).mean(dims), (ci * ci).mean(dims)
            if self.training and self.track_running_stats:
                n = re.numel() // re.shape[1]
                unbiased = n / max(n - 1, 1)  # as nn.BatchNorm: normalise biased, track unbiased
                with torch.no_grad():
                    self.running_mean.lerp_(torch.stack([mr, mi]), self.momentum)
                    self.running_covar.lerp_(torch.stack([vrr, vri, vii]) * unbiased, self.momentum)
                    self.num_batches_tracked += 1
        else:
            mr, mi = self.running_mean
            cr, ci = re - mr.view(shape), im - mi.view(shape)
            vrr, vri, vii = self.running_covar
        wr, wi = whiten_2x2(
            cr, ci, (vrr + self.eps).view(shape), vri.view(shape), (vii + self.eps).view(shape)
        )
        return merge_complex(*self._affine(wr, wi, shape), native)


class ComplexBatchNorm1d(_ComplexBatchNorm):
    """Complex BN over (B, C, 2) / (B, C, L, 2) or complex (B, C) / (B, C, L).

    Training whitens each channel with the inverse square root of its 2x2 covariance (mean 0,
    covariance I), then applies gamma [[rr, ri], [ri, ii]] and beta; eval uses running stats.
    """

    _complex_dims = (2, 3)


class ComplexBatchNorm2d(_ComplexBatchNorm):
    """Complex BN over (B, C, H, W, 2) or complex (B, C, H, W); see :class:`ComplexBatchNorm1d`."""

    _complex_dims = (4,)


class ComplexLayerNorm(_ComplexAffine):
    """Whitens each sample over its last complex dim D: (..., D, 2) or complex (..., D)."""

    def __init__(
        self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True
    ) -> None:
        super().__init__()
        _positive(normalized_shape=normalized_shape)
        self.normalized_shape, self.eps = normalized_shape, eps
        self._make_affine(normalized_shape, elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        if re.dim() == 0 or re.shape[-1] != self.normalized_shape:
            raise ValueError(
                f"x must have last complex dim normalized_shape="
                f"{self.normalized_shape}, got shape {tuple(x.shape)}"
            )
        cr, ci = re - re.mean(-1, keepdim=True), im - im.mean(-1, keepdim=True)
        vrr = (cr * cr).mean(-1, keepdim=True) + self.eps
        vii = (ci * ci).mean(-1, keepdim=True) + self.eps
        wr, wi = whiten_2x2(cr, ci, vrr, (cr * ci).mean(-1, keepdim=True), vii)
        return merge_complex(*self._affine(wr, wi, (-1,)), native)


# ---------------------------------------------------------------- activations and dropout
class CReLU(nn.Module):
    """ReLU on the real and imaginary parts separately."""

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        return merge_complex(F.relu(re), F.relu(im), native)


class ModReLU(nn.Module):
    """modReLU(z) = relu(|z| + b) z / (|z| + eps), a learnable bias b per feature.

    ``feature_dim`` indexes the complex view (the shape without the trailing 2), so the same
    value serves both layouts: 1 for (B, C, ...) maps, -1 for (..., D) features.
    """

    def __init__(
        self, num_features: int, feature_dim: int = 1, eps: float = 1e-5, bias_init: float = 0.0
    ) -> None:
        super().__init__()
        _positive(num_features=num_features)
        self.num_features, self.feature_dim, self.eps = num_features, feature_dim, eps
        self.bias = nn.Parameter(torch.full((num_features,), float(bias_init)))

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        dim = self.feature_dim % re.dim()
        if re.shape[dim] != self.num_features:
            raise ValueError(
                f"x must have num_features={self.num_features} at feature_dim="
                f"{self.feature_dim}, got shape {tuple(x.shape)}"
            )
        shape = [1] * re.dim()
        shape[dim] = -1
        mag = torch.sqrt((re * re + im * im).clamp_min(1e-30))  # finite gradient at z = 0
        scale = F.relu(mag + self.bias.view(shape)) / (mag + self.eps)
        return merge_complex(re * scale, im * scale, native)


class ZReLU(nn.Module):
    """zReLU: z where its phase lies in [0, pi/2] (both parts >= 0), else 0."""

    def forward(self, x: Tensor) -> Tensor:
        re, im, native = split_complex(x)
        keep = ((re >= 0) & (im >= 0)).to(re.dtype)
        return merge_complex(re * keep, im * keep, native)


class ComplexDropout(nn.Module):
    """Dropout with one mask for both parts of each complex element, scaled by 1 / (1 - p)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        re, im, native = split_complex(x)
        mask = F.dropout(torch.ones_like(re), self.p, training=True)
        return merge_complex(re * mask, im * mask, native)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
