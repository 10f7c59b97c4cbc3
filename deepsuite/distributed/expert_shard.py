"""The sharded-expert convention, written once: where experts live, what they are called, how
DeepSpeed recognises them. Everything that shards, saves, reads, exports or checks experts asks
this module.

Letters: E global routed experts of a layer, L = E / ep local experts on one EP rank.

- Placement: EP rank r of an EP group of size ep holds the contiguous global experts
  [r*L, (r+1)*L) (:func:`expert_range`). The GroupedExperts holding them records its first global
  expert and E (``first_expert``, ``n_global_experts``).
- Modules: on such a rank a layer's ``experts`` is an :class:`ExpertShard` wrapping that
  GroupedExperts as ``local``; parameter names gain ``.local`` (``<layer>.experts.local.up_proj``,
  [L, ...]), the unsharded model's are ``<layer>.experts.up_proj`` ([E, ...]); :func:`full_name`
  maps the first to the second. Under ZeRO 0-2 the shard is a :class:`DeepSpeedMoEShard`, which
  subclasses DeepSpeed's ``MoE`` as the marker the engine looks for (expert-data-parallel
  reduction, expert optimizer groups, per-expert checkpoint files); DeepSpeed 0.19 refuses that
  class under ZeRO 3, where the shard is a plain :class:`ExpertShard`.
- State dict: a DeepSpeedMoEShard writes one entry per local expert,
  ``<layer>.experts.deepspeed_moe.experts.deepspeed_experts.<i>.<weight>`` with i in [0, L);
  DeepSpeed names each expert's checkpoint file by its GLOBAL id (``layer_<n>_expert_<e>_...``).
  A ZeRO-3 ExpertShard keeps its stacked ``local.<weight>`` keys (ZeRO 3 saves every parameter in
  per-rank partitions, and the placeholders it keeps in the module round-trip a strict load).
- Groups: DeepSpeed registers the EP x EDP process groups of size ep as ``ep_size_<ep>``
  (:func:`group_name`).
- Tags: every shard parameter carries ``allreduce=False`` and ``group_name``, which is how the
  engine reduces its gradient over the expert-data-parallel group only and ZeRO gives it its own
  optimizer group. Under ZeRO 3 it also carries ``ds_zero_partition_process_group`` (its
  expert-data-parallel group: ZeRO 3 partitions it there, the dense model over the world),
  ``ds_zero_partition_group_name`` and ``ds_zero_placement_family="autoep_expert"`` (without the
  family stage 3 averages expert gradients over the partition group, a wrong scale). The shard
  sets them itself (:meth:`ExpertShard.tag_parameters`), at construction and whenever its
  parameters are replaced (``to_empty`` off the meta device).

DeepSpeed 0.19 (pinned < 0.20) private behaviour relied on: ``engine._save_moe_checkpoint`` finds
expert entries by the ``deepspeed_moe.experts.deepspeed_experts.`` infix and the module by
``isinstance(m, deepspeed.moe.layer.MoE)``; ``groups._get_expert_parallel_group_dict`` holds the
groups by name. ZeRO 3 (runtime/zero/partition_parameters.py ``Init._convert_to_deepspeed_param``
partitions a parameter over ``ds_zero_partition_process_group``; runtime/zero/stage3.py
``_autoep_expert_parallel_group`` keys on the family ``autoep_expert`` and the group name to
average the gradients over the world and sum the grad norm over the expert-parallel group).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from deepsuite.config import validate_expert_parallel
from deepsuite.layers.moe import ExpertRows, GroupedExperts

__all__ = [
    "EXPERT_WEIGHTS",
    "DeepSpeedMoEShard",
    "ExpertShard",
    "expert_range",
    "expert_slices",
    "full_name",
    "group_name",
    "is_expert_name",
    "local_experts",
    "model_ep_size",
    "shard_experts",
    "split_deepspeed_key",
    "stack_expert_slices",
    "tag_expert_parameters",
]

# the names in state dicts and checkpoints (the seed's, Hugging Face's); the module itself holds
# gate and up as one parameter, gate_up_proj (layers/moe/gate_up.py: split_gate_up / fuse_gate_up)
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
DEEPSPEED_EXPERT_INFIX = "deepspeed_moe.experts.deepspeed_experts."
_EXPERT_NAME = re.compile(r"\.experts\.(local\.)?(gate_proj|up_proj|gate_up_proj|down_proj)$")
_DEEPSPEED_KEY = re.compile(
    r"^(.*\.experts)\."
    + re.escape(DEEPSPEED_EXPERT_INFIX)
    + r"(\d+)\.(gate_proj|up_proj|down_proj)$"
)


def group_name(ep: int) -> str:
    """DeepSpeed's name for the EP x EDP groups of size ``ep`` (what expert parameters carry)."""
    return f"ep_size_{ep}"


