"""Faults on CPU with gloo: a rank killed under ``torchrun --max-restarts`` and a corrupt checkpoint.

The oracle for both is an uninterrupted 2-rank run of the same steps: the restarted / fallen-back
run must end with the same model (safetensors export) and the same per-step losses.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from deepsuite.checkpoint.layout import find_resumable, tag_for_step
from deepsuite.runlog import read_metrics
from tests.distributed.launch import CACHE, ROOT, free_port
from tests.training.runner import (
    CHECKPOINTED_RUN,
    CHECKPOINTED_STEPS,
    assert_same_run,
    losses,
)
from tests.training.runner import env as runner_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = CHECKPOINTED_STEPS
SMALL = [*CHECKPOINTED_RUN, "train.keep_last=4"]


def torchrun(run_dir: Path, *extra: str) -> subprocess.Popen:
    """Start a 2-rank run of the tiny config; its output goes to run_dir.log."""
    env = {**runner_env(), "PYTHONUNBUFFERED": "1", "TMPDIR": str(CACHE / "tmp")}
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *extra,
        "train/train.py", "configs/tiny.yaml", *SMALL, f"train.run_dir={run_dir}",
    ]  # fmt: skip
    log = open(f"{run_dir}.log", "w")  # noqa: SIM115 (closed when the child has it)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def finish(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 240.0) -> str:
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    out = Path(f"{run_dir}.log").read_text(errors="replace")
    assert rc == 0, f"torchrun exited {rc}:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def reference_started(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, subprocess.Popen]]:
    """The uninterrupted run, started (the first test runs its own beside it); stopped at the
    module's end if no test waited for it."""
    run_dir = tmp_path_factory.mktemp("ft") / "reference"
    proc = torchrun(run_dir)
    yield run_dir, proc
    if proc.poll() is None:
        proc.terminate()  # torchrun passes it on to its workers
        proc.wait(60)


@pytest.fixture(scope="module")
def reference(reference_started: tuple[Path, subprocess.Popen]) -> Path:
    """An uninterrupted run, checkpoints at steps 2, 4, 6, 8 kept."""
    run_dir, proc = reference_started
    finish(proc, run_dir)
    assert find_resumable(run_dir / "checkpoints") == tag_for_step(STEPS)
    return run_dir


def test_killed_rank_restarts_the_group_and_resumes_to_the_same_model(
    reference_started: tuple[Path, subprocess.Popen], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    run_dir = tmp_path / "killed"
    proc = torchrun(run_dir, "--max-restarts=1")
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not latest.is_file():  # the step-2 checkpoint is committed: training goes on from there
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc, run_dir)
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = [w for w in workers if w.environ().get("RANK") == "1"]
    assert len(victim) == 1, [w.cmdline() for w in workers]
    killed_at = len(losses(run_dir))
    victim[0].send_signal(signal.SIGKILL)
    out = finish(proc, run_dir)
    assert killed_at < STEPS, "the rank was killed after training ended: the test proves nothing"
    assert "resumed from" in out, out[-4000:]
    resumed_at = int(out.split("resumed from")[1].split(" at step ")[1].split()[0])
    assert 2 <= resumed_at < STEPS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["steps_this_run"] == STEPS - resumed_at
    assert_same_run(run_dir, request.getfixturevalue("reference"))  # it ran beside this one


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(
    reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "truncated"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("final", "metrics.jsonl"))
    latest = run_dir / "checkpoints" / tag_for_step(STEPS)
    victim = max(latest.glob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    # the steps the previous checkpoint had done are in the copied jsonl no more: rerun them
    metrics = [r for r in read_metrics(reference) if r.get("step", 0) <= STEPS - 2]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    out = finish(torchrun(run_dir), run_dir)
    assert f"{latest} skipped" in out and "truncated" in out, out[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag_for_step(STEPS - 2)}" in out
    assert_same_run(run_dir, reference)


def test_corrupt_checkpoint_content_is_detected(reference: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", ckpt)
    victim = next((ckpt / tag_for_step(STEPS)).glob("layer_*_expert_*.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    victim.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_resumable(ckpt) == tag_for_step(STEPS - 2)
    assert any("checksum" in str(w.message) for w in caught), [str(w.message) for w in caught]
    # a save killed before its manifest (rank 0 writes it last) is skipped too
    (ckpt / tag_for_step(STEPS - 2) / "manifest.json").unlink()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert find_resumable(ckpt) == tag_for_step(STEPS - 4)
