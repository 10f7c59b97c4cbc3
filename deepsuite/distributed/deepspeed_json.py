"""The DeepSpeed JSON (``parallel.deepspeed_config``), read and checked before any collective.

The YAML config is validated field by field (deepsuite.config); the JSON it points at is checked
here with the same care, because its ZeRO stage decides how the model is built (under stage 3
the experts are partitioned over their expert-data-parallel group, the dense model over the
world) and a wrong one would otherwise surface after the ranks have started talking, or not at
all (a stage-3 JSON used to export experts of shape (0,)). Pure: json and the config only, so
``deepsuite plan`` reads the stage the same way the trainer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepsuite.config import Config, ConfigError

__all__ = ["read_deepspeed_json", "resolved_zero_stage", "validate_deepspeed_json"]

# ZeRO-3 options DeepSpeed 0.19.8 refuses beside its own expert parallelism
# (engine._validate_zero3_moe_compatibility, which our shards do not reach) or that gather over
# groups of their own: key -> (the value that turns it off, why).
_ZERO3_EP_REFUSED = {
    "zero_hpz_partition_size": (1, "hpZ secondary partitions are not supported beside experts"),
    "zero_quantized_gradients": (False, "quantized gradients are not supported beside experts"),
    "zero_quantized_weights": (False, "quantized weights are untested beside experts"),
}


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The JSON at ``path`` as a dict; ConfigError naming ``parallel.deepspeed_config`` if the
    file is missing, not JSON, or not an object."""
    path = Path(path)
    key = "parallel.deepspeed_config"
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


def _json_stage(ds: dict[str, Any], path: str) -> int:
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"zero_optimization in {path}: expected an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"zero_optimization.stage in {path}: expected 0, 1, 2 or 3, got {stage!r}"
        )
    return int(stage)


def resolved_zero_stage(cfg: Config, ds: dict[str, Any] | None = None) -> int:
    """The stage the engine runs: ``parallel.zero_stage`` when set (>= 0), else the JSON's."""
    if cfg.parallel.zero_stage >= 0:
        return cfg.parallel.zero_stage
    path = cfg.parallel.deepspeed_config
    return _json_stage(read_deepspeed_json(path) if ds is None else ds, path)


def validate_deepspeed_json(cfg: Config) -> dict[str, Any]:
    """Read and check the JSON against the YAML; return it. Raises ConfigError naming the key.

    - ``zero_optimization.stage`` must be 0-3; ``parallel.zero_stage`` may move it within 0-2,
      but not to or from 3 (stage 3 builds the model differently and its JSON carries stage-3
      settings): a contradiction is an error, not an override.
    - offload (``offload_optimizer`` / ``offload_param``) is refused: the trainer passes a torch
      AdamW, and DeepSpeed's offload needs its own CPU Adam.
    - under stage 3 with ``parallel.ep`` > 1, the options of ``_ZERO3_EP_REFUSED``.
    """
    path = cfg.parallel.deepspeed_config
    ds = read_deepspeed_json(path)
    json_stage = _json_stage(ds, path)
    stage = resolved_zero_stage(cfg, ds)
    if cfg.parallel.zero_stage >= 0 and (stage == 3) != (json_stage == 3):
        raise ConfigError(
            f"parallel.zero_stage={stage} contradicts zero_optimization.stage={json_stage} in "
            f"{path}: ZeRO 3 must be set in both (use parallel.deepspeed_config="
            f"configs/deepspeed/{'zero3' if stage == 3 else 'zero1'}.json)"
        )
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(
                f"zero_optimization.{key}.device in {path}: offload is not supported (the trainer "
                f"passes a torch AdamW; DeepSpeed's offload needs its CPU Adam), got {device!r}"
            )
    if stage == 3 and cfg.parallel.ep > 1:
        for key, (off, why) in _ZERO3_EP_REFUSED.items():
            if zero.get(key, off) != off:
                raise ConfigError(
                    f"zero_optimization.{key} in {path}: {why} (ZeRO 3 with parallel.ep="
                    f"{cfg.parallel.ep}); remove it or set it to {json.dumps(off)}, got "
                    f"{json.dumps(zero[key])}"
                )
    return ds
