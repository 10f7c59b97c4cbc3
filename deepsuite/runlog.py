"""Reading a run's ``metrics.jsonl`` back: records, scalar series, per-layer loads and MaxVio.

The one reader the plots (:mod:`deepsuite.plotting`), the summary (:mod:`deepsuite.summary`) and
the trainer (trimming the log on resume, pictures for wandb) share. No torch, no plotting.

A line is ``{"step": int, "time": float, **metrics}`` (:class:`deepsuite.training.metrics.MetricsLogger`
writes it); per MoE layer L the keys ``moe/layerL/load`` (tokens per expert of the step, a list),
``moe/layerL/load_window`` (tokens per expert over the window, a list; runs written before it
existed have only ``load``, and readers fall back to it), ``moe/layerL/max_vio``,
``moe/layerL/max_vio_global`` (the window's), ``moe/layerL/dead_experts``, ``moe/layerL/bias``
(a list), and ``moe/window_steps`` (how many steps the window held).

Legend: E experts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepsuite.atomic import atomic_write_text

__all__ = [
    "JSONL_NAME",
    "iter_scalar_series",
    "keep_steps_up_to",
    "last_scalar",
    "latest_loads",
    "layer_ids",
    "load_key",
    "max_vio_series",
    "read_metrics",
    "window_steps",
]

JSONL_NAME = "metrics.jsonl"
_LOAD_KEY = re.compile(r"^moe/layer(\d+)/load$")


def _jsonl_path(run_dir_or_file: str | Path) -> Path:
    p = Path(run_dir_or_file)
    return p / JSONL_NAME if p.is_dir() else p


def read_metrics(run_dir_or_file: str | Path) -> list[dict[str, Any]]:
    """All jsonl records of a run, in file order. Accepts the run directory or the file.

    A truncated last line (a run killed mid-write) is skipped.
    """
    path = _jsonl_path(run_dir_or_file)
    if not path.is_file():
        raise ValueError(f"run_dir_or_file: no metrics file at {path}")
    records = []
    with path.open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite the jsonl at ``path`` (atomically) keeping only the lines of steps <= ``step``.

    A resumed run calls this before logging: steps trained after its checkpoint (before a crash)
    are dropped, so every step appears once. Unreadable lines (a kill mid-write) go too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def iter_scalar_series(records: list[dict[str, Any]], key: str) -> Iterator[tuple[int, float]]:
    """(step, value) for every record holding a finite scalar under `key`."""
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            yield int(r["step"]), float(v)


def last_scalar(records: list[dict[str, Any]], key: str) -> float | None:
    """The last finite scalar logged under `key`, or None."""
    vals = [v for _, v in iter_scalar_series(records, key)]
    return vals[-1] if vals else None


def layer_ids(records: list[dict[str, Any]]) -> list[int]:
    """Sorted MoE layer indices that have a `moe/layer{L}/load` list somewhere in the run."""
    found = {int(m.group(1)) for r in records for k in r if (m := _LOAD_KEY.match(k))}
    return sorted(found)


def load_key(layer: int, record: dict[str, Any], window: bool) -> str:
    """The load list to read from `record`: the window's when asked for and present, else the
    step's (``moe/layerL/load``; all a run written before windows were logged has)."""
    key = f"moe/layer{layer}/load"
    return key + "_window" if window and key + "_window" in record else key


def latest_loads(records: list[dict[str, Any]], *, window: bool = False) -> dict[int, list[float]]:
    """Layer -> the last logged per-expert load list (E token counts): of that step, or with
    `window` summed over the window (the step's in a run that logged no window)."""
    out: dict[int, list[float]] = {}
    for r in records:
        for layer in layer_ids([r]):
            out[layer] = r[load_key(layer, r, window)]
    return out


def window_steps(records: list[dict[str, Any]]) -> int | None:
    """The steps the last logged MoE window held (``moe/window_steps``); None for a run written
    before it was logged."""
    v = last_scalar(records, "moe/window_steps")
    return None if v is None else int(v)


def max_vio_series(records: list[dict[str, Any]]) -> dict[int, dict[str, list[float]]]:
    """Layer -> {"step": [...], "max_vio": [...], "max_vio_global": [...]} (NaN where absent)."""
    out: dict[int, dict[str, list[float]]] = {}
    for layer in layer_ids(records):
        p = f"moe/layer{layer}/"
        rows = [r for r in records if p + "max_vio" in r]
        out[layer] = {
            "step": [int(r["step"]) for r in rows],
            "max_vio": [float(r[p + "max_vio"]) for r in rows],
            "max_vio_global": [float(r.get(p + "max_vio_global", math.nan)) for r in rows],
        }
    return out
