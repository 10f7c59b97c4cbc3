"""The project's own sbatch scripts on a real two-node SLURM (tests/slurm/cluster.py).

A 2-node expert-parallel run of the tiny config through each launch style (torchrun per node,
one task per rank, the deepspeed launcher) must give the same losses; a run that receives the
preemption signal must checkpoint, requeue itself and resume to the same final model, with every
step trained exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from deepsuite.checkpoint.layout import verify_checkpoint
from deepsuite.runlog import read_metrics
from tests.distributed.launch import CACHE, ROOT
from tests.slurm.cluster import SlurmCluster
from tests.training.runner import (
    CHECKPOINTED_RUN,
    CHECKPOINTED_STEPS,
    assert_same_run,
    losses,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

STEPS = CHECKPOINTED_STEPS
SMALL = CHECKPOINTED_RUN
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def submit(cluster: SlurmCluster, script: str, run_dir: Path, *sbatch_args: str) -> int:
    args = [*sbatch_args, f"slurm/{script}", "configs/tiny.yaml", *SMALL]
    return cluster.sbatch([*args, f"train.run_dir={run_dir}"], env=JOB_ENV, cwd=ROOT)


def job_log(cluster: SlurmCluster, job_id: int) -> str:
    path = Path(cluster.job(job_id)["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def finished(cluster: SlurmCluster, job_id: int, timeout_s: float = 240.0) -> str:
    state = cluster.wait(job_id, timeout_s=timeout_s)
    assert state == "COMPLETED", f"job {job_id}: {state}\n{job_log(cluster, job_id)}"
    return job_log(cluster, job_id)


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster) -> Path:
    """An uninterrupted 2-node run through slurm/train_torchrun.sbatch."""
    run_dir = CACHE / "tmp" / f"slurm-ref-{os.getpid()}"
    job = submit(slurm_cluster, "train_torchrun.sbatch", run_dir)
    log = finished(slurm_cluster, job)
    assert "2 node(s)" in log and "rendezvous 127.0.0.1" in log, log
    return run_dir


def test_two_node_expert_parallel_run_completes(reference: Path) -> None:
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == STEPS and not summary["preempted"]
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))
    tag = reference / "checkpoints" / f"step_{STEPS:08d}"
    assert verify_checkpoint(tag) is None
    state = json.loads((tag / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallel"]["ep"] == 2
    # both ranks' expert shards were written: one file per global expert of every MoE layer
    experts = {p.name.split("_mp_rank")[0] for p in tag.glob("layer_*_expert_*")}
    assert len(experts) == 3 * 16, sorted(experts)
    assert summary["loss_last"] < summary["loss_first"]


def test_preempted_job_requeues_and_resumes_to_the_same_model(
    slurm_cluster: SlurmCluster, reference: Path
) -> None:
    run_dir = CACHE / "tmp" / f"slurm-preempt-{os.getpid()}"
    job = submit(slurm_cluster, "train_torchrun.sbatch", run_dir)
    # what SLURM does at --signal=USR1@<s>: SIGUSR1 to every process of the job's steps
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 2:
        assert time.monotonic() < deadline, job_log(slurm_cluster, job)
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    log = finished(slurm_cluster, job)
    assert slurm_cluster.job(job)["Restarts"] == "1", log
    assert "requeued" in log and "restart 1" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and 0 < summary["steps_this_run"] < STEPS, summary
    # no step lost or trained twice: the jsonl (appended by both runs) has each step once
    steps = [r["step"] for r in read_metrics(run_dir) if "loss/train" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize(
    "script", ["train_srun.sbatch", "train_deepspeed.sbatch"], ids=["task-per-rank", "deepspeed"]
)
def test_other_launch_styles_match_torchrun(
    slurm_cluster: SlurmCluster, reference: Path, script: str
) -> None:
    run_dir = CACHE / "tmp" / f"slurm-{script.split('.')[0]}-{os.getpid()}"
    finished(slurm_cluster, submit(slurm_cluster, script, run_dir))
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), (s, got[s], ref[s])
