"""MetricsLogger in wandb offline mode, read back with wandb's own protobuf records."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

pytest.importorskip("wandb")

from deepsuite.runlog import read_metrics
from deepsuite.training.metrics import BIAS_HIST_BINS, MetricsLogger
from deepsuite.training.moe_stats import MoEStatsTracker
from tests.training.wandb_reader import find_run_file, iter_records, read_offline_run


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the explicit argument must win
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "wandb_dir").mkdir()


def _run(tmp_path, steps=6, n_experts=8, expert_series_max=4096):
    rng = np.random.default_rng(0)
    tr = MoEStatsTracker(n_experts, window=4)
    bias = {3: np.zeros(n_experts, np.float32), 4: np.zeros(n_experts, np.float32)}
    config = {"model": {"n_experts": n_experts}, "optim": {"lr": 3e-4}}
    lg = MetricsLogger(tmp_path / "run", rank=0, config=config, wandb_mode="offline",
                       project="proj", name="roundtrip", group="grp", tags=["a", "b"],
                       console=False, expert_series_max=expert_series_max)  # fmt: skip
    for step in range(1, steps + 1):
        for layer, hot in ((3, 0.6), (4, 1 / n_experts)):
            p = np.full(n_experts, (1 - hot) / (n_experts - 1))
            p[0] = hot
            c = rng.multinomial(512, p)
            bias[layer] += np.float32(0.01) * np.sign(c.mean() - c).astype(np.float32)
            tr.update(layer, c, bias[layer])
        lg.log({"loss/train": 4.0 / step, "optim/lr": 3e-4, **tr.metrics()}, step=step)
    lg.log_images(steps)
    lg.alert("MoE layer 3: imbalanced", f"step {steps}: MoE layer 3: MaxVio ...")
    lg.close()
    return read_metrics(tmp_path / "run")


def test_offline_run_equals_jsonl(tmp_path):
    records = _run(tmp_path)
    run = read_offline_run(tmp_path / "wandb_dir")
    assert run.finished
    assert (run.project, run.name, run.group, run.tags) == ("proj", "roundtrip", "grp", ["a", "b"])
    assert run.config == {"model": {"n_experts": 8}, "optim": {"lr": 3e-4}}
    assert len(run.history) == len(records) == 6
    for rec in records:
        (row,) = [h for h in run.history if h["_step"] == rec["step"]]
        assert row["loss/train"] == rec["loss/train"]
        for layer in (3, 4):
            p = f"moe/layer{layer}/"
            for key in ("load", "load_window"):
                load = row[p + key]
                assert load["_type"] == "histogram"
                assert load["values"] == rec[p + key]  # exact per-expert counts
                assert load["bins"] == list(range(9))
            window = np.asarray(rec[p + "load_window"], dtype=np.float64)
            for e in range(8):  # one scalar series per expert: its share and its bias
                assert row[f"{p}expert/{e:02d}/load_share"] == window[e] / window.mean()
                assert row[f"{p}expert/{e:02d}/bias"] == rec[p + "bias"][e]
            for k in ("max_vio", "max_vio_global", "bias_mean", "bias_min", "bias_max",
                      "dead_experts", "load_min", "load_max"):  # fmt: skip
                assert row[p + k] == rec[p + k], k
            counts, edges = np.histogram(rec[p + "bias"], BIAS_HIST_BINS)
            assert row[p + "bias"]["values"] == counts.tolist()
            np.testing.assert_allclose(row[p + "bias"]["bins"], edges, rtol=0, atol=1e-12)
    last = run.history[-1]
    assert records[-1]["moe/layer3/max_vio"] > 1.0 > records[-1]["moe/layer4/max_vio"]
    images = sorted(k for k in last if k.startswith("plots/"))
    assert images == ["plots/layer3/bias", "plots/layer3/load_steps", "plots/layer4/bias",
                      "plots/layer4/load_steps", "plots/load_layers"]  # fmt: skip
    for name in images:
        img = last[name]
        assert img["_type"] == "image-file" and (img["width"], img["height"]) == (1000, 500)
    assert last["moe/load_table"]["nrows"] == 16  # 2 layers x 8 experts
    assert run.summary["moe/layer3/max_vio"] == records[-1]["moe/layer3/max_vio"]
    assert run.alerts == [{"title": "MoE layer 3: imbalanced", "level": "WARN",
                           "text": "step 6: MoE layer 3: MaxVio ..."}]  # fmt: skip


def test_expert_series_stay_out_over_the_cap(tmp_path):
    _run(tmp_path, steps=2, expert_series_max=31)  # 2 layers x 8 experts x 2 = 32 > 31
    run = read_offline_run(tmp_path / "wandb_dir")
    keys = {k for row in run.history for k in row}
    assert "moe/layer3/load_window" in keys
    assert not any("/expert/" in k for k in keys)


def test_reader_rejects_foreign_and_corrupt_files(tmp_path):
    _run(tmp_path, steps=2)
    path = find_run_file(tmp_path / "wandb_dir")
    assert read_offline_run(path).finished  # waits for wandb's service to write the file out
    assert sum(1 for _ in iter_records(path)) > 3
    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a wandb log")
    with pytest.raises(ValueError, match="header"):
        list(iter_records(bad))
    data = bytearray(path.read_bytes())
    _, length, _ = struct.unpack_from("<IHB", data, 7)
    data[7 + 7 + length // 2] ^= 0xFF  # flip a byte inside the first record
    corrupt = tmp_path / "corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(iter_records(corrupt))
    with pytest.raises(ValueError, match="no offline wandb run"):
        find_run_file(tmp_path / "run")


def test_run_identity_from_wandb_env_and_dataclass_config(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class Optim:
        lr: float = 1e-3

    monkeypatch.setenv("WANDB_PROJECT", "envproj")
    monkeypatch.setenv("WANDB_NAME", "envname")
    monkeypatch.setenv("WANDB_RUN_GROUP", "envgroup")
    monkeypatch.setenv("WANDB_TAGS", "t1,t2")
    with MetricsLogger(tmp_path / "run", rank=0, config=Optim(), wandb_mode="offline",
                       console=False) as lg:  # fmt: skip
        lg.log({"loss/train": 1.0}, step=0)
    run = read_offline_run(tmp_path / "wandb_dir")
    assert (run.project, run.name, run.group, run.tags) == ("envproj", "envname", "envgroup",
                                                            ["t1", "t2"])  # fmt: skip
    assert run.config == {"lr": 1e-3}
    assert run.series("loss/train") == {0: 1.0}
