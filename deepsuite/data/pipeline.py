"""Config checks, tokenizer building, and the cached token stream of a split.

The token stream of a split is every document, in order, each preceded by the separator:
``[EOS] doc0 [EOS] doc1 [EOS] doc2 ...``. A separator therefore opens each document (it plays
BOS), and the last token of a document is trained to predict it (it plays EOS). Tokenisation is
``datasets.Dataset.map(batched=True)``; the result is cached as ``.npy`` files under
``cache_dir/stream-<hash>/`` keyed by the corpus (source, files' sizes and mtimes, Python version
for the built-in corpus, max_documents, val_fraction) and the tokenizer fingerprint. ``seq_len``,
``seed`` and batch sizes are not in the key: packing happens at load time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deepsuite.atomic import atomic_path, atomic_write_text
from deepsuite.data.corpus import (
    BUILTIN_PARTS,
    check_source,
    corpus_key,
    count_documents,
    is_local_source,
    key_hash,
    load_documents,
    resolve_local_files,
)
from deepsuite.data.tokenizer import Tokenizer, load_hf_tokenizer, tokenizer_from_spec
from deepsuite.errors import ConfigError, DataError

STREAM_VERSION = 1


def resolve_cache_dir(cfg: Any, run_dir: str | Path | None = None) -> Path:
    """``cfg.cache_dir`` if set, else ``<run_dir>/data_cache``, else ``$DEEPSUITE_CACHE/data``."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if run_dir is not None:
        return Path(run_dir) / "data_cache"
    return Path(os.environ.get("DEEPSUITE_CACHE", ".cache")) / "data"


