"""The project's sbatch scripts on a real two-node SLURM (tests/slurm/cluster.py): launching.

A 2-node expert-parallel run of the tiny config through each launch style (torchrun per node,
one task per rank, the deepspeed launcher) must give the same losses, from any submit directory,
with its logs where slurm/README.md says and nothing else left in the checkout; a GPU node given
no GPUs and a container image reach the user as errors. Preemption: test_preemption.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from deepsuite.checkpoint.layout import verify_checkpoint
from tests.distributed.launch import ROOT
from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import Reference
from tests.slurm.jobs import (
    assert_quiet,
    batch_lines,
    completions,
    ended,
    log_paths,
    run_dir_for,
    submit,
)
from tests.training.runner import CHECKPOINTED_STEPS, losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

STEPS = CHECKPOINTED_STEPS


def test_two_node_expert_parallel_run_completes(
    slurm_cluster: SlurmCluster, reference: Reference
) -> None:
    run_dir = reference.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and not summary["preempted"]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    tag = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert verify_checkpoint(tag) is None
    state = json.loads((tag / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallel"]["ep"] == 2
    # both ranks' expert shards were written: one file per global expert of every MoE layer
    experts = {p.name.split("_mp_rank")[0] for p in tag.glob("layer_*_expert_*")}
    assert len(experts) == 3 * 16, sorted(experts)
    assert summary["loss_last"] < summary["loss_first"]
    # the batch log: a banner and how the run ended; each node's ranks in a log of their own
    main, *nodes = log_paths(slurm_cluster, reference.job)
    lines = batch_lines(slurm_cluster, reference.job)
    assert len(lines) == 2 and "2 node(s)" in lines[0] and "rendezvous 127.0.0.1" in lines[0]
    assert lines[1].endswith("finished"), lines
    assert [p.name.rsplit(".", 2)[1] for p in nodes] == ["node0", "node1"]
    ranks = "".join(p.read_text() for p in nodes)
    assert ranks.count("=== deepsuite run summary ===") == 1 and "finished at step 8" in ranks
    assert_quiet(main.read_text() + ranks)
    assert [(r["JobState"], r["ExitCode"]) for r in completions(slurm_cluster, reference.job)] == [
        ("COMPLETED", "0:0")
    ]


def _checkout_files() -> set[str]:
    """Every untracked or ignored path git sees in the checkout (ignored directories as one)."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.splitlines())


@pytest.mark.parametrize(
    "script", ["train_srun.sbatch", "train_deepspeed.sbatch"], ids=["task-per-rank", "deepspeed"]
)
def test_other_launch_styles_match_torchrun_from_any_directory(
    slurm_cluster: SlurmCluster, reference: Reference, script: str, tmp_path: Path
) -> None:
    """Submitted from a directory outside the checkout, by a relative path: the logs still go to
    slurm/logs/ of the checkout, and the job leaves nothing else there (no hostfile) nor in its
    temp directory."""
    run_dir = run_dir_for(script.split(".")[0])
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    before = _checkout_files()
    job = submit(slurm_cluster, script, run_dir, cwd=elsewhere, default_logs=True)
    text = ended(slurm_cluster, job, "COMPLETED", timeout_s=240)
    paths = log_paths(slurm_cluster, job)
    try:
        ref, got = losses(reference.run_dir), losses(run_dir)
        assert sorted(got) == sorted(ref)
        for s in ref:
            assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), (s, got[s], ref[s])
        assert_quiet(text)
        logs = {f"!! {p.relative_to(ROOT)}" for p in paths}
        assert len(logs) == 3 and _checkout_files() - before == logs, (before, _checkout_files())
        assert list(elsewhere.iterdir()) == []
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        assert not list(tmp.glob(f"deepsuite-{job}.*")), "the job's temp directory was left"
    finally:
        for p in paths:  # the checkout's log directory is the user's: leave it as it was
            p.unlink(missing_ok=True)


def test_gpu_node_given_no_gpus_is_a_loud_error(slurm_cluster: SlurmCluster) -> None:
    """On a GPU node (DEEPSUITE_ACCELERATOR=cuda: the detection's override) a job that asked for
    no GPUs stops at once with a line saying how to ask, instead of one rank per node."""
    run_dir = run_dir_for("nogpu")
    job = submit(
        slurm_cluster, "train_torchrun.sbatch", run_dir, env={"DEEPSUITE_ACCELERATOR": "cuda"}
    )
    text = ended(slurm_cluster, job, "FAILED", timeout_s=60)
    assert "error: GPUS_PER_NODE: this node has GPUs but the job was given none" in text
    assert "--gpus-per-node=N" in text and not run_dir.exists()
    assert slurm_cluster.job(job)["ExitCode"] == "2:0"


def test_container_image_is_passed_to_srun(slurm_cluster: SlurmCluster) -> None:
    """CONTAINER_IMAGE adds pyxis' --container-image to the step's srun (this cluster has no
    pyxis, so srun refuses the option: proof that it was given) and the job fails with srun."""
    run_dir = run_dir_for("container")
    image = "nvcr.io#nvidia/pytorch:24.05-py3"
    job = submit(slurm_cluster, "train_srun.sbatch", run_dir, env={"CONTAINER_IMAGE": image})
    text = ended(slurm_cluster, job, "FAILED", timeout_s=60)
    assert f"--container-image={image}" in text and "the training step failed" in text, text
