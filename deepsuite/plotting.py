"""Load-balance pictures drawn from a run's metrics.jsonl alone (`deepsuite plot RUN_DIR`), read
through :mod:`deepsuite.runlog`; the trainer sends the heatmaps to wandb from the same code.

Figures are built on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
this works headless and inside a training process. Every figure is FIGSIZE at the given dpi.

Expert load is shown as each expert's share of tokens relative to the fair share (tokens / mean
over the experts, 1 = fair) on one fixed scale for every picture and run: a diverging map of
log2(share) (SHARE_CMAP, blue = cold, white = fair, red = hot), clipped at 1/8 and 8, and
experts that received no token at all drawn in DEAD_COLOUR, outside the scale. Loads are summed
over the MoE window (``moe/layerL/load_window``); a run written before windows were logged
falls back to the single logged step (``moe/layerL/load``). The bias is a second diverging map
centred on 0, one labelled row per expert.

Legend: L MoE layers, E experts, S logged steps, R expert-parallel ranks.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np

from deepsuite.errors import DataError
from deepsuite.runlog import (
    iter_scalar_series,
    latest_loads,
    layer_ids,
    load_key,
    max_vio_series,
    read_metrics,
    window_steps,
)

__all__ = [
    "DEAD_COLOUR",
    "FIGSIZE",
    "SHARE_CMAP",
    "SHARE_LOG2_LIMIT",
    "bias_matrix",
    "draw_all",
    "draw_heatmaps",
    "figure_to_rgb",
    "load_matrix_layers",
    "load_matrix_steps",
    "plot_main",
    "write_plots",
]

FIGSIZE = (10.0, 5.0)  # inches; at dpi 100 a PNG is 1000 x 500 pixels
SHARE_CMAP = "RdBu_r"  # log2(share): blue under fair share, white at it, red over
SHARE_LOG2_LIMIT = 3.0  # the share scale runs from 2**-3 = 1/8 to 2**3 = 8 (clipped beyond)
BIAS_CMAP = "BrBG"
DEAD_COLOUR = "black"
_MISSING_COLOUR = "0.75"  # grey behind the heatmap: an expert a layer does not have
_RANK_KEY = re.compile(r"^comm/rank(\d+)/")


def _relative(load: list[float]) -> np.ndarray:
    """Tokens per expert divided by the mean (1 = fair share); zeros when nothing was routed."""
    c = np.asarray(load, dtype=np.float64)
    mean = c.mean() if c.size else 0.0
    return c / mean if mean > 0 else np.zeros_like(c)


def load_matrix_layers(
    records: list[dict[str, Any]], step: int | None = None, *, window: bool = True
) -> tuple[list[int], np.ndarray]:
    """(layers, rel_LE): each layer's load at `step` (default: its last logged one), relative to
    the mean, over the window (`window`, where logged) or of the step. Raises ValueError when no
    record holds MoE loads."""
    if step is not None:
        records = [r for r in records if r.get("step") == step]
    loads = latest_loads(records, window=window)
    if not loads:
        raise ValueError(
            f"records: no moe/layer*/load lists{'' if step is None else f' at step {step}'}"
        )
    layers = sorted(loads)
    n_experts = max(len(loads[la]) for la in layers)
    rel_LE = np.full((len(layers), n_experts), np.nan)
    for i, la in enumerate(layers):
        rel_LE[i, : len(loads[la])] = _relative(loads[la])
    return layers, rel_LE


def load_matrix_steps(
    records: list[dict[str, Any]], layer: int, *, window: bool = True
) -> tuple[list[int], np.ndarray]:
    """(steps, rel_ES): relative load of every expert of `layer` at each logged step, over the
    window (`window`, where logged) or of the step."""
    rows = [
        (int(r["step"]), _relative(r[load_key(layer, r, window)]))
        for r in records
        if f"moe/layer{layer}/load" in r
    ]
    if not rows:
        raise ValueError(
            f"layer: no moe/layer{layer}/load in the records (layers present: {layer_ids(records)})"
        )
    return [s for s, _ in rows], np.stack([v for _, v in rows], axis=1)


def bias_matrix(records: list[dict[str, Any]], layer: int) -> tuple[list[int], np.ndarray]:
    """(steps, bias_SE) of `layer`; empty when the run logged no bias for it."""
    key = f"moe/layer{layer}/bias"
    rows = [(int(r["step"]), r[key]) for r in records if key in r]
    if not rows:
        return [], np.zeros((0, 0))
    return [s for s, _ in rows], np.asarray([b for _, b in rows], dtype=np.float64)


def _window_words(records: list[dict[str, Any]]) -> str:
    """'the last 10 steps' (what the MoE window held), or what an older run's loads cover."""
    w = window_steps(records)
    if w is None:
        return "one logged step (run without a logged window)"
    return f"the last {w} step{'s' if w != 1 else ''}"


