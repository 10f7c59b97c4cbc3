"""Expert parallelism applied from outside the model: shard experts, swap the dispatcher, and make
the DeepSpeed engine treat the shards as MoE parameters.

Letters: E global routed experts, L = E / ep local experts, F expert hidden, D model dim.

Per DeepSeekMoE layer on EP rank r: ``moe.experts`` becomes an ``ExpertShard`` holding a
GroupedExperts with experts [r*L, (r+1)*L) of the (identically initialised) full set, and
``moe.dispatcher`` an AllToAllDispatcher over the EP group. How shards are placed, named and
tagged for DeepSpeed is :mod:`deepsuite.distributed.expert_shard`; this module applies it, groups
the optimizer's parameters, keeps the balancing bias identical on every rank, and gathers the
shards back into one state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepsuite.config import validate_expert_parallel
from deepsuite.distributed.comm import all_gather_flat
from deepsuite.distributed.dispatch import AllToAllDispatcher
from deepsuite.distributed.expert_shard import (
    EXPERT_WEIGHTS,
    ExpertShard,
    local_experts,
    shard_experts,
    tag_expert_parameters,
)
from deepsuite.distributed.groups import ExpertParallelGroups, check_same_config
from deepsuite.layers.moe import DeepSeekMoE, split_gate_up

__all__ = [
    "ExpertShard",
    "apply_expert_parallel",
    "full_state_dict",
    "moe_layers",
    "moe_param_groups",
    "sync_and_update_bias",
    "tag_expert_parameters",
    "verify_bias_identical",
]


def moe_layers(model: nn.Module) -> list[tuple[str, DeepSeekMoE]]:
    """Every DeepSeekMoE in ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeepSeekMoE)]


def _fingerprint(w: Tensor) -> list[float]:
    w64 = w.detach().double().flatten()
    ramp = torch.linspace(1.0, 2.0, w64.numel(), dtype=torch.float64, device=w64.device)
    return [float(w64.sum()), float((w64 * ramp).sum())]


def apply_expert_parallel(
    model: nn.Module,
    groups: ExpertParallelGroups,
    *,
    zero_stage: int = 0,
    check_replicated: bool = True,
    sync_timing: bool = False,
) -> list[str]:
    """Shard every DeepSeekMoE's routed experts over the EP group, in place.

    Every rank must have built the model identically (same seed); with ``check_replicated`` a
    fingerprint of the full expert weights is compared over the world first (one all-gather) and
    a mismatch raises on every rank. The shards follow the convention of
    :mod:`deepsuite.distributed.expert_shard` (placement, names, DeepSpeed tags). ``zero_stage``
    is the stage the engine will run: under 3 the shards are the plain form whose parameters
    ZeRO 3 partitions over the expert-data-parallel group, under 0-2 DeepSpeed MoE modules.

    Returns:
        The names of the converted layers.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {zero_stage!r}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model: expected at least one DeepSeekMoE layer to shard")
    for name, moe in layers:
        if isinstance(moe.experts, ExpertShard):
            raise ValueError(f"{name}: expert parallelism is already applied")
        validate_expert_parallel(moe.n_routed_experts, dist.get_world_size(), groups.ep_size)
    if check_replicated:
        prints = {
            n: [_fingerprint(getattr(m.experts, w)) for w in EXPERT_WEIGHTS] for n, m in layers
        }
        try:
            check_same_config(prints)
        except ValueError as err:
            raise ValueError(
                "model: expert weights differ between ranks before sharding; build the model "
                f"with the same seed on every rank ({err})"
            ) from err
    for _name, moe in layers:
        moe.experts = shard_experts(
            moe.experts,
            groups.ep_size,
            groups.ep_rank,
            edp_group=groups.edp_group if zero_stage == 3 else None,
        )
        moe.dispatcher = AllToAllDispatcher(
            moe.n_routed_experts, groups.ep_group, sync_timing=sync_timing
        )
    return [n for n, _ in layers]


def _default_no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name or name.endswith(".bias")


def moe_param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Callable[[str, nn.Parameter], bool] = _default_no_decay,
) -> list[dict[str, Any]]:
    """Optimizer param groups: decay / no-decay, each split into dense and per-EP-group expert
    groups by DeepSpeed (``moe: True`` groups that ZeRO reduces over the expert-data-parallel
    group). Pass the result as ``model_parameters`` / to the torch optimizer.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    base = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": plain, "weight_decay": 0.0},
    ]
    split = split_params_into_different_moe_groups_for_optimizer([g for g in base if g["params"]])
    return [g for g in split if g["params"]]


