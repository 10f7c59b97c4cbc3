"""Load balance as users watch it: a real 2-rank run read back from wandb's offline files, plots
from a real run's jsonl, and a run without wandb importable."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from tests.training.runner import ROOT, env, metrics, run_train
from tests.training.wandb_reader import read_offline_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL, SEQ, TOPK, E = 8, 32, 2, 8
BASE = [f"train.global_batch_size={GLOBAL}", "train.micro_batch_size=4", "logging.moe_every=2"]


def test_wandb_offline_holds_what_the_jsonl_holds(tmp_path):
    wandb_dir = tmp_path / "wandb"
    run_dir = tmp_path / "run"
    run_train(
        run_dir,
        [*BASE, "train.steps=4", "train.eval_every=2", "logging.wandb=offline", "parallel.ep=2"],
        nproc=2,
        extra_env={"WANDB_DIR": str(wandb_dir)},
    )
    run = read_offline_run(wandb_dir)
    assert run.finished
    assert run.config["moe"]["n_routed_experts"] == E  # the resolved config was logged
    records = {r["step"]: r for r in metrics(run_dir)}
    layers = sorted({k.split("/")[1] for r in records.values() for k in r if k.endswith("/load")})
    assert layers == ["layer1", "layer2", "layer3"]
    for layer in layers:
        hist = run.series(f"moe/{layer}/load")
        assert sorted(hist) == [2, 4]
        for step, h in hist.items():
            load = records[step][f"moe/{layer}/load"]
            assert h["_type"] == "histogram"
            assert [int(v) for v in h["values"]] == load  # bin i = expert i, exact counts
            assert sum(load) == GLOBAL * SEQ * TOPK  # every token of every rank, k experts each
        for key in (
            "max_vio",
            "max_vio_global",
            "bias_mean",
            "bias_min",
            "bias_max",
            "dead_experts",
        ):
            series = run.series(f"moe/{layer}/{key}")
            for step, value in series.items():
                assert value == pytest.approx(records[step][f"moe/{layer}/{key}"], rel=1e-12)
        assert run.series(f"moe/{layer}/bias")  # the bias histogram
    for key in ("loss/train", "loss/val", "comm/a2a_bytes", "comm/straggler", "perf/tokens_per_s"):
        assert run.series(key), key
    # rows the EP ranks received: one per (token, destination rank) per MoE layer, so between
    # one and min(top-k, ep) = 2 rows for each of the step's tokens in each of the 3 layers
    received = sum(records[4][f"comm/rank{r}/tokens_received"] for r in range(2))
    assert 3 * GLOBAL * SEQ <= received <= 3 * GLOBAL * SEQ * 2


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_balancing_shows_in_metrics_and_plots(tmp_path):
    """gamma 0 lets the routing collapse (global MaxVio climbs and stays high); the bias keeps it low."""
    late = {}
    for gamma in (0.0, 0.02):
        run_dir = tmp_path / f"gamma{gamma}"
        run_train(
            run_dir,
            [
                *BASE,
                "train.steps=40",
                "parallel.ep=1",
                "train.micro_batch_size=8",
                "logging.moe_every=5",
                f"moe.bias_update_speed={gamma}",
                "train.export_final=false",
            ],
            nproc=1,
        )
        series = [r["moe/max_vio_global"] for r in metrics(run_dir) if "moe/max_vio_global" in r]
        late[gamma] = sum(series[-3:]) / 3
        out = subprocess.run(
            [sys.executable, "-m", "deepsuite.cli", "plot", str(run_dir)],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        pngs = sorted((run_dir / "plots").glob("*.png"))
        names = {p.name for p in pngs}
        assert {"load_layers.png", "max_vio.png"} <= names, names
        assert any(n.startswith("bias_layer") for n in names), names
        assert any(n.startswith("load_steps_layer") for n in names), names
        for png in pngs:
            width, height = _png_size(png)
            assert width >= 600 and height >= 300
    assert late[0.0] > 1.5, late
    assert late[0.0] > 3 * late[0.02], late


def test_training_runs_without_wandb_installed(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "wandb.py").write_text(
        "raise ImportError('wandb is not installed (blocked by the test)')\n"
    )
    run_dir = tmp_path / "run"
    e = {"PYTHONPATH": f"{blocker}:{ROOT}"}
    proc = run_train(
        run_dir,
        [*BASE, "train.steps=2", "logging.wandb=offline", "parallel.ep=1"],
        nproc=1,
        extra_env=e,
    )
    assert "wandb" in proc.stderr + proc.stdout  # the warning says wandb is missing
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert "moe/layer1/load" in records[1]
