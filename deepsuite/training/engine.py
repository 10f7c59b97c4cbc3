"""Build the pieces of a run: distributed setup, data, model (+ expert parallelism), DeepSpeed engine.

Everything that can be checked without talking to other ranks is checked first, on every rank,
before the process group starts (:func:`validate_before_launch`: the config against the world
size, the run directory, the checkpoint to resume, the DeepSpeed JSON, the data source's first
record, the tokenizer against ``model.vocab_size``). The ranks then agree on the outcome in the
group's first collective, so a problem found by any rank stops every rank at once, each printing
the same message. Data preparation, which only rank 0 does first, ends the same way
(:func:`~deepsuite.distributed.agree.fail_together`): no rank dies while the others wait.

``train.init_from``: the architecture keys the config leaves at their default are the
checkpoint's and the others must equal it; ``data.tokenizer`` left at its default ("byte")
becomes the tokenizer saved beside the checkpoint. Its weights replace the random initialisation
only when the run has no checkpoint of its own to resume: a resumed run reads its own (and
needs the source no more: when it is gone, the architecture comes from that checkpoint).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Callable
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
from deepsuite.checkpoint.run import will_resume
from deepsuite.checkpoint.validate import check_resume
from deepsuite.config import Config, ConfigError, ParallelConfig
from deepsuite.data import (
    HFTokenizer,
    PackedLoader,
    Tokenizer,
    prepare_data,
    set_progress_bars,
    tokenizer_vocab_size,
    validate_data_config,
)
from deepsuite.distributed import DistEnv, check_same_config, detect_env, init_distributed
from deepsuite.distributed.agree import agree_on_error, fail_together
from deepsuite.distributed.deepspeed_json import resolved_zero_stage, validate_deepspeed_json
from deepsuite.distributed.engine import build_engine, deepspeed_config
from deepsuite.distributed.env import start_process_group
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


def check_run_dir(run_dir: str) -> None:
    """``train.run_dir`` is a directory, or can be made one (its nearest existing parent is a
    writable directory)."""
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"train.run_dir: {p} is a file; expected a directory for the run")
    parent = next(a for a in (p, *p.parents) if a.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"train.run_dir: cannot create {p}: {parent} is not writable")


def check_logging(cfg: Config) -> None:
    if cfg.logging.wandb != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"logging.wandb: {cfg.logging.wandb!r} needs the wandb package (pip install wandb); "
            "or set logging.wandb=disabled"
        )


def check_model(cfg: Config) -> None:
    """The model builds (on the meta device: no memory, no time) and each auxiliary head maps
    (B, S, D) hidden states to (B, S, >= vocab) logits, so its config errors come before launch."""
    vocab = cfg.model.vocab_size or tokenizer_vocab_size(cfg.data)[0]
    probe = dataclasses.replace(cfg.model, vocab_size=vocab)
    with torch.device("meta"):
        model = DeepSeekLM(dataclasses.replace(cfg, model=probe))
        for head_cfg in cfg.model.aux_heads:
            try:
                out = model.aux_heads[head_cfg.name](torch.empty(2, 3, cfg.model.dim))
            except Exception:  # a layer without meta support: the run will tell
                continue
            if out.dim() != 3 or tuple(out.shape[:2]) != (2, 3) or out.shape[2] < vocab:
                raise ConfigError(
                    f"model.aux_heads[{head_cfg.name}]: expected the head to map (B, S, "
                    f"{cfg.model.dim}) hidden states to (B, S, V) logits over the target tokens "
                    f"(V >= {vocab}, e.g. out_features: '@vocab'), got {tuple(out.shape)}"
                )


def validate_before_launch(cfg: Config, env: DistEnv) -> None:
    """Every check that needs no collective, cheapest first; raises a DeepsuiteError naming the
    key or file (:mod:`deepsuite.errors`)."""
    cfg.check_world(env.world_size)  # the batch split and the expert-parallel rule
    check_run_dir(cfg.train.run_dir)
    check_logging(cfg)
    check_resume(cfg)
    validate_deepspeed_json(cfg)  # the JSON's ZeRO stage and options against the YAML
    validate_data_config(  # reads the source's first record and the tokenizer
        cfg.data,
        model_max_seq_len=cfg.model.max_seq_len,
        world_size=env.world_size,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        model_vocab_size=cfg.model.vocab_size,
    )
    check_model(cfg)
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


def quiet_third_party(console: bool, rank: int) -> None:
    """Progress bars of `datasets` on rank 0 only and only with console logging; the
    deprecation warning torch gives for DeepSpeed's use of ``all_gather_into_tensor`` (not ours
    to fix) filtered. Other warnings stay."""
    set_progress_bars(console and rank == 0)
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )


def start_run(
    load: Callable[[], Config],
) -> tuple[Config, DistEnv, PretrainedSource | None]:
    """Load and validate the config on every rank, start the process group, agree on the verdict;
    returns the config (with ``train.init_from``'s architecture), the ranks and the source found.

    ``load`` builds the config (YAML and overrides), so a bad key is part of the verdict too:
    with several ranks every one of them then prints the same message, instead of the fastest
    exiting while torchrun stops the others before they print. A lone process with a problem
    raises it at once, without starting anything.
    """
    env = detect_env()
    cfg: Config | None = None
    init_src: PretrainedSource | None = None
    problem: Exception | None = None
    try:
        cfg = load()
        cfg, init_src = resolve_init_from(cfg)  # reads the source's config, no weights
        validate_before_launch(cfg, env)  # before any collective
    except Exception as err:  # shared with every rank below, then raised
        problem = err
    if problem is None or env.world_size > 1:
        p = cfg.parallel if cfg is not None else ParallelConfig()
        start_process_group(p.backend, p.collective_timeout_s)
    agree_on_error(problem, "validation")  # the group's first collective
    assert cfg is not None
    return cfg, env, init_src


def build_run(cfg: Config | Callable[[], Config]) -> RunParts:
    """Validate, start torch.distributed, build data, model and the DeepSpeed engine.

    ``cfg``: the config, or a function loading it (then its errors are agreed on as well).
    """
    cfg, env, init_src = start_run(cfg if callable(cfg) else lambda: cfg)
    quiet_third_party(cfg.logging.console, env.rank)
    init_distributed(cfg.parallel.backend, cfg.parallel.collective_timeout_s)
    check_same_config(cfg.to_dict())
    run_dir = Path(cfg.train.run_dir)

    # data: rank 0 tokenises and caches, the others then read the cache
    tokenizer: Tokenizer | None = None
    with fail_together("data preparation"):
        if env.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
            tokenizer = prepare_data(cfg.data, run_dir=run_dir)
            if isinstance(tokenizer, HFTokenizer):  # the run carries its tokenizer
                tokenizer.save(run_dir)
    with fail_together("data preparation"):
        if env.rank != 0:
            tokenizer = prepare_data(cfg.data, run_dir=run_dir)
        assert tokenizer is not None
        check_vocab_size_of(cfg, tokenizer)
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
        # each rank reads its own experts, so a bad tensor may fail on one rank only
        with fail_together("reading train.init_from"):
            load_pretrained_weights(model, init_src)
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


def check_vocab_size_of(cfg: Config, tokenizer: Tokenizer) -> None:
    """``model.vocab_size`` against the tokenizer built (0 takes its size)."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: expected at least the tokenizer's {tokenizer.vocab_size}, "
            f"got {cfg.model.vocab_size}"
        )
