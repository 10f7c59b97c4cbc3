"""The ``slurm_cluster`` fixture: one real two-node SLURM for the whole session, and
``reference``: an uninterrupted job the preempted ones must end equal to.

Skipped, with the reason in the summary and a warning, only when the binaries are missing (or we
are not root) and CI is not set; under CI=... the same is a failure.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed.launch import CACHE
from tests.slurm.cluster import SlurmCluster, missing_binaries
from tests.slurm.jobs import ended, run_dir_for, submit


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set but {reason}: run scripts/ci_services.sh before the tests")
    msg = (
        f"SLURM TESTS NOT RUN: {reason} (bash scripts/ci_services.sh installs them; CI=true fails)"
    )
    warnings.warn(msg, stacklevel=2)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    missing = missing_binaries()
    if missing:
        _unavailable(f"SLURM/munge binaries missing: {', '.join(missing)}")
    if os.geteuid() != 0:
        _unavailable("not root (slurmd runs jobs as root here)")
    workdir = CACHE / "tmp" / f"slurm-{os.getpid()}"  # short: munge's socket path limit
    with SlurmCluster(workdir) as cluster:
        yield cluster


@dataclass(frozen=True)
class Reference:
    """An uninterrupted CHECKPOINTED_RUN job through slurm/train_torchrun.sbatch."""

    run_dir: Path
    job: int


@pytest.fixture(scope="session")
def reference(slurm_cluster: SlurmCluster) -> Reference:
    run_dir = run_dir_for("ref")
    job = submit(slurm_cluster, "train_torchrun.sbatch", run_dir)
    ended(slurm_cluster, job, "COMPLETED", timeout_s=240)
    return Reference(run_dir, job)
