"""Dispatcher seam: move token rows to their experts and back.

Letters: T tokens, D model dim, K slots per token, E routed experts, L local experts,
N dispatched rows. A dispatcher holds no parameters; the local one below serves one device,
an all-to-all one (deepsuite.distributed) can replace it without touching the layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class ExpertRows(NamedTuple):
    """The rows the experts compute, as a gather not yet done: row n is source[index_N[n]].

    Rows are sorted by local expert (within an expert, by token or received order). Keeping the
    gather lazy lets ``GroupedExperts`` fuse it (the N x D copy, K times the tokens, is never
    built nor saved for backward); ``gather()`` materialises it for code that wants plain rows.
    """

    source: Tensor  # [M, D]: the tokens (local) or the received rows (all-to-all)
    index_N: Tensor  # int64 [N]

    def gather(self) -> Tensor:
        """x_ND = source[index_N] (differentiable)."""
        return self.source.index_select(0, self.index_N)


@runtime_checkable
class Dispatcher(Protocol):
    """dispatch -> (ExpertRows sorted by local expert, counts_L int64, state);
    combine(y_ND, state) -> out_TD."""

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[ExpertRows, Tensor, Any]:
        """-> (rows for this device's experts sorted by local expert id, counts_L int64, state)."""
        ...

    def combine(self, y_ND: Tensor, state: Any) -> Tensor:
        """-> out_TD = sum over non-empty slots k of weights_TK[t,k] * y(row of (t,k)), x's dtype.
        Gradients flow to x, to y and to weights_TK."""
        ...


class LocalState(NamedTuple):
    """order_S: flat slot (t*K + k) of each sorted row; inv_S: sorted row of each flat slot
    (rows >= n_rows are empty slots); weights_TK: gate weights (have grad); dtype: x's dtype."""

    order_S: Tensor
    inv_S: Tensor
    n_rows: int
    weights_TK: Tensor
    dtype: torch.dtype


class _UnsortRows(torch.autograd.Function):
    """y_SD[s] = y_ND[inv[s]] (0 for empty slots); backward is the gather by ``order``."""

    @staticmethod
    def forward(ctx, y_ND, order_S, inv_S):  # type: ignore[override]
        ctx.save_for_backward(order_S)
        ctx.n_rows = y_ND.shape[0]
        return _pad_rows(y_ND, inv_S.numel()).index_select(0, inv_S)

    @staticmethod
    def backward(ctx, g_SD):  # type: ignore[override]
        (order_S,) = ctx.saved_tensors
        return g_SD.index_select(0, order_S[: ctx.n_rows]), None, None


def _pad_rows(x: Tensor, n: int) -> Tensor:
    """x with zero rows appended up to n rows (no copy when it already has n)."""
    if x.shape[0] == n:
        return x
    return torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])


class LocalDispatcher:
    """Single-device dispatcher: stable sort of the T*K (token, slot) pairs by expert id.

    Empty slots (id -1) sort last and are cut off, so tokens may carry different numbers of
    experts. Dispatch returns the gather lazily (``ExpertRows``: the experts fuse it, and sum a
    token's row gradients into it); combine is a gather both ways (forward and backward, no
    atomic scatter-add, which is slow on GPUs) and a weighted sum over each token's K slots.
    """

    def __init__(self, n_experts: int) -> None:
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        self.n_experts = n_experts

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[ExpertRows, Tensor, LocalState]:
        """x_TD [T, D], ids_TK [T, K] int64 (-1 = empty), weights_TK [T, K] float32.

        Returns the rows x_TD[token of each non-empty slot] (N of them, grouped by expert, and
        within an expert by token order) as ``ExpertRows``, counts_E [E] int64, and the state
        ``combine`` needs.
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
        K = ids_TK.shape[1]
        # empty slots get key E: they sort after every real expert and are cut off below
        key_S = torch.where(ids_TK < 0, self.n_experts, ids_TK).reshape(-1)
        order_S = torch.sort(key_S, stable=True)[1]
        inv_S = torch.empty_like(order_S)
        inv_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        counts = torch.bincount(key_S, minlength=self.n_experts + 1)
        n_rows = key_S.numel() - int(counts[self.n_experts])  # host sync: N sizes the output
        token_N = torch.div(order_S[:n_rows], max(K, 1), rounding_mode="floor")
        return (
            ExpertRows(x_TD, token_N),
            counts[: self.n_experts],
            LocalState(order_S, inv_S, n_rows, weights_TK, x_TD.dtype),
        )

    def combine(self, y_ND: Tensor, state: LocalState) -> Tensor:
        """y_ND [N, D] expert outputs in dispatch order -> out_TD [T, D] (x's dtype).

        The weighted sum runs in y's dtype (weights cast to it, as HF and DeepSeek do).
        """
        order_S, inv_S, n_rows, weights_TK, dtype = state
        if y_ND.shape[0] != n_rows:
            raise ValueError(f"y_ND must have {n_rows} rows, got {y_ND.shape[0]}")
        T, K = weights_TK.shape
        y_TKD = _UnsortRows.apply(y_ND, order_S, inv_S).view(T, K, y_ND.shape[1])
        w_TK = weights_TK.to(y_ND.dtype)
        if y_TKD.is_cuda:  # batched m=1 GEMMs are slow on GPUs: multiply-and-sum is memory-bound
            out_TD = (y_TKD * w_TK.unsqueeze(-1)).sum(dim=1)
        else:  # on CPU the batched product beats the elementwise form (~2.5x measured)
            out_TD = torch.bmm(w_TK.unsqueeze(1), y_TKD).squeeze(1)
        return out_TD.to(dtype)


def dispatch_reference(x_TD: Tensor, ids_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Per-expert loop oracle: rows of expert 0 (in token order), then expert 1, ... and counts."""
    rows, counts = [], []
    for e in range(n_experts):
        tok = (ids_TK == e).any(dim=1).nonzero().flatten()
        rows.append(x_TD[tok])
        counts.append(tok.numel())
    return torch.cat(rows), torch.tensor(counts, dtype=torch.int64)