# ---- drawing ---------------------------------------------------------------------------------
def _figure() -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE)
    FigureCanvasAgg(fig)
    return fig


def figure_to_rgb(fig: Any) -> np.ndarray:
    """[H, W, 3] uint8 pixels of a figure (what wandb.Image takes without needing pyplot)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _share_heatmap(fig: Any, rel: np.ndarray, extent: Any) -> Any:
    """rel (rows x columns of tokens / fair share) on the fixed log2 share scale, zeros black."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor(_MISSING_COLOUR)
    with np.errstate(divide="ignore", invalid="ignore"):
        log2 = np.where(rel > 0, np.log2(np.where(rel > 0, rel, 1.0)), np.nan)
    cmap = colormaps[SHARE_CMAP].with_extremes(bad=(0, 0, 0, 0))
    lim = SHARE_LOG2_LIMIT
    im = ax.imshow(np.ma.masked_invalid(log2), aspect="auto", origin="lower", cmap=cmap,
                   vmin=-lim, vmax=lim, interpolation="nearest", extent=extent)  # fmt: skip
    dead = np.where(rel == 0, 1.0, np.nan)
    dead_cmap = ListedColormap([DEAD_COLOUR]).with_extremes(bad=(0, 0, 0, 0))
    ax.imshow(np.ma.masked_invalid(dead), aspect="auto", origin="lower", cmap=dead_cmap,
              vmin=0.0, vmax=1.0, interpolation="nearest", extent=extent)  # fmt: skip
    ticks = np.arange(-lim, lim + 1)
    bar = fig.colorbar(im, ax=ax, ticks=ticks, extend="both")
    labels = [f"1/{2 ** int(-t)}" if t < 0 else str(2 ** int(t)) for t in ticks]
    labels[len(labels) // 2] = "1 = fair"
    bar.ax.set_yticklabels(labels)
    bar.set_label("tokens / fair share (log scale)")
    fig.legend(handles=[Patch(facecolor=DEAD_COLOUR, label="0 tokens (dead)")],
               loc="upper right", fontsize="small")  # fmt: skip
    return ax


def _step_ticks(ax: Any, steps: list[int]) -> None:
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")


def _expert_ticks(ax: Any, n_experts: int) -> None:
    stride = max(1, int(np.ceil(n_experts / 32)))  # every expert up to 32, then every n-th
    ax.set_yticks(range(0, n_experts, stride))
    ax.set_ylabel("expert")


def fig_load_layers(records: list[dict[str, Any]], step: int | None = None) -> Any:
    """Heatmap layers x experts of the relative load over the last logged window."""
    layers, rel_LE = load_matrix_layers(records, step)
    fig = _figure()
    n_l, n_e = rel_LE.shape
    ax = _share_heatmap(fig, rel_LE, (-0.5, n_e - 0.5, -0.5, n_l - 0.5))
    at = "last logged step" if step is None else f"step {step}"
    ax.set_title(f"expert load by MoE layer over {_window_words(records)} ({at})")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_l), [str(la) for la in layers])
    ax.set_xticks(range(0, n_e, max(1, int(np.ceil(n_e / 32)))))
    return fig


