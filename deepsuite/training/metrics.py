"""One metrics interface with sinks: console (rank 0), jsonl (always), wandb (when enabled).

The trainer reduces scalars across ranks with torch.distributed and passes global values; this
module never touches torch.distributed. Every rank may construct a MetricsLogger; only rank 0
writes anything.

Keys are namespaced (`loss/train`, `optim/lr`, `perf/tokens_per_s`, `time/forward`,
`moe/layer3/max_vio`, `moe/layer3/load`, `comm/a2a_bytes`, ...). A jsonl line is
{"step": int, "time": float (unix seconds), **metrics}; lists (per-expert load, bias) are kept
as lists. In wandb every key keeps one name for the whole run:
  - `.../load` and `.../load_window` lists become exact per-expert histograms (bin i = expert i);
    other lists (the bias) become value histograms;
  - per expert E of layer L, `moe/layerL/expert/EE/load_share` (its tokens over the window
    divided by the fair share: 1 = fair, 0 = dead) and `moe/layerL/expert/EE/bias` are scalar
    series while 2 x layers x experts stays within `expert_series_max` (:func:`expert_series`);
  - pictures go under fixed keys (:meth:`MetricsLogger.log_images`).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from deepsuite.runlog import JSONL_NAME, latest_loads, read_metrics

__all__ = [
    "BIAS_HIST_BINS",
    "EXPERT_SERIES_MAX",
    "MetricsLogger",
    "expert_series",
    "plain_config",
]

WANDB_MODES = ("online", "offline", "disabled")
# Scalars the console line shows, in this order, when present (the rest go to jsonl / wandb).
_CONSOLE_KEYS = (
    "loss/train",
    "loss/val",
    "optim/lr",
    "optim/grad_norm",
    "perf/tokens_per_s",
    "perf/mfu",
    "moe/max_vio",
    "moe/max_vio_global",
)
BIAS_HIST_BINS = 32
EXPERT_SERIES_MAX = 4096  # default cap on per-expert scalar series (see expert_series)
_EXACT_HIST = ("/load", "/load_window")  # list keys drawn as exact per-expert histograms


def expert_series(metrics: Mapping[str, Any], cap: int) -> dict[str, float]:
    """Per-expert scalars from the per-layer lists: `moe/layerL/expert/EE/load_share` (the
    expert's tokens over the window divided by the mean: 1 = fair share, 0 = dead) and
    `moe/layerL/expert/EE/bias`; EE is zero-padded to at least 2 digits so names sort.
    Empty when there would be more than `cap` of them: the same lists arrive at every MoE log,
    so a run either has all of these keys from its first MoE log to its last, or none."""
    lists = {
        k: v
        for k, v in metrics.items()
        if k.startswith("moe/layer")
        and k.endswith(("/load_window", "/bias"))
        and isinstance(v, list)
        and v
    }
    if not lists or sum(len(v) for v in lists.values()) > cap:
        return {}
    out: dict[str, float] = {}
    for k, v in lists.items():
        prefix, kind = k.rsplit("/", 1)
        width = max(2, len(str(len(v) - 1)))
        if kind == "load_window":
            mean = sum(v) / len(v)
            values = [x / mean if mean > 0 else 0.0 for x in v]
            name = "load_share"
        else:
            values, name = [float(x) for x in v], "bias"
        out.update({f"{prefix}/expert/{e:0{width}d}/{name}": x for e, x in enumerate(values)})
    return out


def plain_config(config: Any) -> dict[str, Any]:
    """The resolved config as plain dicts: a dict, any Mapping (OmegaConf DictConfig included,
    resolved) or a dataclass instance."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, Mapping or dataclass, got {type(config).__name__}")
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return {str(k): plain_config(v) if isinstance(v, Mapping) else v for k, v in config.items()}