def validate_data_config(
    cfg: Any,
    *,
    model_max_seq_len: int,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    model_vocab_size: int = 0,
) -> None:
    """Check ``cfg`` (a DataConfig) against the model and the batch layout before training.

    Raises :class:`DataError` (or :class:`ConfigError` for ``model.vocab_size``) naming the
    offending field. It reads no more than the source's first record and the tokenizer file, and
    no collective: every rank runs it before the process group starts. A split too small for one
    batch can only be found once the corpus is read, when the loader is built.
    """

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise DataError(msg)

    for name in ("model_max_seq_len", "world_size", "micro_batch_size", "global_batch_size"):
        v = locals()[name]
        need(isinstance(v, int) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
    need(
        isinstance(cfg.source, str) and cfg.source != "",
        f"data.source must be a non-empty str, got {cfg.source!r}",
    )
    if cfg.source == "builtin":
        parts = list(cfg.builtin_parts)
        need(
            len(parts) > 0 and all(p in BUILTIN_PARTS for p in parts),
            f"data.builtin_parts must be a non-empty subset of {list(BUILTIN_PARTS)}, got {parts!r}",
        )
    elif is_local_source(cfg.source):
        files = resolve_local_files(cfg.source)  # raises on missing files / mixed types
        need(
            any(os.path.getsize(f) > 0 for f in files),
            f"data.source: every file at {cfg.source!r} is empty (empty corpus)",
        )
    need(
        isinstance(cfg.text_field, str) and cfg.text_field != "",
        f"data.text_field must be a non-empty str, got {cfg.text_field!r}",
    )
    need(cfg.format in ("text", "sft"), f"data.format must be 'text' or 'sft', got {cfg.format!r}")
    if cfg.format == "sft":
        need(
            cfg.source != "builtin",
            "data.source: data.format=sft needs json/jsonl records of prompt/completion or "
            "messages, not the built-in corpus",
        )
        need(
            not cfg.streaming,
            "data.streaming: expected false with data.format=sft (fine-tuning records are "
            "tokenised once and cached)",
        )
        need(
            bool(cfg.document_masking),
            "data.document_masking: expected true with data.format=sft (packed examples must "
            "not attend to each other)",
        )
    tok = cfg.tokenizer
    need(
        tok in ("byte", "bpe") or (isinstance(tok, str) and os.path.exists(tok)),
        f"data.tokenizer must be 'byte', 'bpe' or an existing local tokenizer path, got {tok!r}",
    )
    if tok == "bpe":
        v = cfg.bpe_vocab_size
        need(
            isinstance(v, int) and v >= 257, f"data.bpe_vocab_size must be an int >= 257, got {v!r}"
        )
    s = cfg.seq_len
    need(isinstance(s, int) and s >= 1, f"data.seq_len must be an int >= 1, got {s!r}")
    need(
        s <= model_max_seq_len,
        f"data.seq_len={s} is longer than the model allows (model max_seq_len={model_max_seq_len})",
    )
    f = cfg.val_fraction
    need(
        isinstance(f, (int, float)) and 0.0 <= f < 1.0,
        f"data.val_fraction must be in [0, 1), got {f!r}",
    )
    m = cfg.max_documents
    need(
        isinstance(m, int) and m >= 0,
        f"data.max_documents must be an int >= 0 (0 = all), got {m!r}",
    )
    n = cfg.num_proc
    need(isinstance(n, int) and n >= 1, f"data.num_proc must be an int >= 1, got {n!r}")
    need(isinstance(cfg.seed, int), f"data.seed must be an int, got {cfg.seed!r}")
    need(
        global_batch_size % world_size == 0,
        f"global_batch_size={global_batch_size} is not divisible by the data-parallel world size {world_size}",
    )
    need(
        global_batch_size % (micro_batch_size * world_size) == 0,
        f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size x world_size "
        f"= {micro_batch_size} x {world_size}",
    )
    check_vocab_size(cfg, model_vocab_size)
    check_source(cfg)


def tokenizer_vocab_size(cfg: Any) -> tuple[int, str]:
    """The number of ids ``cfg.tokenizer`` can give, known before any data is read, and what
    it is: 257 for 'byte', ``data.bpe_vocab_size`` for 'bpe' (its most), the size of a
    tokenizer file (loaded here, which also checks it)."""
    spec = cfg.tokenizer
    if spec == "byte":
        return 257, "the byte tokenizer's 257 ids"
    if spec == "bpe":
        return cfg.bpe_vocab_size, f"data.bpe_vocab_size={cfg.bpe_vocab_size}"
    n = load_hf_tokenizer(spec).vocab_size
    return n, f"the vocabulary of data.tokenizer={spec!r} ({n})"


def check_vocab_size(cfg: Any, model_vocab_size: int) -> None:
    """``model.vocab_size`` (0: the tokenizer's) holds every id the tokenizer can give."""
    need, what = tokenizer_vocab_size(cfg)
    if model_vocab_size and model_vocab_size < need:
        raise ConfigError(
            f"model.vocab_size: expected at least {need} ({what}), or 0 to take the "
            f"tokenizer's size, got {model_vocab_size}"
        )


def set_progress_bars(enabled: bool) -> None:
    """Show or hide the `datasets` progress bars (Map, Filter, Generating split) of this process;
    the trainer shows them on rank 0 only, and only when console logging is on."""
    import datasets

    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()


def _hf_cache(cache_dir: Path) -> str:
    return str(cache_dir / "hf_datasets")


def train_texts(cfg: Any, cache_dir: Path) -> Iterator[str]:
    """The training split's texts, one document at a time (streams when ``cfg.streaming``)."""
    ds = load_documents(cfg, "train", streaming=bool(cfg.streaming), hf_cache=_hf_cache(cache_dir))
    for ex in ds:
        yield ex["text"]


def build_tokenizer(
    cfg: Any, *, cache_dir: str | Path | None = None, run_dir: str | Path | None = None
) -> Tokenizer:
    """The tokenizer ``cfg.tokenizer`` names. 'bpe' is trained on the training split once and cached
    under ``cache_dir/bpe-<hash>/tokenizer.json`` (the hash covers the corpus and the vocab size)."""
    cdir = Path(cache_dir) if cache_dir is not None else resolve_cache_dir(cfg, run_dir)
    bpe_file = (
        cdir
        / f"bpe-{key_hash({'corpus': corpus_key(cfg), 'vocab': cfg.bpe_vocab_size})}"
        / "tokenizer.json"
    )
    texts = train_texts(cfg, cdir) if cfg.tokenizer == "bpe" else None
    return tokenizer_from_spec(
        cfg.tokenizer, bpe_vocab_size=cfg.bpe_vocab_size, bpe_texts=texts, bpe_file=bpe_file
    )


def tokenize_documents(ds: Any, tok: Tokenizer, num_proc: int = 1) -> Any:
    """``ds`` (text column) -> ``ids`` column, each document as ``[eos] + encode(text)``."""
    eos = tok.eos_id

    def fn(batch: dict[str, list]) -> dict[str, list]:
        return {"ids": [[eos, *ids] for ids in tok.encode_batch(batch["text"])]}

    kw: dict[str, Any] = {"batched": True, "remove_columns": ["text"]}
    if num_proc > 1 and hasattr(ds, "__len__"):
        kw["num_proc"] = num_proc
    return ds.map(fn, **kw)


def stream_key(cfg: Any, tok: Tokenizer) -> str:
    """Hash of everything that determines a split's token stream."""
    return key_hash({"v": STREAM_VERSION, "corpus": corpus_key(cfg), "tok": tok.fingerprint})


def _stream_dir(cfg: Any, tok: Tokenizer, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"stream-{stream_key(cfg, tok)}"


def _split_ids(cfg: Any, tok: Tokenizer, split: str, cdir: Path) -> Any:
    """The split's documents as an ``ids`` column (and ``mask`` for fine-tuning records)."""
    if cfg.format == "sft":
        from deepsuite.data.sft import load_records, tokenize_records

        return tokenize_records(load_records(cfg, split, hf_cache=_hf_cache(cdir)), tok, cfg)
    docs = load_documents(cfg, split, streaming=False, hf_cache=_hf_cache(cdir))
    return tokenize_documents(docs, tok, int(cfg.num_proc)) if len(docs) else docs


def token_stream(
    cfg: Any, tok: Tokenizer, split: str, cache_dir: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """The split's token stream ``tokens_N`` (int32) and document start offsets ``starts_M`` (int64).

    Built with ``datasets`` on first use, then memory-mapped from the cache (atomic writes, so
    ranks building concurrently are safe). With ``data.format: sft`` a third file holds each
    token's target flag (:func:`target_mask`). Raises :class:`DataError` when the split has
    no documents.
    """
    cdir = Path(cache_dir)
    d = _stream_dir(cfg, tok, cdir)
    tok_file, start_file = d / f"{split}.tokens.npy", d / f"{split}.starts.npy"
    mask_file = d / f"{split}.mask.npy"
    sft = cfg.format == "sft"
    if not (tok_file.is_file() and start_file.is_file() and (mask_file.is_file() or not sft)):
        ids = _split_ids(cfg, tok, split, cdir)
        if len(ids) == 0:
            if sft:  # records, not text documents: count_documents reads data.text_field
                raise DataError(
                    f"data.val_fraction={cfg.val_fraction}: the {split!r} split of "
                    f"{cfg.source!r} has no records; raise data.val_fraction or set it to 0"
                )
            raise DataError(empty_split_message(cfg, split, count_documents(cfg, _hf_cache(cdir))))
        chunks, masks, lengths = [], [], []
        import pyarrow.compute as pc

        for table in ids.with_format("arrow").iter(batch_size=4096):
            col = table.column("ids").combine_chunks()
            chunks.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.int32))
            lengths.append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
            if sft:
                m = table.column("mask").combine_chunks().flatten()
                masks.append(m.to_numpy(zero_copy_only=False).astype(np.uint8))
        lens = np.concatenate(lengths).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        d.mkdir(parents=True, exist_ok=True)
        files = [(tok_file, np.concatenate(chunks)), (start_file, starts)]
        if sft:
            files.append((mask_file, np.concatenate(masks)))
        for file, arr in files:
            with atomic_path(file) as tmp:
                np.save(tmp, arr)
        meta = {"key": corpus_key(cfg), "tokenizer": tok.fingerprint, "docs": len(starts)}
        atomic_write_text(d / f"{split}.meta.json", json.dumps(meta, indent=1))
    return np.load(tok_file, mmap_mode="r"), np.load(start_file)


def target_mask(cfg: Any, tok: Tokenizer, split: str, cache_dir: str | Path) -> np.ndarray | None:
    """Per stream token, 1 when it is a training target (``data.format: sft``), else None (every
    token is). Call after :func:`token_stream` built the split."""
    if cfg.format != "sft":
        return None
    return np.load(_stream_dir(cfg, tok, cache_dir) / f"{split}.mask.npy", mmap_mode="r")


def empty_split_message(cfg: Any, split: str, n_docs: int) -> str:
    """Why a split has no documents, and what would give it some."""
    f = float(cfg.val_fraction)
    n_val = math.floor(n_docs * f)
    msg = (
        f"data.val_fraction: the {split!r} split of {cfg.source!r} has no documents: the corpus "
        f"has {n_docs} document{'s' if n_docs != 1 else ''} and data.val_fraction={f} puts "
        f"floor({n_docs} x {f}) = {n_val} of them in 'val'. "
    )
    fixes = []
    if n_docs >= 2:
        fixes.append(f"raise data.val_fraction to at least {1 / n_docs:.3g}")
    if cfg.max_documents:
        fixes.append("raise data.max_documents")
    if getattr(cfg, "document_separator", "") == "file" and cfg.source != "builtin":
        fixes.append("split .txt files into documents (data.document_separator=blank_line or line)")
    elif n_docs < 2:
        fixes.append(
            "give the corpus more documents (for .txt files: separate them by blank lines)"
        )
    fixes.append("set data.val_fraction=0 to train without a validation split")
    return msg + "To fix: " + "; ".join(fixes) + "."


def prepare_data(
    cfg: Any, *, cache_dir: str | Path | None = None, run_dir: str | Path | None = None
) -> Tokenizer:
    """Build the tokenizer and (non-streaming) both splits' caches; call on one rank, then barrier."""
    cdir = Path(cache_dir) if cache_dir is not None else resolve_cache_dir(cfg, run_dir)
    tok = build_tokenizer(cfg, cache_dir=cdir)
    if not cfg.streaming:
        token_stream(cfg, tok, "train", cdir)
        if cfg.val_fraction > 0:
            token_stream(cfg, tok, "val", cdir)
    return tok