def fig_load_steps(records: list[dict[str, Any]], layer: int) -> Any:
    """Heatmap experts x logged steps of `layer`'s relative load (each column one window)."""
    steps, rel_ES = load_matrix_steps(records, layer)
    fig = _figure()
    n_e, n_s = rel_ES.shape
    ax = _share_heatmap(fig, rel_ES, (-0.5, n_s - 0.5, -0.5, n_e - 0.5))
    ax.set_title(f"MoE layer {layer}: expert load, each column over {_window_words(records)}")
    _step_ticks(ax, steps)
    _expert_ticks(ax, n_e)
    return fig


def fig_bias(records: list[dict[str, Any]], layer: int) -> Any | None:
    """Heatmap experts x logged steps of `layer`'s balancing bias, centred on 0 (one labelled
    row per expert). None when no bias was logged."""
    steps, bias_SE = bias_matrix(records, layer)
    if not steps:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    n_s, n_e = bias_SE.shape
    lim = float(np.abs(bias_SE).max()) or 1e-3
    im = ax.imshow(bias_SE.T, aspect="auto", origin="lower", cmap=BIAS_CMAP, vmin=-lim, vmax=lim,
                   interpolation="nearest", extent=(-0.5, n_s - 0.5, -0.5, n_e - 0.5))  # fmt: skip
    fig.colorbar(im, ax=ax, label="bias (+: a cold expert boosted, -: a hot one held back)")
    ax.set_title(f"MoE layer {layer}: balancing bias per expert ({n_e} experts)")
    _step_ticks(ax, steps)
    _expert_ticks(ax, n_e)
    return fig


def _lines(title: str, ylabel: str) -> tuple[Any, Any]:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(ax: Any, n: int) -> None:
    ax.legend(fontsize="small", ncol=max(1, int(np.ceil(n / 12))))


def fig_max_vio(records: list[dict[str, Any]]) -> Any | None:
    """MaxVio of one step (solid) and over the window (dashed) for every layer."""
    series = max_vio_series(records)
    if not series:
        return None
    fig, ax = _lines(
        f"MaxVio per MoE layer: one step (solid), over {_window_words(records)} (dashed)",
        "MaxVio = (max c - mean c) / mean c",
    )
    for layer, s in series.items():
        (line,) = ax.plot(s["step"], s["max_vio"], linewidth=1.0, label=f"layer {layer} step")
        if np.isfinite(s["max_vio_global"]).any():
            ax.plot(s["step"], s["max_vio_global"], linestyle="--", color=line.get_color(),
                    linewidth=1.0, label=f"layer {layer} window")  # fmt: skip
    _legend(ax, 2 * len(series))
    return fig


def fig_dead_experts(records: list[dict[str, Any]]) -> Any | None:
    """Experts without a token over the window, per layer."""
    layers = [la for la in layer_ids(records) if any(f"moe/layer{la}/dead_experts" in r
                                                     for r in records)]  # fmt: skip
    if not layers:
        return None
    fig, ax = _lines(
        f"dead experts per MoE layer (no token in {_window_words(records)})", "experts"
    )
    for la in layers:
        pts = list(iter_scalar_series(records, f"moe/layer{la}/dead_experts"))
        ax.plot([s for s, _ in pts], [v for _, v in pts], drawstyle="steps-post",
                label=f"layer {la}")  # fmt: skip
    ax.set_ylim(bottom=-0.2)
    _legend(ax, len(layers))
    return fig


