"""SwiGLU feed-forward block: y = down(silu(gate(x)) * up(x)).

Used for the dense FFN layers, for the always-on shared experts of DeepSeekMoE, and as the
dense FLOP floor in ``benchmarks/moe_layer.py``. Letters: D model dim, F hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """Gated MLP without biases (LLaMA / DeepSeek style).

    Args:
        d_model: input and output width D.
        d_hidden: hidden width F (of each of the gate and up projections).

    Forward: ``x (..., D) -> (..., D)`` in x's dtype. Parameters: ``3 * D * F``.
    """

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last dim d_model={self.d_model}, got shape {tuple(x.shape)}"
            )
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}"


def swiglu_reference(x: Tensor, w_gate_FD: Tensor, w_up_FD: Tensor, w_down_DF: Tensor) -> Tensor:
    """Direct formula, for tests: (silu(x Wg^T) * (x Wu^T)) Wd^T with silu(z) = z * sigmoid(z)."""
    g = x @ w_gate_FD.T
    return ((g * torch.sigmoid(g)) * (x @ w_up_FD.T)) @ w_down_DF.T
