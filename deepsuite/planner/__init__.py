"""Capacity planner: per-GPU parameters, memory, FLOPs, all-to-all bytes and step time of a config
on a cluster, checked against real engine runs at small scale (tests/test_planner*.py)."""

from deepsuite.planner.comm import (
    A2ATraffic,
    ReduceTraffic,
    balanced_a2a,
    balanced_rows_per_token,
    dispatcher_bytes,
    reduce_traffic,
    rows_from_routing,
    sample_routing,
)
from deepsuite.planner.layout import HARDWARE, Hardware, Layout, ZeroSettings, validate_layout
from deepsuite.planner.memory import (
    ActivationEstimate,
    ModelStates,
    activation_bytes,
    kv_cache_bytes,
    model_state_bytes,
    param_table,
    params_on_rank,
    zero3_partition,
    zero_grad_buffer,
    zero_param_groups,
)
from deepsuite.planner.params import ParamBreakdown, param_breakdown
from deepsuite.planner.plan import Plan, forward_flops_per_token, make_plan, suggestions
from deepsuite.planner.report import SHIPPED, format_plan, plan_main
from deepsuite.planner.search import NodeSearch, min_nodes

__all__ = [
    "HARDWARE",
    "SHIPPED",
    "A2ATraffic",
    "ActivationEstimate",
    "Hardware",
    "Layout",
    "ModelStates",
    "NodeSearch",
    "ParamBreakdown",
    "Plan",
    "ReduceTraffic",
    "ZeroSettings",
    "activation_bytes",
    "balanced_a2a",
    "balanced_rows_per_token",
    "dispatcher_bytes",
    "format_plan",
    "forward_flops_per_token",
    "kv_cache_bytes",
    "make_plan",
    "min_nodes",
    "model_state_bytes",
    "param_breakdown",
    "param_table",
    "params_on_rank",
    "plan_main",
    "reduce_traffic",
    "rows_from_routing",
    "sample_routing",
    "suggestions",
    "validate_layout",
    "zero3_partition",
    "zero_grad_buffer",
    "zero_param_groups",
]