def _to_jsonable(key: str, v: Any) -> float | int | list[float | int]:
    """Python numbers and flat lists from python / numpy / torch values. NaN and inf are kept
    (Python's json reads them back); anything else is refused where it is logged."""
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
        v = v.detach().to("cpu").tolist()
    elif isinstance(v, np.ndarray | np.generic):
        v = v.tolist()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, list | tuple) and all(
        isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v
    ):
        return [int(x) if isinstance(x, numbers.Integral) else float(x) for x in v]
    raise TypeError(
        f"metrics[{key!r}] must be a number or a flat list of numbers, got {type(v).__name__}"
    )


class _Console:
    """A tqdm progress bar plus a compact per-step line written above it (rank 0 only)."""

    def __init__(self, total_steps: int | None, stream: IO[str]) -> None:
        from tqdm.auto import tqdm

        self._stream = stream
        # disable=None: no bar when the stream is not a terminal (SLURM logs), lines still print.
        self._bar = tqdm(
            total=total_steps, file=stream, unit="step", dynamic_ncols=True, disable=None
        )
        self._last_step: int | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._last_step is None or step > self._last_step:
            self._bar.update(step - (self._last_step or 0))
            self._last_step = step
        parts = [f"step {step}"]
        for k in _CONSOLE_KEYS:
            v = metrics.get(k)
            if isinstance(v, int | float):
                parts.append(f"{k} {_fmt(v)}")
        if len(parts) > 1:
            self._bar.write(" | ".join(parts), file=self._stream)

    def warn(self, line: str) -> None:
        """A line on stderr; the bar is cleared and redrawn around it."""
        self._bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


