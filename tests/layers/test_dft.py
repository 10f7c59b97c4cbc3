"""Matrix DFT / RDFT / STFT against torch.fft and torch.stft (the reference beside the fast path)."""

import pytest
import torch

from deepsuite.layers.dft import DFT, RDFT, STFT, dft_matrix

NORMS = ["backward", "ortho", "forward"]


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n", [1, 7, 16])
def test_dft_matches_torch_fft_real_and_complex(norm, n):
    torch.manual_seed(n)
    layer = DFT(n, norm=norm)
    xr = torch.randn(3, 2, n, dtype=torch.float64)
    xc = torch.randn(4, n, dtype=torch.complex128)
    _close(layer(xr), torch.fft.fft(xr, n, dim=-1, norm=norm))
    _close(layer(xc), torch.fft.fft(xc, n, dim=-1, norm=norm))
    _close(layer.inverse(xc), torch.fft.ifft(xc, n, dim=-1, norm=norm))


@pytest.mark.parametrize("length", [5, 12])
def test_dft_pads_and_trims_like_torch_fft(length):
    x = torch.randn(2, length, dtype=torch.float64)
    _close(DFT(8)(x), torch.fft.fft(x, 8))
    _close(DFT(8).inverse(x.to(torch.complex128)), torch.fft.ifft(x.to(torch.complex128), 8))


def test_dft_float32_input_gives_complex64_close_to_fft():
    x = torch.randn(5, 64)
    out = DFT(64)(x)
    assert out.dtype == torch.complex64
    torch.testing.assert_close(out, torch.fft.fft(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", NORMS)
def test_round_trip_and_parseval(norm):
    torch.manual_seed(0)
    n = 12
    layer = DFT(n, norm=norm)
    x = torch.randn(6, n, dtype=torch.complex128)
    X = layer(x)
    _close(layer.inverse(X), x)
    # Parseval: sum |x|^2 = (1/N) sum |X_unnormalised|^2
    fwd_scale = {"backward": 1.0, "ortho": n**-0.5, "forward": 1.0 / n}[norm]
    energy_x = (x.abs() ** 2).sum(-1)
    energy_X = (X.abs() ** 2).sum(-1) / (fwd_scale**2 * n)
    _close(energy_X, energy_x)


def test_matrix_is_unitary_up_to_n():
    w = dft_matrix(10)
    f = torch.complex(w[0], w[1])
    _close(f @ f.conj().T, 10 * torch.eye(10, dtype=torch.complex128))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n", [7, 16])
def test_rdft_matches_rfft_and_irfft(norm, n):
    torch.manual_seed(1)
    layer = RDFT(n, norm=norm)
    x = torch.randn(3, n, dtype=torch.float64)
    X = layer(x)
    _close(X, torch.fft.rfft(x, n, norm=norm))
    _close(layer.inverse(X), x)
    noisy = torch.randn(3, n // 2 + 1, dtype=torch.complex128)  # imag of DC/Nyquist is ignored
    _close(layer.inverse(noisy), torch.fft.irfft(noisy, n, norm=norm))


def test_gradcheck_through_real_and_complex_leaves():
    torch.manual_seed(0)
    layer = DFT(6, norm="ortho")
    xr = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(2, 6, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(layer(t)), (xr,))
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(layer.inverse(t)), (xc,))
    r = RDFT(6)
    assert torch.autograd.gradcheck(
        lambda t: r.inverse(torch.view_as_complex(t)),
        (torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True),),
    )
    # and the gradient equals torch.fft's
    g = torch.randn(2, 6, dtype=torch.complex128)
    (gx,) = torch.autograd.grad((torch.view_as_real(layer(xr)) * torch.view_as_real(g)).sum(), xr)
    xr2 = xr.detach().clone().requires_grad_()
    ref = torch.view_as_real(torch.fft.fft(xr2, norm="ortho"))
    (gref,) = torch.autograd.grad((ref * torch.view_as_real(g)).sum(), xr2)
    _close(gx, gref)


def test_learnable_starts_at_exact_dft_and_trains():
    torch.manual_seed(0)
    layer = DFT(8, learnable=True)
    assert {n for n, _ in layer.named_parameters()} == {"weight_real", "weight_imag"}
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), torch.fft.fft(x), rtol=1e-5, atol=1e-5)
    layer(x).abs().sum().backward()
    assert layer.weight_real.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in DFT(8).parameters())


@pytest.mark.parametrize(
    ("n_fft", "hop", "win", "center", "normalized"),
    [(16, 4, None, True, False), (16, 5, 10, True, True), (8, 8, None, False, False)],
)
def test_stft_matches_torch_stft(n_fft, hop, win, center, normalized):
    torch.manual_seed(0)
    x = torch.randn(2, 100, dtype=torch.float64)
    layer = STFT(n_fft, hop_length=hop, win_length=win, center=center, normalized=normalized)
    wl = n_fft if win is None else win
    ref = torch.stft(
        x,
        n_fft,
        hop_length=hop,
        win_length=wl,
        window=torch.hann_window(wl, dtype=torch.float64),
        center=center,
        pad_mode="reflect",
        normalized=normalized,
        return_complex=True,
    )
    out = layer(x)
    assert out.shape == ref.shape
    _close(out, ref)
    _close(layer(x[0]), ref[0])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="n_fft"):
        DFT(0)
    with pytest.raises(ValueError, match="norm"):
        DFT(8, norm="unitary")
    with pytest.raises(TypeError, match="real"):
        RDFT(8)(torch.randn(8, dtype=torch.complex64))
    with pytest.raises(ValueError, match="win_length"):
        STFT(8, win_length=12)
    with pytest.raises(ValueError, match="window"):
        STFT(8, window="hamming")
    with pytest.raises(ValueError, match="waveform"):
        STFT(8)(torch.randn(2, 3, 40))
