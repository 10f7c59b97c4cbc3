"""The options of a DeepSeekMoE layer that are not sizes, each defined and validated here once.

:class:`RoutingOptions` says how the router picks a token's experts, :class:`BalanceOptions` how
expert load is balanced. ``Router`` and ``DeepSeekMoE`` take them (or the same names as keyword
arguments); the config's ``moe`` section (``deepsuite.config.MoEConfig``) inherits both, so a YAML
key, a constructor argument and an attribute share one name, one default and one check.

Every error names the field (``where`` prefixes it, e.g. "moe.") and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "SCORE_FUNCS",
    "BalanceOptions",
    "RoutingOptions",
    "balance_of",
    "routing_of",
    "split_options",
]

SCORE_FUNCS = ("sigmoid", "softmax")


def _int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{key}: expected an int >= {low}, got {value}")


def _non_negative(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{key}: expected a float >= 0, got {value!r}")


@dataclass
class RoutingOptions:
    """How a token picks its experts (the DeepSeek-V3 gate; docs/formulas.md, "Routing").

    n_group: expert groups G (the experts must split into G equal groups); 1 = no group limit.
    topk_group: groups kept per token (<= G).
    score_func: "sigmoid" (V3) or "softmax" (V2).
    route_scale: multiplier on the gate weights.
    norm_topk_prob: divide the selected weights by their sum.
    top_p: 0 (or None) = off; else each token keeps the fewest of its k candidates whose
        normalised scores reach top_p (unused slots get id -1 and weight 0).
    use_expert_bias: add the balancing bias to the selection scores (V3). False gives V2 routing:
        no bias, and a group scores its best expert instead of its best two.
    """

    n_group: int = 1
    topk_group: int = 1
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    top_p: float | None = 0.0
    use_expert_bias: bool = True

    def __post_init__(self) -> None:
        if self.top_p is None:
            self.top_p = 0.0  # one spelling of "off"
        self.check_routing()

    def check_routing(self, where: str = "") -> None:
        """Raise TypeError / ValueError naming the first option out of range."""
        _int(f"{where}n_group", self.n_group, 1)
        _int(f"{where}topk_group", self.topk_group, 1)
        if self.topk_group > self.n_group:
            raise ValueError(
                f"{where}topk_group: expected at most {where}n_group ({self.n_group}), "
                f"got {self.topk_group}"
            )
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(
                f"{where}score_func: expected one of {list(SCORE_FUNCS)}, got {self.score_func!r}"
            )
        r = self.route_scale
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"{where}route_scale: expected a positive finite float, got {r!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ValueError(f"{where}top_p: expected 0 (off) or a value in (0, 1], got {p!r}")

    def check_experts(self, n_experts: int, top_k: int, where: str = "") -> int:
        """Check the options against E routed experts and K slots per token; returns the most
        experts a token can reach (those of its topk_group groups)."""
        _int(f"{where}n_routed_experts", n_experts, 1)
        _int(f"{where}n_expert_per_token", top_k, 1)
        if n_experts % self.n_group:
            raise ValueError(
                f"{where}n_group: expected a divisor of {where}n_routed_experts ({n_experts}), "
                f"got {self.n_group} (the experts are not divisible by n_group into equal groups)"
            )
        reachable = self.topk_group * (n_experts // self.n_group)
        if top_k > reachable:
            raise ValueError(
                f"{where}n_expert_per_token: expected at most the {reachable} experts reachable in "
                f"topk_group={self.topk_group} of n_group={self.n_group} groups of "
                f"n_routed_experts={n_experts}, got {top_k}"
            )
        return reachable


@dataclass
class BalanceOptions:
    """How expert load is balanced (docs/formulas.md, "Balancing").

    bias_update_speed: gamma of the loss-free bias update b += gamma * sign(mean(c) - c), applied
        once per optimizer step outside ``forward`` (V3: 0.001; short runs need more, e.g. 0.01).
    bias_recenter: subtract the bias's mean after each update.
    seq_aux_alpha: weight of the complementary sequence-wise balance loss (V3: 1e-4); 0 = off.
    aux_loss_alpha: weight of the classic batch-wide balance loss, for comparison; 0 = off.
    """

    bias_update_speed: float = 0.001
    bias_recenter: bool = False
    seq_aux_alpha: float = 0.0
    aux_loss_alpha: float = 0.0

    def __post_init__(self) -> None:
        self.check_balance()

    def check_balance(self, where: str = "") -> None:
        """Raise ValueError naming the first option out of range."""
        for name in ("bias_update_speed", "seq_aux_alpha", "aux_loss_alpha"):
            _non_negative(f"{where}{name}", getattr(self, name))


def routing_of(obj: RoutingOptions) -> RoutingOptions:
    """The routing fields of ``obj`` (e.g. the config's moe section) as plain RoutingOptions."""
    return RoutingOptions(**{f.name: getattr(obj, f.name) for f in fields(RoutingOptions)})


def balance_of(obj: BalanceOptions) -> BalanceOptions:
    """The balancing fields of ``obj`` (e.g. the config's moe section) as plain BalanceOptions."""
    return BalanceOptions(**{f.name: getattr(obj, f.name) for f in fields(BalanceOptions)})


def split_options(
    options: dict[str, Any],
    routing: RoutingOptions | None = None,
    balance: BalanceOptions | None = None,
) -> tuple[RoutingOptions, BalanceOptions]:
    """Keyword arguments named like fields of the two classes -> the two option objects: ``routing``
    / ``balance`` (or the defaults) with those fields replaced. Unknown names raise TypeError."""
    r_names = {f.name for f in fields(RoutingOptions)}
    b_names = {f.name for f in fields(BalanceOptions)}
    unknown = sorted(set(options) - r_names - b_names)
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown}: expected fields of RoutingOptions "
            f"{sorted(r_names)} or BalanceOptions {sorted(b_names)}"
        )
    r = replace(
        routing_of(routing or RoutingOptions()),
        **{k: v for k, v in options.items() if k in r_names},
    )
    b = replace(
        balance_of(balance or BalanceOptions()),
        **{k: v for k, v in options.items() if k in b_names},
    )
    return r, b
