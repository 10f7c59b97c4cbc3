"""Build the pieces of a run: distributed setup, data, model (+ expert parallelism), DeepSpeed engine.

Everything that can be checked without talking to other ranks is checked first (config against
the world size, the data config, the expert-parallel layout, a ``train.init_from`` checkpoint's
architecture and tokenizer), so bad input fails with a clear message on every rank before any
collective could hang.

``train.init_from``: the architecture keys the config leaves at their default are the
checkpoint's and the others must equal it; ``data.tokenizer`` left at its default ("byte")
becomes the tokenizer saved beside the checkpoint. Its weights replace the random initialisation
only when the run has no checkpoint of its own to resume: a resumed run reads its own (and
needs the source no more: when it is gone, the architecture comes from that checkpoint).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepsuite.checkpoint.layout import find_resumable
from deepsuite.checkpoint.pretrained import (
    PretrainedError,
    PretrainedSource,
    apply_pretrained_architecture,
    find_pretrained,
    load_pretrained_weights,
)
from deepsuite.checkpoint.run import check_resume_layout, will_resume
from deepsuite.config import Config
from deepsuite.data import (
    HFTokenizer,
    PackedLoader,
    Tokenizer,
    load_hf_tokenizer,
    prepare_data,
    validate_data_config,
)
from deepsuite.distributed import DistEnv, check_same_config, detect_env, init_distributed
from deepsuite.distributed.comm import raise_on_every_rank
from deepsuite.distributed.deepspeed_json import resolved_zero_stage, validate_deepspeed_json
from deepsuite.distributed.engine import build_engine, deepspeed_config
from deepsuite.distributed.expert_parallel import apply_expert_parallel
from deepsuite.distributed.groups import setup_expert_parallel
from deepsuite.distributed.topology import resolve_group_limit
from deepsuite.models import DeepSeekLM
from deepsuite.training.activation_checkpointing import apply_activation_checkpointing
from deepsuite.training.compile import apply_compile


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


def resolve_init_from(cfg: Config) -> tuple[Config, PretrainedSource | None]:
    """``cfg`` with a ``train.init_from`` checkpoint's architecture and tokenizer (see the module
    docstring), and the checkpoint found; reads configs only. Raises PretrainedError."""
    if not cfg.train.init_from:
        return cfg, None
    own = Path(cfg.train.run_dir) / "checkpoints"
    if (
        not Path(cfg.train.init_from).exists()
        and cfg.train.resume == "auto"
        and find_resumable(own) is not None
    ):  # the source is gone, but the run resumes from its own checkpoint: same architecture
        src = find_pretrained(own)
    else:
        src = find_pretrained(cfg.train.init_from)
    cfg = apply_pretrained_architecture(cfg, src, "train.init_from")
    if cfg.data.tokenizer == "byte" and src.tokenizer != "byte":
        if src.tokenizer is None:
            raise PretrainedError(
                f"data.tokenizer: train.init_from={src.path} has no tokenizer.json beside it; "
                "name the tokenizer its weights were trained with (data.tokenizer=PATH)"
            )
        cfg.data.tokenizer = src.tokenizer
    return cfg, src


def check_tokenizer_vocab(cfg: Config) -> None:
    """A tokenizer file named in ``data.tokenizer`` must fit the model's vocabulary."""
    spec, vocab = cfg.data.tokenizer, cfg.model.vocab_size
    if spec in ("byte", "bpe") or vocab == 0:
        return
    n = load_hf_tokenizer(spec).vocab_size
    if n > vocab:
        where = " (the checkpoint's, train.init_from)" if cfg.train.init_from else ""
        raise ValueError(
            f"data.tokenizer: {spec} has {n} tokens, more than model.vocab_size={vocab}{where}; "
            "ids past the embedding table cannot be trained"
        )


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
    check_tokenizer_vocab(cfg)
    validate_deepspeed_json(cfg)  # the JSON's ZeRO stage and options against the YAML
    here = {"world": env.world_size, "ep": cfg.parallel.ep, "zero": resolved_zero_stage(cfg)}
    check_resume_layout(cfg.train.resume, Path(cfg.train.run_dir) / "checkpoints", here)


def _prepare_data_once(cfg: Config, rank: int, run_dir: Path) -> Tokenizer:
    """Rank 0 tokenises and caches, then the others read the cache; an error on rank 0 (a bad
    record, say) is raised on every rank instead of leaving the others at a barrier."""
    err: ValueError | None = None
    if rank == 0:
        try:
            tokenizer = prepare_data(cfg.data, run_dir=run_dir)
            if isinstance(tokenizer, HFTokenizer):  # the run carries its tokenizer
                tokenizer.save(run_dir)
        except ValueError as e:
            err = e
    raise_on_every_rank(err)
    if rank != 0:
        tokenizer = prepare_data(cfg.data, run_dir=run_dir)
    return tokenizer


def build_run(cfg: Config) -> RunParts:
    """Validate, start torch.distributed, build data, model and the DeepSpeed engine."""
    env = detect_env()
    cfg, init_src = resolve_init_from(cfg)
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

    tokenizer = _prepare_data_once(cfg, env.rank, run_dir)
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
    if init_src is not None and not will_resume(cfg.train.resume, run_dir / "checkpoints"):
        err = None
        try:  # each rank reads its own experts, so a bad tensor may fail on one rank only
            load_pretrained_weights(model, init_src)
        except ValueError as e:
            err = e
        raise_on_every_rank(err)
        if env.rank == 0:
            print(f"initialised from {init_src.path} ({init_src.kind})", flush=True)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile:  # per block, in place: parameter names and checkpoints unchanged;
        # a checkpointed block's recomputation then replays the compiled block
        apply_compile(model, cfg.train.compile_backend)

    grad_accum = cfg.grad_accumulation_steps(W)
    engine = build_engine(cfg, model, deepspeed_config(cfg, grad_accum))
    return RunParts(
        cfg, env, run_dir, engine, model, tokenizer, train_loader, val_loader, grad_accum
    )
