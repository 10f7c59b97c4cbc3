"""`deepsuite summary RUN_DIR`: load balance per layer, worst experts, throughput, from the jsonl.

Legend: E experts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from deepsuite.errors import DataError
from deepsuite.runlog import iter_scalar_series, last_scalar, layer_ids, read_metrics, window_steps

__all__ = ["format_summary", "summarize", "summary_main"]


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _layer_summary(records: list[dict[str, Any]], layer: int, top: int) -> dict[str, Any]:
    p = f"moe/layer{layer}/"
    loads = [np.asarray(r[p + "load"], dtype=np.float64) for r in records if p + "load" in r]
    total_E = np.sum(np.stack(loads), axis=0)  # tokens per expert over every logged step
    mean = total_E.mean()
    share_E = total_E / mean if mean > 0 else np.zeros_like(total_E)
    order = np.argsort(-share_E, kind="stable")
    vio = [v for _, v in iter_scalar_series(records, p + "max_vio")]
    return {
        "layer": layer,
        "n_experts": int(total_E.size),
        "logged_steps": len(loads),
        "max_vio_last": vio[-1] if vio else None,
        "max_vio_mean": _mean(vio),
        "max_vio_global_last": last_scalar(records, p + "max_vio_global"),
        "max_vio_logged": float((total_E.max() - mean) / mean) if mean > 0 else 0.0,
        "dead_experts_last": last_scalar(records, p + "dead_experts"),
        "never_used": [int(e) for e in np.flatnonzero(total_E == 0)],
        "hottest": [(int(e), float(share_E[e])) for e in order[:top]],
        "coldest": [(int(e), float(share_E[e])) for e in order[::-1][:top]],
        "bias_min_last": last_scalar(records, p + "bias_min"),
        "bias_max_last": last_scalar(records, p + "bias_max"),
    }


def summarize(run_dir: str | Path, *, top: int = 3, skip_first: int = 1) -> dict[str, Any]:
    """Summary of a run from its metrics.jsonl.

    Per layer: MaxVio (last batch, mean over logged batches, last window "global" over the last
    `window_steps` steps (None for a run that did not log it), and over the sum of every
    logged load), dead/never-used experts, the `top` hottest and coldest experts by
    share of tokens relative to the mean (1 = fair). Throughput: mean tokens/s, MFU and step-time
    parts (`time/*`, seconds) over logged steps, skipping the first `skip_first` (warm-up).
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"run_dir: {run_dir} has an empty metrics file")

    def steady(key: str) -> list[float]:
        vals = [v for _, v in iter_scalar_series(records, key)]
        return vals[skip_first:] if len(vals) > skip_first else vals

    time_keys = sorted({k for r in records for k in r if k.startswith("time/")})
    return {
        "run_dir": str(run_dir),
        "steps": [int(records[0]["step"]), int(records[-1]["step"])],
        "window_steps": window_steps(records),
        "loss": {
            "train_last": last_scalar(records, "loss/train"),
            "val_last": last_scalar(records, "loss/val"),
            "val_best": min((v for _, v in iter_scalar_series(records, "loss/val")), default=None),
        },
        "throughput": {
            "tokens_per_s": _mean(steady("perf/tokens_per_s")),
            "mfu": _mean(steady("perf/mfu")),
            "step_time_s": {k.removeprefix("time/"): _mean(steady(k)) for k in time_keys},
        },
        "layers": [_layer_summary(records, la, top) for la in layer_ids(records)],
    }


def _f(v: float | None, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text of `summarize`'s result."""
    lines = [f"run {s['run_dir']}  steps {s['steps'][0]}..{s['steps'][1]}"]
    lo, th = s["loss"], s["throughput"]
    lines.append(
        f"loss/train {_f(lo['train_last'], '.4f')}  loss/val {_f(lo['val_last'], '.4f')}"
        f" (best {_f(lo['val_best'], '.4f')})"
    )
    lines.append(f"tokens/s {_f(th['tokens_per_s'], ',.0f')}  MFU {_f(th['mfu'], '.2%')}")
    if th["step_time_s"]:
        parts = "  ".join(f"{k} {_f(v, '.4f')}" for k, v in th["step_time_s"].items())
        lines.append(f"step time (s): {parts}")
    if s["layers"]:
        w = s.get("window_steps")
        window = f"the last {w} steps" if w else "the run's window (length not logged)"
        lines.append("")
        lines.append(
            f"MaxVio: last logged step, mean over logged steps, window = over {window}, "
            "all = over every logged step's load"
        )
        lines.append(
            f"{'layer':>5} {'E':>4} {'MaxVio':>7} {'mean':>7} {'window':>7} {'all':>7} "
            f"{'dead':>4}  hottest (share)        coldest (share)"
        )
    for la in s["layers"]:
        hot = ", ".join(f"{e}:{v:.2f}" for e, v in la["hottest"])
        cold = ", ".join(f"{e}:{v:.2f}" for e, v in la["coldest"])
        dead = la["dead_experts_last"]
        lines.append(
            f"{la['layer']:>5} {la['n_experts']:>4} {_f(la['max_vio_last']):>7} "
            f"{_f(la['max_vio_mean']):>7} {_f(la['max_vio_global_last']):>7} "
            f"{_f(la['max_vio_logged']):>7} {'-' if dead is None else int(dead):>4}  "
            f"{hot:<22} {cold}"
        )
    return "\n".join(lines)


def summary_main(argv: list[str] | None = None) -> int:
    """`deepsuite summary RUN_DIR [--json] [--top N]`; returns the exit code."""
    ap = argparse.ArgumentParser(prog="deepsuite summary", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="run directory holding metrics.jsonl")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--top", type=int, default=3, help="hottest/coldest experts to list")
    args = ap.parse_args(argv)
    try:
        s = summarize(args.run_dir, top=args.top)
    except DataError:
        raise
    except ValueError as e:  # the run log's reader names the file; the boundary prints it
        raise DataError(str(e)) from e
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0
