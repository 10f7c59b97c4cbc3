"""Run the real entry point (train/train.py) under a launcher, as a user would, for tests.

Every run uses a small variant of configs/tiny.yaml (``SMALL``) and a data cache shared across
tests, so the built-in corpus is tokenised once per suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from safetensors.torch import load_file

from deepsuite.runlog import read_metrics
from tests.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DEEPSUITE_CACHE", ROOT / ".cache"))
PY = Path(sys.executable)
BIN = PY.parent

SMALL = [
    "model.dim=64",
    "model.n_heads=2",
    "model.inter_dim=128",
    "mla.kv_lora_rank=32",
    "mla.qk_nope_head_dim=16",
    "mla.qk_rope_head_dim=8",
    "mla.v_head_dim=16",
    "moe.n_routed_experts=8",
    "moe.n_group=4",
    "moe.topk_group=2",
    "moe.expert_intermediate_size=32",
    "data.seq_len=32",
    "data.max_documents=400",
    f"data.cache_dir={CACHE / 'test_data'}",
    "train.eval_every=0",
    "train.save_every=0",
    "logging.console=false",
    "logging.moe_every=1",
    # balance alerts off: a few steps of a tiny model are not a balanced run (tests that check
    # alerts turn them on)
    "logging.alert_dead_steps=0",
    "logging.alert_max_vio=0",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(
        OMP_NUM_THREADS="1",
        DEEPSUITE_CACHE=str(CACHE),
        TORCH_EXTENSIONS_DIR=str(CACHE / "torch_extensions"),
        HF_HOME=str(CACHE / "hf"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        WANDB_DIR=str(CACHE / "wandb"),
        PYTHONPATH=str(ROOT),
    )
    return e


def launch_cmd(launcher: str, nproc: int) -> list[str]:
    port = str(free_port())
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"),
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port]
    if launcher == "accelerate":
        return [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
        ]
    raise ValueError(launcher)


def run_train(
    run_dir: Path,
    overrides: list[str],
    nproc: int = 2,
    launcher: str = "torchrun",
    timeout: float = 600,
    check: bool = True,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    cmd = [
        *launch_cmd(launcher, nproc),
        str(ROOT / "train/train.py"),
        str(ROOT / "configs/tiny.yaml"),
        *SMALL,
        f"train.run_dir={run_dir}",
        *overrides,
    ]
    e = env()
    e.update(extra_env or {})
    if launcher == "accelerate":
        e["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check:
        assert_ran(proc)
    return proc


def assert_ran(proc: subprocess.CompletedProcess) -> None:
    """Fail with the command and the end of its output unless the run exited 0."""
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )


K = TypeVar("K")


@dataclass(frozen=True)
class Job:
    """One run_train call: its run dir, overrides, ranks, launcher and extra environment."""

    run_dir: Path
    overrides: list[str]
    nproc: int = 2
    launcher: str = "torchrun"
    extra_env: dict[str, str] | None = None


def _run_job(job: Job) -> subprocess.CompletedProcess:
    return run_train(
        job.run_dir, job.overrides, job.nproc, job.launcher, check=False, extra_env=job.extra_env
    )


def run_trains(
    jobs: dict[K, Job], at_once: int = 2, check: bool = True
) -> dict[K, subprocess.CompletedProcess]:
    """Independent runs, ``at_once`` of them at a time; name -> finished process.

    One launch alone keeps about one of two cores busy (imports, inductor's compile and the ranks
    waiting on each other's collectives are mostly serial), so two at once end sooner than one
    after the other. Each run has its own port, run dir and single-threaded ranks: its results are
    those it gives alone. ``check``: after all ended, fail on the first that did not exit 0.
    """
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {name: pool.submit(_run_job, job) for name, job in jobs.items()}
        procs = {name: f.result() for name, f in futures.items()}
    if check:
        for proc in procs.values():
            assert_ran(proc)
    return procs


# The tiny config for 8 steps with a checkpoint every 2: the fault-tolerance and SLURM tests'
# run (their own launchers, same job), so their reference runs are comparable.
CHECKPOINTED_STEPS = 8
CHECKPOINTED_RUN = [
    "model.dim=64",
    f"train.steps={CHECKPOINTED_STEPS}",
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "data.max_documents=200",
    "train.eval_every=0",
    "train.save_every=2",
]


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss/train"] for r in metrics(run_dir) if "loss/train" in r}


def assert_same_run(got: Path, ref: Path) -> None:
    """A CHECKPOINTED_RUN job ``got`` (however launched, interrupted or resumed) ends where the
    uninterrupted ``ref`` does: every step's loss once, and the same exported model."""
    lr, lg = losses(ref), losses(got)
    assert sorted(lg) == list(range(1, CHECKPOINTED_STEPS + 1))
    for s in lr:
        assert lg[s] == pytest.approx(lr[s], rel=1e-6, abs=1e-6), (s, lg[s], lr[s])
    a = load_file(str(ref / "final" / "model.safetensors"))
    b = load_file(str(got / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
