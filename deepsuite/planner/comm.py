"""All-to-all and gradient-reduction traffic of one rank, from routing statistics or balanced routing.

Letters: T tokens on a rank, K slots per token, E experts, P ranks in the EP group, L = E / P
experts per rank, D model dim.

The unit of all-to-all traffic is the row: one token sent to one rank. deepsuite's dispatcher
(``deepsuite.distributed.dispatch``) sends one row per (token, destination rank) -- per-rank
deduplication -- carrying the token (D x itemsize bytes) and K (local id int32, gate weight
float32) pairs (8 K bytes); the combine returns one row of D x itemsize per received row; a
small all-to-all of a P x (1 + L) int64 count table comes first (rows per rank, slots per local
expert: the one host read of the layer). Its backward sends the gradients of the same
floating tensors back: R x (D itemsize + 4 K) for the dispatch, S x D itemsize for the combine.
So a rank's traffic is a function of how many rows it sends to each rank (``rows_P``) and
receives; ``dispatcher_bytes`` reproduces the dispatcher's own count exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepsuite.config import Config
from deepsuite.planner.layout import Layout


def rows_from_routing(ids_TK: torch.Tensor, n_experts: int, ep: int) -> list[int]:
    """Rows a rank sends to each EP rank for routing ``ids_TK`` (int [T, K], -1 = empty slot):
    the number of its tokens with at least one expert on that rank."""
    if ids_TK.dim() != 2:
        raise ValueError(f"ids_TK: expected [T, K], got shape {tuple(ids_TK.shape)}")
    L = n_experts // ep
    valid_TK = ids_TK >= 0
    dest_TK = torch.where(valid_TK, ids_TK // L, ep)  # empty slots go to a dummy rank ep
    hit_TP = torch.zeros(ids_TK.shape[0], ep + 1, dtype=torch.bool)
    hit_TP.scatter_(1, dest_TK, True)
    return [int(n) for n in hit_TP[:, :ep].sum(dim=0)]


def dispatcher_bytes(
    send_P: list[int], recv_P: list[int], d_model: int, k: int, itemsize: int, n_local: int
) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends for one MoE layer, self-copy included;
    ``n_local`` experts per rank (L).

    Forward is exactly what ``AllToAllDispatcher.last_comm_stats.bytes_sent`` reports.
    """
    S, R, P = sum(send_P), sum(recv_P), len(send_P)
    row = d_model * itemsize
    fwd = S * (row + 8 * k) + R * row + 8 * P * (1 + n_local)
    bwd = R * (row + 4 * k) + S * row
    return fwd, bwd


