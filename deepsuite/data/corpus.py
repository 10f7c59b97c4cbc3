"""Where documents come from: the built-in corpus, local files, or a hub dataset, via `datasets`.

The built-in corpus needs no download and is real text not written for this project: it is found
on the running interpreter. Part "docs" is the standard library's documentation text
(``pydoc_data.topics.topics``, one document per topic, ~465 KB of English); part "source" is the
standard library's own ``.py`` files (one document per file, sorted by path, excluding
``site-packages`` and the ``test``/``tests``/``idlelib`` packages; ~11 MB on CPython 3.11).
Its content therefore depends on the Python version, which is part of the cache key.

Local files: ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` give one document per record (its
``data.text_field``); a ``.txt`` file splits into documents at blank lines by default
(``data.document_separator``: "blank_line", "line" or "file"). A directory or glob is every file
of one of these kinds under it, in sorted order. Any other ``data.source`` is a hub dataset name.

Every loader returns a `datasets` (Iterable)Dataset with one column, ``text``, empty documents
dropped and ``max_documents`` applied, in a fixed order. The validation split is every document
whose index i satisfies floor((i+1) f) > floor(i f) for ``f = val_fraction``: exactly
floor(n f) documents, evenly spread, disjoint from training, and the same rule in streaming mode.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepsuite.errors import DataError

BUILTIN_PARTS = ("docs", "source")
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
)
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
# data.document_separator -> the `text` builder's sample_by ("paragraph" splits at "\n\n")
_TXT_SAMPLE_BY = {"blank_line": "paragraph", "line": "line", "file": "document"}


def builtin_source_files() -> list[Path]:
    """The standard library's ``.py`` files on this interpreter, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f for f in root.rglob("*.py") if not (_SKIP_DIRS & set(f.relative_to(root).parts[:-1]))
    ]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def builtin_documents(parts: list[str] | tuple[str, ...]) -> Iterator[dict[str, str]]:
    """Yield ``{"text": ...}`` for the built-in corpus parts, in a fixed order ("docs" first)."""
    bad = [p for p in parts if p not in BUILTIN_PARTS]
    if bad or not parts:
        raise DataError(
            f"data.builtin_parts must be a non-empty subset of {list(BUILTIN_PARTS)}, got {parts!r}"
        )
    if "docs" in parts:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield {"text": topics[key]}
    if "source" in parts:
        for f in builtin_source_files():
            yield {"text": f.read_bytes().decode("utf-8", errors="replace")}


def is_local_source(source: str) -> bool:
    """True when ``data.source`` names local files (an existing path, a glob, or a known suffix)."""
    return (
        os.path.exists(source)
        or any(c in source for c in "*?[")
        or Path(source).suffix.lower() in _BUILDERS
        or source.startswith(("/", "./", "../", "~"))
    )


def resolve_local_files(source: str) -> list[str]:
    """Expand a local file / directory / glob into a sorted list of data files of one known type.

    Raises ``ValueError`` naming ``data.source`` when nothing matches or types are mixed.
    """
    src = os.path.expanduser(source)
    if os.path.isdir(src):
        files = [
            str(p) for p in Path(src).rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS
        ]
    else:
        files = [f for f in glob.glob(src, recursive=True) if os.path.isfile(f)]
    files = sorted(files)
    if not files:
        raise DataError(
            f"data.source: no data files found at {source!r} (expected {sorted(_BUILDERS)})"
        )
    kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(
            f"data.source: files at {source!r} must all be one of {sorted(_BUILDERS)}, got suffixes "
            f"{sorted({Path(f).suffix for f in files})}"
        )
    return files


def corpus_key(cfg: Any) -> dict[str, Any]:
    """What determines the document sequence (before tokenisation); hashed into cache keys."""
    key: dict[str, Any] = {
        "source": cfg.source,
        "text_field": cfg.text_field,
        "max_documents": int(cfg.max_documents),
        "val_fraction": float(cfg.val_fraction),
    }
    if cfg.format != "text":  # fine-tuning records: which fields make prompt and completion
        key["format"] = [cfg.format, cfg.prompt_field, cfg.completion_field, cfg.messages_field]
    if cfg.source == "builtin":
        key["builtin_parts"] = list(cfg.builtin_parts)
        key["python"] = [sys.version, sysconfig.get_paths()["stdlib"]]
    elif is_local_source(cfg.source):
        files = resolve_local_files(cfg.source)
        key["files"] = [
            [os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)] for f in files
        ]
        if _builder(files) == "text":
            key["document_separator"] = cfg.document_separator
    return key


def key_hash(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def is_val_index(i: int, val_fraction: float) -> bool:
    """Document ``i`` belongs to the validation split (exactly floor(n f) of the first n do)."""
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)


def _builder(files: list[str]) -> str:
    return _BUILDERS[Path(files[0]).suffix.lower()]


def _local_dataset(cfg: Any, files: list[str], streaming: bool, hf_cache: str) -> Any:
    import datasets

    builder = _builder(files)
    extra = {"sample_by": _TXT_SAMPLE_BY[cfg.document_separator]} if builder == "text" else {}
    return datasets.load_dataset(
        builder, data_files=files, split="train", streaming=streaming, cache_dir=hf_cache, **extra
    )


