"""A run checkpointed by an older deepsuite resumes under this one as it would have under its own.

The older tree is commit 6e49e12, the last with the experts' gate and up as two parameters: its
checkpoint's ZeRO optimizer partitions are laid out by other parameters than this tree's, which
DeepSpeed would restore by position (it refuses, on every rank, with a traceback), so the resume
goes by name (``load_any_layout``). The older tree continues its own run beside, and the steps
after the checkpoint must agree. Skipped where the clone has no history (the reason is printed).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training import runner

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

OLDER = "6e49e12"


def _older_runner(tmp: Path):
    """The older tree (unpacked by git archive) and its own tests' runner."""
    tree = tmp / "older"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", OLDER], cwd=runner.ROOT, capture_output=True, check=False
    )
    if archive.returncode:
        pytest.skip(f"commit {OLDER} is not in this clone: {archive.stderr.decode()[-200:]}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    spec = importlib.util.spec_from_file_location("older_runner", tree / "tests/training/runner.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(tree))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(tree))
    return mod


def test_older_zero1_checkpoint_resumes_by_name(tmp_path: Path) -> None:
    older = _older_runner(tmp_path)
    common = ["train.save_every=2", "parallel.zero_stage=1"]
    older.run_train(tmp_path / "a", [*common, "train.steps=2"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    older.run_train(tmp_path / "a", [*common, "train.steps=4"])  # the older tree goes on
    p = runner.run_train(tmp_path / "b", [*common, "train.steps=4"])  # this tree resumes it
    assert "other parameter names" in p.stdout + p.stderr
    a, b = runner.losses(tmp_path / "a"), runner.losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, a, b)
