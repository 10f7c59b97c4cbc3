"""deepsuite.training.preemption in one process: what is heard when, and how a run ends.

The end-to-end behaviour (a notice in each phase of a real SLURM job, the requeue, the exit
status SLURM records) is in tests/slurm/test_preemption.py.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepsuite.training.preemption import NOT_FINISHED, StopRequested


@pytest.fixture
def handlers() -> Iterator[None]:
    """StopRequested installs process-wide handlers: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_usr1_is_recorded_and_sigterm_only_once_listened_for(handlers: None) -> None:
    stop = StopRequested(environ={})
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # start-up: SIGTERM's default
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler records it instead of dying
    assert stop.pending() == signal.SIGUSR1
    stop.listen_for_term()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.pending() == signal.SIGTERM  # SIGTERM (stop, no requeue) wins over SIGUSR1
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.pending() == signal.SIGTERM


def test_notice_file_counts_as_usr1(handlers: None, tmp_path: Path) -> None:
    """slurm/task.sh and the batch script create it for a notice the trainer could not hear."""
    notice = tmp_path / "notice"
    stop = StopRequested(environ={"DEEPSUITE_NOTICE": str(notice)})
    assert stop.pending() is None
    notice.touch()
    assert stop.pending() == signal.SIGUSR1
    assert StopRequested(environ={}).pending() is None  # no file named: nothing to look at


def _stopped(signum: int | None) -> StopRequested:
    stop = StopRequested(environ={})
    stop.signal = signum
    return stop


def test_a_run_that_finished_exits_0(handlers: None) -> None:
    out = _stopped(None).conclude(step=8, last_step=8, saved=True, rank=0, local_rank=0)
    assert (out.exit_code, out.line) == (0, "finished at step 8")
    # a notice at the last step changes nothing: the run is complete, no requeue
    out = _stopped(signal.SIGUSR1).conclude(step=8, last_step=8, saved=True, rank=0, local_rank=0)
    assert out.exit_code == 0 and out.line == "finished at step 8"


def test_outcome_file_hands_the_requeue_to_the_batch_script(handlers: None, tmp_path: Path) -> None:
    env = {"DEEPSUITE_OUTCOME": str(tmp_path / "outcome"), "SLURM_JOB_ID": "7"}
    stop = _stopped(signal.SIGUSR1)
    other = stop.conclude(step=4, last_step=8, saved=True, rank=1, local_rank=1, environ=env)
    assert not (tmp_path / "outcome").exists()  # only each node's first rank writes it
    first = stop.conclude(step=4, last_step=8, saved=True, rank=2, local_rank=0, environ=env)
    assert (tmp_path / "outcome").read_text() == "preempted 4 SIGUSR1\n"
    assert other == first and first.exit_code == 0  # every rank exits 0: nothing to report
    assert "checkpoint of step 4 committed" in first.line and "sbatch script" in first.line
    assert "rerun" not in first.line
    none = stop.conclude(step=0, last_step=8, saved=False, rank=0, local_rank=0, environ=env)
    assert "no step trained in this run" in none.line


@pytest.mark.parametrize(
    ("signum", "environ", "rank"),
    [
        (signal.SIGUSR1, {}, 0),  # not a SLURM job
        (signal.SIGUSR1, {"SLURM_JOB_ID": "4242", "DEEPSUITE_REQUEUE": "0"}, 0),
        (signal.SIGUSR1, {"SLURM_JOB_ID": "4242"}, 1),  # only rank 0 requeues
        (signal.SIGTERM, {"SLURM_JOB_ID": "4242"}, 0),  # the job is ending: never bring it back
        (signal.SIGUSR1, {"SLURM_JOB_ID": "4242", "PATH": "/nonexistent"}, 0),  # no scontrol
    ],
    ids=["no-slurm", "requeue-disabled", "rank-1", "sigterm", "scontrol-missing"],
)
def test_stopped_early_and_not_requeued_exits_not_finished(
    handlers: None, signum: int, environ: dict[str, str], rank: int
) -> None:
    """EX_TEMPFAIL on every rank, so a launcher, `afterok` and sacct see an unfinished run."""
    stop = _stopped(signum)
    env = {"SLURM_CONF": "/nonexistent/slurm.conf", **environ}
    out = stop.conclude(step=3, last_step=8, saved=True, rank=rank, local_rank=0, environ=env)
    assert out.exit_code == NOT_FINISHED == 75
    name = signal.Signals(signum).name
    assert out.line == (
        f"stopped at step 3 of 8 on {name}, checkpoint of step 3 committed; "
        "not requeued: rerun the same command to resume"
    )
