"""Load-balance pictures drawn from a run's metrics.jsonl alone (`deepsuite plot RUN_DIR`), read
through :mod:`deepsuite.runlog`.

Figures are built on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so
this works headless and inside a training process. Every figure is FIGSIZE at the given dpi.

Legend: L MoE layers, E experts, S logged steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from deepsuite.errors import DataError
from deepsuite.runlog import latest_loads, layer_ids, max_vio_series, read_metrics

__all__ = [
    "FIGSIZE",
    "bias_matrix",
    "default_layer",
    "draw_all",
    "figure_to_rgb",
    "load_matrix_layers",
    "load_matrix_steps",
    "plot_main",
    "write_plots",
]

FIGSIZE = (10.0, 5.0)  # inches; at dpi 100 a PNG is 1000 x 500 pixels


def _relative(load: list[float]) -> np.ndarray:
    """Tokens per expert divided by the mean (1 = fair share); zeros when nothing was routed."""
    c = np.asarray(load, dtype=np.float64)
    mean = c.mean() if c.size else 0.0
    return c / mean if mean > 0 else np.zeros_like(c)


def load_matrix_layers(
    records: list[dict[str, Any]], step: int | None = None
) -> tuple[list[int], np.ndarray]:
    """(layers, rel_LE): each layer's load at `step` (default: its last logged one), relative to
    the mean. Raises ValueError when no record holds MoE loads."""
    if step is not None:
        records = [r for r in records if r.get("step") == step]
    loads = latest_loads(records)
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


def load_matrix_steps(records: list[dict[str, Any]], layer: int) -> tuple[list[int], np.ndarray]:
    """(steps, rel_ES): relative load of every expert of `layer` at each logged step."""
    key = f"moe/layer{layer}/load"
    rows = [(int(r["step"]), _relative(r[key])) for r in records if key in r]
    if not rows:
        raise ValueError(f"layer: no {key} in the records (layers present: {layer_ids(records)})")
    return [s for s, _ in rows], np.stack([v for _, v in rows], axis=1)


def bias_matrix(records: list[dict[str, Any]], layer: int) -> tuple[list[int], np.ndarray]:
    """(steps, bias_SE) of `layer`; empty when the run logged no bias for it."""
    key = f"moe/layer{layer}/bias"
    rows = [(int(r["step"]), r[key]) for r in records if key in r]
    if not rows:
        return [], np.zeros((0, 0))
    return [s for s, _ in rows], np.asarray([b for _, b in rows], dtype=np.float64)


def default_layer(records: list[dict[str, Any]]) -> int:
    """The layer whose last logged global MaxVio (else batch MaxVio) is worst."""
    series = max_vio_series(records)
    if not series:
        layers = layer_ids(records)
        if not layers:
            raise ValueError("records: no MoE layers logged")
        return layers[0]

    def worst(la: int) -> float:
        s = series[la]
        g = s["max_vio_global"][-1] if s["step"] else np.nan
        return float(g if np.isfinite(g) else (s["max_vio"][-1] if s["step"] else -1.0))

    return max(series, key=worst)


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


def _heatmap(fig: Any, m: np.ndarray, xlabel: str, ylabel: str, title: str, extent: Any) -> Any:
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(2.0, float(np.nanmax(m))) if m.size else 2.0
    im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
                   interpolation="nearest", extent=extent)  # fmt: skip
    fig.colorbar(im, ax=ax, label="tokens / mean (1 = fair share)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return ax


def fig_load_layers(records: list[dict[str, Any]], step: int | None = None) -> Any:
    """Heatmap layers x experts of the relative load (the last logged step by default)."""
    layers, rel_LE = load_matrix_layers(records, step)
    fig = _figure()
    n_l, n_e = rel_LE.shape
    ax = _heatmap(fig, rel_LE, "expert", "MoE layer",
                  f"expert load by layer ({'last step' if step is None else f'step {step}'})",
                  (-0.5, n_e - 0.5, -0.5, n_l - 0.5))  # fmt: skip
    ax.set_yticks(range(n_l), [str(la) for la in layers])
    return fig


def fig_load_steps(records: list[dict[str, Any]], layer: int) -> Any:
    """Heatmap experts x logged steps of `layer`'s relative load."""
    steps, rel_ES = load_matrix_steps(records, layer)
    fig = _figure()
    n_e, n_s = rel_ES.shape
    ax = _heatmap(fig, rel_ES, "logged step index", "expert",
                  f"layer {layer}: expert load over steps {steps[0]}..{steps[-1]}",
                  (-0.5, n_s - 0.5, -0.5, n_e - 0.5))  # fmt: skip
    ticks = np.linspace(0, n_s - 1, min(n_s, 8)).round().astype(int)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    return fig


def fig_bias(records: list[dict[str, Any]], layer: int) -> Any | None:
    """One line per expert: `layer`'s balancing bias over steps. None when no bias was logged."""
    steps, bias_SE = bias_matrix(records, layer)
    if not steps:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, bias_SE, linewidth=0.8, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("bias")
    ax.set_title(f"layer {layer}: balancing bias per expert ({bias_SE.shape[1]} experts)")
    ax.grid(alpha=0.3)
    return fig


def fig_max_vio(records: list[dict[str, Any]]) -> Any | None:
    """MaxVio of the batch (solid) and over the window (dashed) for every layer."""
    series = max_vio_series(records)
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for layer, s in series.items():
        (line,) = ax.plot(s["step"], s["max_vio"], linewidth=1.0, label=f"layer {layer} batch")
        if np.isfinite(s["max_vio_global"]).any():
            ax.plot(s["step"], s["max_vio_global"], linestyle="--", color=line.get_color(),
                    linewidth=1.0, label=f"layer {layer} global")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio = (max c - mean c) / mean c")
    ax.set_title("load imbalance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return fig


def draw_all(records: list[dict[str, Any]], layer: int | None = None) -> dict[str, Any]:
    """name -> Figure for every picture the records support ({} when no MoE keys)."""
    if not layer_ids(records):
        return {}
    layer = default_layer(records) if layer is None else layer
    figs = {
        "load_layers": fig_load_layers(records),
        f"load_steps_layer{layer}": fig_load_steps(records, layer),
        "max_vio": fig_max_vio(records),
        f"bias_layer{layer}": fig_bias(records, layer),
    }
    return {k: f for k, f in figs.items() if f is not None}


def write_plots(
    run_dir: str | Path, out_dir: str | Path | None = None, *, layer: int | None = None,
    dpi: int = 100,
) -> list[Path]:  # fmt: skip
    """Writes every picture as PNG into out_dir (default RUN_DIR/plots); returns the paths."""
    if dpi <= 0:
        raise ValueError(f"dpi must be > 0, got {dpi}")
    records = read_metrics(run_dir)
    figs = draw_all(records, layer=layer)
    if not figs:
        raise ValueError(f"run_dir: {run_dir} has no moe/layer*/load metrics to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi, format="png")
        paths.append(path)
    return paths


def plot_main(argv: list[str] | None = None) -> int:
    """`deepsuite plot RUN_DIR [--out DIR] [--layer L] [--dpi N]`; returns the exit code."""
    ap = argparse.ArgumentParser(prog="deepsuite plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="run directory holding metrics.jsonl")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    ap.add_argument(
        "--layer", type=int, default=None, help="layer for per-step views (default: worst)"
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
