"""A consolidated copy of the model: every expert gathered from the expert-parallel ranks.

The result has the state-dict keys of the unsharded :class:`~deepsuite.models.DeepSeekLM`
(stacked ``...ffn.experts.{gate,up,down}_proj`` of all E experts), so a run at any EP size exports
the same file layout, and one process can load it with ``load_state_dict``. ZeRO stages 0-2 keep
full parameters on every rank, so only the expert shards need a collective.
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


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on every rank (all-gathers expert shards over each EP group)."""
    state = {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if ".ffn.experts." not in k
    }
    for name, moe in moe_layers(model):
        experts = moe.experts
        for w in _WEIGHTS:
            if isinstance(experts, ExpertShard):
                local = getattr(experts.local, w).detach().contiguous()
                group = moe.dispatcher.group
                size = dist.get_world_size(group)
                gathered = local.new_empty((size * local.shape[0], *local.shape[1:]))
                dist.all_gather_into_tensor(gathered, local, group=group)
                full = gathered
            else:
                full = getattr(experts, w).detach()
            state[f"{name}.experts.{w}"] = full.cpu().clone()
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
