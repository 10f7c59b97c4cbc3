"""Expert parallelism applied from outside the model: shard experts, swap the dispatcher, and make
the DeepSpeed engine treat the shards as MoE parameters.

Letters: E global routed experts, L = E / ep local experts, F expert hidden, D model dim.

Per DeepSeekMoE layer on EP rank r: ``moe.experts`` becomes an ``ExpertShard`` holding a
GroupedExperts with experts [r*L, (r+1)*L) of the (identically initialised) full set, and
``moe.dispatcher`` an AllToAllDispatcher over the EP group. ExpertShard subclasses DeepSpeed's
``MoE`` only as a marker (DeepSpeed switches on expert-data-parallel reduction, expert optimizer
groups and per-expert checkpoint files for instances of it); it never runs DeepSpeed's MoE code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import Tensor, nn

from deepsuite.config import validate_expert_parallel
from deepsuite.distributed.comm import all_gather_flat
from deepsuite.distributed.dispatch import AllToAllDispatcher
from deepsuite.distributed.groups import ExpertParallelGroups, check_same_config
from deepsuite.layers.moe import DeepSeekMoE, ExpertRows, GroupedExperts

__all__ = [
    "ExpertShard",
    "apply_expert_parallel",
    "moe_layers",
    "moe_param_groups",
    "sync_and_update_bias",
    "tag_expert_parameters",
    "verify_bias_identical",
]

# DeepSpeed finds per-expert checkpoint entries by this infix (engine._save_moe_checkpoint)
_DS_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class ExpertShard(_DeepSpeedMoE):
    """This rank's slice of a layer's routed experts, marked as a DeepSpeed MoE module.

    ``forward(x_ND, counts_L) -> y_ND`` is the wrapped GroupedExperts (``self.local``, L experts).
    Its state dict holds one entry per local expert,
    ``deepspeed_moe.experts.deepspeed_experts.<i>.{gate_proj,up_proj,down_proj}`` ([F, D] /
    [D, F]), so DeepSpeed writes one checkpoint file per GLOBAL expert from every EP rank;
    loading accepts the same keys and stacks them back.
    """

    def __init__(self, local: GroupedExperts, n_experts: int, ep_rank: int, group_name: str):
        nn.Module.__init__(self)  # the marker: none of DeepSpeed's MoE construction
        self.local = local
        self.num_experts = n_experts
        self.num_local_experts = local.n_experts
        self.ep_size = n_experts // local.n_experts
        self.ep_rank = ep_rank
        self.expert_group_name = group_name
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.register_state_dict_post_hook(_split_experts_hook)
        self.register_load_state_dict_pre_hook(_stack_experts_hook)

    def forward(self, x: Tensor | ExpertRows, counts_L: Tensor | Sequence[int]) -> Tensor:  # type: ignore[override]
        return self.local(x, counts_L)

    def set_deepspeed_parallelism(self, *args: Any, **kwargs: Any) -> None:
        """Called by the engine: the groups must already exist (``setup_expert_parallel``)."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(
                f"ExpertShard: process groups '{self.expert_group_name}' do not exist; call "
                f"setup_expert_parallel(ep={self.ep_size}, ...) before deepspeed.initialize"
            )

    # read-only views so code that inspects moe.experts keeps working
    @property
    def n_experts(self) -> int:
        return self.local.n_experts

    @property
    def gate_proj(self) -> nn.Parameter:
        return self.local.gate_proj

    @property
    def up_proj(self) -> nn.Parameter:
        return self.local.up_proj

    @property
    def down_proj(self) -> nn.Parameter:
        return self.local.down_proj

    def extra_repr(self) -> str:
        return (
            f"experts [{self.ep_rank * self.num_local_experts}, "
            f"{(self.ep_rank + 1) * self.num_local_experts}) of {self.num_experts}, "
            f"group={self.expert_group_name}"
        )


def _split_experts_hook(module: ExpertShard, state: dict, prefix: str, _meta: Any) -> None:
    for name in _WEIGHTS:
        key = f"{prefix}local.{name}"
        if key in state:
            w = state.pop(key)
            for i in range(w.shape[0]):
                state[f"{prefix}{_DS_PREFIX}{i}.{name}"] = w[i]


def _stack_experts_hook(module: ExpertShard, state: dict, prefix: str, *_: Any) -> None:
    for name in _WEIGHTS:
        keys = [f"{prefix}{_DS_PREFIX}{i}.{name}" for i in range(module.num_local_experts)]
        if all(k in state for k in keys):
            state[f"{prefix}local.{name}"] = torch.stack([state.pop(k) for k in keys])


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
    check_replicated: bool = True,
    sync_timing: bool = False,
) -> list[str]:
    """Shard every DeepSeekMoE's routed experts over the EP group, in place.

    Every rank must have built the model identically (same seed); with ``check_replicated`` a
    fingerprint of the full expert weights is compared over the world first (one all-gather) and
    a mismatch raises on every rank. Expert parameters are tagged ``allreduce=False`` and
    ``group_name=groups.group_name`` so DeepSpeed reduces their gradients over the
    expert-data-parallel group only.

    Returns:
        The names of the converted layers.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model: expected at least one DeepSeekMoE layer to shard")
    for name, moe in layers:
        if isinstance(moe.experts, ExpertShard):
            raise ValueError(f"{name}: expert parallelism is already applied")
        validate_expert_parallel(moe.n_routed_experts, dist.get_world_size(), groups.ep_size)
    if check_replicated:
        prints = {n: [_fingerprint(getattr(m.experts, w)) for w in _WEIGHTS] for n, m in layers}
        try:
            check_same_config(prints)
        except ValueError as err:
            raise ValueError(
                "model: expert weights differ between ranks before sharding; build the model "
                f"with the same seed on every rank ({err})"
            ) from err
    for _name, moe in layers:
        E = moe.n_routed_experts
        L = E // groups.ep_size
        lo = groups.ep_rank * L
        local = moe.experts.slice_experts(lo, lo + L)
        moe.experts = ExpertShard(local, E, groups.ep_rank, groups.group_name)
        moe.dispatcher = AllToAllDispatcher(E, groups.ep_group, sync_timing=sync_timing)
    tag_expert_parameters(model)
    return [n for n, _ in layers]


def tag_expert_parameters(model: nn.Module) -> int:
    """Mark every ExpertShard's parameters ``allreduce=False``, ``group_name=<its EP group>``.

    Call again after anything that replaces Parameter objects (``to_empty`` from the meta device
    does): untagged expert shards would be averaged over the whole world. Returns the count.
    """
    n = 0
    for _, moe in moe_layers(model):
        if isinstance(moe.experts, ExpertShard):
            for p in moe.experts.parameters():
                p.allreduce = False
                p.group_name = moe.experts.expert_group_name
                n += 1
    return n


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


def tag_summary(params: Iterable[nn.Parameter]) -> dict[str, int]:
    """Count parameters per DeepSpeed group name ('dense' for untagged) -- for logs and tests."""
    out: dict[str, int] = {}
    for p in params:
        key = (
            getattr(p, "group_name", "dense") if getattr(p, "allreduce", True) is False else "dense"
        )
        out[key] = out.get(key, 0) + p.numel()
    return out
