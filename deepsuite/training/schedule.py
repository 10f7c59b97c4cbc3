"""Learning-rate and balancing-speed schedules (pure functions of the step / tokens seen)."""

from __future__ import annotations

from deepsuite.config import MoEConfig


def bias_gamma(tokens_seen: int, cfg: MoEConfig) -> float:
    """The bias update speed: ``bias_update_speed`` until ``bias_update_until_tokens``, then 0."""
    if cfg.bias_update_until_tokens and tokens_seen >= cfg.bias_update_until_tokens:
        return 0.0
    return cfg.bias_update_speed
