"""A consolidated copy of the model (``RUN_DIR/final/model.safetensors``): every expert gathered
from the expert-parallel ranks.

The file has the state-dict keys of the unsharded :class:`~deepsuite.models.DeepSeekLM` (stacked
``...ffn.experts.{gate,up,down}_proj`` of all E experts), so a run at any EP size exports the same
layout, and one process loads it with ``safetensors.torch.load_file`` + ``load_state_dict``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

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
