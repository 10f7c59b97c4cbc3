"""``deepsuite eval PATH --data SOURCE``: loss, perplexity and expert load of a trained model on a
dataset, on any number of ranks with any expert-parallel size.

    deepsuite eval runs/finetune-tiny --data runs/sft.jsonl --format sft
    torchrun --standalone --nproc_per_node 2 -m deepsuite.cli eval runs/tiny-hf --data builtin --ep 2

PATH is anything :func:`~deepsuite.checkpoint.pretrained.find_pretrained` reads (a Hugging Face
DeepSeek-V2/V3 directory, a deepsuite export or run). The rows are the split's packed rows in
stream order (``data.seq_len`` each, no shuffling), ``--batch-size`` of them per step over all
ranks, so every layout evaluates the same rows. The loss is the mean cross-entropy over every
target token of those rows (summed in float64 over ranks, then divided by the token count), so
it does not depend on the world or EP size; perplexity is exp(loss). The load statistics are
the evaluated tokens' expert counts per MoE layer summed over all ranks, and MaxVio per layer
(docs/formulas.md).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from deepsuite.atomic import atomic_write_text
from deepsuite.checkpoint.pretrained import (
    PretrainedError,
    PretrainedSource,
    find_pretrained,
    load_pretrained_weights,
)
from deepsuite.config import ConfigError, DataConfig, ModelArgs, validate_expert_parallel
from deepsuite.data import PackedLoader, load_hf_tokenizer, prepare_data, validate_data_config
from deepsuite.data.loader import model_inputs
from deepsuite.distributed import detect_env, init_distributed
from deepsuite.distributed.agree import fail_together
from deepsuite.models import IGNORE_INDEX, DeepSeekLM
from deepsuite.training.moe_stats import max_vio


@dataclass
class EvalResult:
    """What one evaluation measured (the same on every rank)."""

    loss: float
    perplexity: float
    tokens: int
    rows: int
    counts: dict[int, list[int]] = field(default_factory=dict)  # MoE layer -> tokens per expert
    max_vio: dict[int, float] = field(default_factory=dict)  # MoE layer -> MaxVio

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "rows": self.rows,
            "max_vio": {str(k): v for k, v in self.max_vio.items()},
            "counts": {str(k): v for k, v in self.counts.items()},
        }


def _data_config(args: argparse.Namespace, src: PretrainedSource) -> DataConfig:
    tok = args.tokenizer or src.tokenizer
    if tok is None:
        raise PretrainedError(
            f"--tokenizer: {src.path} has no tokenizer.json beside it; name the tokenizer its "
            "weights were trained with"
        )
    return DataConfig(
        source=args.data,
        text_field=args.text_field,
        tokenizer=tok,
        seq_len=args.seq_len or min(128, src.args.model.max_seq_len),
        val_fraction=0.0 if args.split == "all" else args.val_fraction,
        max_documents=args.max_documents,
        cache_dir=args.cache_dir,
        format=args.format,
        document_masking=args.document_masking or args.format == "sft",
    )


def _check(args: argparse.Namespace, src: PretrainedSource, data: DataConfig, world: int) -> None:
    """Every check that needs no collective, identical on every rank."""
    if args.batch_size < 1 or args.batch_size % world:
        raise ConfigError(
            f"--batch-size: expected a positive multiple of the {world} ranks, got {args.batch_size}"
        )
    validate_data_config(
        data,
        model_max_seq_len=src.args.model.max_seq_len,
        world_size=world,
        micro_batch_size=max(1, args.batch_size // world),
        global_batch_size=args.batch_size,
    )
    validate_expert_parallel(src.args.moe.n_routed_experts, world, args.ep)
    if args.ep > 1 and src.args.model.n_dense_layers == src.args.model.n_layers:
        raise ConfigError(f"--ep={args.ep}: the model has no MoE layer to split")
    if data.tokenizer not in ("byte", "bpe"):
        n, vocab = load_hf_tokenizer(data.tokenizer).vocab_size, src.args.model.vocab_size
        if n > vocab:
            raise ConfigError(
                f"--tokenizer: {data.tokenizer} has {n} tokens, more than the model's "
                f"vocabulary (model.vocab_size={vocab})"
            )


def build_eval_model(src: PretrainedSource, ep: int) -> DeepSeekLM:
    """The source's model (without MTP modules or auxiliary heads), its routed experts split
    over ``ep`` ranks, each rank reading only its own; call on every rank after
    ``init_distributed``."""
    m = replace(src.args.model, mtp_depth=0, aux_heads=[])
    with torch.device("meta"):
        model = DeepSeekLM(ModelArgs(model=m, mla=src.args.mla, moe=src.args.moe))
    if ep > 1:
        from deepsuite.distributed.expert_parallel import apply_expert_parallel
        from deepsuite.distributed.groups import setup_expert_parallel

        groups = setup_expert_parallel(ep, src.args.moe.n_routed_experts)
        apply_expert_parallel(model, groups, check_replicated=False)
    model.allocate("cpu")
    with fail_together("reading the checkpoint"):  # each rank reads its own experts
        load_pretrained_weights(model, src)
    return model.eval()


@torch.no_grad()
def evaluate(
    model: DeepSeekLM,
    loader: PackedLoader,
    n_batches: int,
    document_masking: bool,
    device: str = "cpu",
) -> EvalResult:
    """Token-weighted loss and expert counts over ``n_batches`` micro-batches of this rank's
    ``loader`` (every rank the same number), reduced over the world."""
    layers = model.moe_layers()
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    counts = [torch.zeros(m.n_routed_experts, dtype=torch.float64) for m in layers]
    it = iter(loader)
    for _ in range(n_batches):
        batch = next(it)
        inputs = model_inputs(batch, device, document_masking)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        loss_sum += F.cross_entropy(
            logits.float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).double()
        tokens += (labels != IGNORE_INDEX).sum()
        for c, m in zip(counts, layers, strict=True):
            c += m.last_stats.counts_E.double().cpu()
    flat = torch.cat([loss_sum.view(1), tokens.view(1), *counts])
    if dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    n_tok = int(flat[1])
    loss = float(flat[0]) / max(n_tok, 1)
    out = EvalResult(loss, math.exp(min(loss, 700.0)), n_tok, 0)
    offset = 2
    n_dense = model.args.model.n_dense_layers
    for i, m in enumerate(layers):
        c = flat[offset : offset + m.n_routed_experts]
        offset += m.n_routed_experts
        out.counts[n_dense + i] = [int(x) for x in c]
        out.max_vio[n_dense + i] = max_vio(c.numpy())
    return out


def format_eval(res: EvalResult, path: str) -> str:
    lines = [
        f"eval {path}",
        f"loss        {res.loss:.4f} over {res.tokens} target tokens ({res.rows} rows)",
        f"perplexity  {res.perplexity:.3f}",
    ]
    for layer, v in res.max_vio.items():
        c = res.counts[layer]
        lines.append(
            f"layer {layer:<3}   MaxVio {v:.3f}   tokens per expert min {min(c)} max {max(c)}"
        )
    if res.max_vio:
        mean = sum(res.max_vio.values()) / len(res.max_vio)
        lines.append(f"MaxVio      {mean:.3f} (global, mean over MoE layers)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="deepsuite eval",
        description="Loss, perplexity and expert load of a model on a dataset (any ranks, any EP).",
    )
    p.add_argument("path", help="Hugging Face DeepSeek dir, deepsuite export, or run dir")
    p.add_argument("--data", required=True, help="'builtin', a local file/dir/glob, or a dataset")
    p.add_argument("--split", choices=("all", "train", "val"), default="all")
    p.add_argument("--val-fraction", type=float, default=0.02, help="with --split train/val")
    p.add_argument("--format", choices=("text", "sft"), default="text")
    p.add_argument("--text-field", default="text")
    p.add_argument("--tokenizer", default=None, help="default: the one saved beside PATH")
    p.add_argument("--seq-len", type=int, default=0, help="default: min(128, model max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step over all ranks")
    p.add_argument("--max-batches", type=int, default=0, help="0: the whole split")
    p.add_argument("--max-documents", type=int, default=0)
    p.add_argument("--document-masking", action="store_true", help="(always on for sft)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides the ranks)")
    p.add_argument("--cache-dir", default="", help="token cache (default under $DEEPSUITE_CACHE)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def run_eval(args: argparse.Namespace) -> EvalResult:
    env = detect_env()
    src = find_pretrained(args.path)
    data = _data_config(args, src)
    _check(args, src, data, env.world_size)  # before any collective
    init_distributed("auto")
    tok = None
    with fail_together("data preparation"):  # rank 0 tokenises and caches, then the others
        if env.rank == 0:
            tok = prepare_data(data)
    with fail_together("data preparation"):
        if env.rank != 0:
            tok = prepare_data(data)
    model = build_eval_model(src, args.ep)
    W = env.world_size
    split = "val" if args.split == "val" else "train"
    loader = PackedLoader(data, tok, split, args.batch_size // W, env.rank, W, shuffle=False)
    n = len(loader) if not args.max_batches else min(len(loader), args.max_batches)
    if n == 0:
        raise ConfigError(
            f"--batch-size={args.batch_size}: the split packs into {loader.rows_per_epoch} rows "
            f"of {data.seq_len} tokens, fewer than one batch"
        )
    res = evaluate(model, loader, n, data.document_masking)
    res.rows = n * args.batch_size
    return res


def eval_main(argv: list[str] | None = None) -> int:
    """Entry point of ``deepsuite eval``; bad input raises a DeepsuiteError (one line on every
    rank and exit status 2, from the boundary in ``deepsuite.cli``)."""
    args = parse_args(argv)
    rank = detect_env().rank
    res = run_eval(args)
    if rank == 0:
        print(format_eval(res, args.path), flush=True)
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(res.to_dict(), indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
