"""A consolidated copy of the model: every expert gathered from the expert-parallel ranks.

The result has the state-dict keys of the unsharded :class:`~deepsuite.models.DeepSeekLM`
(stacked ``...ffn.experts.{gate,up,down}_proj`` of all E experts), so a run at any EP size exports
the same file layout, and one process can load it with ``load_state_dict``. ZeRO stages 0-2 keep
full parameters on every rank, so only the expert shards need a collective; under ZeRO 3 every
parameter is first all-gathered from its partitions (DeepSpeed's ``GatheredParameters``, one
parameter at a time, so at most one full tensor beyond the rank's partition is alive): dense ones
over the world, each rank's experts over their expert-data-parallel group.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deepsuite.atomic import atomic_path
from deepsuite.distributed.expert_parallel import ExpertShard, moe_layers

_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def _whole(t: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A copy of ``t`` at full size on ``device``: a ZeRO-3 parameter is gathered from its
    partitions (a collective over its partition group); anything else is copied as held."""
    from deepspeed.runtime.zero import GatheredParameters  # a no-op for non-ZeRO-3 tensors

    with GatheredParameters([t]):
        return t.detach().to(device, copy=True)


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on every rank (all-gathers ZeRO-3 partitions, then the expert
    shards over each EP group). Collective: call on every rank."""
    state = {
        k: _whole(v)
        for k, v in model.state_dict(keep_vars=True).items()
        if ".ffn.experts." not in k
    }
    for name, moe in moe_layers(model):
        experts = moe.experts
        for w in _WEIGHTS:
            if isinstance(experts, ExpertShard):
                param = getattr(experts.local, w)
                local = _whole(param, param.device)  # the EP all-gather runs on the device
                group = moe.dispatcher.group
                size = dist.get_world_size(group)
                full = local.new_empty((size * local.shape[0], *local.shape[1:]))
                dist.all_gather_into_tensor(full, local, group=group)
            else:
                full = _whole(getattr(experts, w))
            state[f"{name}.experts.{w}"] = full.cpu()
    return state


def export_safetensors(model: nn.Module, path: str | Path, rank: int) -> Path:
    """Gather on every rank, write on ``rank == 0`` (atomically); returns the path."""
    state = full_state_dict(model)
    path = Path(path)
    if rank == 0:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    return path


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    return load_file(str(path))
