"""A consolidated copy of the model: every expert gathered from the expert-parallel ranks.

The result has the state-dict keys of the unsharded :class:`~deepsuite.models.DeepSeekLM`
(stacked ``...ffn.experts.{gate,up,down}_proj`` of all E experts), so a run at any EP size exports
the same file layout, and one process can load it with ``load_state_dict``. ZeRO stages 0-2 keep
full parameters on every rank, so only the expert shards need a collective.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deepsuite.atomic import atomic_path
from deepsuite.distributed.expert_parallel import full_state_dict


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