def sample_routing(
    cfg: Config, lay: Layout, n_tokens: int = 8192, seed: int = 0, node_limit: int | None = None
) -> torch.Tensor:
    """Expert ids [T, K] of balanced routing: i.i.d. scores per (token, expert) -- what a bias
    that has equalised the load looks like to the dispatcher -- selected by the config's own rule
    (group-limited top-K; group score = sum of the top 2, as the router with its bias), then, with
    node-limited routing M, only experts on the M nodes with the highest sum of their top K/M."""
    e = cfg.moe
    E, K = e.n_routed_experts, e.n_expert_per_token
    g = torch.Generator().manual_seed(seed)
    s_TE = torch.rand(n_tokens, E, generator=g)
    if e.n_group > 1:
        s_TGe = s_TE.view(n_tokens, e.n_group, -1)
        top = min(2, s_TGe.shape[-1])
        group_TG = s_TGe.topk(top, dim=-1).values.sum(-1)
        keep_TG = group_TG.topk(e.topk_group, dim=-1).indices
        drop_TG = torch.ones_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
        s_TE = s_TGe.masked_fill(drop_TG[..., None], float("-inf")).view(n_tokens, E)
    M = lay.node_limit if node_limit is None else node_limit
    nodes = lay.ep_nodes
    if M and nodes > M:
        per = max(1, K // M)
        s_TNe = s_TE.view(n_tokens, nodes, -1)
        node_TN = s_TNe.topk(per, dim=-1).values.clamp_min(-1e9).sum(-1)
        keep_TN = node_TN.topk(M, dim=-1).indices
        drop_TN = torch.ones_like(node_TN, dtype=torch.bool).scatter_(1, keep_TN, False)
        s_TE = s_TNe.masked_fill(drop_TN[..., None], float("-inf")).view(n_tokens, E)
    return s_TE.topk(K, dim=-1).indices


def balanced_rows_per_token(
    cfg: Config, lay: Layout, node_limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expected, per token, under ``sample_routing``: slots landing on each EP rank [P], rows
    sent to each EP rank with per-rank dedup [P], and rows to each node with per-node dedup.
    Cached by what the routing depends on (a layout search asks for the same one often)."""
    e = cfg.moe
    M = lay.node_limit if node_limit is None else node_limit
    key = (e.n_routed_experts, e.n_expert_per_token, e.n_group, e.topk_group, lay.ep,
           lay.gpus_per_node, M)  # fmt: skip
    if key not in _ROWS:
        _ROWS[key] = _balanced_rows(cfg, lay, node_limit)
    return _ROWS[key]


_ROWS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _balanced_rows(
    cfg: Config, lay: Layout, node_limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    P = lay.ep
    L = cfg.moe.n_routed_experts // P
    ids_TK = sample_routing(cfg, lay, node_limit=node_limit)
    T = ids_TK.shape[0]
    rank_TK = ids_TK // L
    slots_P = torch.bincount(rank_TK.flatten(), minlength=P).double() / T
    rows_P = torch.zeros(T, P, dtype=torch.bool).scatter_(1, rank_TK, True).double().mean(0)
    node_TK = rank_TK // lay.gpus_per_node
    n_nodes = -(-P // lay.gpus_per_node)
    nodes_N = torch.zeros(T, n_nodes, dtype=torch.bool).scatter_(1, node_TK, True)
    return slots_P, rows_P, nodes_N.double().mean(0)


@dataclass(frozen=True)
class A2ATraffic:
    """Bytes one rank sends in all-to-alls per optimizer step, split by link.

    ``self_bytes`` is the dispatcher's copy to itself (counted by it, not on any wire).
    """

    scheme: str
    self_bytes: float
    intra_bytes: float  # NVLink
    inter_bytes: float  # InfiniBand

    @property
    def total(self) -> float:
        return self.self_bytes + self.intra_bytes + self.inter_bytes


def _layer_passes(cfg: Config, lay: Layout) -> tuple[int, float]:
    """(MoE layers incl. MTP, forward passes per step counting the recompute)."""
    m = cfg.model
    n_moe = m.n_layers - m.n_dense_layers
    n_moe += m.mtp_depth if n_moe else 0
    return n_moe, 2.0 if lay.activation_checkpointing else 1.0


def balanced_a2a(cfg: Config, lay: Layout, node_limit: int | None = None) -> list[A2ATraffic]:
    """Expected all-to-all bytes per rank per step under balanced routing (``sample_routing``),
    forward (+ recompute) and backward, for three schemes: every slot its own row ('no dedup'),
    one row per (token, rank) ('rank dedup', deepsuite's dispatcher), and one row per (token,
    node) over InfiniBand forwarded inside the node ('node dedup', DeepSeek-V3's kernels; the
    forwarding is counted as NVLink rows, an upper bound)."""
    if lay.ep == 1:
        return [A2ATraffic(s, 0.0, 0.0, 0.0) for s in ("no dedup", "rank dedup", "node dedup")]
    e, P, gpn = cfg.moe, lay.ep, lay.gpus_per_node
    K = e.n_expert_per_token
    slots_P, rows_P, nodes_N = balanced_rows_per_token(cfg, lay, node_limit)
    node_of = torch.arange(P) // gpn
    n_nodes = nodes_N.numel()
    item = lay.param_bytes
    row = cfg.model.dim * item
    fwd_row = 2 * row + 8 * K  # dispatch + combine of one row
    bwd_row = 2 * row + 4 * K
    n_moe, passes = _layer_passes(cfg, lay)
    scale = lay.micro_batch * lay.seq_len * lay.grad_accum * n_moe
    per_row = (passes * fwd_row + bwd_row) * scale
    out = []
    for scheme, per_dest in (("no dedup", slots_P), ("rank dedup", rows_P)):
        self_b = intra = inter = 0.0
        for src in range(P):  # average over source ranks (routing does not depend on them)
            for dst in range(P):
                b = float(per_dest[dst]) * per_row / P
                if dst == src:
                    self_b += b
                elif node_of[dst] == node_of[src]:
                    intra += b
                else:
                    inter += b
        out.append(A2ATraffic(scheme, self_b, intra, inter))
    # node dedup: one IB row per remote node; rank rows to remote ranks forwarded on NVLink
    rank_dedup = out[1]
    inter_rows = sum(
        float(nodes_N[n]) for src in range(P) for n in range(n_nodes) if n != node_of[src]
    )
    inter_nd = inter_rows / P * per_row
    out.append(
        A2ATraffic(
            "node dedup",
            rank_dedup.self_bytes,
            rank_dedup.intra_bytes + rank_dedup.inter_bytes,
            inter_nd,
        )
    )
    return out


@dataclass(frozen=True)
class ReduceTraffic:
    """Bytes one rank sends per step to reduce gradients (and all-gather ZeRO partitions)."""

    dense_bytes: float
    expert_bytes: float
    dense_inter: bool  # the dense group spans nodes (InfiniBand bound)
    expert_inter: bool


def reduce_traffic(dense_params: int, local_expert_params: int, lay: Layout) -> ReduceTraffic:
    """Ring collectives over n ranks send (n-1)/n of the buffer per reduce-scatter or
    all-gather (an all-reduce is both). Dense tensors go over all W ranks, expert ones over the
    EDP group. Per optimizer step, as DeepSpeed 0.19 schedules them:

    - ZeRO 0: one all-reduce of the gradients;
    - ZeRO 1: one reduce-scatter of the gradients and one all-gather of the updated partitions;
    - ZeRO 2: a reduce-scatter per micro-batch (gradients are partitioned as they are made),
      one all-gather per step;
    - ZeRO 3: per micro-batch, an all-gather of every parameter for forward, again for backward
      (and for the recompute with activation checkpointing), and a reduce-scatter.
    """
    item = lay.param_bytes
    accum = lay.grad_accum
    if lay.zero_stage <= 1:
        passes = 2.0
    elif lay.zero_stage == 2:
        passes = accum + 1.0
    else:
        passes = accum * (3.0 + (1.0 if lay.activation_checkpointing else 0.0))

    def ring(n: int, numel: int) -> float:
        return 0.0 if n == 1 else passes * (n - 1) / n * numel * item

    W, edp, gpn = lay.world, lay.edp, lay.gpus_per_node
    return ReduceTraffic(
        dense_bytes=ring(W, dense_params),
        expert_bytes=ring(edp, local_expert_params),
        dense_inter=gpn < W,
        expert_inter=edp > 1 and gpn < W and (lay.ep >= gpn or edp > gpn // lay.ep),
    )
