"""Dispatcher seam: move token rows to their experts and back.

Letters: T tokens, D model dim, K slots per token, E routed experts, L local experts,
M source rows (the tokens, or the rows an all-to-all received), N dispatched rows.

A dispatcher holds no parameters. ``dispatch`` says which rows the local experts compute, as
``ExpertRows``: a gather not yet done (row n is source[index_N[n]]) with each row's gate weight.
The experts fuse both ends: they gather their rows, and return per SOURCE row the weighted sum of
that row's expert outputs ([M, D]); ``combine`` only brings those sums home (the local dispatcher:
nothing to move; the all-to-all one in deepsuite.distributed: send back and add per token). So
neither the K-times-repeated token rows nor the per-row expert outputs need to exist in full.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor


class SlotMap(NamedTuple):
    """Local dispatch's permutation between rows and (token, slot) pairs, for atomics-free
    gathers and scatters: slot_N is the flat slot t*K + k of each row, row_S the row of each flat
    slot (>= N for an empty slot)."""

    slot_N: Tensor  # int64 [N]
    row_S: Tensor  # int64 [M * K]


class ExpertRows(NamedTuple):
    """The rows the experts compute: row n is source[index_N[n]], weighted by weight_N[n].

    Rows are sorted by local expert (within an expert, by token or received order). ``gather``
    materialises the rows, ``scatter`` reduces per-row outputs to per-source-row weighted sums;
    ``GroupedExperts`` fuses both on its CPU path. ``slots`` (local dispatch) lets both run as
    gathers, forward and backward, with no atomic scatter-add (slow on GPUs).
    """

    source: Tensor  # [M, D]
    index_N: Tensor  # int64 [N]
    weight_N: Tensor | None = None  # [N] gate weights (differentiable); None: weight 1
    slots: SlotMap | None = None

    def gather(self) -> Tensor:
        """x_ND = source[index_N] (differentiable)."""
        if self.slots is None:
            return self.source.index_select(0, self.index_N)
        return _GatherRows.apply(self.source, self.index_N, self.slots.row_S)

    def scatter(self, y_ND: Tensor) -> Tensor:
        """z_MD[m] = sum of weight_N[n] y_ND[n] over the rows n of source row m, in y's dtype."""
        if y_ND.dim() != 2 or y_ND.shape[0] != self.index_N.shape[0]:
            raise ValueError(
                f"y_ND: expected [{self.index_N.shape[0]}, D], got {tuple(y_ND.shape)}"
            )
        yw = y_ND if self.weight_N is None else y_ND * self.weight_N.to(y_ND.dtype)[:, None]
        M = self.source.shape[0]
        if self.slots is None:
            return yw.new_zeros(M, y_ND.shape[1]).index_add(0, self.index_N, yw)
        y_SD = _UnsortRows.apply(yw, self.slots.slot_N, self.slots.row_S)
        K = self.slots.row_S.numel() // M if M else 0
        return y_SD.view(M, K, y_ND.shape[1]).sum(dim=1)


class _GatherRows(torch.autograd.Function):
    """x_ND = x_TD[token_N]. Backward without atomics: un-sort the row grads with the inverse
    permutation (a gather), then sum each token's K slots."""

    @staticmethod
    def forward(ctx, x_TD, token_N, row_S):  # type: ignore[override]
        ctx.save_for_backward(row_S)
        ctx.shape = (x_TD.shape[0], row_S.numel() // max(x_TD.shape[0], 1), x_TD.shape[1])
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_ND):  # type: ignore[override]
        (row_S,) = ctx.saved_tensors
        g_SD = _pad_rows(g_ND, row_S.numel()).index_select(0, row_S)
        return g_SD.view(ctx.shape).sum(dim=1), None, None


class _UnsortRows(torch.autograd.Function):
    """y_SD[s] = y_ND[row_S[s]] (0 for empty slots); backward is the gather by ``slot_N``."""

    @staticmethod
    def forward(ctx, y_ND, slot_N, row_S):  # type: ignore[override]
        ctx.save_for_backward(slot_N)
        return _pad_rows(y_ND, row_S.numel()).index_select(0, row_S)

    @staticmethod
    def backward(ctx, g_SD):  # type: ignore[override]
        (slot_N,) = ctx.saved_tensors
        return g_SD.index_select(0, slot_N), None, None


