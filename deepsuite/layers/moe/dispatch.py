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
    ``slot_rows`` (local dispatch: the row of each (token, slot), >= N for an empty slot) lets
    ``gather()``'s backward sum a token's row gradients with a gather instead of an atomic
    scatter-add.
    """

    source: Tensor  # [M, D]: the tokens (local) or the received rows (all-to-all)
    index_N: Tensor  # int64 [N]
    slot_rows: Tensor | None = None  # int64 [M * K]

    def gather(self) -> Tensor:
        """x_ND = source[index_N] (differentiable)."""
        if self.slot_rows is None:
            return self.source.index_select(0, self.index_N)
        return _GatherRows.apply(self.source, self.index_N, self.slot_rows)


class _GatherRows(torch.autograd.Function):
    """x_ND = x_TD[token_N]. Backward without atomics: un-sort the row grads with the inverse
    permutation (a gather), then sum each token's K slots."""

    @staticmethod
    def forward(ctx, x_TD, token_N, slot_rows):  # type: ignore[override]
        ctx.save_for_backward(slot_rows)
        ctx.shape = (x_TD.shape[0], slot_rows.numel() // max(x_TD.shape[0], 1), x_TD.shape[1])
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_ND):  # type: ignore[override]
        (slot_rows,) = ctx.saved_tensors
        g_SD = _pad_rows(g_ND, slot_rows.numel()).index_select(0, slot_rows)
        return g_SD.view(ctx.shape).sum(dim=1), None, None


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
    (rows >= n_rows are empty slots); token_N: token of each row; weights_TK: gate weights
    (have grad); dtype: x's dtype."""

    order_S: Tensor
    inv_S: Tensor
    token_N: Tensor
    n_rows: int
    weights_TK: Tensor
    dtype: torch.dtype


class _WeightedSumRows(torch.autograd.Function):
    """out_TD[t] = sum of w_N[n] y_ND[n] over the rows n of token t (token_N[n] = t), CPU.

    Works in chunks of rows through one scratch buffer: no N x D temporaries in forward (only y
    is kept for the weights' gradient) and, in backward, only dy itself. ``index_add_`` on CPU
    adds rows in order, so the sum is deterministic (a token's slots in ascending expert order).
    """

    @staticmethod
    def forward(ctx, y_ND, w_N, token_N, n_tokens):  # type: ignore[override]
        N, D = y_ND.shape
        out_TD = y_ND.new_zeros(n_tokens, D)
        step = _chunk_rows(D)
        buf = y_ND.new_empty(min(step, N), D)
        for s in range(0, N, step):
            t = min(s + step, N)
            yw = torch.mul(y_ND[s:t], w_N[s:t, None], out=buf[: t - s])
            out_TD.index_add_(0, token_N[s:t], yw)
        ctx.save_for_backward(y_ND, w_N, token_N)
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD):  # type: ignore[override]
        y_ND, w_N, token_N = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        N, D = y_ND.shape
        g_TD = g_TD.contiguous()
        g_ND = y_ND.new_empty(N, D)  # holds g[token] per row, then (in place) dy = w g[token]
        dw = w_N.new_empty(N) if need_w else None
        step = _chunk_rows(D)
        buf = y_ND.new_empty(min(step, N), D) if need_w else None
        for s in range(0, N, step):
            t = min(s + step, N)
            g = torch.index_select(g_TD, 0, token_N[s:t], out=g_ND[s:t])
            if need_w:
                torch.sum(torch.mul(g, y_ND[s:t], out=buf[: t - s]), dim=1, out=dw[s:t])
            if need_y:
                g.mul_(w_N[s:t, None])
        return (g_ND if need_y else None), dw, None, None


def _chunk_rows(d: int) -> int:
    """Rows per chunk for about 256K elements (1 MiB of fp32): cache-sized scratch."""
    return max(1, (1 << 18) // max(d, 1))


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
    token's row gradients into it). Combine has two forms with one result: on GPUs a gather both
    ways (forward and backward, no atomic scatter-add, which is slow there) and a weighted sum
    over each token's K slots (``combine_by_gather``); on CPU each weighted row added into its
    token in cache-sized chunks, with no N x D temporaries (``combine_by_rows``).
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
            ExpertRows(x_TD, token_N, inv_S),
            counts[: self.n_experts],
            LocalState(order_S, inv_S, token_N, n_rows, weights_TK, x_TD.dtype),
        )

    def combine(self, y_ND: Tensor, state: LocalState) -> Tensor:
        """y_ND [N, D] expert outputs in dispatch order -> out_TD [T, D] (x's dtype).

        The weighted sum runs in y's dtype (weights cast to it, as HF and DeepSeek do).
        """
        if y_ND.shape[0] != state.n_rows:
            raise ValueError(f"y_ND must have {state.n_rows} rows, got {y_ND.shape[0]}")
        dtype = state.dtype
        combine = combine_by_gather if y_ND.is_cuda else combine_by_rows
        return combine(y_ND, state).to(dtype)


def combine_by_gather(y_ND: Tensor, state: LocalState) -> Tensor:
    """GPU form: un-sort the rows to (token, slot) order by a gather, then multiply-and-sum over
    the K slots (no atomics, memory-bound). -> [T, D] in y's dtype."""
    T, K = state.weights_TK.shape
    y_TKD = _UnsortRows.apply(y_ND, state.order_S, state.inv_S).view(T, K, y_ND.shape[1])
    return (y_TKD * state.weights_TK.to(y_ND.dtype).unsqueeze(-1)).sum(dim=1)


def combine_by_rows(y_ND: Tensor, state: LocalState) -> Tensor:
    """CPU form: each row, weighted, added into its token in cache-sized chunks (no N x D
    temporaries). -> [T, D] in y's dtype."""
    w_N = state.weights_TK.to(y_ND.dtype).reshape(-1).index_select(0, state.order_S[: state.n_rows])
    return _WeightedSumRows.apply(y_ND.contiguous(), w_N, state.token_N, state.weights_TK.shape[0])


def dispatch_reference(x_TD: Tensor, ids_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Per-expert loop oracle: rows of expert 0 (in token order), then expert 1, ... and counts."""
    rows, counts = [], []
    for e in range(n_experts):
        tok = (ids_TK == e).any(dim=1).nonzero().flatten()
        rows.append(x_TD[tok])
        counts.append(tok.numel())
    return torch.cat(rows), torch.tensor(counts, dtype=torch.int64)
