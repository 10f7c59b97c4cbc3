"""Hermite polynomial feature expansion (plain basis layer and a trainable KAN-style layer).

Shapes: x (...) -> basis (..., N+1) with N the maximum degree; expansion (..., I) -> (..., O)
with I input features and O output features.

Three kinds, all by three-term recurrence:
- "physicists":   H_{n+1} = 2x H_n - 2n H_{n-1},            H_0 = 1, H_1 = 2x
- "probabilists": He_{n+1} = x He_n - n He_{n-1},           He_0 = 1, He_1 = x
- "functions":    psi_n = (2^n n! sqrt(pi))^{-1/2} exp(-x^2/2) H_n (orthonormal on the real line),
                  psi_{n+1} = sqrt(2/(n+1)) x psi_n - sqrt(n/(n+1)) psi_{n-1}, psi_0 = pi^{-1/4} e^{-x^2/2}

The features are computed in at least float32, with autocast disabled: in fp16 H_n overflows on
[-1, 1] from degree 11, so a half-precision input gives a float32 basis.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

HermiteKind = Literal["physicists", "probabilists", "functions"]
Squash = Literal["tanh"] | None
_KINDS = ("physicists", "probabilists", "functions")


def check_degree(degree: int, name: str = "degree") -> int:
    """Return ``degree`` if it is an int >= 0, else raise naming ``name``."""
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"{name} must be an int >= 0, got {type(degree).__name__} {degree!r}")
    if degree < 0:
        raise ValueError(f"{name} must be >= 0, got {degree}")
    return degree


def check_positive(value: int, name: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def basis_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other floating or integer dtype computes in float32."""
    if x.is_complex():
        raise TypeError(f"x must be a real tensor, got dtype {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def hermite_basis(x: Tensor, degree: int, kind: HermiteKind = "physicists") -> Tensor:
    """Hermite basis of ``kind`` at every element of ``x``.

    Args:
        x: real tensor of any shape (...).
        degree: highest degree N >= 0.
        kind: "physicists" (H_n), "probabilists" (He_n) or "functions" (normalised psi_n).

    Returns:
        (..., N+1) tensor; entry n holds the degree-n function at x. float64 for float64 input,
        float32 otherwise (also under autocast).
    """
    check_degree(degree)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    dtype = basis_dtype(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.to(dtype)
        if kind == "functions":
            p0 = math.pi**-0.25 * torch.exp(-0.5 * x * x)
            p1 = math.sqrt(2.0) * x * p0
        else:
            p0 = torch.ones_like(x)
            p1 = 2.0 * x if kind == "physicists" else x
        out = [p0, p1][: degree + 1]
        for n in range(1, degree):
            if kind == "physicists":
                nxt = 2.0 * x * out[n] - 2.0 * n * out[n - 1]
            elif kind == "probabilists":
                nxt = x * out[n] - n * out[n - 1]
            else:
                nxt = math.sqrt(2.0 / (n + 1)) * x * out[n] - math.sqrt(n / (n + 1)) * out[n - 1]
            out.append(nxt)
        return torch.stack(out, dim=-1)


class HermiteLayer(nn.Module):
    """Parameter-free Hermite basis: x (...) -> (..., max_order + 1) holding P_0(x) .. P_N(x)."""

    def __init__(self, max_order: int, kind: HermiteKind = "physicists") -> None:
        super().__init__()
        self.max_order = check_degree(max_order, "max_order")
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return hermite_basis(x, self.max_order, self.kind)

    def extra_repr(self) -> str:
        return f"max_order={self.max_order}, kind={self.kind!r}"


def expand_features(basis_BIN: Tensor, coeffs_OIN: Tensor, bias_O: Tensor | None) -> Tensor:
    """y[..., o] = sum_{i, n} coeffs[o, i, n] basis[..., i, n] + bias[o], as one matmul.

    Shapes: basis (..., I, N+1), coeffs (O, I, N+1), bias (O,) -> (..., O).
    """
    flat = basis_BIN.flatten(-2).to(coeffs_OIN.dtype)  # (..., I*(N+1))
    y = flat @ coeffs_OIN.flatten(1).t()
    return y if bias_O is None else y + bias_O


_SQUASH = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}


class PolynomialExpansion(nn.Module):
    """Shared body of the trainable expansions: y = coeffs . basis(squash(x)) + bias.

    Subclasses give ``basis(x) -> (..., I, N+1)``, the squashes they allow and their own
    ``extra_repr`` fields. Coefficients start as N(0, 1 / (in_features * (degree + 1))).
    """

    squashes: tuple[str | None, ...] = ("tanh", None)

    def __init__(
        self, in_features: int, out_features: int, degree: int, squash: str | None, bias: bool
    ) -> None:
        super().__init__()
        self.in_features = check_positive(in_features, "in_features")
        self.out_features = check_positive(out_features, "out_features")
        self.degree = check_degree(degree)
        if squash not in self.squashes:
            allowed = ", ".join(repr(q) for q in self.squashes)
            raise ValueError(f"squash must be one of {allowed}, got {squash!r}")
        self.squash = squash
        self.coeffs = nn.Parameter(torch.empty(out_features, in_features, degree + 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    def basis(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        nn.init.normal_(self.coeffs, std=(self.in_features * (self.degree + 1)) ** -0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dim in_features={self.in_features}, got shape {tuple(x.shape)}"
            )
        if self.squash is not None:
            x = _SQUASH[self.squash](x)
        return expand_features(self.basis(x), self.coeffs, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"degree={self.degree}, squash={self.squash!r}"
        )


class HermiteExpansion(PolynomialExpansion):
    """Trainable Hermite expansion (KAN-style): (..., in_features) -> (..., out_features).

    y_o = sum_i sum_n c[o, i, n] P_n(s(x_i)) + b_o, with s = tanh when ``squash="tanh"`` (keeps
    the polynomials in their well-conditioned range) or the identity when ``squash=None``.
    Coefficients start as N(0, 1 / (in_features * (degree + 1))).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        degree: int,
        kind: HermiteKind = "physicists",
        squash: Squash = "tanh",
        bias: bool = True,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind = kind
        super().__init__(in_features, out_features, degree, squash, bias)

    def basis(self, x: Tensor) -> Tensor:
        return hermite_basis(x, self.degree, self.kind)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}"
