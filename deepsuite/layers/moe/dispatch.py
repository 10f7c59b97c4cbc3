"""Dispatcher seam: move token rows to their experts and back.

Letters: T tokens, D model dim, K slots per token, E routed experts, L local experts,
N dispatched rows. A dispatcher holds no parameters; the local one below serves one device,
an all-to-all one (deepsuite.distributed) can replace it without touching the layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Dispatcher(Protocol):
    """dispatch -> (x_ND sorted by local expert, counts_L int64, state); combine(y_ND, state) -> out_TD."""

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[Tensor, Tensor, Any]:
        """-> (x_ND rows for this device's experts sorted by local expert id, counts_L int64, state)."""
        ...

    def combine(self, y_ND: Tensor, state: Any) -> Tensor:
        """-> out_TD = sum over non-empty slots k of weights_TK[t,k] * y(row of (t,k)), x's dtype.
        Gradients flow to x, to y and to weights_TK."""
        ...


class LocalState(NamedTuple):
    """token_N: source token of each sorted row; weight_N: its gate weight (float32, has grad)."""

    token_N: Tensor
    weight_N: Tensor
    n_tokens: int
    dtype: torch.dtype


class LocalDispatcher:
    """Single-device dispatcher: stable sort of the (token, slot) pairs by expert id.

    Empty slots (id -1) are skipped, so tokens may carry different numbers of experts.
    """

    def __init__(self, n_experts: int) -> None:
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        self.n_experts = n_experts

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[Tensor, Tensor, LocalState]:
        """x_TD [T, D], ids_TK [T, K] int64 (-1 = empty), weights_TK [T, K] float32.

        Returns x_ND [N, D] (N = non-empty slots, rows grouped by expert, and within an expert
        by token order), counts_E [E] int64, and the state ``combine`` needs.
        """
        if x_TD.dim() != 2 or ids_TK.dim() != 2 or ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"need x_TD [T, D] and ids_TK [T, K] with the same T, got "
                f"{tuple(x_TD.shape)} and {tuple(ids_TK.shape)}"
            )
        if weights_TK.shape != ids_TK.shape:
            raise ValueError(
                f"weights_TK must match ids_TK {tuple(ids_TK.shape)}, got {tuple(weights_TK.shape)}"
            )
        T, K = ids_TK.shape
        ids = ids_TK.reshape(-1)
        # empty slots sort after every real expert and are cut off below
        key = torch.where(ids < 0, self.n_experts, ids)
        order = torch.sort(key, stable=True)[1]
        counts_E = torch.bincount(key, minlength=self.n_experts + 1)[: self.n_experts]
        n_rows = T * K - int((ids < 0).sum()) if K else 0
        order = order[:n_rows]
        token_N = torch.div(order, K, rounding_mode="floor") if K else order
        weight_N = weights_TK.reshape(-1).index_select(0, order)
        x_ND = x_TD.index_select(0, token_N)
        return x_ND, counts_E, LocalState(token_N, weight_N, T, x_TD.dtype)

    def combine(self, y_ND: Tensor, state: LocalState) -> Tensor:
        """y_ND [N, D] expert outputs in dispatch order -> out_TD [T, D] (x's dtype)."""
        token_N, weight_N, T, dtype = state
        if y_ND.shape[0] != token_N.shape[0]:
            raise ValueError(f"y_ND must have {token_N.shape[0]} rows, got {y_ND.shape[0]}")
        # weight in float32, then cast: bf16 experts still get an fp32-accurate weighted sum
        wy_ND = y_ND * weight_N.unsqueeze(1).to(torch.promote_types(y_ND.dtype, torch.float32))
        out = wy_ND.new_zeros(T, y_ND.shape[1]).index_add_(0, token_N, wy_ND)
        return out.to(dtype)


def dispatch_reference(x_TD: Tensor, ids_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Per-expert loop oracle: rows of expert 0 (in token order), then expert 1, ... and counts."""
    rows, counts = [], []
    for e in range(n_experts):
        tok = (ids_TK == e).any(dim=1).nonzero().flatten()
        rows.append(x_TD[tok])
        counts.append(tok.numel())
    return torch.cat(rows), torch.tensor(counts, dtype=torch.int64)
