"""`deepsuite plot`: PNGs from a synthetic metrics.jsonl with known loads; the pixels show the
scale (fair share at the centre colour, dead experts black), the labels say what is drawn, and
a run written before the window was logged still plots."""

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
    BIAS_CMAP,
    SHARE_CMAP,
    SHARE_LOG2_LIMIT,
    draw_all,
    draw_heatmaps,
    fig_bias,
    fig_load_steps,
    fig_max_vio,
    load_matrix_layers,
    load_matrix_steps,
    plot_main,
)
from deepsuite.runlog import max_vio_series, read_metrics, window_steps
from deepsuite.training.moe_stats import MoEStatsTracker

E, HOT, DEAD, FAIR, WINDOW = 8, 5, 7, 0, 4
# layer 3, tokens per step: expert HOT 4x the mean, DEAD none, FAIR exactly the mean (100),
# the other five 0.6x; layer 4: exactly balanced
LOAD3 = np.array([100, 60, 60, 60, 60, 400, 60, 0])
SHARE3 = LOAD3 / LOAD3.mean()
STEPS = list(range(0, 120, 10))


def _write_run(run_dir, *, old_format=False):
    """12 logged steps; `old_format` drops what the previous version did not log (the window's
    loads and length), as a run written by it would read."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tr = MoEStatsTracker(E, window=WINDOW)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step in STEPS:
            tr.update(3, LOAD3, bias_E=np.linspace(-1, 1, E) * (step + 10) / 1000)
            tr.update(4, np.full(E, 100), bias_E=np.zeros(E))
            m = tr.metrics()
            if old_format:
                m = {k: v for k, v in m.items() if "window" not in k or "max_vio" in k}
            f.write(json.dumps({"step": step, "time": 1.0 + step, **m}) + "\n")
        f.write('{"step": 999, "loss/tr')  # a run killed mid-line: skipped by the reader


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _pixels(fig, tmp_path):
    """A function (x, y in data coordinates) -> RGB of the saved PNG at that point."""
    path = tmp_path / "fig.png"
    fig.savefig(path, dpi=100)
    px = imread(path)[..., :3]  # [H, W, 3] floats, row 0 at the top
    ax = fig.axes[0]

    def at(x, y):
        u, v = ax.transData.transform((x, y))
        return px[int(np.rint(px.shape[0] - v)), int(np.rint(u))]

    return at


def _share_colour(share):
    pos = (np.log2(share) + SHARE_LOG2_LIMIT) / (2 * SHARE_LOG2_LIMIT)
    return colormaps[SHARE_CMAP](pos)[:3]


def test_matrices_follow_the_jsonl(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    assert len(records) == 12 and window_steps(records) == WINDOW
    layers, rel = load_matrix_layers(records)
    assert layers == [3, 4]
    np.testing.assert_allclose(rel, np.stack([SHARE3, np.ones(E)]))
    steps, rel_es = load_matrix_steps(records, 3)
    assert steps == STEPS and rel_es.shape == (E, 12)
    np.testing.assert_allclose(rel_es[HOT], 4.0)
    s = max_vio_series(records)
    np.testing.assert_allclose(s[3]["max_vio"], 3.0)
    np.testing.assert_allclose(s[4]["max_vio"], 0.0)
    with pytest.raises(ValueError, match="layer"):
        load_matrix_steps(records, 7)


def test_load_heatmap_is_centred_on_fair_share_with_dead_experts_black(tmp_path):
    _write_run(tmp_path)
    fig = fig_load_steps(read_metrics(tmp_path), 3)
    pixel = _pixels(fig, tmp_path)
    for col in (0, 6, 11):
        np.testing.assert_allclose(pixel(col, FAIR), colormaps[SHARE_CMAP](0.5)[:3], atol=0.02)
        np.testing.assert_allclose(pixel(col, HOT), _share_colour(4.0), atol=0.02)
        np.testing.assert_allclose(pixel(col, 1), _share_colour(0.6), atol=0.02)
        np.testing.assert_allclose(pixel(col, DEAD), (0.0, 0.0, 0.0), atol=0.02)
    # hot red, cold blue, fair near white: a reader needs no colour bar to tell them apart
    hot, cold, fair = pixel(3, HOT), pixel(3, 1), pixel(3, FAIR)
    assert hot[0] > hot[2] + 0.3 and cold[2] > cold[0] + 0.1 and fair.min() > 0.9
    ax, bar_ax = fig.axes[:2]
    assert "last 4 steps" in ax.get_title() and "layer 3" in ax.get_title()
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "expert"
    steps_shown = [t.get_text() for t in ax.get_xticklabels()]
    assert steps_shown[0] == "0" and steps_shown[-1] == "110"  # steps, not column indices
    labels = [t.get_text() for t in bar_ax.get_yticklabels()]
    assert labels == ["1/8", "1/4", "1/2", "1 = fair", "2", "4", "8"]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["0 tokens (dead)"]


def test_bias_heatmap_labels_every_expert_centred_on_zero(tmp_path):
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    fig = fig_bias(records, 3)
    ax = fig.axes[0]
    assert [int(t) for t in ax.get_yticks()] == list(range(E))  # every expert has its row
    pixel = _pixels(fig, tmp_path)
    cmap = colormaps[BIAS_CMAP]
    last = len(STEPS) - 1  # the bias is linspace(-1, 1) x 0.12 there: the extremes of the scale
    np.testing.assert_allclose(pixel(last, E - 1), cmap(1.0)[:3], atol=0.02)
    np.testing.assert_allclose(pixel(last, 0), cmap(0.0)[:3], atol=0.02)
    np.testing.assert_allclose(pixel(0, E - 1), cmap(0.5 + 0.5 / 12)[:3], atol=0.02)
    assert fig_bias(records, 4) is not None  # all zeros: drawn, not a division by zero


def test_max_vio_figure_states_its_window(tmp_path):
    _write_run(tmp_path)
    fig = fig_max_vio(read_metrics(tmp_path))
    ax = fig.axes[0]
    assert "over the last 4 steps" in ax.get_title()
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert set(lines) == {"layer 3 step", "layer 3 window", "layer 4 step", "layer 4 window"}
    np.testing.assert_allclose(lines["layer 3 step"].get_ydata(), 3.0)
    np.testing.assert_allclose(lines["layer 4 window"].get_ydata(), 0.0)
    assert list(lines["layer 3 step"].get_xdata()) == STEPS
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["layer 3 step", "layer 3 window", "layer 4 step", "layer 4 window"]


def test_heatmap_names_are_fixed_per_layer(tmp_path):
    """The wandb keys must not follow the values: the same names whichever layer is worst."""
    _write_run(tmp_path)
    records = read_metrics(tmp_path)
    want = ["load_layers", "layer3/load_steps", "layer3/bias", "layer4/load_steps", "layer4/bias"]
    assert list(draw_heatmaps(records)) == want
    assert list(draw_heatmaps(records[:3])) == want
    assert list(draw_heatmaps(records, [4])) == ["load_layers", *want[3:]]
    with pytest.raises(ValueError, match="layer: 9"):
        draw_heatmaps(records, [9])


def test_plot_main_writes_pngs_of_the_expected_size(tmp_path, capsys):
    _write_run(tmp_path / "run")
    assert plot_main([str(tmp_path / "run"), "--dpi", "80"]) == 0
    out = tmp_path / "run" / "plots"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "dead_experts.png", "layer3_bias.png", "layer3_load_steps.png", "layer4_bias.png",
        "layer4_load_steps.png", "load_layers.png", "max_vio.png",
    ]  # fmt: skip
    for p in out.iterdir():
        assert _png_size(p) == (800, 400)
        assert imread(p)[..., :3].std() > 0.05  # not a blank canvas
    assert capsys.readouterr().out.count(".png") == 7
    assert plot_main([str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--layer", "4"]) == 0
    assert _png_size(tmp_path / "o" / "layer4_load_steps.png") == (1000, 500)
    assert not (tmp_path / "o" / "layer3_bias.png").exists()
    assert cli_main(["plot", str(tmp_path / "run"), "--layer", "9"]) == 2  # the error boundary
    assert "layer: 9 has no logged load" in capsys.readouterr().err


def test_a_run_written_before_the_window_was_logged_still_plots(tmp_path):
    _write_run(tmp_path, old_format=True)
    records = read_metrics(tmp_path)
    assert "moe/layer3/load_window" not in records[0] and window_steps(records) is None
    figs = draw_all(records)
    assert set(figs) == {"load_layers", "layer3/load_steps", "layer3/bias", "layer4/load_steps",
                         "layer4/bias", "max_vio", "dead_experts"}  # fmt: skip
    assert "one logged step" in figs["max_vio"].axes[0].get_title()
    _, rel = load_matrix_layers(records)  # the step's loads stand in for the window's
    np.testing.assert_allclose(rel[0], SHARE3)


def test_plot_main_reports_a_run_without_moe_keys(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0, "loss/train": 2.0}\n')
    assert draw_all(read_metrics(tmp_path)) == {}
    assert cli_main(["plot", str(tmp_path)]) == 2  # through the error boundary
    assert "no moe/layer*/load" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path / "missing")]) == 2
