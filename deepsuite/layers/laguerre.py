"""Generalised Laguerre polynomial feature expansion (basis layer and trainable KAN-style layer).

Shapes: x (...) -> basis (..., N+1) with N the maximum degree; expansion (..., I) -> (..., O)
with I input features and O output features.

Recurrence: L_0 = 1, L_1 = 1 + alpha - x,
(n+1) L_{n+1} = (2n + 1 + alpha - x) L_n - (n + alpha) L_{n-1},  alpha > -1.
The orthonormal variant divides by the norm sqrt(Gamma(n + alpha + 1) / n!) under the weight
x^alpha e^{-x} on [0, inf). Computed in at least float32 with autocast disabled.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from deepsuite.layers.hermite import PolynomialExpansion, basis_dtype, check_degree

LaguerreSquash = Literal["tanh", "sigmoid"] | None


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as float if it is a real number > -1, else raise."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a real number > -1, got {type(alpha).__name__}")
    if not alpha > -1.0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > -1, got {alpha}")
    return float(alpha)


def laguerre_norms(degree: int, alpha: float = 0.0) -> list[float]:
    """sqrt(Gamma(n + alpha + 1) / n!) for n = 0..degree: the L2 norms under x^alpha e^{-x}."""
    check_degree(degree)
    alpha = check_alpha(alpha)
    return [
        math.exp(0.5 * (math.lgamma(n + alpha + 1.0) - math.lgamma(n + 1.0)))
        for n in range(degree + 1)
    ]


def laguerre_basis(x: Tensor, degree: int, alpha: float = 0.0, normalized: bool = False) -> Tensor:
    """Generalised Laguerre basis L_0^alpha(x) .. L_N^alpha(x).

    Args:
        x: real tensor of any shape (...); the polynomials are orthogonal on [0, inf) but are
            evaluated anywhere.
        degree: highest degree N >= 0.
        alpha: generalisation parameter, > -1 (0 gives the plain Laguerre polynomials).
        normalized: divide degree n by sqrt(Gamma(n + alpha + 1) / n!) (orthonormal under
            x^alpha e^{-x}).

    Returns:
        (..., N+1); float64 for float64 input, float32 otherwise (also under autocast).
    """
    check_degree(degree)
    alpha = check_alpha(alpha)
    dtype = basis_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        out = [torch.ones_like(x), 1.0 + alpha - x][: degree + 1]
        for n in range(1, degree):
            out.append(((2 * n + 1 + alpha - x) * out[n] - (n + alpha) * out[n - 1]) / (n + 1))
        basis = torch.stack(out, dim=-1)
        if normalized:
            norms = torch.tensor(laguerre_norms(degree, alpha), dtype=torch.float64)
            basis = basis / norms.to(device=x.device, dtype=dtype)
        return basis


class LaguerreLayer(nn.Module):
    """Parameter-free basis: x (...) -> (..., max_order + 1) holding L_0^alpha(x) .. L_N^alpha(x)."""

    def __init__(self, max_order: int, alpha: float = 0.0, normalized: bool = False) -> None:
        super().__init__()
        self.max_order = check_degree(max_order, "max_order")
        self.alpha = check_alpha(alpha)
        self.normalized = bool(normalized)

    def forward(self, x: Tensor) -> Tensor:
        return laguerre_basis(x, self.max_order, self.alpha, self.normalized)

    def extra_repr(self) -> str:
        return f"max_order={self.max_order}, alpha={self.alpha}, normalized={self.normalized}"


class LaguerreExpansion(PolynomialExpansion):
    """Trainable Laguerre expansion (KAN-style): (..., in_features) -> (..., out_features).

    y_o = sum_i sum_n c[o, i, n] L_n^alpha(s(x_i)) + b_o, with s = tanh (default), sigmoid (maps
    into (0, 1), inside the polynomials' natural domain) or the identity (``squash=None``).
    Coefficients start as N(0, 1 / (in_features * (degree + 1))).
    """

    squashes = ("tanh", "sigmoid", None)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        degree: int,
        alpha: float = 0.0,
        normalized: bool = False,
        squash: LaguerreSquash = "tanh",
        bias: bool = True,
    ) -> None:
        self.alpha = check_alpha(alpha)
        self.normalized = bool(normalized)
        super().__init__(in_features, out_features, degree, squash, bias)

    def basis(self, x: Tensor) -> Tensor:
        return laguerre_basis(x, self.degree, self.alpha, self.normalized)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, normalized={self.normalized}"
