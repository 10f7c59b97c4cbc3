"""Laguerre basis and expansion against scipy.special / numpy.polynomial and Gauss quadrature."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import laguerre as npL
from scipy import special

from deepsuite.layers.laguerre import (
    LaguerreExpansion,
    LaguerreLayer,
    laguerre_basis,
    laguerre_norms,
)

X64 = torch.linspace(0.0, 12.0, 49, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 0.7, 3.0])
def test_basis_matches_scipy_genlaguerre_to_degree_20(alpha):
    got = LaguerreLayer(20, alpha=alpha)(X64).numpy()
    assert got.shape == (49, 21)
    for n in range(21):
        want = special.eval_genlaguerre(n, alpha, X64.numpy())
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got[:, n], want, rtol=1e-10, atol=1e-11 * scale)


def test_alpha_zero_matches_numpy_lagval():
    x = X64.numpy()
    got = laguerre_basis(X64, 8).numpy()
    for n in range(9):
        np.testing.assert_allclose(got[:, n], npL.lagval(x, np.eye(9)[n]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_orthogonality_by_gauss_laguerre_quadrature(alpha):
    deg = 10
    nodes, weights = special.roots_genlaguerre(deg + 2, alpha)
    basis = laguerre_basis(torch.from_numpy(nodes), deg, alpha).numpy()
    gram = basis.T @ (weights[:, None] * basis)
    want = np.diag([math.gamma(n + alpha + 1) / math.factorial(n) for n in range(deg + 1)])
    np.testing.assert_allclose(gram, want, rtol=1e-9, atol=1e-9 * want.max())
    ortho = laguerre_basis(torch.from_numpy(nodes), deg, alpha, normalized=True).numpy()
    np.testing.assert_allclose(ortho.T @ (weights[:, None] * ortho), np.eye(deg + 1), atol=1e-9)


def test_norms_match_gamma_formula():
    got = laguerre_norms(5, 0.5)
    want = [math.sqrt(math.gamma(n + 1.5) / math.factorial(n)) for n in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_expansion_matches_numpy_lagval():
    torch.manual_seed(0)
    layer = LaguerreExpansion(3, 2, degree=5, squash="sigmoid").double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(4, 3, dtype=torch.float64)
    got = layer(x).detach().numpy()
    c, b = layer.coeffs.detach().numpy(), layer.bias.detach().numpy()
    s = 1 / (1 + np.exp(-x.numpy()))
    want = np.array(
        [
            [b[o] + sum(npL.lagval(s[t, i], c[o, i]) for i in range(3)) for o in range(2)]
            for t in range(4)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_expansion_generalised_and_normalized_matches_scipy():
    torch.manual_seed(1)
    alpha = 0.5
    layer = LaguerreExpansion(2, 1, degree=4, alpha=alpha, normalized=True, bias=False).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    s = np.tanh(x.numpy())
    c = layer.coeffs.detach().numpy()[0]
    norms = laguerre_norms(4, alpha)
    want = sum(
        c[i, n] * special.eval_genlaguerre(n, alpha, s[:, i]) / norms[n]
        for i in range(2)
        for n in range(5)
    )
    np.testing.assert_allclose(layer(x).detach().numpy()[:, 0], want, rtol=1e-12, atol=1e-12)


def test_expansion_gradcheck_and_batch_dims():
    torch.manual_seed(0)
    layer = LaguerreExpansion(3, 2, degree=4, alpha=1.0).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert layer(x).shape == (2, 5, 2)
    assert torch.autograd.gradcheck(layer, (x,))


def test_half_input_under_autocast_gives_float32():
    x = torch.linspace(0, 4, 17).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = laguerre_basis(x, 12, alpha=0.5)
    assert out.dtype == torch.float32
    want = np.stack([special.eval_genlaguerre(n, 0.5, x.double().numpy()) for n in range(13)], -1)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        LaguerreLayer(3, alpha=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        laguerre_basis(X64, 3, alpha=-2.5)
    with pytest.raises(ValueError, match="max_order"):
        LaguerreLayer(-1)
    with pytest.raises(ValueError, match="degree"):
        LaguerreExpansion(2, 2, degree=-1)
    with pytest.raises(ValueError, match="squash"):
        LaguerreExpansion(2, 2, degree=3, squash="softplus")
    with pytest.raises(ValueError, match="in_features=2"):
        LaguerreExpansion(2, 2, degree=3)(torch.randn(4, 3))