@torch.no_grad()
def sync_and_update_bias(
    model: nn.Module, gamma: float | None = None, group: dist.ProcessGroup | None = None
) -> dict[str, Tensor]:
    """Sum every MoE layer's accumulated ``tokens_per_expert`` over the world in ONE all-reduce
    and apply ``update_bias`` with the global counts on every rank (once per optimizer step).

    Every rank routes its own tokens, so the world sum is the global batch's count (DP x EP).
    Returns the global counts per layer name (int64 [E]).
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    flat = torch.cat([m.tokens_per_expert.to(torch.int64) for _, m in layers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out = {}
    for (name, moe), counts in zip(
        layers, flat.split([m.n_routed_experts for _, m in layers]), strict=True
    ):
        moe.update_bias(counts, gamma)
        out[name] = counts
    return out


@torch.no_grad()
def verify_bias_identical(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """All-gather every layer's balancing bias (one collective) and raise on every rank unless
    all ranks hold bit-identical values; the message names the first layer and the ranks."""
    layers = [(n, m) for n, m in moe_layers(model) if m.router.expert_bias is not None]
    if not layers:
        return
    flat = torch.cat([m.router.expert_bias.float().view(torch.int32) for _, m in layers])
    world = dist.get_world_size(group)
    gathered = flat.new_empty(world * flat.numel())
    all_gather_flat(gathered, flat, group=group)
    rows = gathered.view(world, -1)
    start = 0
    for name, moe in layers:
        stop = start + moe.n_routed_experts
        bad = [r for r in range(world) if not torch.equal(rows[r, start:stop], rows[0, start:stop])]
        if bad:
            raise RuntimeError(
                f"{name}.router.expert_bias differs from rank 0 on ranks {bad} (seen on rank "
                f"{dist.get_rank()}): update it only through sync_and_update_bias"
            )
        start = stop


def _whole(t: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A copy of ``t`` at full size on ``device``: a ZeRO-3 parameter is gathered from its
    partitions (a collective over its partition group); anything else is copied as held."""
    from deepspeed.runtime.zero import GatheredParameters  # a no-op for non-ZeRO-3 tensors

    with GatheredParameters([t]):
        return t.detach().to(device, copy=True)


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded model's state dict on every rank, on the CPU: expert shards all-gathered over
    each layer's EP group into the stacked ``<layer>.experts.<weight>`` [E, ...] of one process.

    ZeRO stages 0-2 keep full parameters on every rank, so only the expert shards need a
    collective; under ZeRO 3 every parameter is first all-gathered from its partitions
    (DeepSpeed's ``GatheredParameters``, one parameter at a time, so at most one full tensor
    beyond the rank's partition is alive): dense ones over the world, each rank's experts over
    their expert-data-parallel group. Collective: call on every rank.
    """
    layers = moe_layers(model)
    sharded = tuple(f"{name}.experts." for name, _ in layers)
    state = {
        k: _whole(v)
        for k, v in model.state_dict(keep_vars=True).items()
        if not k.startswith(sharded)
    }
    for name, moe in layers:
        experts = moe.experts
        for w, param in local_experts(experts).named_parameters():
            if isinstance(experts, ExpertShard):
                local = _whole(param, param.device)  # the EP all-gather runs on the device
                group = moe.dispatcher.group
                size = dist.get_world_size(group)
                full = local.new_empty((size * local.shape[0], *local.shape[1:]))
                dist.all_gather_into_tensor(full, local, group=group)
            else:
                full = _whole(param)
            state[f"{name}.experts.{w}"] = full.cpu()
    return split_gate_up(state)  # the seed's names (gate_proj, up_proj), as state_dict gives
