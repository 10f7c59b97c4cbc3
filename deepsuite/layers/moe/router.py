"""DeepSeek-V3 router (gate): float32 scores, group-limited top-k, bias for selection only.

Letters: T tokens, D model dim, E routed experts, G expert groups, K top-k slots.
Ties in every ranking go to the lower index (stable sort), so routing is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .options import RoutingOptions, split_options


class RouterOutput(NamedTuple):
    """What the router returns for T tokens.

    logits_TE: float32 raw ``x W^T`` (returned by the layer as ``router_logits``).
    scores_TE: float32 unbiased sigmoid/softmax scores.
    ids_TK: int64 expert ids in slot order; -1 marks an empty slot (top-p mode only).
    weights_TK: float32 gate weights from the UNBIASED scores, normalised (if enabled) and
        times route_scale; 0 in empty slots.
    counts_E: int64 tokens routed to each expert by this call (empty slots excluded).
    """

    logits_TE: Tensor
    scores_TE: Tensor
    ids_TK: Tensor
    weights_TK: Tensor
    counts_E: Tensor


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def count_ids(ids: Tensor, n: int) -> Tensor:
    """int64 [n]: how often each id in [0, n) occurs in ``ids``; negative ids (empty slots) are
    not counted. A scatter-add into n + 1 fixed bins: unlike ``bincount`` or boolean-mask
    indexing, its output size does not depend on the data, so a GPU never waits for the host."""
    flat = torch.where(ids < 0, n, ids).reshape(-1)
    bins = torch.zeros(n + 1, dtype=torch.int64, device=ids.device)
    return bins.scatter_add_(0, flat, torch.ones_like(flat))[:n]


def _sort_desc(x: Tensor) -> tuple[Tensor, Tensor]:
    """Descending sort along the last dim; equal values keep index order (lower index first)."""
    return torch.sort(x, dim=-1, descending=True, stable=True)


class Router(nn.Module):
    """Scores every token against every routed expert and picks its experts.

    Args:
        d_model: token width D.
        n_experts: routed experts E.
        top_k: default slots per token K (overridable per call with ``k``; k_max in top-p mode).
        routing: the :class:`~deepsuite.layers.moe.options.RoutingOptions` (groups, score
            function, scale, normalisation, top-p, bias); ``**options`` replaces single fields
            (``Router(d, E, K, n_group=4, topk_group=2)``).

    Attributes:
        weight: Parameter [E, D].
        expert_bias: float32 buffer [E], persistent; updated outside forward by the balancer.
        routing, and its fields as attributes (n_group, topk_group, score_func, route_scale,
        norm_topk_prob, top_p, use_bias).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        routing: RoutingOptions | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        _check_int("d_model", d_model, 1)
        routing, _ = split_options(options, routing)
        if set(options) - {f.name for f in fields(RoutingOptions)}:
            raise TypeError(f"Router takes routing options only, got {sorted(options)}")
        self.max_k = routing.check_experts(n_experts, top_k)  # experts reachable in kept groups
        self.routing = routing
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.n_group = routing.n_group
        self.topk_group = routing.topk_group
        self.score_func = routing.score_func
        self.route_scale = float(routing.route_scale)
        self.norm_topk_prob = routing.norm_topk_prob
        self.top_p = routing.top_p or None  # None: off
        self.use_bias = routing.use_expert_bias
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.d_model))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Keep ``expert_bias`` float32 through ``.to(bf16)`` / ``.half()`` (values untouched)."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def _check_k(self, k: object, name: str = "k") -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"{name} must be an int, got {type(k).__name__}")
        if not 1 <= k <= self.max_k:
            raise ValueError(
                f"{name} must be in [1, {self.max_k}] (n_routed_experts={self.n_experts}, "
                f"reachable in topk_group={self.topk_group} of n_group={self.n_group} groups), "
                f"got {k}"
            )
        return k

    def forward(self, x_TD: Tensor, k: int | None = None) -> RouterOutput:
        """Route T tokens. x_TD: [T, D] floating; k: slots per token (default top_k)."""
        if not isinstance(x_TD, Tensor) or x_TD.dim() != 2 or x_TD.shape[1] != self.d_model:
            shape = tuple(x_TD.shape) if isinstance(x_TD, Tensor) else type(x_TD).__name__
            raise ValueError(f"x_TD must be [T, {self.d_model}], got {shape}")
        if not x_TD.is_floating_point():
            raise TypeError(f"x_TD must be a floating tensor, got {x_TD.dtype}")
        k = self._check_k(self.top_k if k is None else k)

        # float32 even under autocast (which would otherwise run this linear in bf16/fp16)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.score_func == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)

        with torch.no_grad():  # selection is discrete: no gradient flows through it
            sel_TE = scores_TE + self.expert_bias if self.use_bias else scores_TE
            if self.n_group > 1:
                sel_TE = self._limit_groups(sel_TE)
            ids_TK = _sort_desc(sel_TE)[1][:, :k]
        weights_TK = scores_TE.gather(1, ids_TK)  # unbiased scores: the bias never enters here

        if self.top_p is not None:
            ids_TK, weights_TK = self._top_p(ids_TK, weights_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.route_scale

        return RouterOutput(
            logits_TE, scores_TE, ids_TK, weights_TK, count_ids(ids_TK, self.n_experts)
        )

    def _limit_groups(self, sel_TE: Tensor) -> Tensor:
        """Set the experts of all but the best topk_group groups to -inf (never 0)."""
        T = sel_TE.shape[0]
        sel_TGe = sel_TE.view(T, self.n_group, -1)
        if self.use_bias and sel_TGe.shape[-1] >= 2:
            group_TG = _sort_desc(sel_TGe)[0][..., :2].sum(dim=-1)
        else:
            group_TG = sel_TGe.amax(dim=-1)
        keep_TG = _sort_desc(group_TG)[1][:, : self.topk_group]
        drop_TG = torch.ones_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
        return sel_TGe.masked_fill(drop_TG.unsqueeze(-1), float("-inf")).view(T, -1)

    def _top_p(self, ids_TK: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the fewest candidates (by unbiased score) whose normalised scores reach top_p."""
        with torch.no_grad():
            order_TK = _sort_desc(weights_TK)[1]
        ids_TK = ids_TK.gather(1, order_TK)
        weights_TK = weights_TK.gather(1, order_TK)
        with torch.no_grad():
            p_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
            before_TK = p_TK.cumsum(dim=-1) - p_TK  # mass of the better candidates
            keep_TK = before_TK < self.top_p - 1e-6  # first slot always kept
            keep_TK[:, 0] = True
        ids_TK = ids_TK.masked_fill(~keep_TK, -1)
        weights_TK = weights_TK.masked_fill(~keep_TK, 0.0)
        return ids_TK, weights_TK

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, "
            f"n_group={self.n_group}, topk_group={self.topk_group}, "
            f"score_func={self.score_func}, route_scale={self.route_scale}, top_p={self.top_p}"
        )
