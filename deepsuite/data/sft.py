"""Fine-tuning records (``data.format: sft``): prompt/completion pairs or chat messages, with
the loss on the completion (assistant) tokens only.

A record is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(field names from ``data.prompt_field`` / ``completion_field`` / ``messages_field``). Each becomes
one document of the token stream, ``[EOS] prompt completion``, with a per-token target flag:

* the opening separator: 1 (it is what the previous document's last token must predict: the
  model learns to stop after a completion);
* prompt tokens: 0 (their labels are IGNORE_INDEX, so they carry no gradient);
* completion tokens: 1.

Chat messages go through the tokenizer's chat template (:func:`~deepsuite.data.tokenizer.render_chat`):
the text before each assistant turn, generation prompt included, is prompt; the turn itself is
completion. Each piece is tokenised on its own, as a prompt is at generation time. A template
whose rendering of the first n turns is not a prefix of the first n + 1 is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepsuite.data.corpus import is_val_index, raw_dataset
from deepsuite.data.tokenizer import Tokenizer, render_chat
from deepsuite.errors import DataError

IGNORE_INDEX = -100  # labels without a target (torch's cross_entropy default ignore_index)


def sft_fields(cfg: Any) -> tuple[str, str, str]:
    return cfg.prompt_field, cfg.completion_field, cfg.messages_field


def load_records(cfg: Any, split: str, *, hf_cache: str) -> Any:
    """The records of one split (``datasets.Dataset``, non-streaming) with the fields this
    format reads; the split rule is the text corpus's (:func:`~deepsuite.data.corpus.is_val_index`
    over record indices)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    ds = raw_dataset(cfg, False, hf_cache)
    prompt, completion, messages = sft_fields(cfg)
    present = [c for c in (prompt, completion, messages) if c in ds.column_names]
    if messages not in present and not {prompt, completion} <= set(present):
        raise DataError(
            f"data.format=sft: {cfg.source!r} has columns {ds.column_names}; expected "
            f"{prompt!r} and {completion!r} (data.prompt_field / data.completion_field) or "
            f"{messages!r} (data.messages_field)"
        )
    ds = ds.select_columns(present)
    if cfg.max_documents:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    if len(ds) == 0:
        raise DataError(f"data.source: {cfg.source!r} holds no records")
    f = float(cfg.val_fraction)
    want_val = split == "val"
    return ds.filter(
        lambda b, idx: [is_val_index(i, f) == want_val for i in idx],
        batched=True,
        with_indices=True,
    )


def chat_segments(tok: Tokenizer, messages: Sequence[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces: assistant turns are targets,
    everything else (system and user turns, the template's markup, generation prompts) is not."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i}: expected a mapping with 'role' and 'content'")
        if m["role"] == "assistant":
            prompt = render_chat(tok, messages[:i], add_generation_prompt=True)
            full = render_chat(tok, messages[: i + 1], add_generation_prompt=False)
            pieces = [(prompt, False), (full, True)]
        else:
            full = render_chat(tok, messages[: i + 1], add_generation_prompt=False)
            pieces = [(full, False)]
        for text, target in pieces:
            if not text.startswith(done):
                raise ValueError(
                    f"message {i}: the chat template does not render the conversation "
                    "incrementally (turns before it change), so assistant tokens cannot be found"
                )
            if len(text) > len(done):
                out.append((text[len(done) :], target))
            done = text
    if not any(t for _, t in out):
        raise ValueError("messages: no assistant turn, so no token to train on")
    return out


def encode_record(
    rec: dict[str, Any], tok: Tokenizer, fields: tuple[str, str, str]
) -> tuple[list[int], list[int]]:
    """(ids, target flags) of one record, without the opening separator."""
    prompt, completion, messages = fields
    if rec.get(messages) is not None:
        pieces = chat_segments(tok, rec[messages])
    else:
        p, c = rec.get(prompt), rec.get(completion)
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise ValueError(
                f"expected a {prompt!r} string and a non-empty {completion!r} string, or a "
                f"{messages!r} list; got {prompt}={p!r}, {completion}={c!r}"
            )
        pieces = [(p, False), (c, True)]
    ids: list[int] = []
    flags: list[int] = []
    for text, target in pieces:
        enc = tok.encode(text)
        ids += enc
        flags += [int(target)] * len(enc)
    if not any(flags):
        raise ValueError("the completion encodes to no tokens")
    return ids, flags


def tokenize_records(ds: Any, tok: Tokenizer, cfg: Any) -> Any:
    """``ds`` of records -> ``ids`` and ``mask`` columns, each document ``[eos] + tokens`` with
    target flags ``[1] + flags`` (see the module docstring). A bad record raises DataError
    naming its index in the split."""
    eos, fields = tok.eos_id, sft_fields(cfg)
    names = ds.column_names

    def fn(batch: dict[str, list], idx: list[int]) -> dict[str, list]:
        ids, mask = [], []
        for j, i in enumerate(idx):
            rec = {k: batch[k][j] for k in names}
            try:
                a, b = encode_record(rec, tok, fields)
            except ValueError as err:
                raise DataError(
                    f"data.source {cfg.source!r}, record {i} of the split: {err}"
                ) from None
            ids.append([eos, *a])
            mask.append([1, *b])
        return {"ids": ids, "mask": mask}

    return ds.map(fn, batched=True, with_indices=True, remove_columns=names)
