"""DeepSeekMoE: shared experts + routed experts, forward in four named phases.

Letters: B batch, S sequence, T = B*S tokens, D model dim, E routed experts, K slots per token,
N dispatched rows, F expert hidden. route -> dispatch -> compute -> combine, plus the always-on
shared experts. Balancing state lives here; the bias itself is updated by ``update_bias``,
called once per optimizer step from outside ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..mlp import SwiGLU
from .balance import (
    aux_balance_loss,
    max_vio,
    routing_entropy,
    sequence_balance_loss,
    sign_rule_update_,
)
from .dispatch import Dispatcher, LocalDispatcher
from .experts import GroupedExperts
from .options import BalanceOptions, RoutingOptions, split_options
from .router import Router, RouterOutput


def _in_backward() -> bool:
    """True while autograd's engine is running (e.g. a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


@torch.library.custom_op("deepsuite::outside_backward", mutates_args=())
def _outside_backward(like: Tensor) -> Tensor:
    """0-d int64 on ``like``'s device: 1 in a first forward, 0 while autograd recomputes it
    (activation checkpointing). An op, not a Python branch, so a compiled block decides at run
    time, also when a checkpoint wrapped around the compiled block replays it in backward."""
    return torch.full((), int(not _in_backward()), dtype=torch.int64, device=like.device)


@_outside_backward.register_fake
def _(like: Tensor) -> Tensor:
    return like.new_empty((), dtype=torch.int64)


def _dispatch_compute_combine(
    dispatcher: Dispatcher, experts: nn.Module, x_TD: Tensor, r: RouterOutput
) -> Tensor:
    rows, counts_L, state = dispatcher.dispatch(x_TD, r.ids_TK, r.weights_TK)
    # per source row, the gate-weighted sum of its experts' outputs (gather and weighting fused
    # into the experts), brought home by combine
    return dispatcher.combine(experts(rows, counts_L), state)


_EAGER: list[Callable[..., Tensor]] = []


def _dispatch_compute_combine_eager() -> Callable[..., Tensor]:
    """``_dispatch_compute_combine`` outside any compiled graph, for a dispatcher whose exchange
    is sized on the host (``traceable = False``: the all-to-all reads its split sizes): the ONE
    graph break per MoE layer under torch.compile with expert parallelism. Made on first use
    (``torch.compiler.disable`` imports torch._dynamo, seconds at start-up)."""
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_dispatch_compute_combine))
    return _EAGER[0]


@dataclass
class RoutingStats:
    """Per-forward routing statistics (detached; reading them as numbers is the caller's sync).

    counts_E: int64 [E] tokens per expert; max_vio: float32 scalar; experts_per_token: mean
    non-empty slots per token; entropy: mean score entropy (nats); seq_aux_loss / aux_loss:
    detached loss values, or None when disabled; n_tokens: T.
    """

    counts_E: Tensor
    max_vio: Tensor
    experts_per_token: Tensor
    entropy: Tensor
    n_tokens: int
    seq_aux_loss: Tensor | None = None
    aux_loss: Tensor | None = None


