"""Load balance as users watch it: a real 2-rank run read back from wandb's offline files, plots
from a real run's jsonl, and a run without wandb importable."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings

import pytest

from tests.training.runner import ROOT, Job, env, metrics, run_train, run_trains
from tests.training.wandb_reader import read_offline_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GLOBAL, SEQ, TOPK, E = 8, 32, 2, 8
BASE = [f"train.global_batch_size={GLOBAL}", "train.micro_batch_size=4", "logging.moe_every=2"]


def test_wandb_offline_holds_what_the_jsonl_holds(tmp_path):
    wandb_dir = tmp_path / "wandb"
    run_dir = tmp_path / "run"
    run_train(
        run_dir,
        [*BASE, "train.steps=4", "train.eval_every=2", "logging.wandb=offline", "parallel.ep=2",
         "logging.moe_window=2", "logging.images_every=2"],
        nproc=2,
        extra_env={"WANDB_DIR": str(wandb_dir)},
    )  # fmt: skip
    run = read_offline_run(wandb_dir)
    assert run.finished
    assert run.config["moe"]["n_routed_experts"] == E  # the resolved config was logged
    assert run.alerts == []  # alerts are off in tests unless asked for
    records = {r["step"]: r for r in metrics(run_dir)}
    rows = {h["_step"]: h for h in run.history if "loss/train" in h}
    assert sorted(rows) == [1, 2, 3, 4]
    # every key keeps its name from the first step to the last: the MoE steps (2, 4: window
    # metrics, eval, pictures) log one set of keys, the others (1, 3) another
    assert set(rows[2]) == set(rows[4]) and set(rows[1]) == set(rows[3]) < set(rows[2])
    layers = sorted({k.split("/")[1] for r in records.values() for k in r if k.endswith("/load")})
    assert layers == ["layer1", "layer2", "layer3"]
    for layer in layers:
        p = f"moe/{layer}/"
        for step in (2, 4):
            rec, row = records[step], rows[step]
            assert rec["moe/window_steps"] == 2
            for key in ("load", "load_window"):
                h = row[p + key]
                assert h["_type"] == "histogram"
                assert [int(v) for v in h["values"]] == rec[p + key]  # bin i = expert i, exact
            # every token of every rank, k experts each, over the steps of the window
            assert sum(rec[p + "load"]) == GLOBAL * SEQ * TOPK
            assert sum(rec[p + "load_window"]) == GLOBAL * SEQ * TOPK * rec["moe/window_steps"]
            window = rec[p + "load_window"]
            for e in range(E):
                share = row[f"{p}expert/{e:02d}/load_share"]
                assert share == pytest.approx(window[e] * E / sum(window), rel=1e-12)
                assert row[f"{p}expert/{e:02d}/bias"] == rec[p + "bias"][e]
            for key in ("load_steps", "bias"):
                assert row[f"plots/{layer}/{key}"]["_type"] == "image-file"
        for key in (
            "max_vio",
            "max_vio_global",
            "bias_mean",
            "bias_min",
            "bias_max",
            "dead_experts",
        ):
            series = run.series(f"moe/{layer}/{key}")
            assert sorted(series) == [2, 4]
            for step, value in series.items():
                assert value == pytest.approx(records[step][f"moe/{layer}/{key}"], rel=1e-12)
    assert sorted(run.series("plots/load_layers")) == [2, 4]
    for key in ("loss/train", "loss/val", "comm/a2a_bytes", "comm/straggler", "perf/tokens_per_s"):
        assert run.series(key), key
    for r in range(2):  # all-to-all per EP rank: bytes and seconds each rank spent
        assert sorted(run.series(f"comm/rank{r}/a2a_bytes")) == [1, 2, 3, 4]
        assert run.series(f"comm/rank{r}/a2a_time")[4] > 0
    assert sum(records[4][f"comm/rank{r}/a2a_bytes"] for r in range(2)) == pytest.approx(
        records[4]["comm/a2a_bytes"]
    )
    # rows the EP ranks received: one per (token, destination rank) per MoE layer, so between
    # one and min(top-k, ep) = 2 rows for each of the step's tokens in each of the 3 layers
    received = sum(records[4][f"comm/rank{r}/tokens_received"] for r in range(2))
    assert 3 * GLOBAL * SEQ <= received <= 3 * GLOBAL * SEQ * 2
    _check_workspace(run_dir, run)


def _check_workspace(run_dir, run):
    """The workspace `deepsuite workspace` would save: every panel names keys this run sent to
    wandb, and what wandb's workspace API would upload parses back into the same workspace."""
    with warnings.catch_warnings():  # its pydantic-v1-style validators warn on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from wandb_workspaces.workspaces import Workspace, internal

    from deepsuite.training.wandb_workspace import build_workspace, workspace_sections

    sections = workspace_sections(metrics(run_dir))
    logged = {k for h in run.history for k in h}
    names = [s["name"] for s in sections]
    assert names == ["Load balance", "Bias per expert", "Load per expert", "All-to-all per rank",
                     "Throughput"]  # fmt: skip
    for s in sections:
        for panel in s["panels"]:
            keys = panel.get("y") or panel.get("keys")
            assert keys and set(keys) <= logged, (panel["title"], set(keys) - logged)
    titles = [p["title"] for p in sections[0]["panels"]]
    assert titles[0] == "MaxVio per MoE layer, over the last 2 steps"
    ws = build_workspace(sections, entity="someone", project="deepsuite")
    # Workspace._to_model / _from_model: wandb-workspaces 0.4.x's (private) wire format, the
    # JSON .save() uploads; nothing public reads a workspace back without a server
    wire = ws._to_model().model_dump_json()
    back = Workspace._from_model(internal.View.model_validate_json(wire))
    assert [s.name for s in back.sections] == names
    assert [p.title for p in back.sections[0].panels] == titles
    y = [m.name for m in back.sections[1].panels[0].y]  # wr.Metric after the round trip
    assert y == [f"moe/layer1/expert/{e:02d}/bias" for e in range(E)]
    assert back.sections[0].panels[3].media_keys == [
        "plots/load_layers",
        *[f"plots/layer{la}/load_steps" for la in (1, 2, 3)],
    ]
    out = subprocess.run(
        [sys.executable, "-m", "deepsuite.cli", "workspace", str(run_dir), "--save"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "--entity: required with --save" in out.stdout


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# after a 20-step warm-up: an expert without a token for 10 steps, or a window MaxVio over 2.5
# (gamma 0 goes to ~3, the most top-2 of 8 experts allows; gamma 0.02 stays under 1.7)
ALERTS = [
    "logging.alert_dead_steps=15",
    "logging.alert_max_vio=2.5",
    "logging.alert_after_steps=20",
]


def test_balancing_shows_in_metrics_plots_and_alerts(tmp_path):
    """gamma 0 lets the routing collapse (global MaxVio climbs and stays high, experts die, the
    alerts fire once per onset); the bias keeps it low and the alerts silent."""
    late, alerts, gammas = {}, {}, (0.0, 0.02)
    jobs = {
        gamma: Job(
            tmp_path / f"gamma{gamma}",
            [
                *BASE,
                "train.steps=40",
                "parallel.ep=1",
                "train.micro_batch_size=8",
                "logging.moe_every=5",
                f"moe.bias_update_speed={gamma}",
                "train.export_final=false",
                *(["logging.wandb=offline"] if gamma == 0 else []),  # where alerts are read
                *ALERTS,
            ],
            nproc=1,
            extra_env={"WANDB_DIR": str(tmp_path / f"wandb{gamma}")},
        )
        for gamma in gammas
    }
    procs = run_trains(jobs)  # both at once
    for gamma in gammas:
        run_dir, proc, wandb = jobs[gamma].run_dir, procs[gamma], gamma == 0
        console = [ln for ln in proc.stderr.splitlines() if ln.startswith("deepsuite WARNING")]
        alerts[gamma] = [ln.split(" ", 2)[2] for ln in console]
        if wandb:  # the same alerts reach wandb
            sent = read_offline_run(tmp_path / f"wandb{gamma}").alerts
            assert [a["text"] for a in sent] == alerts[gamma]
            assert {a["level"] for a in sent} == {"WARN"}
            assert all(a["title"].startswith("MoE layer") for a in sent)
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
        assert {"load_layers.png", "max_vio.png", "dead_experts.png", "throughput.png"} <= names
        for la in (1, 2, 3):
            assert {f"layer{la}_load_steps.png", f"layer{la}_bias.png"} <= names, names
        for png in pngs:
            width, height = _png_size(png)
            assert width >= 600 and height >= 300
    assert late[0.0] > 1.5, late
    assert late[0.0] > 3 * late[0.02], late
    assert alerts[0.02] == []
    steps = [int(text.split(":")[0].split()[1]) for text in alerts[0.0]]
    assert min(steps) > 20  # nothing in the warm-up
    imbalanced = [t.split(":")[1] for t in alerts[0.0] if "alert_max_vio=2.5" in t]
    dead = [t for t in alerts[0.0] if "received no token for 15+ steps" in t]
    assert imbalanced and dead and len(imbalanced) + len(dead) == len(alerts[0.0])
    assert len(imbalanced) == len(set(imbalanced))  # once per layer: it never recovered


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
