"""MoEStatsTracker and MetricsLogger (console + jsonl sinks; wandb disabled or missing)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsuite.layers.moe import routing_entropy
from deepsuite.runlog import read_metrics
from deepsuite.training.metrics import MetricsLogger
from deepsuite.training.moe_stats import (
    MoEStatsTracker,
    comm_stats,
    flops_per_token,
    load_entropy,
    max_vio,
    mfu,
)

REPO = Path(__file__).resolve().parents[2]


def router_entropy(scores_TE) -> float:
    """float64 numpy reference for the layer's routing_entropy: mean over tokens of the entropy (nats) of each token's normalised router scores.

    scores_TE: [T, E] non-negative affinities (sigmoid or softmax outputs). Rows are divided by
    their sum first, so sigmoid scores are treated like V3's normalised gate.
    """
    if hasattr(scores_TE, "detach"):
        scores_TE = scores_TE.detach().to("cpu").double().numpy()
    s = np.asarray(scores_TE, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores_TE must be [T, E] with T > 0, got shape {tuple(s.shape)}")
    if np.any(s < 0):
        raise ValueError("scores_TE must be non-negative (sigmoid/softmax outputs)")
    p = s / np.clip(s.sum(axis=1, keepdims=True), 1e-30, None)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return float(-plogp.sum(axis=1).mean())


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


# ---- pure statistics -------------------------------------------------------------------------


def test_max_vio_hand_worked():
    assert max_vio([10, 10, 10, 10]) == 0.0
    assert max_vio([40, 0, 0, 0]) == pytest.approx(3.0)  # (40 - 10) / 10 = E - 1
    assert max_vio([15, 5, 10, 10]) == pytest.approx(0.5)
    assert max_vio([0, 0, 0]) == 0.0
    assert max_vio(torch.tensor([15, 5, 10, 10])) == pytest.approx(0.5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=16), st.integers(1, 7), st.randoms())
def test_max_vio_invariant_to_permutation_and_scale(c, k, rnd):
    perm = list(c)
    rnd.shuffle(perm)
    assert max_vio(perm) == pytest.approx(max_vio(c))
    assert max_vio([k * x for x in c]) == pytest.approx(max_vio(c))
    assert 0.0 <= max_vio(c) <= len(c) - 1 + 1e-12


def test_load_entropy_bounds():
    assert load_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert load_entropy([20, 0, 0, 0]) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25, 0.0])
    assert load_entropy([2, 1, 1, 0]) == pytest.approx(-(p[:3] * np.log(p[:3])).sum() / np.log(4))


def test_router_entropy_matches_torch():
    g = torch.Generator().manual_seed(0)
    s = torch.sigmoid(torch.randn(50, 8, generator=g, dtype=torch.float64))
    p = s / s.sum(-1, keepdim=True)
    ref = torch.distributions.Categorical(probs=p).entropy().mean().item()
    assert router_entropy(s) == pytest.approx(ref, rel=1e-9)
    # the layer's float32 statistic (logged as moe/layerL/entropy) against this reference
    assert routing_entropy(s.float()).item() == pytest.approx(router_entropy(s), rel=1e-5)
    one_hot = torch.zeros(3, 4)
    one_hot[:, 1] = 1.0
    assert router_entropy(one_hot) == 0.0
    with pytest.raises(ValueError, match="scores_TE"):
        router_entropy(torch.zeros(4))


def test_tracker_window_global_and_dead_experts():
    tr = MoEStatsTracker(4, window=2)
    tr.update(3, [8, 0, 0, 0], bias_E=[0.1, -0.1, 0.0, 0.0], entropy=0.7, seq_aux_loss=0.02)
    tr.update(3, [0, 8, 0, 0], bias_E=[0.2, -0.2, 0.0, 0.0])
    m = tr.metrics()
    assert m["moe/layer3/load"] == [0, 8, 0, 0]
    assert m["moe/layer3/max_vio"] == pytest.approx(3.0)
    # window holds both steps: [8, 8, 0, 0], mean 4 -> (8 - 4) / 4 = 1
    assert m["moe/layer3/max_vio_global"] == pytest.approx(1.0)
    assert m["moe/layer3/dead_experts"] == 2
    assert (m["moe/layer3/load_min"], m["moe/layer3/load_max"]) == (0, 8)
    assert m["moe/layer3/bias"] == [0.2, -0.2, 0.0, 0.0]
    assert m["moe/layer3/bias_mean"] == pytest.approx(0.0)
    assert (m["moe/layer3/bias_min"], m["moe/layer3/bias_max"]) == (-0.2, 0.2)
    assert "moe/layer3/entropy" not in m  # not given on the latest step
    assert "moe/layer3/seq_aux_loss" not in m
    tr.update(3, [0, 0, 8, 0])  # window of 2 drops the first step: [0, 8, 8, 0]
    m = tr.metrics()
    assert m["moe/layer3/dead_experts"] == 2
    assert tr.window_counts(3).tolist() == [0, 8, 8, 0]
    assert "moe/layer3/bias" not in m


def test_tracker_global_equals_maxvio_of_window_sum_and_aggregates():
    rng = np.random.default_rng(1)
    tr = MoEStatsTracker(6, window=5)
    hist = {1: [], 2: []}
    for _ in range(9):
        for layer, p in ((1, [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]), (2, [1 / 6] * 6)):
            c = rng.multinomial(600, p)
            hist[layer].append(c)
            tr.update(layer, torch.from_numpy(c))
    m = tr.metrics()
    for layer in (1, 2):
        want = max_vio(np.sum(hist[layer][-5:], axis=0))
        assert m[f"moe/layer{layer}/max_vio_global"] == pytest.approx(want)
    assert m["moe/layer1/max_vio"] > m["moe/layer2/max_vio"]
    assert m["moe/max_vio_worst"] == m["moe/layer1/max_vio"]
    assert m["moe/max_vio"] == pytest.approx(
        (m["moe/layer1/max_vio"] + m["moe/layer2/max_vio"]) / 2
    )
    assert all(isinstance(x, int) for x in m["moe/layer1/load"])


def test_tracker_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_experts"):
        MoEStatsTracker(0)
    with pytest.raises(ValueError, match="window"):
        MoEStatsTracker(4, window=0)
    tr = MoEStatsTracker(4)
    with pytest.raises(ValueError, match="counts_E must have length 4"):
        tr.update(0, [1, 2, 3])
    with pytest.raises(ValueError, match="counts_E must be >= 0"):
        tr.update(0, [1, -2, 3, 4])
    with pytest.raises(ValueError, match="bias_E must have length 4"):
        tr.update(0, [1, 2, 3, 4], bias_E=[0.0])
    with pytest.raises(ValueError, match="layer"):
        tr.update(-1, [1, 2, 3, 4])


def test_comm_and_flops_helpers():
    m = comm_stats([100, 300], a2a_bytes=4096, a2a_time_s=0.01)
    assert m["comm/rank0/tokens_received"] == 100.0
    assert m["comm/rank1/tokens_received"] == 300.0
    assert m["comm/straggler"] == pytest.approx(1.5)
    assert (m["comm/a2a_bytes"], m["comm/a2a_time"]) == (4096.0, 0.01)
    f = flops_per_token(1_000_000, n_layers=2, seq_len=128, attn_dim=64)
    assert f == 6e6 + 12 * 2 * 128 * 64
    assert mfu(1000.0, f, 1e12) == pytest.approx(1000 * f / 1e12)
    with pytest.raises(ValueError, match="peak_flops_per_s"):
        mfu(1.0, 1.0, 0.0)


# ---- logger: jsonl + console ---------------------------------------------------------------


def test_logger_jsonl_and_console(tmp_path):
    out = io.StringIO()
    tr = MoEStatsTracker(4, window=3)
    tr.update(3, np.array([5, 1, 1, 1]), bias_E=np.array([0.5, 0.25, -0.25, -0.5], np.float32))
    lg = MetricsLogger(tmp_path / "run", rank=0, config={"x": 1}, stream=out, total_steps=10)
    lg.log({"loss/train": torch.tensor(2.5), "optim/lr": np.float32(1e-3), **tr.metrics()}, step=1)
    lg.log({"loss/train": 2.25, "loss/val": float("nan"), "perf/tokens_per_s": 12345.0}, step=2)
    lg.close()
    lg.close()  # idempotent
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["loss/train"] == 2.5
    assert recs[0]["optim/lr"] == pytest.approx(1e-3)
    assert recs[0]["moe/layer3/load"] == [5, 1, 1, 1]
    assert recs[0]["moe/layer3/max_vio"] == pytest.approx(1.5)
    assert recs[0]["moe/layer3/bias"] == [0.5, 0.25, -0.25, -0.5]
    assert math.isnan(recs[1]["loss/val"])
    assert recs[0]["time"] <= recs[1]["time"]
    text = out.getvalue()
    assert "step 1 | loss/train 2.5 | optim/lr 0.001" in text
    assert "perf/tokens_per_s 1.234e+04" in text
    assert "moe/max_vio 1.5" in text
    assert "moe/layer3/load" not in text  # lists stay out of the compact line


def test_logger_appends_on_resume_and_rejects_bad_input(tmp_path):
    with MetricsLogger(tmp_path, rank=0, config={}, console=False) as lg:
        lg.log({"loss/train": 1.0}, step=1)
        with pytest.raises(ValueError, match="step"):
            lg.log({"loss/train": 1.0}, step=-1)
        with pytest.raises(TypeError, match=r"metrics\['bad'\]"):
            lg.log({"bad": "text"}, step=2)
        with pytest.raises(ValueError, match="keys"):
            lg.log({"step": 1.0}, step=2)
    with MetricsLogger(tmp_path, rank=0, config={}, console=False) as lg:
        lg.log({"loss/train": 0.5}, step=2)
    assert [(r["step"], r["loss/train"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5)]
    with pytest.raises(ValueError, match="wandb_mode"):
        MetricsLogger(tmp_path, rank=0, config={}, wandb_mode="sometimes")
    with pytest.raises(ValueError, match="rank"):
        MetricsLogger(tmp_path, rank=-1, config={})


def test_nonzero_rank_writes_nothing(tmp_path):
    out = io.StringIO()
    lg = MetricsLogger(tmp_path / "r1", rank=1, config={}, wandb_mode="offline", stream=out)
    lg.log({"loss/train": 1.0}, step=1)
    lg.log_images(1)
    lg.close()
    assert not (tmp_path / "r1").exists()
    assert not (tmp_path / "wandb_dir").exists()
    assert out.getvalue() == ""


def test_wandb_disabled_writes_no_wandb_files(tmp_path):
    with MetricsLogger(tmp_path / "run", rank=0, config={}, wandb_mode=None, console=False) as lg:
        assert lg.wandb_mode == "disabled"  # from WANDB_MODE
        lg.log({"moe/layer0/load": [1, 2, 3]}, step=0)
        lg.log_images(0)  # no wandb: a no-op, not an error
    assert read_metrics(tmp_path / "run")[0]["moe/layer0/load"] == [1, 2, 3]
    assert not (tmp_path / "wandb_dir").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def test_wandb_not_importable_falls_back_to_jsonl(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["wandb"] = None  # import wandb now raises ImportError
        from deepsuite.training.metrics import MetricsLogger
        from deepsuite.training.moe_stats import MoEStatsTracker
        tr = MoEStatsTracker(2)
        tr.update(1, [3, 1], bias_E=[0.0, 0.1])
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            lg = MetricsLogger({str(tmp_path / "run")!r}, rank=0, config={{"a": 1}},
                               wandb_mode="offline", console=False)
        assert any("wandb is not importable" in str(x.message) for x in w), w
        lg.log({{"loss/train": 1.5, **tr.metrics()}}, step=7)
        lg.log_images(7)
        lg.close()
        print("ok")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    (rec,) = read_metrics(tmp_path / "run")
    assert rec["step"] == 7 and rec["loss/train"] == 1.5
    assert rec["moe/layer1/load"] == [3, 1]
    assert rec["moe/layer1/max_vio"] == pytest.approx(0.5)
    assert rec["moe/layer1/bias"] == [0.0, 0.1]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 7


def test_plain_config_accepts_omegaconf_and_dataclasses():
    import dataclasses

    from omegaconf import OmegaConf

    from deepsuite.training.metrics import plain_config

    @dataclasses.dataclass
    class C:
        lr: float = 0.1

    assert plain_config(OmegaConf.create({"a": {"b": "${c}"}, "c": 2})) == {"a": {"b": 2}, "c": 2}
    assert plain_config(C()) == {"lr": 0.1}
    with pytest.raises(TypeError, match="config"):
        plain_config([1, 2])
