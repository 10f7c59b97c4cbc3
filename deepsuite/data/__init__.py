"""Data pipeline: documents (`datasets`) -> tokens -> packed fixed-length rows, sharded per rank.

Typical use by a trainer::

    validate_data_config(cfg.data, model_max_seq_len=..., world_size=W,
                         micro_batch_size=B, global_batch_size=G)
    tok = prepare_data(cfg.data, run_dir=run_dir)       # on one rank first, then barrier
    train = PackedLoader(cfg.data, tok, "train", B, dp_rank=r, dp_size=W, run_dir=run_dir)
    batch = next(train)                                  # input_ids/labels/position_ids/doc_ids [B, S]
"""

from deepsuite.data.corpus import (
    builtin_documents,
    builtin_source_files,
    check_source,
    load_documents,
)
from deepsuite.data.loader import PackedLoader, make_batch, position_ids_from_docs
from deepsuite.data.pipeline import (
    build_tokenizer,
    check_vocab_size,
    prepare_data,
    resolve_cache_dir,
    set_progress_bars,
    token_stream,
    tokenize_documents,
    tokenizer_vocab_size,
    validate_data_config,
)
from deepsuite.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_hf_tokenizer,
    train_bpe,
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedLoader",
    "Tokenizer",
    "build_tokenizer",
    "builtin_documents",
    "builtin_source_files",
    "check_source",
    "check_vocab_size",
    "load_documents",
    "load_hf_tokenizer",
    "make_batch",
    "position_ids_from_docs",
    "prepare_data",
    "resolve_cache_dir",
    "set_progress_bars",
    "token_stream",
    "tokenize_documents",
    "tokenizer_vocab_size",
    "train_bpe",
    "validate_data_config",
]