def expert_range(n_experts: int, ep: int, ep_rank: int) -> range:
    """The global experts EP rank ``ep_rank`` of ``ep`` holds: [ep_rank * L, (ep_rank + 1) * L)."""
    validate_expert_parallel(n_experts, None, ep)
    if not 0 <= ep_rank < ep:
        raise ValueError(f"ep_rank: expected a rank in [0, {ep}), got {ep_rank}")
    L = n_experts // ep
    return range(ep_rank * L, (ep_rank + 1) * L)


def stack_expert_slices(per_ep: dict[int, Tensor], ep: int) -> Tensor:
    """EP ranks 0..ep-1's local [L, ...] tensors of a layer's experts -> the global [E, ...]."""
    if sorted(per_ep) != list(range(ep)):
        raise ValueError(
            f"per_ep: expected the slices of EP ranks 0..{ep - 1}, got {sorted(per_ep)}"
        )
    return torch.cat([per_ep[e] for e in range(ep)], dim=0)


def full_name(name: str) -> str:
    """The unsharded model's name of a parameter: 'a.experts.local.up_proj' -> 'a.experts.up_proj'."""
    return name.replace(".experts.local.", ".experts.")


def is_expert_name(name: str) -> bool:
    """True for a routed-expert weight, sharded or not ('...experts[.local].{gate,up,gate_up,down}_proj')."""
    return _EXPERT_NAME.search(name) is not None


def split_deepspeed_key(key: str) -> tuple[str, int] | None:
    """A per-expert state-dict key -> (the unsharded stacked name, local expert index), or None.

    'l.ffn.experts.deepspeed_moe.experts.deepspeed_experts.3.up_proj' -> ('l.ffn.experts.up_proj', 3)
    """
    m = _DEEPSPEED_KEY.match(key)
    return None if m is None else (f"{m.group(1)}.{m.group(3)}", int(m.group(2)))


# ZeRO 3's placement family for expert parameters (DeepSpeed 0.19.8, runtime/zero/stage3.py)
_ZERO3_EXPERT_FAMILY = "autoep_expert"


def _tag(params: Any, name: str, partition_group: ProcessGroup | None) -> None:
    """The one place expert parameters are tagged for DeepSpeed (ZeRO 3's placement too when
    ``partition_group`` is given)."""
    for p in params:
        p.allreduce = False
        p.group_name = name
        if partition_group is not None:
            p.ds_zero_placement_family = _ZERO3_EXPERT_FAMILY
            p.ds_zero_partition_group_name = name
            p.ds_zero_partition_process_group = partition_group


class ExpertShard(nn.Module):
    """This rank's slice of a layer's routed experts; as is, the ZeRO-3 form.

    ``forward(x_ND, counts_L) -> y_ND`` is the wrapped GroupedExperts (``self.local``, L experts).
    Constructing it places ``local`` at global experts [ep_rank * L, (ep_rank + 1) * L) of
    ``n_experts`` (recorded on ``local``) and tags its parameters, with ZeRO 3's placement over
    ``edp_group`` (the expert-data-parallel group holding the same experts). Its state-dict keys
    are the stacked ``local.<weight>``. :class:`DeepSpeedMoEShard` is the ZeRO 0-2 form.
    """

    def __init__(
        self,
        local: GroupedExperts,
        n_experts: int,
        ep_rank: int,
        group_name: str,
        edp_group: ProcessGroup | None,
    ):
        nn.Module.__init__(self)  # not super(): DeepSpeedMoEShard's marker must not construct
        if edp_group is None and not isinstance(self, DeepSpeedMoEShard):
            raise ValueError(
                "edp_group: a ZeRO-3 ExpertShard is partitioned over its expert-data-parallel "
                "group and needs it (under ZeRO 0-2 use DeepSpeedMoEShard)"
            )
        self.local = local
        self.num_experts = n_experts
        self.num_local_experts = local.n_experts
        self.ep_size = n_experts // local.n_experts
        self.ep_rank = ep_rank
        self.expert_group_name = group_name
        self.edp_group = edp_group
        held = expert_range(n_experts, self.ep_size, ep_rank)
        if len(held) != local.n_experts:
            raise ValueError(
                f"local: expected {len(held)} experts for ep_rank {ep_rank} of {n_experts} "
                f"experts, got {local.n_experts}"
            )
        local.first_expert, local.n_global_experts = held.start, n_experts
        self.tag_parameters()

    def tag_parameters(self) -> None:
        """``allreduce=False``, ``group_name=<its EP group>`` on every parameter of the shard,
        and under ZeRO 3 its placement over the expert-data-parallel group."""
        _tag(self.local.parameters(), self.expert_group_name, self.edp_group)

    def _apply(self, fn: Any, recurse: bool = True) -> ExpertShard:  # type: ignore[override]
        """``to_empty`` / device moves may make new Parameter objects: tag those too."""
        super()._apply(fn, recurse)
        self.tag_parameters()
        return self

    def forward(self, x: Tensor | ExpertRows, counts_L: Tensor | Sequence[int]) -> Tensor:  # type: ignore[override]
        return self.local(x, counts_L)

    # read-only views so code that inspects moe.experts keeps working
    @property
    def n_experts(self) -> int:
        return self.local.n_experts

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.local.gate_up_proj

    @property
    def gate_proj(self) -> Tensor:
        return self.local.gate_proj

    @property
    def up_proj(self) -> Tensor:
        return self.local.up_proj

    @property
    def down_proj(self) -> nn.Parameter:
        return self.local.down_proj

    def extra_repr(self) -> str:
        lo = self.local.first_expert
        return (
            f"experts [{lo}, {lo + self.num_local_experts}) of {self.num_experts}, "
            f"group={self.expert_group_name}"
        )


