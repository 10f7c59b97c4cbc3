"""Build the pieces of a run: distributed setup, data, model (+ expert parallelism), DeepSpeed engine.

Everything that can be checked without talking to other ranks is checked first (config against
the world size, the data config, the expert-parallel layout), so bad input fails with a clear
message on every rank before any collective could hang.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deepsuite.config import Config
from deepsuite.data import PackedLoader, Tokenizer, prepare_data, validate_data_config
from deepsuite.distributed import DistEnv, check_same_config, detect_env, init_distributed
from deepsuite.distributed.expert_parallel import (
    apply_expert_parallel,
    moe_param_groups,
    tag_expert_parameters,
)
from deepsuite.distributed.groups import setup_expert_parallel, validate_expert_parallel
from deepsuite.distributed.topology import resolve_group_limit
from deepsuite.models import DeepSeekLM
from deepsuite.training.checkpoint import make_safe_checkpoint_engine
from deepsuite.training.compile import apply_compile
from deepsuite.training.schedule import lr_factor


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
    cfg.check_world(env.world_size)
    validate_data_config(
        cfg.data,
        model_max_seq_len=cfg.model.max_seq_len,
        world_size=env.world_size,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
    )
    if cfg.model.n_dense_layers < cfg.model.n_layers:
        validate_expert_parallel(cfg.moe.n_routed_experts, env.world_size, cfg.parallel.ep)
    ds_path = Path(cfg.parallel.deepspeed_config)
    if not ds_path.is_file():
        raise ValueError(f"parallel.deepspeed_config: file not found: {ds_path}")


def deepspeed_config(cfg: Config, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed JSON under configs/ with the batch, clipping and precision of ``cfg``."""
    ds = json.loads(Path(cfg.parallel.deepspeed_config).read_text())
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
        apply_expert_parallel(model, groups, check_replicated=False)  # nothing to compare yet
    model.materialize("cpu", seed=cfg.train.seed)
    tag_expert_parameters(model)  # to_empty made new Parameter objects: tag them again
    if cfg.train.compile:  # per block, in place: parameter names and checkpoints unchanged
        apply_compile(model, cfg.train.compile_backend)

    grad_accum = cfg.grad_accumulation_steps(W)
    engine = build_engine(cfg, model, deepspeed_config(cfg, grad_accum))
    return RunParts(
        cfg, env, run_dir, engine, model, tokenizer, train_loader, val_loader, grad_accum
    )


def build_engine(cfg: Config, model: DeepSeekLM, ds_config: dict[str, Any]) -> Any:
    """AdamW over the decay / no-decay / expert groups, the LR schedule, the DeepSpeed engine.

    Shared by :func:`build_run` and the checkpoint resharder, so both build the same optimizer
    layout (ep 1: experts are ordinary data-parallel parameters in the dense groups).
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
