"""Preemption on a real two-node SLURM, through slurm/train_torchrun.sbatch.

A notice (SIGUSR1), however SLURM delivers it (to the job steps during start-up, to everything
mid-training with ``scancel --full``, to the batch shell alone with ``--signal=B:USR1@<s>``),
ends in a checkpoint and a clean requeue (no traceback, no failed task, no failure in SLURM's
records) and a resumed run equal to the uninterrupted one. When the job cannot or may not be
requeued it ends FAILED with exit 75, not COMPLETED.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from deepsuite.checkpoint.layout import tag_for_step, verify_checkpoint
from deepsuite.runlog import read_metrics
from deepsuite.training.preemption import StopRequested
from tests.slurm.cluster import TERMINAL, SlurmCluster
from tests.slurm.conftest import Reference
from tests.slurm.jobs import (
    assert_quiet,
    batch_lines,
    completions,
    ended,
    logs,
    run_dir_for,
    submit,
    wait_running,
)
from tests.training.runner import (
    CHECKPOINTED_RUN,
    CHECKPOINTED_STEPS,
    assert_same_run,
    losses,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

STEPS = CHECKPOINTED_STEPS
SCRIPT = "train_torchrun.sbatch"
LONG_RUN = (*CHECKPOINTED_RUN, "train.steps=1000")  # cannot end before its notice


def notice_at(cluster: SlurmCluster, job: int, seconds: float, *scancel_args: str) -> None:
    """``scancel --signal=USR1`` (what SLURM does at --signal=USR1@<s>: every process of the
    job's steps) ``seconds`` after the job started running."""
    wait_running(cluster, job)
    time.sleep(seconds)
    cluster.run(["scancel", "--signal=USR1", *scancel_args, str(job)])


def stopped_at(line: str) -> int:
    m = re.search(r"preempted at step (\d+) \(SIGUSR1\)", line)
    assert m, line
    return int(m.group(1))


def assert_requeued_once(cluster: SlurmCluster, job: int, text: str) -> int:
    """One clean requeue, then a finished run; returns the step the first run stopped at."""
    assert cluster.job(job)["Restarts"] == "1", text
    lines = batch_lines(cluster, job)
    assert len(lines) == 4, lines  # banner, requeued, banner of restart 1, finished
    assert "restart 0" in lines[0] and "restart 1" in lines[2] and lines[3].endswith("finished")
    assert "state saved; requeued: restart 1 resumes from it" in lines[1], lines
    assert_quiet(text)
    assert "rerun the same command" not in text and "submit the same command" not in text
    # SLURM's records (what sacct shows): the requeued run exited 0, the job COMPLETED 0:0
    # (jobcomp writes the requeue record with the state the job is put in: PENDING)
    records = [(r["JobState"], r["ExitCode"]) for r in completions(cluster, job)]
    assert records == [("PENDING", "0:0"), ("COMPLETED", "0:0")], records
    return stopped_at(lines[1])


def test_notice_mid_training_requeues_and_resumes_to_the_same_model(
    slurm_cluster: SlurmCluster, reference: Reference
) -> None:
    """``scancel --full``: the notice reaches the batch shell, srun and every process of the step
    at once (the batch shell used to die of it: FAILED 0:10)."""
    run_dir = run_dir_for("preempt")
    job = submit(slurm_cluster, SCRIPT, run_dir)
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 2:
        assert time.monotonic() < deadline, logs(slurm_cluster, job)
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--full", "--signal=USR1", str(job)])
    text = ended(slurm_cluster, job, "COMPLETED", timeout_s=240)
    step = assert_requeued_once(slurm_cluster, job, text)
    assert 2 <= step < STEPS
    assert (
        f"stopped at step {step} of {STEPS} on SIGUSR1, checkpoint of step {step} committed" in text
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["steps_this_run"] == STEPS - step, summary
    # no step lost or trained twice: the jsonl (appended by both runs) has each step once
    steps = [r["step"] for r in read_metrics(run_dir) if "loss/train" in r]
    assert steps == list(range(1, STEPS + 1)), steps
    assert_same_run(run_dir, reference.run_dir)


def test_notice_during_start_up_requeues_and_resumes_exactly(
    slurm_cluster: SlurmCluster, reference: Reference
) -> None:
    """SIGUSR1 at second 5, while the launchers and workers are still starting: kept (by
    slurm/task.sh, and by the trainer's handler from its first line), acted on before the first
    step, which needs no checkpoint, and the requeued run trains every step."""
    run_dir = run_dir_for("startup")
    job = submit(slurm_cluster, SCRIPT, run_dir)
    notice_at(slurm_cluster, job, 5.0)
    text = ended(slurm_cluster, job, "COMPLETED", timeout_s=300)
    assert assert_requeued_once(slurm_cluster, job, text) == 0
    assert f"stopped at step 0 of {STEPS} on SIGUSR1, no step trained in this run" in text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_run"] == STEPS, summary
    assert_same_run(run_dir, reference.run_dir)


def test_notice_to_the_batch_shell_alone_requeues(slurm_cluster: SlurmCluster) -> None:
    """``--signal=B:USR1@110`` on a 2-minute job: SLURM signals only the batch shell, at its next
    time-limit check (within ~30 s of the start). The shell used to die of it (FAILED 0:10); now
    it hands the notice to the step and the job requeues cleanly. The long run is cancelled once
    requeued (resuming is tested above)."""
    run_dir = run_dir_for("batch-signal")
    job = submit(
        slurm_cluster, SCRIPT, run_dir, "--time=2", "--signal=B:USR1@110", overrides=LONG_RUN
    )
    wait_running(slurm_cluster, job)
    deadline = time.monotonic() + 120
    while f"{job}.0 " not in (steps := slurm_cluster.run(["squeue", "-h", "-s", "-o", "%i %j"])):
        assert time.monotonic() < deadline, logs(slurm_cluster, job)
        time.sleep(0.2)
    assert f"{job}.0 train:tiny" in steps, steps  # the step is named for sacct / squeue -s
    deadline = time.monotonic() + 200
    while slurm_cluster.job(job)["Restarts"] == "0":
        state = slurm_cluster.job(job)["JobState"]
        assert time.monotonic() < deadline and state not in TERMINAL, (
            f"{state}\n{logs(slurm_cluster, job)}"
        )
        time.sleep(0.2)
    slurm_cluster.run(["scancel", str(job)])
    text = ended(slurm_cluster, job, "CANCELLED", timeout_s=60)
    lines = batch_lines(slurm_cluster, job)
    step = stopped_at(lines[1])
    assert "requeued: restart 1 resumes from it" in lines[1], lines
    if step > 0:
        assert verify_checkpoint(run_dir / "checkpoints" / tag_for_step(step)) is None
    assert_quiet(text)
    assert completions(slurm_cluster, job)[0]["ExitCode"] == "0:0"


def test_stopped_early_without_requeue_fails_with_exit_75(slurm_cluster: SlurmCluster) -> None:
    """A run that stopped on a notice and was not requeued (here the job was submitted with
    --no-requeue, so scontrol refuses; DEEPSUITE_REQUEUE=0 takes the same way out) did not
    finish: the job must not end COMPLETED 0:0, or `afterok` and sacct would count a success."""
    why = "scontrol requeue: Requested operation is presently disabled"
    job = submit(slurm_cluster, SCRIPT, run_dir_for("norequeue"), "--no-requeue")
    notice_at(slurm_cluster, job, 5.0)
    text = ended(slurm_cluster, job, "FAILED", timeout_s=240)
    info = slurm_cluster.job(job)
    assert info["ExitCode"] == "75:0" and info["Restarts"] == "0", info
    lines = batch_lines(slurm_cluster, job)
    assert len(lines) == 2 and f"not requeued ({why}" in lines[1], lines
    assert lines[1].endswith("submit the same command again to resume"), lines
    records = [(r["JobState"], r["ExitCode"]) for r in completions(slurm_cluster, job)]
    assert records == [("FAILED", "75:0")], records
    assert_quiet(text)


def test_trainer_requeues_its_own_job_outside_the_sbatch_scripts(
    slurm_cluster: SlurmCluster,
) -> None:
    """A job of the user's own (`srun python train/train.py`, no DEEPSUITE_OUTCOME): rank 0
    runs `scontrol requeue` itself after the checkpoint, and the run counts as requeued (exit 0).
    A real running job stands in for the training job's allocation."""
    job = slurm_cluster.sbatch(["--requeue", "--nodes=1", "--output=/dev/null", "--wrap=sleep 300"])
    wait_running(slurm_cluster, job)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequested(environ={})
        stop.signal = signal.SIGUSR1
        env = {**slurm_cluster.env, "SLURM_JOB_ID": str(job)}
        out = stop.conclude(step=3, last_step=8, saved=True, rank=0, local_rank=0, environ=env)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert out.exit_code == 0, out
    assert out.line.endswith(f"SLURM job {job} requeued, it resumes by itself"), out
    assert slurm_cluster.job(job)["Restarts"] == "1"
    slurm_cluster.run(["scancel", str(job)])
    slurm_cluster.wait(job, timeout_s=60)
