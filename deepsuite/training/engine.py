"""Build the pieces of a run: distributed setup, data, model (+ expert parallelism), DeepSpeed engine.

Everything that can be checked without talking to other ranks is checked first (config against
the world size, the data config, the expert-parallel layout), so bad input fails with a clear
message on every rank before any collective could hang.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deepsuite.config import Config
from deepsuite.data import PackedLoader, Tokenizer, prepare_data, validate_data_config
from deepsuite.distributed import DistEnv, check_same_config, detect_env, init_distributed
from deepsuite.distributed.deepspeed_json import resolved_zero_stage, validate_deepspeed_json
from deepsuite.distributed.engine import build_engine, deepspeed_config
from deepsuite.distributed.expert_parallel import apply_expert_parallel
from deepsuite.distributed.groups import setup_expert_parallel
from deepsuite.distributed.topology import resolve_group_limit
from deepsuite.models import DeepSeekLM
from deepsuite.training.activation_checkpointing import apply_activation_checkpointing


@dataclass
class RunParts:
    """What the training loop needs, built by :func:`build_run`."""

    cfg: Config
    env: DistEnv
    run_dir: Path
    engine: Any  # deepspeed.DeepSpeedEngine
    model: DeepSeekLM  # the module inside the engine
    tokenizer: Tokenizer
    train_loader: PackedLoader
    val_loader: PackedLoader | None
    grad_accum: int


def validate_before_launch(cfg: Config, env: DistEnv) -> None:
    """Every check that needs no collective; raises ValueError/ConfigError naming the field."""
    cfg.check_world(env.world_size)  # the batch split and the expert-parallel rule
    validate_data_config(
        cfg.data,
        model_max_seq_len=cfg.model.max_seq_len,
        world_size=env.world_size,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
    )
    validate_deepspeed_json(cfg)  # the JSON's ZeRO stage and options against the YAML


def build_run(cfg: Config) -> RunParts:
    """Validate, start torch.distributed, build data, model and the DeepSpeed engine."""
    env = detect_env()
    validate_before_launch(cfg, env)  # before any collective
    if cfg.model.n_dense_layers < cfg.model.n_layers:  # router groups = EP ranks / nodes
        limit = resolve_group_limit(
            cfg.parallel.limit_groups_to,
            cfg.moe.n_routed_experts,
            cfg.moe.n_group,
            cfg.moe.topk_group,
            cfg.parallel.ep,
            env.local_world_size,
            env.world_size,
        )
        if limit.n_group != cfg.moe.n_group:  # derived from n_group=1; revalidates the section
            cfg.moe = dataclasses.replace(cfg.moe, n_group=limit.n_group)
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_s)
    check_same_config(cfg.to_dict())
    run_dir = Path(cfg.train.run_dir)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # data: rank 0 tokenises and caches, the others read the cache
    if env.rank == 0:
        tokenizer = prepare_data(cfg.data, run_dir=run_dir)
    dist.barrier()
    if env.rank != 0:
        tokenizer = prepare_data(cfg.data, run_dir=run_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size: expected at least the tokenizer's {tokenizer.vocab_size}, "
            f"got {cfg.model.vocab_size}"
        )
    B, W = cfg.train.micro_batch_size, env.world_size
    train_loader = PackedLoader(cfg.data, tokenizer, "train", B, env.rank, W, run_dir=run_dir)
    val_loader = None
    if cfg.data.val_fraction > 0 and cfg.train.eval_batches > 0:
        val_loader = PackedLoader(cfg.data, tokenizer, "val", B, env.rank, W, run_dir=run_dir)

    # model: built on the meta device, experts sharded from outside, then only this rank's
    # tensors allocated and initialised (keyed by name and global expert id, so every layout
    # starts from the same weights)
    with torch.device("meta"):
        model = DeepSeekLM(cfg)
    if cfg.parallel.ep > 1:
        groups = setup_expert_parallel(cfg.parallel.ep, cfg.moe.n_routed_experts)
        apply_expert_parallel(  # nothing to compare yet: check_replicated=False
            model, groups, zero_stage=resolved_zero_stage(cfg), check_replicated=False
        )
    model.materialize("cpu", seed=cfg.train.seed)  # expert shards keep their DeepSpeed tags
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)

    grad_accum = cfg.grad_accumulation_steps(W)
    engine = build_engine(cfg, model, deepspeed_config(cfg, grad_accum))
    return RunParts(
        cfg, env, run_dir, engine, model, tokenizer, train_loader, val_loader, grad_accum
    )
