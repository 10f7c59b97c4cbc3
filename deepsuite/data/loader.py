"""Packed, rank-sharded, resumable micro-batches over a split's token stream.

Legend: B micro-batch rows per rank, W data-parallel ranks, S ``seq_len``, N stream tokens.

Packing: row k of an epoch is ``stream[k*S : k*S + S + 1]``; inputs are its first S tokens and
labels its last S, so rows overlap by one token, every token after the first is a label exactly
once, and concatenating the inputs of rows 0, 1, 2, ... gives back the stream. An epoch has
``(N - 1) // S`` rows; the last partial row is dropped.

Global order: the training stream is the infinite sequence of rows of epoch 0, then epoch 1, ...
(non-streaming training shuffles rows within each epoch with ``numpy.random.default_rng([seed,
epoch])``; streaming and validation keep stream order). Global micro-batch i is rows
``[i*B*W, (i+1)*B*W)`` of it and rank r gets rows ``[i*B*W + r*B, i*B*W + (r+1)*B)``, so W ranks
with micro-batch B see exactly what one process with micro-batch B*W sees. A global batch may span
an epoch boundary. The resume state is the number of global rows consumed, identical on every rank.

Fine-tuning records (``data.format: sft``) pack the same way; a label whose token is not a
target (a prompt token) is IGNORE_INDEX, so only completion tokens carry loss and gradient.

Streaming reads the whole stream on every rank and keeps its own rows: this costs W-fold
tokenisation but preserves the global order exactly (what ``split_dataset_by_node`` cannot).
Validation iterates a fixed pass over its rows, dropping the final incomplete global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepsuite.data.corpus import load_documents
from deepsuite.data.pipeline import (
    _hf_cache,
    resolve_cache_dir,
    stream_key,
    target_mask,
    token_stream,
    tokenize_documents,
)
from deepsuite.data.sft import IGNORE_INDEX
from deepsuite.data.tokenizer import Tokenizer
from deepsuite.errors import DataError
from deepsuite.layers.attention.doc_mask import (
    document_block_mask,
    document_mask,
    flex_supported,
)

STATE_VERSION = 1


def position_ids_from_docs(doc_BS: np.ndarray) -> np.ndarray:
    """Position of each token within its document, restarting at 0 at each row start.

    ``doc_BS`` holds per-token document ids; returns int64 of the same shape.
    """
    b, s = doc_BS.shape
    idx = np.broadcast_to(np.arange(s), (b, s))
    new = np.ones((b, s), dtype=bool)
    new[:, 1:] = doc_BS[:, 1:] != doc_BS[:, :-1]
    run_start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    return (idx - run_start).astype(np.int64)


def make_batch(
    tok_BS1: np.ndarray, doc_BS1: np.ndarray, target_BS1: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """Rows of S+1 tokens (and their doc ids, and optionally their target flags) -> input_ids,
    labels, position_ids, doc_ids [B, S]; a label whose token is not a target is IGNORE_INDEX."""
    doc_BS = np.ascontiguousarray(doc_BS1[:, :-1], dtype=np.int64)
    labels_BS = np.ascontiguousarray(tok_BS1[:, 1:], dtype=np.int64)
    if target_BS1 is not None:
        labels_BS = np.where(target_BS1[:, 1:] != 0, labels_BS, IGNORE_INDEX)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(tok_BS1[:, :-1], dtype=np.int64)),
        "labels": torch.from_numpy(labels_BS),
        "position_ids": torch.from_numpy(position_ids_from_docs(doc_BS)),
        "doc_ids": torch.from_numpy(doc_BS),
    }


def model_inputs(
    batch: dict[str, torch.Tensor],
    device: torch.device | str,
    document_masking: bool,
    *,
    flex: bool | None = None,
) -> dict[str, Any]:
    """A loader batch -> the model's keyword arguments on ``device``.

    With ``document_masking`` each token attends only to earlier tokens of its own document and
    its rotary position counts from the start of that document; without it the row is one
    causal sequence. The mask is a FlexAttention block mask where flex attention trains
    (``flex=None``: on CUDA), else the dense boolean (B, 1, S, S) mask it is tested against
    (``deepsuite.layers.attention.doc_mask``); ``flex`` forces either.
    """
    out: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "labels": batch["labels"].to(device),
    }
    if document_masking:
        doc_BS = batch["doc_ids"].to(device)
        use_flex = flex_supported(device) if flex is None else flex
        out["attention_mask"] = document_block_mask(doc_BS) if use_flex else document_mask(doc_BS)
        out["position_ids"] = batch["position_ids"].to(device)
    return out


class PackedLoader:
    """Iterable of micro-batches for ONE data-parallel rank (see the module docstring for the order).

    Each batch is a dict of int64 tensors of shape [B, S]: ``input_ids``, ``labels`` (next tokens),
    ``position_ids`` (within-document positions, reset at each separator and row start) and
    ``doc_ids`` (index of the document within the split). Training iterates forever and
    ``iter(loader)`` continues from the current position; validation yields one fixed pass per
    ``iter``. ``shuffle`` defaults to True for non-streaming training and must be False otherwise.
    Raises ``ValueError`` at construction for bad arguments, an empty split, or a validation split
    smaller than one global batch.
    """

    def __init__(
        self,
        cfg: Any,
        tokenizer: Tokenizer,
        split: str,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        *,
        shuffle: bool | None = None,
        cache_dir: str | Path | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for name, v in (
            ("micro_batch_size", micro_batch_size),
            ("dp_size", dp_size),
            ("data.seq_len", cfg.seq_len),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be an int in [0, dp_size={dp_size}), got {dp_rank!r}")
        if split == "val" and not cfg.val_fraction > 0:
            raise DataError("data.val_fraction is 0: there is no validation split")
        self.streaming = bool(cfg.streaming)
        self.shuffle = (
            (split == "train" and not self.streaming) if shuffle is None else bool(shuffle)
        )
        if self.shuffle and (self.streaming or split == "val"):
            raise DataError(
                "shuffle=True needs non-streaming training data (data.streaming=False, split='train')"
            )
        self.cfg, self.tok, self.split = cfg, tokenizer, split
        self.seq_len, self.B, self.rank, self.W = cfg.seq_len, micro_batch_size, dp_rank, dp_size
        self.seed = int(cfg.seed)
        self.cache_dir = (
            Path(cache_dir) if cache_dir is not None else resolve_cache_dir(cfg, run_dir)
        )
        self.key = stream_key(cfg, tokenizer)
        self._rows = 0  # global rows consumed: the whole resume state
        self._perm: tuple[int, np.ndarray] | None = None
        self._gen: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        if self.streaming:
            hf = _hf_cache(self.cache_dir)
            docs = load_documents(cfg, split, streaming=True, hf_cache=hf)
            self._ids_ds = tokenize_documents(docs, tokenizer)
            self.rows_per_epoch: int | None = None
            if next(self._epoch_rows(), None) is None:
                raise DataError(self._too_short_msg())
            if split == "val":
                self.rows_per_epoch = sum(1 for _ in self._epoch_rows())
        else:
            self._tokens, self._starts = token_stream(cfg, tokenizer, split, self.cache_dir)
            self._targets = target_mask(cfg, tokenizer, split, self.cache_dir)
            self.rows_per_epoch = max(0, (len(self._tokens) - 1) // self.seq_len)
            if self.rows_per_epoch == 0:
                raise DataError(self._too_short_msg())
        if split == "val" and self.rows_per_epoch < self.B * self.W:
            raise DataError(
                f"data: the val split packs into {self.rows_per_epoch} sequences of data.seq_len="
                f"{self.seq_len}, fewer than one global batch ({self.B} x {self.W}); raise "
                "data.val_fraction, lower train.micro_batch_size, or set data.val_fraction=0 to "
                "train without a validation split"
            )

    def _too_short_msg(self) -> str:
        return (
            f"data: the {self.split!r} split of {self.cfg.source!r} has fewer than data.seq_len+1="
            f"{self.seq_len + 1} tokens (empty or too small corpus)"
        )

    # ---- rows -----------------------------------------------------------------------------
    def _epoch_rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Streaming: one epoch's rows (tokens_S1, docs_S1) in stream order, packed on the fly."""
        s1 = self.seq_len + 1
        buf_t = np.empty(0, dtype=np.int64)
        buf_d = np.empty(0, dtype=np.int64)
        for doc, ex in enumerate(self._ids_ds):
            ids = np.asarray(ex["ids"], dtype=np.int64)
            buf_t = np.concatenate([buf_t, ids])
            buf_d = np.concatenate([buf_d, np.full(len(ids), doc, dtype=np.int64)])
            n_rows = (len(buf_t) - 1) // self.seq_len
            for k in range(n_rows):
                yield (
                    buf_t[k * self.seq_len : k * self.seq_len + s1],
                    buf_d[k * self.seq_len : k * self.seq_len + s1],
                )
            buf_t, buf_d = buf_t[n_rows * self.seq_len :], buf_d[n_rows * self.seq_len :]

    def _stream_from(self, start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Streaming: the infinite global row sequence from global row ``start``."""
        g = 0
        while True:
            if self.rows_per_epoch and start - g >= self.rows_per_epoch:
                g += (start - g) // self.rows_per_epoch * self.rows_per_epoch
            count = 0
            for row in self._epoch_rows():
                if g >= start:
                    yield row
                g += 1
                count += 1
            self.rows_per_epoch = count

    def _row(self, g: int) -> tuple[np.ndarray, ...]:
        """Non-streaming: global row ``g`` as (tokens_S1, docs_S1[, targets_S1])."""
        assert self.rows_per_epoch is not None
        epoch, k = divmod(g, self.rows_per_epoch)
        if self.shuffle:
            if self._perm is None or self._perm[0] != epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm = (epoch, rng.permutation(self.rows_per_epoch))
            k = int(self._perm[1][k])
        a = k * self.seq_len
        toks = np.asarray(self._tokens[a : a + self.seq_len + 1])
        docs = np.searchsorted(self._starts, np.arange(a, a + self.seq_len + 1), side="right") - 1
        if self._targets is None:
            return toks, docs
        return toks, docs, np.asarray(self._targets[a : a + self.seq_len + 1])

    def _global_batch_rows(
        self, g0: int, gen: Iterator | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's B rows of the global batch starting at global row ``g0``."""
        lo = self.rank * self.B
        if gen is None:
            return [self._row(g0 + lo + j) for j in range(self.B)]
        rows = [next(gen) for _ in range(self.B * self.W)]
        return rows[lo : lo + self.B]

    @staticmethod
    def _stack(rows: list[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
        targets = np.stack([r[2] for r in rows]) if len(rows[0]) > 2 else None
        return make_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), targets)

    # ---- iteration ------------------------------------------------------------------------
    def __len__(self) -> int:
        """Micro-batches per validation pass (training: per epoch, rounded down)."""
        return (self.rows_per_epoch or 0) // (self.B * self.W)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.split == "train":
            return self
        return self._val_pass()

    def _val_pass(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = self._stream_from(0) if self.streaming else None
        for i in range(len(self)):
            yield self._stack(self._global_batch_rows(i * self.B * self.W, gen))

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.split != "train":
            raise TypeError("the val loader is not an iterator; use `for batch in loader`")
        if self.streaming and self._gen is None:
            self._gen = self._stream_from(self._rows)
        batch = self._stack(self._global_batch_rows(self._rows, self._gen))
        self._rows += self.B * self.W
        return batch

    # ---- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Exact resume position: plain ints/strs (JSON and ``torch.load(weights_only=True)`` safe)."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "rows_consumed": self._rows,
            "stream_key": self.key,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "streaming": self.streaming,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the next batch is the one the saving loader would have yielded
        next (also under another B x W split of the same global batch when rows align)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"state: unsupported version {state.get('version')!r}")
        what = {
            "split": "the split",
            "stream_key": "the corpus or tokenizer (data.source, its files, data.text_field, "
            "data.max_documents, data.val_fraction, data.tokenizer)",
            "seq_len": "data.seq_len",
            "seed": "data.seed",
            "shuffle": "data.streaming",
        }
        for k, name in what.items():
            if state[k] != self.state_dict()[k]:
                raise DataError(
                    f"train.resume: the checkpoint's data position was saved with another {name} "
                    f"({k}: {state[k]!r}, this run: {self.state_dict()[k]!r}); resume with the "
                    "data settings it was saved with, or start afresh (train.resume=never or "
                    "a new train.run_dir)"
                )
        rows = state["rows_consumed"]
        if not isinstance(rows, int) or rows < 0:
            raise DataError(f"state['rows_consumed'] must be an int >= 0, got {rows!r}")
        self._rows = rows
        self._gen = None
