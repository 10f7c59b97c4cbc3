"""Expert-parallel dispatcher: uneven all-to-all token exchange with per-rank deduplication.

Letters: T tokens on this rank, D model dim, K top-k slots, E global experts, P ranks in the
expert-parallel group, L = E / P local experts, S rows sent (unique (token, destination rank)
pairs), R rows received, N dispatched rows (one per (received row, local-expert slot)).

Expert e lives on EP rank e // L as local expert e % L. A token whose K experts sit on the same
rank crosses the wire once: its row goes with the K (local id, gate weight) pairs meant for that
rank, and is copied per slot on arrival. On the way back the expert rank applies the gate weights
and sums, so it returns one row per (token, source rank); the gate weights' gradient flows back
through the same exchange.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from deepsuite.config import validate_expert_parallel
from deepsuite.distributed.comm import all_to_all_rows
from deepsuite.layers.moe.dispatch import ExpertRows
from deepsuite.layers.moe.router import count_ids

__all__ = ["AllToAllDispatcher", "CommStats", "DispatchState"]


@dataclass(frozen=True)
class CommStats:
    """Traffic of the last dispatch + combine on this rank (bytes include the self-copy)."""

    rows_sent: int  # S: unique (token, destination rank) rows, self included
    rows_sent_remote: int  # rows sent to other ranks
    rows_received: int  # R
    slots: int  # valid (token, slot) pairs: what a dispatcher without dedup would send
    dispatch_bytes_sent: int  # token payload of the dispatch exchange (S * D * itemsize)
    dispatch_meta_bytes_sent: int  # local ids + gate weights sent along (S * K * 8)
    combine_bytes_sent: int  # weighted-and-summed rows sent back (R * D * itemsize)
    bytes_sent: int  # everything this rank put on the wire in dispatch + combine
    bytes_received: int
    a2a_time_s: float  # wall time inside the three all-to-alls (forward only)


@dataclass
class DispatchState:
    """What ``combine`` needs to undo ``dispatch``."""

    token_S: torch.Tensor  # int64 [S] token index of each sent row
    in_splits: tuple[int, ...]  # [P] rows sent to each rank
    out_splits: tuple[int, ...]  # [P] rows received from each rank
    n_received: int  # R: rows received, the source rows of this rank's ExpertRows
    n_tokens: int
    dtype: torch.dtype
    a2a_time_s: float
    stats: dict[str, int]


class AllToAllDispatcher:
    """Dispatcher protocol over an expert-parallel process group (holds no parameters).

    Args:
        n_experts: E, global routed experts; must be divisible by the group size.
        ep_group: expert-parallel process group (None = world).
        sync_timing: synchronise the device around the exchanges so ``a2a_time_s`` is real time
            on CUDA (costs a sync); on CPU the exchanges are synchronous anyway.
    """

    # dispatch sizes its exchange from counts read on the host, so under torch.compile the
    # MoE layer runs dispatch -> experts -> combine eagerly (see DeepSeekMoE.forward)
    traceable = False

    def __init__(
        self, n_experts: int, ep_group: ProcessGroup | None = None, *, sync_timing: bool = False
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("AllToAllDispatcher: torch.distributed is not initialised")
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        validate_expert_parallel(n_experts, None, self.ep_size)
        self.n_experts = n_experts
        self.n_local = n_experts // self.ep_size
        self.sync_timing = sync_timing
        self.last_comm_stats: CommStats | None = None

    def _timed_exchange(self, tensors, in_splits, out_splits, device) -> tuple[list, float]:
        if self.sync_timing and device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = all_to_all_rows(tensors, in_splits, out_splits, self.group)
        if self.sync_timing and device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    def dispatch(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> tuple[ExpertRows, torch.Tensor, DispatchState]:
        """Send token rows to the ranks holding their experts.

        Args:
            x_TD: tokens [T, D], any float dtype.
            ids_TK: int64 [T, K] global expert ids in [0, n_experts), -1 = empty slot.
            weights_TK: float32 [T, K] gate weights (applied in ``combine``, on the expert side).

        Returns:
            the rows for this rank's experts sorted by local expert id (``ExpertRows``: the
            received rows and the index that orders them), counts_L int64 [L], and the state
            for ``combine``.

        Host reads: exactly one. The count tables (rows per destination rank, slots per
        (rank, local expert)) cross in a first small all-to-all; this rank then reads what it
        sent and received in one go, since the row exchange needs its split sizes on the host.
        Every other size is derived from those numbers, and every index is built with static
        shapes, so nothing else waits for the device.
        """
        if x_TD.dim() != 2 or ids_TK.dim() != 2 or ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"x_TD/ids_TK: expected [T, D] and [T, K], got {tuple(x_TD.shape)} and "
                f"{tuple(ids_TK.shape)}"
            )
        if weights_TK.shape != ids_TK.shape:
            raise ValueError(
                f"weights_TK: expected shape {tuple(ids_TK.shape)}, got {tuple(weights_TK.shape)}"
            )
        P, L, dev = self.ep_size, self.n_local, x_TD.device
        T, K = ids_TK.shape
        # checked on the device: an id past the experts would silently go nowhere
        torch._assert_async(
            (ids_TK < self.n_experts).all(), f"ids_TK: expected ids < n_experts={self.n_experts}"
        )
        valid_TK = ids_TK >= 0
        dest_TK = torch.where(valid_TK, ids_TK // L, P)  # P: no rank (an empty slot)
        to_rank_PT = (dest_TK[..., None] == torch.arange(P, device=dev)).any(dim=1).T
        # count tables: rows to each rank, then slots per (rank, local expert) = per global expert
        send_PC = torch.cat(
            [to_rank_PT.sum(dim=1, keepdim=True), count_ids(ids_TK, P * L).view(P, L)], dim=1
        )
        recv_PC = torch.empty_like(send_PC)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv_PC, send_PC, group=self.group)
        sent, got = torch.stack([send_PC, recv_PC]).tolist()  # THE host read of this layer
        t_counts = time.perf_counter() - t0
        in_splits, out_splits = tuple(r[0] for r in sent), tuple(r[0] for r in got)
        S, N = sum(in_splits), sum(sum(r[1:]) for r in got)

        # rows ordered by destination rank, then token: the layout all_to_all_single expects
        flat_S = torch.nonzero_static(to_rank_PT.reshape(-1), size=S).squeeze(1)
        rank_S, token_S = flat_S // max(T, 1), flat_S % max(T, 1)
        here_SK = dest_TK[token_S] == rank_S[:, None]
        lid_SK = torch.where(here_SK, ids_TK[token_S] - rank_S[:, None] * L, -1).to(torch.int32)
        w_SK = torch.where(here_SK, weights_TK[token_S].float(), 0.0)
        x_SD = x_TD[token_S]
        (x_RD, w_RK, lid_RK), t_rows = self._timed_exchange(
            [x_SD, w_SK, lid_SK], in_splits, out_splits, dev
        )

        # (received row, slot) pairs by local expert, then row and slot: a stable sort of the
        # R*K slots with empty ones keyed last, cut at the N real ones
        key = torch.where(lid_RK >= 0, lid_RK.long(), L).reshape(-1)
        slot_N = torch.sort(key, stable=True)[1][:N]
        row_N = torch.div(slot_N, K, rounding_mode="floor")
        counts_L = recv_PC[:, 1:].sum(dim=0)
        item = x_TD.element_size()
        R, D = x_RD.shape[0], x_TD.shape[1]
        count_bytes = send_PC.numel() * send_PC.element_size()
        stats = {
            "rows_sent": S,
            "rows_sent_remote": S - in_splits[self.ep_rank],
            "rows_received": R,
            "slots": sum(sum(r[1:]) for r in sent),
            "dispatch_bytes_sent": S * D * item,
            "dispatch_meta_bytes_sent": S * K * 8,
            "dispatch_bytes_received": R * (D * item + K * 8),
            "counts_bytes": 2 * count_bytes,
            "item": item,
            "D": D,
        }
        state = DispatchState(
            token_S=token_S,
            in_splits=in_splits,
            out_splits=out_splits,
            n_received=R,
            n_tokens=T,
            dtype=x_TD.dtype,
            a2a_time_s=t_counts + t_rows,
            stats=stats,
        )
        return ExpertRows(x_RD, row_N, w_RK.reshape(-1)[slot_N]), counts_L, state

    def combine(self, z_RD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Send the per-received-row sums back and sum per token.

        Args:
            z_RD: [R, D], for each received row the gate-weighted sum of its experts' outputs
                (what ``GroupedExperts`` returns for the ``ExpertRows`` of ``dispatch``).
            state: from ``dispatch``.

        Returns:
            out_TD [T, D] in x's dtype: out[t] = sum_k weights_TK[t, k] * y(row of (t, k)).
        """
        if z_RD.dim() != 2 or z_RD.shape[0] != state.n_received:
            raise ValueError(f"z_RD: expected [{state.n_received}, D], got {tuple(z_RD.shape)}")
        D, n_recv = z_RD.shape[1], state.n_received
        (z_SD,), t_back = self._timed_exchange(
            [z_RD.to(state.dtype)], state.out_splits, state.in_splits, z_RD.device
        )
        out_TD = z_SD.new_zeros((state.n_tokens, D), dtype=torch.float32)
        out_TD = out_TD.index_add(0, state.token_S, z_SD.float()).to(state.dtype)
        s = state.stats
        combine_sent = n_recv * D * s["item"]
        combine_recv = z_SD.shape[0] * D * s["item"]
        self.last_comm_stats = CommStats(
            rows_sent=s["rows_sent"],
            rows_sent_remote=s["rows_sent_remote"],
            rows_received=s["rows_received"],
            slots=s["slots"],
            dispatch_bytes_sent=s["dispatch_bytes_sent"],
            dispatch_meta_bytes_sent=s["dispatch_meta_bytes_sent"],
            combine_bytes_sent=combine_sent,
            bytes_sent=s["dispatch_bytes_sent"]
            + s["dispatch_meta_bytes_sent"]
            + combine_sent
            + s["counts_bytes"] // 2,
            bytes_received=s["dispatch_bytes_received"] + combine_recv + s["counts_bytes"] // 2,
            a2a_time_s=state.a2a_time_s + t_back,
        )
        return out_TD


def reference_moe(
    x_TD: torch.Tensor,
    ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    expert_fn,
) -> torch.Tensor:
    """Obviously-correct single-process oracle: out[t] = sum_k w[t,k] * expert_fn(e, x[t]).

    ``expert_fn(e, x_MD) -> y_MD`` applies global expert e to a batch of rows.
    """
    out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e >= 0:
                y = expert_fn(e, x_TD[t : t + 1])[0]
                out_TD[t] = out_TD[t] + weights_TK[t, k].float() * y.float()
    return out_TD.to(x_TD.dtype)
