"""Hermite basis and expansion against scipy.special / numpy.polynomial and Gauss quadrature."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import hermite as npH
from numpy.polynomial import hermite_e as npHe
from scipy import special

from deepsuite.layers.hermite import HermiteExpansion, HermiteLayer, hermite_basis

X64 = torch.linspace(-3.0, 3.0, 41, dtype=torch.float64)
DEG = 20


def _hermite_function(n: int, x: np.ndarray) -> np.ndarray:
    norm = math.sqrt(2.0**n * math.factorial(n) * math.sqrt(math.pi))
    return special.eval_hermite(n, x) * np.exp(-0.5 * x * x) / norm


@pytest.mark.parametrize(
    ("kind", "oracle"),
    [
        ("physicists", special.eval_hermite),
        ("probabilists", special.eval_hermitenorm),
        ("functions", _hermite_function),
    ],
)
def test_basis_matches_scipy_to_degree_20(kind, oracle):
    got = HermiteLayer(DEG, kind=kind)(X64).numpy()
    assert got.shape == (41, DEG + 1)
    for n in range(DEG + 1):
        want = oracle(n, X64.numpy())
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got[:, n], want, rtol=1e-12, atol=1e-12 * scale)


def test_any_input_shape_gets_a_trailing_degree_axis():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    out = HermiteLayer(5)(x)
    assert out.shape == (2, 3, 4, 6)
    torch.testing.assert_close(out[1, 2, 3], HermiteLayer(5)(x[1, 2, 3]))
    torch.testing.assert_close(out[..., 2], 4 * x * x - 2)


@pytest.mark.parametrize(
    ("kind", "roots", "norm2"),
    [
        (
            "physicists",
            special.roots_hermite,
            lambda n: 2.0**n * math.factorial(n) * math.sqrt(math.pi),
        ),
        (
            "probabilists",
            special.roots_hermitenorm,
            lambda n: math.factorial(n) * math.sqrt(2 * math.pi),
        ),
    ],
)
def test_orthogonality_by_gauss_quadrature(kind, roots, norm2):
    deg = 12
    nodes, weights = roots(deg + 2)  # exact for polynomials up to degree 2*deg + 3
    basis = hermite_basis(torch.from_numpy(nodes), deg, kind).numpy()
    gram = basis.T @ (weights[:, None] * basis)
    want = np.diag([norm2(n) for n in range(deg + 1)])
    np.testing.assert_allclose(gram, want, rtol=1e-10, atol=1e-8 * want.max())


def test_hermite_functions_are_orthonormal():
    deg = 15
    nodes, weights = special.roots_hermite(40)
    psi = hermite_basis(torch.from_numpy(nodes), deg, "functions").numpy()
    # psi_m psi_n = e^{-x^2} * polynomial, so quadrature weight e^{-x^2} is already inside.
    gram = psi.T @ ((weights * np.exp(nodes**2))[:, None] * psi)
    np.testing.assert_allclose(gram, np.eye(deg + 1), atol=1e-10)


@pytest.mark.parametrize(
    ("kind", "val"), [("physicists", npH.hermval), ("probabilists", npHe.hermeval)]
)
def test_expansion_matches_numpy_polynomial(kind, val):
    torch.manual_seed(0)
    layer = HermiteExpansion(3, 4, degree=6, kind=kind).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(5, 3, dtype=torch.float64)
    got = layer(x).detach().numpy()
    c = layer.coeffs.detach().numpy()
    b = layer.bias.detach().numpy()
    s = np.tanh(x.numpy())
    want = np.zeros((5, 4))
    for t in range(5):
        for o in range(4):
            want[t, o] = b[o] + sum(val(s[t, i], c[o, i]) for i in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_expansion_without_squash_uses_raw_input():
    layer = HermiteExpansion(1, 1, degree=2, kind="probabilists", squash=None, bias=False).double()
    with torch.no_grad():
        layer.coeffs.copy_(torch.tensor([[[0.0, 0.0, 1.0]]]))  # He_2 = x^2 - 1
    x = torch.tensor([[3.0]], dtype=torch.float64)
    assert layer(x).item() == pytest.approx(8.0)


def test_expansion_on_leading_batch_dims_and_gradcheck():
    torch.manual_seed(0)
    layer = HermiteExpansion(4, 3, degree=5).double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 7, 3)
    torch.testing.assert_close(y[1, 3], layer(x[1, 3]))
    assert torch.autograd.gradcheck(layer, (x,))


def test_half_input_computes_in_float32_without_overflow():
    x16 = torch.linspace(-1, 1, 33).half()
    naive = [torch.ones_like(x16), 2 * x16]
    for n in range(1, 15):
        naive.append(2 * x16 * naive[n] - 2 * n * naive[n - 1])
    assert not torch.isfinite(naive[-1]).all(), "fp16 recurrence should overflow (test premise)"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hermite_basis(x16, 15)
    assert out.dtype == torch.float32
    want = np.stack([special.eval_hermite(n, x16.double().numpy()) for n in range(16)], -1)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-3)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="max_order"):
        HermiteLayer(-1)
    with pytest.raises(TypeError, match="max_order"):
        HermiteLayer(2.0)
    with pytest.raises(ValueError, match="kind"):
        HermiteLayer(3, kind="chebyshev")
    with pytest.raises(ValueError, match="degree"):
        HermiteExpansion(3, 4, degree=-2)
    with pytest.raises(ValueError, match="in_features"):
        HermiteExpansion(0, 4, degree=2)
    with pytest.raises(ValueError, match="squash"):
        HermiteExpansion(3, 4, degree=2, squash="relu")
    with pytest.raises(ValueError, match="in_features=3"):
        HermiteExpansion(3, 4, degree=2)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="real"):
        hermite_basis(torch.randn(3, dtype=torch.complex64), 2)