class DeepSeekMoE(nn.Module):
    """DeepSeek-V3 MoE block with auxiliary-loss-free balancing.

    ``out, router_logits = moe(x)``: x (B, S, D) or (T, D) -> out (same shape and dtype as x),
    router_logits (T, E) float32. Sizes: routed experts of hidden ``expert_intermediate_size``;
    shared experts fused into one SwiGLU of hidden ``shared_intermediate_size`` (default
    n_shared * expert_intermediate_size). How tokens are routed is ``routing``
    (:class:`~deepsuite.layers.moe.options.RoutingOptions`: groups, sigmoid/softmax, scale,
    top-p, ``use_expert_bias=False`` for V2-style routing with no bias) and how load is balanced
    ``balance`` (:class:`~deepsuite.layers.moe.options.BalanceOptions`: the bias update speed,
    the default gamma of ``update_bias`` (V3: 0.001; short runs need more, e.g. 0.01), and the
    weights of the sequence-wise and classic balance losses, whose sum for the last forward is
    ``self.aux_loss``, None when both are 0). Any of their fields may also be given by name:
    ``DeepSeekMoE(256, 1, 16, 2, 128, n_group=4, topk_group=2, bias_update_speed=0.01)``.
    """

    def __init__(
        self,
        d_model: int,
        n_shared_experts: int = 1,
        n_routed_experts: int = 64,
        n_expert_per_token: int = 6,
        expert_intermediate_size: int = 1408,
        *,
        shared_intermediate_size: int | None = None,
        routing: RoutingOptions | None = None,
        balance: BalanceOptions | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if isinstance(n_shared_experts, bool) or not isinstance(n_shared_experts, int):
            raise TypeError(
                f"n_shared_experts must be an int, got {type(n_shared_experts).__name__}"
            )
        if n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {n_shared_experts}")
        routing, balance = split_options(options, routing, balance)
        self.router = Router(d_model, n_routed_experts, n_expert_per_token, routing)
        self.experts = GroupedExperts(n_routed_experts, d_model, expert_intermediate_size)
        if shared_intermediate_size is None:
            shared_intermediate_size = n_shared_experts * expert_intermediate_size
        self.shared_experts = (
            SwiGLU(d_model, shared_intermediate_size) if n_shared_experts > 0 else None
        )
        # without top-p every slot holds an expert: N = T*K, the dispatch reads nothing
        self.dispatcher: Dispatcher = LocalDispatcher(
            n_routed_experts, empty_slots=self.router.top_p is not None
        )
        self.d_model = d_model
        self.n_routed_experts = n_routed_experts
        self.n_expert_per_token = n_expert_per_token
        self.balance = balance
        self.seq_aux_alpha = float(balance.seq_aux_alpha)
        self.aux_loss_alpha = float(balance.aux_loss_alpha)
        self.bias_update_speed = float(balance.bias_update_speed)
        self.bias_recenter = balance.bias_recenter
        self.register_buffer(
            "tokens_per_expert", torch.zeros(n_routed_experts, dtype=torch.int64), persistent=False
        )
        self.last_stats: RoutingStats | None = None
        self.aux_loss: Tensor | None = None

    def _flatten(self, x: Tensor) -> tuple[Tensor, int]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be (B, S, {self.d_model}) or (T, {self.d_model}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        n_seq = x.shape[0] if x.dim() == 3 else 1
        return x.reshape(-1, self.d_model), n_seq

    def forward(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """x (B, S, D) or (T, D); k slots per token (default n_expert_per_token; k_max with top_p).

        -> (out same shape/dtype as x, router_logits (T, E) float32).
        """
        x_TD, n_seq = self._flatten(x)
        d = self.dispatcher
        if self.router.top_p is not None and not getattr(d, "empty_slots", True):
            raise ValueError(
                "router.top_p leaves slots empty: the dispatcher needs "
                "LocalDispatcher(n_experts, empty_slots=True)"
            )
        r = self.router(x_TD, k)  # route
        routed = (
            _dispatch_compute_combine
            if getattr(d, "traceable", True)
            else _dispatch_compute_combine_eager()
        )
        out_TD = routed(d, self.experts, x_TD, r)  # dispatch, compute, combine
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        self._record(r, n_seq)
        return out_TD.view(x.shape), r.logits_TE

    def forward_reference(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Per-expert loop oracle (no sort, no dispatcher): for each expert, find its tokens,
        run its SwiGLU and add weight * output. Does not touch balancing state."""
        x_TD, _ = self._flatten(x)
        r = self.router(x_TD, k)
        out = torch.zeros_like(x_TD, dtype=torch.float32)
        ex = self.experts
        for e in range(ex.n_experts):
            tok, slot = (r.ids_TK == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x_TD[tok]
            y = (
                torch.nn.functional.silu(h @ ex.gate_proj[e].T) * (h @ ex.up_proj[e].T)
            ) @ ex.down_proj[e].T
            out = out.index_add(0, tok, y.float() * r.weights_TK[tok, slot].unsqueeze(1))
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_TD)
        return out.view(x.shape), r.logits_TE

    def _record(self, r: RouterOutput, n_seq: int) -> None:
        """Accumulate counts (training only) and compute stats / enabled losses.

        Under activation checkpointing the forward runs again inside backward: the losses are
        recomputed (checkpointing needs the same saved tensors) but the state is left alone, so
        a token is counted once and ``last_stats`` / ``aux_loss`` stay the first pass's. Nothing
        here is read on the host: the statistics stay device tensors until someone logs them.
        Compiled, the counts still skip a replay (``_outside_backward`` decides on the device,
        whichever of checkpointing and compilation wraps the other); the attributes are set once
        when compilation wraps the checkpoint (dynamo's
        ``skip_fwd_side_effects_in_bwd_under_checkpoint``, set by ``apply_compile``), and set
        again to the same values when a checkpoint replays a compiled block.
        """
        counts_E = r.counts_E.detach()
        if self.training:
            self.tokens_per_expert.add_(
                counts_E.to(self.tokens_per_expert.device) * _outside_backward(counts_E)
            )
        recompute = not torch.compiler.is_compiling() and _in_backward()
        T = r.ids_TK.shape[0]
        losses: list[Tensor] = []
        seq = aux = None
        if self.seq_aux_alpha > 0:
            E = r.scores_TE.shape[1]
            seq = sequence_balance_loss(
                r.scores_TE.view(n_seq, -1, E),
                r.ids_TK.view(n_seq, -1, r.ids_TK.shape[1]),
                self.seq_aux_alpha,
            )
            losses.append(seq)
        if self.aux_loss_alpha > 0:
            aux = aux_balance_loss(r.scores_TE, r.ids_TK, self.aux_loss_alpha)
            losses.append(aux)
        if recompute:
            return
        self.aux_loss = sum(losses[1:], losses[0]) if losses else None
        self.last_stats = RoutingStats(
            counts_E=counts_E,
            max_vio=max_vio(counts_E),
            experts_per_token=(r.ids_TK >= 0).sum(dim=1).float().mean(),
            entropy=routing_entropy(r.scores_TE),
            n_tokens=T,
            seq_aux_loss=None if seq is None else seq.detach(),
            aux_loss=None if aux is None else aux.detach(),
        )

    @torch.no_grad()
    def update_bias(self, counts_E: Tensor | None = None, gamma: float | None = None) -> None:
        """In place: b += gamma * sign(mean(c) - c), then re-centre if enabled.

        counts_E defaults to ``tokens_per_expert`` (accumulated over micro-batches since the last
        update); the trainer passes the data-parallel all-reduced counts instead. gamma defaults
        to ``bias_update_speed``. Resets the accumulator either way.
        """
        c = self.tokens_per_expert if counts_E is None else counts_E
        g = self.bias_update_speed if gamma is None else gamma
        if g > 0:
            bias = self.router.expert_bias
            moved = sign_rule_update_(bias.clone(), c, g, self.bias_recenter)
            # no token routed: nothing moves (the re-centring would), decided on the device so
            # the update never waits for the counts
            bias.copy_(torch.where((c.sum() > 0).to(bias.device), moved, bias))
        self.tokens_per_expert.zero_()
