"""The offline converter: ``deepsuite reshard SRC DST --ep N`` writes a checkpoint for another
expert-parallel size, world size or ZeRO stage (0-3, ZeRO 3 either way) ahead of time (weights,
balancing bias, Adam moments, LR schedule position, data position and trainer state kept).

It reads the source into one full state (:mod:`deepsuite.checkpoint.full_state`), spawns the
target's N gloo ranks, each of which builds the target engine, pours the state in
(:func:`~deepsuite.checkpoint.load.load_full_state`) and saves natively; rank 0 then writes the
trainer state and commits the manifest and an atomic ``latest`` (:mod:`deepsuite.checkpoint.layout`).
Resume from it with ``train.resume=DST``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepsuite.checkpoint import layout
from deepsuite.checkpoint.full_state import FullState, dense_states_file, read_full_state
from deepsuite.checkpoint.load import load_full_state
from deepsuite.config import config_from_dict, validate_expert_parallel
from deepsuite.distributed.engine import build_engine, safe_torch_load
from deepsuite.distributed.env import init_distributed
from deepsuite.distributed.expert_parallel import apply_expert_parallel
from deepsuite.distributed.groups import setup_expert_parallel
from deepsuite.errors import CheckpointError, run_main
from deepsuite.models import DeepSeekLM

__all__ = ["reshard_checkpoint", "reshard_main"]


def _state_to_dict(st: FullState) -> dict[str, Any]:
    return {k: getattr(st, k) for k in FullState.__dataclass_fields__}


def _convert_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One target rank: build the target engine, pour the full state in, save natively."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    init_distributed("gloo")
    try:
        cfg = config_from_dict(job["config"])
        torch.manual_seed(cfg.train.seed)
        model = DeepSeekLM(cfg)
        if cfg.parallel.ep > 1:
            groups = setup_expert_parallel(cfg.parallel.ep, cfg.moe.n_routed_experts)
            apply_expert_parallel(
                model, groups, zero_stage=job["zero_stage"], check_replicated=False
            )
        engine = build_engine(cfg, model, job["ds_config"])
        raw = torch.load(job["state_file"], map_location="cpu", weights_only=True)
        load_full_state(engine, model, FullState(**raw))
        dst, tag = Path(job["dst"]), job["tag"]
        engine.save_checkpoint(str(dst), tag=tag, save_latest=False)
        src_rng = Path(job["src_tag_dir"]) / f"rng_rank{rank}.pt"
        if src_rng.is_file():  # ranks that did not exist before start from their seed
            shutil.copyfile(src_rng, dst / tag / src_rng.name)
        dist.barrier()
        if rank == 0:
            layout.write_trainer_state(dst / tag, job["trainer_state"])
            layout.commit_latest(dst, tag, keep_last=10**6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def reshard_checkpoint(
    src: str | Path,
    dst: str | Path,
    ep: int,
    world: int | None = None,
    tag: str | None = None,
    zero_stage: int | None = None,
) -> Path:
    """Convert a checkpoint to EP ``ep`` on ``world`` ranks (default ``ep``); returns the tag dir.

    Args:
        src: a checkpoints directory (its newest complete tag, or ``tag``) or a tag directory.
        dst: the checkpoints directory to write (``train.resume=<dst>`` resumes from it).
        ep: target expert-parallel size (divides moe.n_routed_experts and ``world``).
        world: target world size; the global batch must split over it (train.micro_batch_size
            is lowered when needed, keeping the global batch).
        zero_stage: target ZeRO stage (0, 1, 2, 3); default the source's.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(
            f"src: {src} {'is a file' if src.exists() else 'does not exist'}; expected a "
            "checkpoints directory (RUN_DIR/checkpoints) or one step_N tag in it"
        )
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"dst: {dst} is a file; expected a directory to write")
    if not (src / "trainer_state.json").is_file():
        tag = tag or layout.find_resumable(src)
        if tag is None:
            raise CheckpointError(f"src: no complete checkpoint under {src}")
        src = src / tag
    reason = layout.verify_checkpoint(src)
    if reason is not None:
        raise CheckpointError(f"src: {src} is not a complete checkpoint: {reason}")
    world = ep if world is None else world
    trainer_state = layout.read_trainer_state(src)
    cfg = config_from_dict(trainer_state["config"])
    validate_expert_parallel(cfg.moe.n_routed_experts, world, ep)
    if zero_stage not in (None, 0, 1, 2, 3):
        raise CheckpointError(f"zero_stage: expected 0, 1, 2 or 3, got {zero_stage!r}")
    if dst.resolve() == src.parent.resolve():
        raise CheckpointError("dst: must differ from the source's checkpoints directory")
    cfg.parallel.ep = ep
    cfg.parallel.limit_groups_to = "experts"  # placement is the trainer's check, routing is kept
    tr = cfg.train
    while tr.global_batch_size % (tr.micro_batch_size * world) and tr.micro_batch_size > 1:
        tr.micro_batch_size -= 1
    cfg.check_world(world)
    dense = safe_torch_load(dense_states_file(src))
    ds = dict(dense["ds_config"])
    ds["train_micro_batch_size_per_gpu"] = tr.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accumulation_steps(world)
    ds["train_batch_size"] = tr.global_batch_size
    if zero_stage is not None:
        zero = dict(ds.get("zero_optimization", {}))
        if (zero.get("stage", 0) == 3) != (zero_stage == 3):
            # one side's stage-specific options mean nothing on the other: DeepSpeed's defaults
            zero = {}
            path = cfg.parallel.deepspeed_config  # the shipped JSON of the new stage, if it was one
            cfg.parallel.deepspeed_config = re.sub(r"zero\d\.json$", f"zero{zero_stage}.json", path)
        ds["zero_optimization"] = {**zero, "stage": zero_stage}
        cfg.parallel.zero_stage = zero_stage
    state = read_full_state(src)
    tag_name = src.name
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / tag_name).exists():
        shutil.rmtree(dst / tag_name)
    state_file = dst / f".reshard_{tag_name}.pt"
    torch.save(_state_to_dict(state), state_file)
    trainer_state = {**trainer_state, "world_size": world, "config": cfg.to_dict()}
    job = {
        "config": cfg.to_dict(),
        "ds_config": ds,
        "state_file": str(state_file),
        "dst": str(dst),
        "tag": tag_name,
        "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)),
        "src_tag_dir": str(src),
        "trainer_state": trainer_state,
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(
            _convert_rank, args=(world, port, job), nprocs=world, start_method="spawn"
        )
    finally:
        state_file.unlink(missing_ok=True)
    return dst / tag_name


def reshard_main(argv: list[str] | None = None) -> int:
    """``deepsuite reshard SRC DST --ep N [--world W] [--tag T] [--zero-stage S]``."""
    p = argparse.ArgumentParser(
        prog="deepsuite reshard",
        description="Convert a training checkpoint to another expert-parallel size, world size or "
        "ZeRO stage 0-3 (Adam moments, LR schedule, balancing bias, data position kept); resume "
        "with train.resume=DST.",
    )
    p.add_argument("src", help="checkpoints directory (newest complete tag) or one tag directory")
    p.add_argument("dst", help="checkpoints directory to write")
    p.add_argument("--ep", type=int, required=True, help="target expert-parallel size")
    p.add_argument("--world", type=int, default=None, help="target world size (default: --ep)")
    p.add_argument("--tag", default=None, help="tag under SRC (default: the newest complete one)")
    p.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3))
    a = p.parse_args(argv)
    out = reshard_checkpoint(a.src, a.dst, a.ep, a.world, a.tag, a.zero_stage)
    print(f"wrote {out} (ep={a.ep}, world={a.world or a.ep}); resume with train.resume={a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(reshard_main, sys.argv[1:], "deepsuite reshard"))