def _pad_rows(x: Tensor, n: int) -> Tensor:
    """x with zero rows appended up to n rows (no copy when it already has n)."""
    if x.shape[0] == n:
        return x
    return torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])


@runtime_checkable
class Dispatcher(Protocol):
    """dispatch -> (ExpertRows sorted by local expert, counts_L int64, state);
    combine(z_MD, state) -> out_TD.

    A dispatcher that must read sizes on the host (an all-to-all's split sizes) says so with a
    class attribute ``traceable = False``: the MoE layer then keeps dispatch -> experts ->
    combine out of compiled graphs (absent means True)."""

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[ExpertRows, Tensor, Any]:
        """-> (rows for this device's experts sorted by local expert id, counts_L int64, state)."""
        ...

    def combine(self, z_MD: Tensor, state: Any) -> Tensor:
        """z_MD: the experts' weighted sums per source row (``ExpertRows.scatter`` of their
        outputs) -> out_TD = sum over non-empty slots k of weights_TK[t,k] * expert(x_t), in x's
        dtype. Gradients flow to x, to the expert weights and to weights_TK."""
        ...


class LocalState(NamedTuple):
    """n_tokens: T; dtype: x's dtype."""

    n_tokens: int
    dtype: torch.dtype


class LocalDispatcher:
    """Single-device dispatcher: stable sort of the T*K (token, slot) pairs by expert id.

    Empty slots (id -1) sort last and are cut off, so tokens may carry different numbers of
    experts; finding how many rows remain is a host read. ``empty_slots=False`` promises that
    every slot holds an expert (no top-p; ``DeepSeekMoE`` checks it): then N = T*K and the
    dispatch reads nothing from the device and has static shapes. The source rows are the tokens themselves, so ``combine`` has
    nothing to move.
    """

    def __init__(self, n_experts: int, *, empty_slots: bool = True) -> None:
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        self.n_experts = n_experts
        self.empty_slots = bool(empty_slots)

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[ExpertRows, Tensor, LocalState]:
        """x_TD [T, D], ids_TK [T, K] int64 (-1 = empty), weights_TK [T, K] float32.

        Returns the rows x_TD[token of each non-empty slot] with their gate weights (N of them,
        grouped by expert, and within an expert by token order) as ``ExpertRows``, counts_E [E]
        int64, and the state ``combine`` needs.
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
        E = self.n_experts
        key_S = torch.where(ids_TK < 0, E, ids_TK).reshape(-1)
        sorted_S, order_S = torch.sort(key_S, stable=True)
        row_S = torch.empty_like(order_S)
        row_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        # each expert's first row in the sorted keys; the last bound is where empty slots begin
        bounds = torch.searchsorted(sorted_S, torch.arange(E + 1, device=key_S.device))
        counts_E = bounds.diff()
        # every slot holds an expert: N = T*K, nothing to read; else N sizes the rows: a read
        n_rows = int(bounds[E]) if self.empty_slots else key_S.numel()
        slot_N = order_S[:n_rows]
        rows = ExpertRows(
            x_TD,
            torch.div(slot_N, max(K, 1), rounding_mode="floor"),
            weights_TK.reshape(-1).index_select(0, slot_N),
            SlotMap(slot_N, row_S),
        )
        return rows, counts_E, LocalState(x_TD.shape[0], x_TD.dtype)

    def combine(self, z_TD: Tensor, state: LocalState) -> Tensor:
        """z_TD [T, D], the experts' weighted sums per token -> out_TD in x's dtype."""
        if z_TD.dim() != 2 or z_TD.shape[0] != state.n_tokens:
            raise ValueError(f"z_TD: expected [{state.n_tokens}, D], got {tuple(z_TD.shape)}")
        return z_TD.to(state.dtype)


def dispatch_reference(x_TD: Tensor, ids_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Per-expert loop oracle: rows of expert 0 (in token order), then expert 1, ... and counts."""
    rows, counts = [], []
    for e in range(n_experts):
        tok = (ids_TK == e).any(dim=1).nonzero().flatten()
        rows.append(x_TD[tok])
        counts.append(tok.numel())
    return torch.cat(rows), torch.tensor(counts, dtype=torch.int64)
