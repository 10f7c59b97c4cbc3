"""The ``slurm_cluster`` fixture: one real two-node SLURM for the whole session.

Skipped, with the reason in the summary and a warning, only when the binaries are missing (or we
are not root) and CI is not set; under CI=... the same is a failure.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from tests.distributed.launch import CACHE
from tests.slurm.cluster import SlurmCluster, missing_binaries


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
