"""``deepsuite convert``: Hugging Face DeepSeek-V2/V3 checkpoints <-> deepsuite exports.

    deepsuite convert to-deepsuite HF_DIR OUT_DIR      -> OUT_DIR/config.yaml + model.safetensors
    deepsuite convert to-hf RUN_OR_EXPORT OUT_DIR      -> config.json + sharded safetensors + index

The deepsuite side is the layout ``train.export_final`` writes: a consolidated
``model.safetensors`` (stacked experts) next to, or one level below, the run's ``config.yaml``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from deepsuite.errors import CheckpointError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for u, mult in units.items():
        if text.upper().endswith(u):
            return int(float(text[: -len(u)]) * mult)
    return int(text)


def _find_export(src: Path) -> tuple[Path, Path]:
    """(model.safetensors, config.yaml) for a run directory, its final/ folder or the file."""
    weights = (
        src
        if src.is_file()
        else next(
            (
                p
                for p in (src / "model.safetensors", src / "final" / "model.safetensors")
                if p.is_file()
            ),
            None,
        )
    )
    if weights is None:
        raise CheckpointError(f"src: expected model.safetensors in {src} or {src}/final")
    for cand in (weights.parent / "config.yaml", weights.parent.parent / "config.yaml"):
        if cand.is_file():
            return weights, cand
    raise CheckpointError(f"src: expected config.yaml beside {weights} or one level up")


def to_deepsuite(src: Path, out: Path, dtype: torch.dtype, mtp: bool) -> Path:
    from safetensors.torch import save_file

    from deepsuite.models.hf.io import load_hf_model

    cfg, model = load_hf_model(src, mtp=mtp, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.model.tie_embeddings:
        state.pop("head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def to_hf(src: Path, out: Path, dtype: torch.dtype | None, max_shard: int) -> Path:
    from deepsuite.config import load_config
    from deepsuite.models.hf.io import lazy_safetensors, save_hf_state

    weights, cfg_path = _find_export(src)
    cfg = load_config(cfg_path)
    state = lazy_safetensors(weights)
    if cfg.model.tie_embeddings and "head.weight" not in state:
        state = {**{k: state[k] for k in state}, "head.weight": state["embed.weight"]}
    return save_hf_state(state, cfg, out, dtype=dtype, max_shard_bytes=max_shard)


def hf_main(argv: list[str] | None = None) -> int:
    """Entry point of ``deepsuite convert`` (returns the exit status)."""
    parser = argparse.ArgumentParser(
        prog="deepsuite convert",
        description="Convert DeepSeek-V2/V3 checkpoints between Hugging Face and deepsuite.",
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("to-deepsuite", help="HF checkpoint dir -> config.yaml + model.safetensors")
    a.add_argument("src", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    a.add_argument("--no-mtp", action="store_true", help="drop the checkpoint's MTP layers")
    b = sub.add_parser("to-hf", help="deepsuite run dir / export -> HF checkpoint dir")
    b.add_argument("src", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: as stored")
    b.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, or bytes")
    args = parser.parse_args(argv)
    if args.direction == "to-deepsuite":
        out = to_deepsuite(args.src, args.out, _DTYPES[args.dtype], not args.no_mtp)
    else:
        dtype = _DTYPES[args.dtype] if args.dtype else None
        out = to_hf(args.src, args.out, dtype, _size(args.max_shard_size))
        for name in _TOKENIZER_FILES:  # keep a tokenizer that sits beside the export
            f = _find_export(args.src)[1].parent / name
            if f.is_file():
                shutil.copy2(f, out / name)
    if args.direction == "to-deepsuite":
        for name in _TOKENIZER_FILES:
            if (args.src / name).is_file():
                shutil.copy2(args.src / name, out / name)
    print(f"wrote {out}")
    return 0
