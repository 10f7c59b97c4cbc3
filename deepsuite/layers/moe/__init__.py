"""DeepSeekMoE: router, dispatcher, grouped experts, balancing (pure, single device)."""

from .balance import (
    GammaSchedule,
    aux_balance_loss,
    max_vio,
    routing_entropy,
    sequence_balance_loss,
    sign_rule_update_,
)
from .dispatch import Dispatcher, ExpertRows, LocalDispatcher, LocalState, dispatch_reference
from .experts import GroupedExperts
from .gate_up import fuse_gate_up, split_gate_up, unfused_names
from .layer import DeepSeekMoE, RoutingStats
from .options import BalanceOptions, RoutingOptions
from .router import Router, RouterOutput

__all__ = [
    "BalanceOptions",
    "DeepSeekMoE",
    "Dispatcher",
    "ExpertRows",
    "GammaSchedule",
    "GroupedExperts",
    "LocalDispatcher",
    "LocalState",
    "Router",
    "RouterOutput",
    "RoutingOptions",
    "RoutingStats",
    "aux_balance_loss",
    "dispatch_reference",
    "fuse_gate_up",
    "max_vio",
    "routing_entropy",
    "sequence_balance_loss",
    "sign_rule_update_",
    "split_gate_up",
    "unfused_names",
]
