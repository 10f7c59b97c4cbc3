"""The DeepSpeed JSON (``parallel.deepspeed_config``): read it, and check it against the run.

The JSON holds the engine settings the YAML does not: the ZeRO stage and its options, logging.
Its ZeRO stage decides how the model is built (under stage 3 the experts are partitioned over
their expert-data-parallel group, the dense model over the world; a stage-3 JSON unchecked used
to export experts of shape (0,)). Everything the YAML owns (batch sizes, clipping, precision,
optimizer, LR schedule) is written into the engine's config by
:func:`deepsuite.distributed.engine.deepspeed_config`; a JSON that sets one of those differently
would be silently overridden, so it is refused with the YAML key to use instead.

The checks are :data:`RULES`, one function each, run in order by :func:`validate_deepspeed_json`
on every rank before the process group starts. A rule takes the parsed JSON and the config and
returns None when it holds, else what is wrong, starting with the JSON key it is about; the
error then names the file. Add a rule by appending a function to the list. Pure but for the
last rule (DeepSpeed's own schema): ``deepsuite plan`` reads the stage the same way the trainer
does (:func:`resolved_zero_stage`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepsuite.config import Config
from deepsuite.errors import ConfigError

__all__ = [
    "RULES",
    "ZERO_STAGES",
    "read_deepspeed_json",
    "resolve_deepspeed_json",
    "resolved_zero_stage",
    "validate_deepspeed_json",
]

ZERO_STAGES = (0, 1, 2, 3)

# ZeRO-3 options DeepSpeed 0.19.8 refuses beside its own expert parallelism
# (engine._validate_zero3_moe_compatibility, which our shards do not reach) or that gather over
# groups of their own: key -> (the value that turns it off, why).
_ZERO3_EP_REFUSED = {
    "zero_hpz_partition_size": (1, "hpZ secondary partitions are not supported beside experts"),
    "zero_quantized_gradients": (False, "quantized gradients are not supported beside experts"),
    "zero_quantized_weights": (False, "quantized weights are untested beside experts"),
}

Rule = Callable[[dict[str, Any], Config], "str | None"]


# the checkout holding the shipped configs/deepspeed/*.json (this file is deepsuite/distributed/)
_ROOT = Path(__file__).resolve().parents[2]


def resolve_deepspeed_json(path: str | Path) -> Path:
    """``path`` itself when absolute or found from the working directory, else the shipped file
    of that name in the checkout (so ``configs/deepspeed/zero1.json`` works from any directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (_ROOT / p).is_file():
        return p
    return _ROOT / p


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path`` (:func:`resolve_deepspeed_json`); a missing file or a syntax
    error names the file and line."""
    p = resolve_deepspeed_json(path)
    key = "parallel.deepspeed_config"
    if not p.is_file():
        where = "" if p.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        what = "is a directory" if p.is_dir() else "not found"
        raise ConfigError(f"{key}: {p} {what}{where}; expected a DeepSpeed JSON file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{key}: {p}, line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}: {p}: not UTF-8 text ({err.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {p}: expected a JSON object, got {type(data).__name__}")
    return data


def _json_stage(ds: dict[str, Any]) -> Any:
    """The stage the JSON names (0 when it names none; None when the section is not an object)."""
    zero = ds.get("zero_optimization", {})
    return zero.get("stage", 0) if isinstance(zero, dict) else None


def resolved_zero_stage(cfg: Config, ds: dict[str, Any] | None = None) -> int:
    """The stage the engine runs: ``parallel.zero_stage`` when set (>= 0), else the JSON's
    (read from ``parallel.deepspeed_config`` when ``ds`` is not given)."""
    if cfg.parallel.zero_stage >= 0:
        return cfg.parallel.zero_stage
    stage = _json_stage(read_deepspeed_json(cfg.parallel.deepspeed_config) if ds is None else ds)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ConfigError(
            f"parallel.deepspeed_config: {cfg.parallel.deepspeed_config}: zero_optimization.stage:"
            f" expected one of {list(ZERO_STAGES)}, got {stage!r}"
        )
    return int(stage)


def _zero_section(ds: dict[str, Any], cfg: Config) -> str | None:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return f"zero_optimization: expected an object, got {zero!r}"
    return None


def _zero_stage(ds: dict[str, Any], cfg: Config) -> str | None:
    """0-3; ``parallel.zero_stage`` may move it within 0-2, but not to or from 3 (stage 3
    builds the model differently and its JSON carries stage-3 settings)."""
    stage = _json_stage(ds)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        return f"zero_optimization.stage: expected one of {list(ZERO_STAGES)}, got {stage!r}"
    yaml_stage = cfg.parallel.zero_stage
    if yaml_stage >= 0 and (yaml_stage == 3) != (stage == 3):
        return (
            f"parallel.zero_stage={yaml_stage} contradicts zero_optimization.stage={stage}: ZeRO 3"
            " must be set in both (use parallel.deepspeed_config="
            f"configs/deepspeed/{'zero3' if yaml_stage == 3 else 'zero1'}.json)"
        )
    return None


def _zero3_with_experts(ds: dict[str, Any], cfg: Config) -> str | None:
    """Under stage 3 with ``parallel.ep`` > 1, the options of ``_ZERO3_EP_REFUSED``."""
    zero = ds.get("zero_optimization", {})
    if resolved_zero_stage(cfg, ds) != 3 or cfg.parallel.ep == 1:
        return None
    for key, (off, why) in _ZERO3_EP_REFUSED.items():
        if zero.get(key, off) != off:
            return (
                f"zero_optimization.{key}: {why} (ZeRO 3 with parallel.ep={cfg.parallel.ep});"
                f" remove it or set it to {json.dumps(off)}, got {json.dumps(zero[key])}"
            )
    return None


def _moe_stage_options(ds: dict[str, Any], cfg: Config) -> str | None:
    """DeepSpeed asserts these for MoE models (stage_1_and_2.py, _configure_moe_settings)."""
    zero = ds.get("zero_optimization", {})
    stage = resolved_zero_stage(cfg, ds)
    if cfg.parallel.ep == 1 or stage not in (1, 2):
        return None
    if zero.get("reduce_scatter", True) is False:
        return "zero_optimization.reduce_scatter: expected true with parallel.ep > 1 (DeepSpeed's MoE path needs it)"
    if stage == 2 and zero.get("contiguous_gradients", True) is False:
        return "zero_optimization.contiguous_gradients: expected true with ZeRO-2 and parallel.ep > 1 (DeepSpeed's MoE path needs it)"
    return None


def _offload(ds: dict[str, Any], cfg: Config) -> str | None:
    """DeepSpeed's offload needs its own CPU Adam; deepsuite passes a torch AdamW."""
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        device = section.get("device", "none") if isinstance(section, dict) else None
        if device not in (None, "none"):
            return (
                f"zero_optimization.{key}: offload is not supported (the trainer passes a torch "
                f"AdamW; DeepSpeed's offload needs its CPU Adam), got device {device!r}"
            )
    return None


def _owned_by_yaml(ds: dict[str, Any], cfg: Config) -> str | None:
    """Keys the YAML sets: allowed in the JSON only with the value the YAML gives them."""
    t, note = cfg.train, "(the YAML sets it; remove it from the JSON)"
    bf16 = t.precision == "bf16"
    owned: dict[str, tuple[Any, str]] = {
        "train_batch_size": (t.global_batch_size, "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
        "bf16": ({"enabled": bf16}, "train.precision"),
    }
    for key, (want, yaml_key) in owned.items():
        if key not in ds:
            continue
        got = ds[key]
        same = (
            got.get("enabled", False) == want["enabled"]
            if isinstance(want, dict) and isinstance(got, dict)
            else isinstance(got, int | float)
            and not isinstance(got, bool)
            and math.isclose(got, want)
        )
        if not same:
            return f"{key}: {got!r} disagrees with {yaml_key} ({want!r}) {note}"
    if "gradient_accumulation_steps" in ds:
        return (
            "gradient_accumulation_steps: set by train.global_batch_size / "
            f"(train.micro_batch_size x world size) {note}"
        )
    for key, yaml_key in (("optimizer", "optim.*"), ("scheduler", "optim.schedule")):
        if key in ds:
            return f"{key}: deepsuite builds AdamW and its LR schedule from {yaml_key} {note}"
    for key in ("fp16", "amp"):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled", False):
            return f"{key}.enabled: not supported; train.precision is fp32 or bf16"
    return None


def _deepspeed_schema(ds: dict[str, Any], cfg: Config) -> str | None:
    """The ZeRO section against DeepSpeed's own schema (unknown keys, wrong types): the check
    DeepSpeed makes in ``deepspeed.initialize``, made before any rank starts. Private API
    (DeepSpeed 0.19, pinned < 0.20): ``deepspeed.runtime.zero.config.DeepSpeedZeroConfig``."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"zero_optimization.{loc}: {first.get('msg', 'invalid')}"
    return None


RULES: list[Rule] = [
    _zero_section,
    _zero_stage,
    _zero3_with_experts,
    _moe_stage_options,
    _offload,
    _owned_by_yaml,
    _deepspeed_schema,  # last: it imports DeepSpeed
]


def validate_deepspeed_json(cfg: Config) -> dict[str, Any]:
    """Read ``parallel.deepspeed_config`` and check every rule; returns the parsed JSON.

    Raises :class:`~deepsuite.errors.ConfigError` naming the file and the JSON key. Pure: no
    collective, so every rank runs it before the process group starts.
    """
    path = cfg.parallel.deepspeed_config
    ds = read_deepspeed_json(path)
    for rule in RULES:
        problem = rule(ds, cfg)
        if problem is not None:
            raise ConfigError(f"parallel.deepspeed_config: {path}: {problem}")
    return ds