def raw_dataset(cfg: Any, streaming: bool, hf_cache: str) -> Any:
    import datasets

    if cfg.source == "builtin":
        parts = tuple(cfg.builtin_parts)
        if streaming:
            return datasets.IterableDataset.from_generator(
                builtin_documents, gen_kwargs={"parts": parts}
            )
        return datasets.Dataset.from_list(list(builtin_documents(parts)))
    if is_local_source(cfg.source):
        return _local_dataset(cfg, resolve_local_files(cfg.source), streaming, hf_cache)
    try:
        return datasets.load_dataset(
            cfg.source, split="train", streaming=streaming, cache_dir=hf_cache
        )
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise DataError(
            f"data.source: {cfg.source!r} is not a local file/dir/glob and could not be loaded as a "
            f"hub dataset ({type(e).__name__}: {e})"
        ) from e


def _documents(cfg: Any, streaming: bool, hf_cache: str) -> Any:
    """Every non-empty document of the corpus (both splits), ``max_documents`` applied."""
    try:
        ds = raw_dataset(cfg, streaming, hf_cache)
    except DataError:
        raise
    except Exception as e:  # datasets' parse errors name no config key
        raise DataError(f"data.source: cannot read {cfg.source!r} ({_first_line(e)})") from e
    field = "text" if cfg.source == "builtin" else cfg.text_field
    names = ds.column_names
    if names is not None and field not in names:
        raise DataError(f"data.text_field: column {field!r} not in the corpus columns {names}")
    if names is not None:
        ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    ds = ds.filter(lambda b: [isinstance(t, str) and len(t) > 0 for t in b["text"]], batched=True)
    if cfg.max_documents:
        ds = (
            ds.take(cfg.max_documents)
            if streaming
            else ds.select(range(min(cfg.max_documents, len(ds))))
        )
    if not streaming and len(ds) == 0:
        raise DataError(
            f"data.source: corpus {cfg.source!r} has no non-empty documents in field {field!r}"
        )
    return ds


def load_documents(cfg: Any, split: str, *, streaming: bool, hf_cache: str) -> Any:
    """Documents of one split as a `datasets` (Iterable)Dataset with a single ``text`` column.

    ``split`` is "train" or "val". Non-streaming raises :class:`DataError` on an empty corpus or
    a missing ``text_field`` right here; streaming checks lazily (the loader probes it at build).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ds = _documents(cfg, streaming, hf_cache)
    want_val = split == "val"
    f = float(cfg.val_fraction)
    return ds.filter(
        lambda b, idx: [is_val_index(i, f) == want_val for i in idx],
        batched=True,
        with_indices=True,
    )


def count_documents(cfg: Any, hf_cache: str) -> int:
    """How many documents the corpus holds (both splits); for messages about split sizes."""
    return len(_documents(cfg, False, hf_cache))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_source(cfg: Any) -> None:
    """Read the first record of ``data.source`` and check ``data.text_field`` holds text in it.

    Cheap (one streamed record, nothing written to any cache) and free of collectives, so a
    wrong path, an unreadable file, an unknown hub name or a wrong field fails on every rank
    before the process group starts. Raises :class:`DataError` naming the key and the file.
    """
    if cfg.source == "builtin":
        return
    if is_local_source(cfg.source):
        files = [f for f in resolve_local_files(cfg.source) if os.path.getsize(f) > 0]
        if not files:
            raise DataError(f"data.source: every file at {cfg.source!r} is empty (empty corpus)")
        where = files[0]
    else:
        where = cfg.source
    import datasets

    log = datasets.utils.logging.get_logger("datasets")
    level = log.level
    log.setLevel("CRITICAL")  # its own log of the same parse error would repeat our message
    try:
        if is_local_source(cfg.source):
            ds = _local_dataset(cfg, [where], streaming=True, hf_cache=None)
        else:
            ds = datasets.load_dataset(cfg.source, split="train", streaming=True)
        first = next(iter(ds), None)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ArrowInvalid, ...)
        kind = "file" if is_local_source(cfg.source) else "hub dataset"
        raise DataError(
            f"data.source: cannot read the {kind} {where!r} ({_first_line(e)}); expected a local "
            f"file, directory or glob of {sorted(_BUILDERS)} files, or a hub dataset name"
        ) from e
    finally:
        log.setLevel(level)
    if first is None:
        raise DataError(f"data.source: {where!r} holds no records")
    if cfg.format == "sft":  # fine-tuning records: a prompt/completion pair or a chat
        pair, chat = {cfg.prompt_field, cfg.completion_field}, cfg.messages_field
        if chat not in first and not pair <= set(first):
            raise DataError(
                f"data.format=sft: the records in {where!r} have the fields {sorted(first)}; "
                f"expected {cfg.prompt_field!r} and {cfg.completion_field!r} (data.prompt_field "
                f"/ data.completion_field) or {chat!r} (data.messages_field)"
            )
        return
    field = cfg.text_field
    if field not in first:
        hint = (
            "a .txt source has the one field 'text'"
            if "text" in first and len(first) == 1
            else f"its fields are {sorted(first)}"
        )
        raise DataError(
            f"data.text_field: {field!r} is not a field of the records in {where!r} ({hint}); "
            "set data.text_field to the field holding the text"
        )
    if not isinstance(first[field], str):
        raise DataError(
            f"data.text_field: {field!r} in {where!r} holds {type(first[field]).__name__} "
            f"values ({first[field]!r:.60}), expected text"
        )
