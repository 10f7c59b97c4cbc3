"""The DeepSpeed engine around a model: its JSON config, the optimizer and LR schedule, safe loading.

One builder for every place that needs an engine (the training run and the checkpoint converter),
so both hold the same optimizer layout: AdamW over the decay / no-decay / per-EP-group expert
groups (:func:`~deepsuite.distributed.expert_parallel.moe_param_groups`), linear warmup then
cosine / linear / constant decay (:func:`lr_factor`).

The engine reads checkpoints with ``torch.load(weights_only=True)``: DeepSpeed's own checkpoint
engine loads with ``weights_only=False`` (arbitrary code on load). Private DeepSpeed API relied on
(0.19, pinned < 0.20): ``engine.checkpoint_engine`` and ``TorchCheckpointEngine``, and the classes
of :func:`deepspeed_safe_globals` that its files pickle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepsuite.config import Config, OptimConfig
from deepsuite.distributed.deepspeed_json import read_deepspeed_json
from deepsuite.distributed.expert_parallel import moe_param_groups

__all__ = [
    "build_engine",
    "deepspeed_config",
    "deepspeed_safe_globals",
    "lr_factor",
    "make_safe_checkpoint_engine",
    "safe_torch_load",
]


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


def deepspeed_config(cfg: Config, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed JSON under configs/ with the batch, clipping and precision of ``cfg``
    (:func:`~deepsuite.distributed.deepspeed_json.validate_deepspeed_json` checked it before
    launch)."""
    ds = read_deepspeed_json(cfg.parallel.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = cfg.train.global_batch_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds.pop("optimizer", None)  # a torch optimizer is passed in (DeepSpeed's would compile ops)
    ds.pop("scheduler", None)
    if cfg.parallel.zero_stage >= 0:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.parallel.zero_stage
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_engine(cfg: Config, model: nn.Module, ds_config: dict[str, Any]) -> Any:
    """AdamW over the decay / no-decay / expert groups, the LR schedule, the DeepSpeed engine.

    ep 1: experts are ordinary data-parallel parameters in the dense groups. The engine's
    checkpoint loads are ``weights_only`` (:func:`make_safe_checkpoint_engine`).
    """
    import deepspeed

    param_groups = moe_param_groups(model, cfg.optim.weight_decay)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    steps = cfg.train.steps

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, o))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    engine.checkpoint_engine = make_safe_checkpoint_engine()
    # the bf16 cast leaves the bias float32: Router._apply keeps it so under any dtype cast
    return engine


def deepspeed_safe_globals() -> list[Any]:
    """The data-only DeepSpeed classes its checkpoints pickle (enums, a loss-scaler record, a
    fragment address); allowlisted by name so ``weights_only=True`` loading can read them."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path) -> Any:
    """One file DeepSpeed wrote, loaded on the CPU with ``weights_only=True``."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def make_safe_checkpoint_engine() -> Any:
    """A DeepSpeed checkpoint engine whose loads use ``torch.load(weights_only=True)``: tensors,
    containers and the classes of :func:`deepspeed_safe_globals`, nothing else."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = deepspeed_safe_globals()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine()
