"""Learning-rate and balancing-speed schedules (pure functions of the step / tokens seen)."""

from __future__ import annotations

import math

from deepsuite.config import MoEConfig, OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def bias_gamma(tokens_seen: int, cfg: MoEConfig) -> float:
    """The bias update speed: ``bias_update_speed`` until ``bias_update_until_tokens``, then 0."""
    if cfg.bias_update_until_tokens and tokens_seen >= cfg.bias_update_until_tokens:
        return 0.0
    return cfg.bias_update_speed
