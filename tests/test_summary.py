"""`deepsuite summary`: per-layer balance, worst experts and throughput from a jsonl."""

from __future__ import annotations

import json

import pytest

from deepsuite.cli import main as cli_main
from deepsuite.summary import format_summary, summarize, summary_main


def _write(run_dir):
    rows = [
        # step 1 is warm-up: its slow throughput is skipped by default
        {"step": 1, "loss/train": 5.0, "perf/tokens_per_s": 10.0, "time/forward": 9.0,
         "moe/layer2/load": [6, 2, 0, 0], "moe/layer2/max_vio": 1.0,
         "moe/layer2/dead_experts": 2},
        {"step": 2, "loss/train": 4.0, "loss/val": 4.5, "perf/tokens_per_s": 1000.0,
         "perf/mfu": 0.25, "time/forward": 0.2, "time/backward": 0.4,
         "moe/layer2/load": [2, 4, 2, 0], "moe/layer2/max_vio": 3.0,
         "moe/layer2/max_vio_global": 0.5, "moe/layer2/dead_experts": 1,
         "moe/layer2/bias_min": -0.01, "moe/layer2/bias_max": 0.02},
        {"step": 3, "loss/train": 3.0, "loss/val": 4.7, "perf/tokens_per_s": 3000.0,
         "perf/mfu": 0.35, "time/forward": 0.4, "time/backward": 0.6},
    ]  # fmt: skip
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"time": 0.0, **r}) + "\n" for r in rows)
    )


def test_summarize_hand_worked(tmp_path):
    _write(tmp_path)
    s = summarize(tmp_path, top=2)
    assert s["steps"] == [1, 3]
    assert s["loss"] == {"train_last": 3.0, "val_last": 4.7, "val_best": 4.5}
    th = s["throughput"]
    assert th["tokens_per_s"] == pytest.approx(2000.0)  # mean of steps 2 and 3
    assert th["mfu"] == pytest.approx(0.35)  # only 2 values: the first is skipped
    assert th["step_time_s"] == {"forward": pytest.approx(0.3), "backward": pytest.approx(0.6)}
    (la,) = s["layers"]
    # loads summed over logged steps: [8, 6, 2, 0], mean 4
    assert la["layer"] == 2 and la["n_experts"] == 4 and la["logged_steps"] == 2
    assert la["max_vio_logged"] == pytest.approx(1.0)
    assert la["max_vio_last"] == 3.0 and la["max_vio_mean"] == pytest.approx(2.0)
    assert la["max_vio_global_last"] == 0.5
    assert la["dead_experts_last"] == 1
    assert la["never_used"] == [3]
    assert la["hottest"] == [(0, 2.0), (1, 1.5)]
    assert la["coldest"] == [(3, 0.0), (2, 0.5)]
    assert (la["bias_min_last"], la["bias_max_last"]) == (-0.01, 0.02)
    assert summarize(tmp_path, skip_first=0)["throughput"]["tokens_per_s"] == pytest.approx(
        4010.0 / 3
    )
    assert s["window_steps"] is None  # a run written before the window length was logged
    text = format_summary(s)
    assert "window = over the run's window (length not logged)" in text
    assert "tokens/s 2,000" in text and "MFU 35.00%" in text
    assert "0:2.00, 1:1.50" in text and "3:0.00, 2:0.50" in text


def test_summary_states_the_window(tmp_path):
    _write(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "time": 0.0, "moe/layer2/load": [2, 2, 2, 2],
                            "moe/layer2/load_window": [8, 6, 6, 4],
                            "moe/window_steps": 10}) + "\n")  # fmt: skip
    s = summarize(tmp_path)
    assert s["window_steps"] == 10 and s["layers"][0]["logged_steps"] == 3
    assert "window = over the last 10 steps" in format_summary(s)


def test_summary_main_text_json_and_errors(tmp_path, capsys):
    _write(tmp_path)
    assert summary_main([str(tmp_path)]) == 0
    assert "loss/train 3.0000" in capsys.readouterr().out
    assert summary_main([str(tmp_path), "--json", "--top", "1"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["layers"][0]["hottest"] == [[0, 2.0]]
    assert cli_main(["summary", str(tmp_path / "nope")]) == 2  # through the error boundary
    err = capsys.readouterr().err
    assert "deepsuite summary: error:" in err and "no metrics file" in err
    with pytest.raises(ValueError, match="top"):
        summarize(tmp_path, top=0)
