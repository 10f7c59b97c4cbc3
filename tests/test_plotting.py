"""`deepsuite plot`: PNGs from a synthetic metrics.jsonl, and the pixels show the imbalance."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from deepsuite.cli import main as cli_main

pytest.importorskip("matplotlib")

from matplotlib import colormaps
from matplotlib.image import imread

from deepsuite.plotting import (
    default_layer,
    draw_all,
    fig_load_steps,
    fig_max_vio,
    load_matrix_layers,
    load_matrix_steps,
    plot_main,
)
from deepsuite.runlog import max_vio_series, read_metrics
from deepsuite.training.moe_stats import MoEStatsTracker

E, HOT = 8, 5


def _write_run(run_dir, steps=12):
    """Layer 3: expert HOT gets half of all tokens; layer 4: exactly balanced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = MoEStatsTracker(E, window=4)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in range(0, steps * 10, 10):
            hot = np.full(E, 40)
            hot[HOT] = 280  # mean 70 -> relative 4, MaxVio 3
            tr.update(3, hot, bias_E=np.linspace(-1, 1, E) * step / 1000)
            tr.update(4, np.full(E, 70), bias_E=np.zeros(E))
            f.write(json.dumps({"step": step, "time": 1.0 + step, **tr.metrics()}) + "\n")
        f.write('{"step": 999, "loss/tr')  # a run killed mid-line: skipped by the reader


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_matrices_follow_the_jsonl(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    assert len(records) == 12
    layers, rel = load_matrix_layers(records)
    assert layers == [3, 4]
    want3 = np.full(E, 40 / 70)
    want3[HOT] = 4.0
    np.testing.assert_allclose(rel, np.stack([want3, np.ones(E)]))
    steps, rel_es = load_matrix_steps(records, 3)
    assert steps == list(range(0, 120, 10)) and rel_es.shape == (E, 12)
    np.testing.assert_allclose(rel_es[HOT], 4.0)
    s = max_vio_series(records)
    np.testing.assert_allclose(s[3]["max_vio"], 3.0)
    np.testing.assert_allclose(s[4]["max_vio"], 0.0)
    assert default_layer(records) == 3
    with pytest.raises(ValueError, match="layer"):
        load_matrix_steps(records, 7)


def test_heatmap_pixels_show_the_hot_expert(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    fig = fig_load_steps(records, 3)
    path = tmp_path / "steps.png"
    fig.savefig(path, dpi=100)
    px = imread(path)[..., :3]  # [H, W, 3] floats, row 0 at the top
    ax = fig.axes[0]
    vmax = 4.0  # max(2, largest relative load)
    cmap = colormaps["viridis"]

    def pixel(col, expert):
        x, y = ax.transData.transform((col, expert))
        return px[int(np.rint(px.shape[0] - y)), int(np.rint(x))]

    for col in (0, 6, 11):
        np.testing.assert_allclose(pixel(col, HOT), cmap(4.0 / vmax)[:3], atol=0.02)
        np.testing.assert_allclose(pixel(col, 0), cmap((40 / 70) / vmax)[:3], atol=0.02)


def test_max_vio_figure_plots_the_series(tmp_path):
    _write_run(tmp_path)
    fig = fig_max_vio(read_metrics(tmp_path))
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    np.testing.assert_allclose(lines["layer 3 batch"].get_ydata(), 3.0)
    np.testing.assert_allclose(lines["layer 4 global"].get_ydata(), 0.0)
    assert list(lines["layer 3 batch"].get_xdata()) == list(range(0, 120, 10))


def test_plot_main_writes_pngs_of_the_expected_size(tmp_path, capsys):
    _write_run(tmp_path / "run")
    assert plot_main([str(tmp_path / "run"), "--dpi", "80"]) == 0
    out = tmp_path / "run" / "plots"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bias_layer3.png", "load_layers.png", "load_steps_layer3.png", "max_vio.png"]
    for p in out.iterdir():
        assert _png_size(p) == (800, 400)
        assert imread(p)[..., :3].std() > 0.05  # not a blank canvas
    assert capsys.readouterr().out.count(".png") == 4
    assert plot_main([str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--layer", "4"]) == 0
    assert _png_size(tmp_path / "o" / "load_steps_layer4.png") == (1000, 500)


def test_plot_main_reports_a_run_without_moe_keys(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0, "loss/train": 2.0}\n')
    assert draw_all(read_metrics(tmp_path)) == {}
    assert cli_main(["plot", str(tmp_path)]) == 2  # through the error boundary
    assert "no moe/layer*/load" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