class _Wandb:
    """wandb sink; imported lazily so the package works without wandb installed."""

    def __init__(self, wandb: Any, run: Any, expert_series_max: int) -> None:
        self.wandb = wandb
        self.run = run
        self.expert_series_max = expert_series_max

    def convert(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in metrics.items():
            if isinstance(v, list):
                if not v:
                    continue
                if k.endswith(_EXACT_HIST):  # exact per-expert histogram: bin i = expert i
                    edges = np.arange(len(v) + 1, dtype=np.float64)
                    out[k] = self.wandb.Histogram(np_histogram=(list(v), edges.tolist()))
                else:
                    counts, edges = np.histogram(np.asarray(v, dtype=np.float64), BIAS_HIST_BINS)
                    out[k] = self.wandb.Histogram(np_histogram=(counts.tolist(), edges.tolist()))
            else:
                out[k] = v
        out.update(expert_series(metrics, self.expert_series_max))
        return out

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(self.convert(metrics), step=step)


class MetricsLogger:
    """Writes metrics from rank 0 to the console, `run_dir/metrics.jsonl` and wandb.

    wandb_mode: "online", "offline" (no network needed), "disabled", or None to take WANDB_MODE
    (default "disabled"). project / name / group / tags default to WANDB_PROJECT, WANDB_NAME,
    WANDB_RUN_GROUP, WANDB_TAGS (comma-separated). If wandb is not importable, a warning is
    given and the other sinks carry on. The resolved `config` (dict, DictConfig or dataclass)
    is logged to wandb. expert_series_max: the cap of :func:`expert_series`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int,
        config: dict | Any,
        wandb_mode: str | None = "disabled",
        project: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        console: bool = True,
        total_steps: int | None = None,
        stream: IO[str] | None = None,
        expert_series_max: int = EXPERT_SERIES_MAX,
    ) -> None:
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        config = plain_config(config)
        mode = wandb_mode if wandb_mode is not None else os.environ.get("WANDB_MODE", "disabled")
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {mode!r}")
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0 or None, got {total_steps}")
        if not isinstance(expert_series_max, int) or expert_series_max < 0:
            raise ValueError(f"expert_series_max must be an int >= 0, got {expert_series_max!r}")
        self.expert_series_max = expert_series_max
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.wandb_mode = mode
        self.active = rank == 0
        self._file: IO[str] | None = None
        self._console: _Console | None = None
        self._wandb: _Wandb | None = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file; readers keep the lines in order.
        self._file = (self.run_dir / JSONL_NAME).open("a", buffering=1)
        if console:
            self._console = _Console(total_steps, stream if stream is not None else sys.stdout)
        if mode != "disabled":
            self._wandb = self._init_wandb(mode, config, project, name, group, tags)

    @property
    def jsonl_path(self) -> Path:
        return self.run_dir / JSONL_NAME

    def _init_wandb(
        self,
        mode: str,
        config: dict,
        project: str | None,
        name: str | None,
        group: str | None,
        tags: list[str] | None,
    ) -> _Wandb | None:
        try:
            import wandb
        except ImportError as e:
            warnings.warn(
                f"wandb_mode={mode!r} but wandb is not importable ({e}); logging to jsonl only",
                stacklevel=3,
            )
            return None
        env_tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
        run = wandb.init(
            mode=mode,
            project=project or os.environ.get("WANDB_PROJECT") or "deepsuite",
            name=name or os.environ.get("WANDB_NAME"),
            group=group or os.environ.get("WANDB_RUN_GROUP"),
            tags=list(tags) if tags is not None else env_tags or None,
            config=config,
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            reinit="finish_previous",
        )
        return _Wandb(wandb, run, self.expert_series_max)

    def log(self, metrics: dict[str, float | int | list[float]], step: int) -> None:
        """Writes one record at `step` (optimizer steps, >= 0). No-op on rank != 0."""
        if not self.active:
            return
        if self._file is None:
            raise ValueError("log() called after close()")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict of key -> value, got {type(metrics)}")
        clean: dict[str, Any] = {}
        for k, v in metrics.items():
            if not isinstance(k, str) or k in ("step", "time"):
                raise ValueError(f"metrics keys must be str other than 'step'/'time', got {k!r}")
            clean[k] = _to_jsonable(k, v)
        record = {"step": step, "time": time.time(), **clean}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._console is not None:
            self._console.log(clean, step)
        if self._wandb is not None:
            self._wandb.log(clean, step)

    def alert(self, title: str, text: str) -> None:
        """One line on stderr (even with the console sink off) and a wandb alert (level WARN,
        which wandb online forwards by email / Slack). Rank 0 only."""
        if not self.active:
            return
        line = f"deepsuite WARNING {text}"
        if self._console is not None:
            self._console.warn(line)
        else:
            print(line, file=sys.stderr, flush=True)
        if self._wandb is not None:
            wb = self._wandb.wandb
            self._wandb.run.alert(title=title, text=text, level=wb.AlertLevel.WARN)

    def log_images(self, step: int) -> None:
        """Logs the heatmaps of :func:`deepsuite.plotting.draw_heatmaps` (relative load layers x
        experts, and per layer load and bias experts x steps), drawn from the jsonl so far, to
        wandb under fixed keys `plots/<name>`, and the last window's loads as a table
        (`moe/load_table`: layer, expert, tokens, share). No-op without wandb."""
        if not self.active or self._wandb is None or self._file is None:
            return
        from deepsuite.plotting import draw_heatmaps, figure_to_rgb  # matplotlib: when drawing

        self._file.flush()
        records = read_metrics(self.jsonl_path)
        figs = draw_heatmaps(records)
        if not figs:
            return
        wb = self._wandb.wandb
        payload: dict[str, Any] = {
            f"plots/{k}": wb.Image(figure_to_rgb(fig)) for k, fig in figs.items()
        }
        rows = [
            [layer, e, c, c * len(load) / sum(load) if sum(load) > 0 else 0.0]
            for layer, load in latest_loads(records, window=True).items()
            for e, c in enumerate(load)
        ]
        if rows:
            columns = ["layer", "expert", "tokens", "share"]
            payload["moe/load_table"] = wb.Table(columns=columns, data=rows)
        self._wandb.run.log(payload, step=step)

    def close(self) -> None:
        """Flushes the jsonl, closes the progress bar, finishes the wandb run. Idempotent."""
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.run.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
