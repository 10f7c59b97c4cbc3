"""Submit the project's sbatch scripts to the test cluster, and read what a job left behind.

A job of slurm/*.sbatch logs to ``<log dir>/<job-name>-<job-id>.out`` (the batch script's lines:
one banner per run and one line saying how it ended) and ``...node<i>.out`` (node i's ranks).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tests.distributed.launch import CACHE, ROOT
from tests.slurm.cluster import SlurmCluster
from tests.training.runner import CHECKPOINTED_RUN

LOGS = ROOT / "slurm" / "logs"
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# what a clean requeue must not print: launcher tracebacks, srun's report of a failed task
NOISE = ("Traceback", "SignalException", "ChildFailedError", "srun: error")


_LOG_DIRS: dict[int, Path] = {}


def run_dir_for(name: str) -> Path:
    """The run dir of this session's job ``name``: under the checkout's cache, outside the
    cluster's own directory, unique to this pytest process."""
    return CACHE / "tmp" / f"slurm-{name}-{os.getpid()}"


def submit(
    cluster: SlurmCluster,
    script: str,
    run_dir: Path,
    *sbatch_args: str,
    overrides: tuple[str, ...] = tuple(CHECKPOINTED_RUN),
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    default_logs: bool = False,
) -> int:
    """``sbatch [sbatch_args] slurm/<script> configs/tiny.yaml <overrides>`` from ``cwd``; the
    script's path is given relative to ``cwd``, as a user there would type it. The logs go to
    the cluster's directory (DEEPSUITE_LOG_DIR), or with ``default_logs`` to slurm/logs/."""
    path = os.path.relpath(ROOT / "slurm" / script, cwd)
    argv = [*sbatch_args, path, "configs/tiny.yaml", *overrides, f"train.run_dir={run_dir}"]
    log_dir = LOGS if default_logs else cluster.dir / "joblogs"
    job_env = {**JOB_ENV, **({} if default_logs else {"DEEPSUITE_LOG_DIR": str(log_dir)})}
    job = cluster.sbatch(argv, env={**job_env, **(env or {})}, cwd=cwd)
    _LOG_DIRS[job] = log_dir
    return job


def log_paths(cluster: SlurmCluster, job_id: int) -> list[Path]:
    """The job's batch log first, then its nodes' logs."""
    name, log_dir = cluster.job(job_id)["JobName"], _LOG_DIRS[job_id]
    main = log_dir / f"{name}-{job_id}.out"
    return [main, *sorted(log_dir.glob(f"{name}-{job_id}.node*.out"))]


def logs(cluster: SlurmCluster, job_id: int) -> str:
    """Every log of the job, each under a header (for assertions and their messages)."""
    parts = []
    for path in log_paths(cluster, job_id):
        text = path.read_text(errors="replace") if path.is_file() else "(missing)"
        parts.append(f"===== {path.name}\n{text}")
    return "\n".join(parts)


def batch_lines(cluster: SlurmCluster, job_id: int) -> list[str]:
    """The batch script's own lines about the job (banners and outcomes)."""
    main = log_paths(cluster, job_id)[0]
    text = main.read_text(errors="replace") if main.is_file() else ""
    return [line for line in text.splitlines() if line.startswith("[deepsuite] job")]


def wait_running(cluster: SlurmCluster, job_id: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while cluster.job(job_id).get("JobState") != "RUNNING":
        assert time.monotonic() < deadline, f"job {job_id} never started:\n{cluster.logs_tail()}"
        time.sleep(0.1)


def ended(cluster: SlurmCluster, job_id: int, state: str, timeout_s: float = 300.0) -> str:
    """Wait for the job's end, assert its state, return all its logs."""
    got = cluster.wait(job_id, timeout_s=timeout_s)
    text = logs(cluster, job_id)
    assert got == state, f"job {job_id}: {got}, expected {state}\n{text}"
    return text


def completions(cluster: SlurmCluster, job_id: int) -> list[dict[str, str]]:
    """SLURM's job-completion records of the job (jobcomp/filetxt: one per requeue and one at the
    end, with the state and exit code sacct would show)."""
    path = cluster.dir / "log" / "jobcomp.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
    return [r for r in records if r.get("JobId") == str(job_id)]


def assert_quiet(text: str) -> None:
    """No launcher traceback and no failed-task report in the job's logs."""
    found = [n for n in NOISE if n in text]
    assert not found, f"{found} in the job's logs:\n{text}"
