"""A training run's save and resume: every rank calls these at the same point of the loop.

Save order (so a kill at any moment leaves ``latest`` on a complete checkpoint):
  1. the balancing bias is checked bit-identical over the world (it is saved from one rank);
  2. a half-written tag of this step (from a kill during an earlier save) is removed; barrier;
  3. every rank writes its DeepSpeed files and its RNG states, rank 0 the trainer state; barrier;
  4. rank 0 writes the manifest and replaces ``latest`` atomically, pruning old tags; barrier.
Resume: rank 0 picks the newest complete tag and tells the others; every rank loads it whatever
layout saved it (:func:`~deepsuite.checkpoint.load.load_any_layout`) and its RNG states.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from deepsuite.checkpoint import layout
from deepsuite.checkpoint.load import load_any_layout
from deepsuite.distributed.comm import guard_collectives
from deepsuite.distributed.expert_parallel import verify_bias_identical
from deepsuite.errors import CheckpointError

__all__ = ["TrainerState", "resume_run", "save_run", "will_resume"]


@dataclass
class TrainerState:
    """What the loop needs besides the engine's tensors (``trainer_state.json``)."""

    step: int
    tokens_seen: int
    world_size: int
    train_loader: dict[str, Any]  # the loader's state_dict(): its position in the data
    config: dict[str, Any]  # the resolved config (Config.to_dict())
    loss_history: list[float] = field(default_factory=list)
    # the metrics' windowed state (the MoE window, alert state): a resumed run logs what an
    # uninterrupted one logs; plain JSON written by the trainer, opaque here
    metrics_window: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        return cls(
            step=d["step"],
            tokens_seen=d["tokens_seen"],
            world_size=d["world_size"],
            train_loader=d["train_loader"],
            config=d["config"],
            loss_history=d.get("loss_history", []),
            metrics_window=d.get("metrics_window", {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "world_size": self.world_size,
            "train_loader": self.train_loader,
            "loss_history": self.loss_history,
            "metrics_window": self.metrics_window,
            "config": self.config,
        }


def save_run(
    engine: Any, model: nn.Module, ckpt_dir: Path, state: TrainerState, *, rank: int, keep_last: int
) -> Path:
    """Save step ``state.step`` under ``ckpt_dir`` on every rank and commit it; returns its tag dir."""
    tag = layout.tag_for_step(state.step)
    tag_dir = ckpt_dir / tag
    with guard_collectives("checkpoint", state.step):
        verify_bias_identical(model)  # the bias in the checkpoint is every rank's bias
        if rank == 0 and tag_dir.exists():  # a half-written save of this step, from a kill
            shutil.rmtree(tag_dir)
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        layout.save_rank_state(tag_dir, rank)
        if rank == 0:
            layout.write_trainer_state(tag_dir, state.to_dict())
        dist.barrier()
        if rank == 0:
            layout.commit_latest(ckpt_dir, tag, keep_last)
        dist.barrier()
    return tag_dir


def _resume_tag(resume: str, run_ckpt_dir: Path) -> tuple[Path, str | None]:
    """(checkpoints directory, its newest complete tag as rank 0 sees it, on every rank)."""
    ckpt_dir = Path(resume) if resume != "auto" else run_ckpt_dir
    tag = [layout.find_resumable(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tag, src=0)
    return ckpt_dir, tag[0]


def will_resume(resume: str, run_ckpt_dir: Path) -> bool:
    """Whether :func:`resume_run` will load a checkpoint (same answer on every rank): a run that
    started from ``train.init_from`` resumes from its own checkpoints, not from the source."""
    return resume != "never" and (
        resume != "auto" or _resume_tag(resume, run_ckpt_dir)[1] is not None
    )


def resume_run(
    engine: Any, model: nn.Module, resume: str, run_ckpt_dir: Path, *, rank: int
) -> TrainerState | None:
    """Load the checkpoint ``resume`` names (``train.resume``) on every rank; None if none.

    ``resume``: "never"; "auto" (the newest complete tag under ``run_ckpt_dir``, or a fresh start
    when there is none); or a checkpoints directory, which must hold a complete tag. The RNG
    states are restored; the caller restores its loop and loader from the returned state.
    """
    if resume == "never":
        return None
    ckpt_dir, tag = _resume_tag(resume, run_ckpt_dir)
    if tag is None:
        if resume != "auto":
            raise CheckpointError(f"train.resume: no complete checkpoint under {ckpt_dir}")
        return None
    tag_dir = ckpt_dir / tag
    # any EP / world / ZeRO layout: native load when it matches, else resharded on load
    load_any_layout(engine, model, ckpt_dir, tag)
    state = TrainerState.from_dict(layout.read_trainer_state(tag_dir))
    layout.load_rank_state(tag_dir, rank)
    verify_bias_identical(model)
    if rank == 0:
        print(f"resumed from {tag_dir} at step {state.step}", flush=True)
    return state