def fig_comm(records: list[dict[str, Any]]) -> Any | None:
    """All-to-all bytes and seconds, and expert rows received, per expert-parallel rank."""
    ranks = sorted({int(m.group(1)) for r in records for k in r if (m := _RANK_KEY.match(k))})
    if not ranks:
        return None
    fig = _figure()
    panels = (("a2a_bytes", "all-to-all MB sent", 1e-6), ("a2a_time", "all-to-all seconds", 1.0),
              ("tokens_received", "expert rows received", 1.0))  # fmt: skip
    for i, (name, title, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.set_title(f"{title} per rank", fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for rank in ranks:
            pts = list(iter_scalar_series(records, f"comm/rank{rank}/{name}"))
            if pts:
                ax.plot([s for s, _ in pts], [v * scale for _, v in pts], linewidth=0.8,
                        label=f"rank {rank}")  # fmt: skip
        if ax.lines:
            _legend(ax, len(ranks))
    fig.tight_layout()
    return fig


def fig_throughput(records: list[dict[str, Any]]) -> Any | None:
    """Tokens per second over steps."""
    pts = list(iter_scalar_series(records, "perf/tokens_per_s"))
    if not pts:
        return None
    fig, ax = _lines("throughput (global batch tokens / step time)", "tokens / s")
    ax.plot([s for s, _ in pts], [v for _, v in pts], linewidth=0.8)
    return fig


def draw_heatmaps(records: list[dict[str, Any]], layers: list[int] | None = None) -> dict[str, Any]:
    """name -> Figure of the heatmaps ({} when no MoE keys): `load_layers`, and for every layer
    (or those given) `layerL/load_steps` and `layerL/bias`. The names never depend on the
    values, so wandb panels keep one key each for the whole run."""
    found = layer_ids(records)
    if not found:
        return {}
    for la in layers or []:
        if la not in found:
            raise ValueError(f"layer: {la} has no logged load (layers present: {found})")
    figs: dict[str, Any] = {"load_layers": fig_load_layers(records)}
    for la in layers or found:
        figs[f"layer{la}/load_steps"] = fig_load_steps(records, la)
        figs[f"layer{la}/bias"] = fig_bias(records, la)
    return {k: f for k, f in figs.items() if f is not None}


def draw_all(records: list[dict[str, Any]], layers: list[int] | None = None) -> dict[str, Any]:
    """name -> Figure for every picture the records support ({} when no MoE keys): the heatmaps
    plus the views a wandb workspace shows as line charts (`max_vio`, `dead_experts`, `comm`,
    `throughput`)."""
    figs = draw_heatmaps(records, layers)
    if not figs:
        return {}
    lines = {"max_vio": fig_max_vio(records), "dead_experts": fig_dead_experts(records),
             "comm": fig_comm(records), "throughput": fig_throughput(records)}  # fmt: skip
    figs.update({k: f for k, f in lines.items() if f is not None})
    return figs


def write_plots(
    run_dir: str | Path, out_dir: str | Path | None = None, *, layer: int | None = None,
    dpi: int = 100,
) -> list[Path]:  # fmt: skip
    """Writes every picture as PNG into out_dir (default RUN_DIR/plots); returns the paths.
    A name `layerL/bias` is written as `layerL_bias.png`; `layer` keeps one layer's pictures."""
    if dpi <= 0:
        raise ValueError(f"dpi must be > 0, got {dpi}")
    records = read_metrics(run_dir)
    figs = draw_all(records, None if layer is None else [layer])
    if not figs:
        raise ValueError(f"run_dir: {run_dir} has no moe/layer*/load metrics to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        path = out / f"{name.replace('/', '_')}.png"
        fig.savefig(path, dpi=dpi, format="png")
        paths.append(path)
    return paths


def plot_main(argv: list[str] | None = None) -> int:
    """`deepsuite plot RUN_DIR [--out DIR] [--layer L] [--dpi N]`; returns the exit code."""
    ap = argparse.ArgumentParser(prog="deepsuite plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="run directory holding metrics.jsonl")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    ap.add_argument(
        "--layer",
        type=int,
        default=None,
        help="per-layer pictures of this layer only (default: all)",
    )
    ap.add_argument("--dpi", type=int, default=100)
    args = ap.parse_args(argv)
    try:
        paths = write_plots(args.run_dir, args.out, layer=args.layer, dpi=args.dpi)
    except DataError:
        raise
    except ValueError as e:  # names the run directory or the option; the boundary prints it
        raise DataError(str(e)) from e
    for p in paths:
        print(p)
    return 0