class DeepSpeedMoEShard(ExpertShard, _DeepSpeedMoE):
    """An ExpertShard marked as a DeepSpeed MoE module: the form for ZeRO 0-2.

    Its state dict holds one entry per local expert (the module docstring), so DeepSpeed writes
    one checkpoint file per GLOBAL expert from every EP rank; loading accepts the same keys and
    stacks them back. It subclasses DeepSpeed's ``MoE`` only as the marker the engine looks for,
    and never runs its code.
    """

    def __init__(self, local: GroupedExperts, n_experts: int, ep_rank: int, group_name: str):
        ExpertShard.__init__(self, local, n_experts, ep_rank, group_name, None)
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        self.register_state_dict_post_hook(_split_experts_hook)
        self.register_load_state_dict_pre_hook(_stack_experts_hook)

    def set_deepspeed_parallelism(self, *args: Any, **kwargs: Any) -> None:
        """Called by the engine: the groups must already exist (``setup_expert_parallel``)."""
        from deepspeed.utils import groups

        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            raise RuntimeError(
                f"ExpertShard: process groups '{self.expert_group_name}' do not exist; call "
                f"setup_expert_parallel(ep={self.ep_size}, ...) before deepspeed.initialize"
            )


def _split_experts_hook(module: ExpertShard, state: dict, prefix: str, _meta: Any) -> None:
    for name in EXPERT_WEIGHTS:
        key = f"{prefix}local.{name}"
        if key in state:
            w = state.pop(key)
            for i in range(w.shape[0]):
                state[f"{prefix}{DEEPSPEED_EXPERT_INFIX}{i}.{name}"] = w[i]


def _stack_experts_hook(module: ExpertShard, state: dict, prefix: str, *_: Any) -> None:
    for name in EXPERT_WEIGHTS:
        keys = [
            f"{prefix}{DEEPSPEED_EXPERT_INFIX}{i}.{name}" for i in range(module.num_local_experts)
        ]
        if all(k in state for k in keys):
            state[f"{prefix}local.{name}"] = torch.stack([state.pop(k) for k in keys])


def shard_experts(
    experts: GroupedExperts, ep: int, ep_rank: int, *, edp_group: ProcessGroup | None = None
) -> ExpertShard:
    """EP rank ``ep_rank``'s ExpertShard of a layer's full ``experts`` (copies its slice): the
    ZeRO-3 form partitioned over ``edp_group`` when given, else a DeepSpeedMoEShard."""
    held = expert_range(experts.n_experts, ep, ep_rank)
    local = experts.slice_experts(held.start, held.stop)
    if edp_group is None:
        return DeepSpeedMoEShard(local, experts.n_experts, ep_rank, group_name(ep))
    return ExpertShard(local, experts.n_experts, ep_rank, group_name(ep), edp_group)


def local_experts(module: nn.Module) -> GroupedExperts:
    """The GroupedExperts inside a layer's ``experts`` (itself, or an ExpertShard's ``local``)."""
    if isinstance(module, ExpertShard):
        return module.local
    if isinstance(module, GroupedExperts):
        return module
    raise TypeError(f"expected GroupedExperts or ExpertShard, got {type(module).__name__}")


def expert_slices(model: nn.Module) -> dict[str, range]:
    """Routed-expert weight name -> the global experts it holds (its rows), for every
    GroupedExperts in ``model``, sharded or not: its parameters' names (``gate_up_proj``,
    ``down_proj``) and its state-dict names (``gate_proj``, ``up_proj``, ``down_proj``)."""
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            held = range(mod.first_expert, mod.first_expert + mod.n_experts)
            for w in (*EXPERT_WEIGHTS, *(n for n, _ in mod.named_parameters())):
                out[f"{mname}.{w}"] = held
    return out


def model_ep_size(model: nn.Module) -> int:
    """The expert-parallel size ``model`` was sharded with (1 when it is not)."""
    eps = {m.ep_size for m in model.modules() if isinstance(m, ExpertShard)}
    if len(eps) > 1:
        raise ValueError(f"model: layers sharded with different ep sizes {sorted(eps)}")
    return eps.pop() if eps else 1


def tag_expert_parameters(model: nn.Module) -> int:
    """Tag every ExpertShard's parameters (see the module docstring); returns how many.

    ExpertShard keeps its tags through ``to_empty`` itself; call this after anything else that
    replaces its Parameter objects.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, ExpertShard):
            m.tag_parameters()
            n += sum(1 for _ in m.local.parameters())
    return n
