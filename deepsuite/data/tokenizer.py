"""Tokenizers for the data pipeline: byte-level (default), locally trained BPE, or a local HF dir.

Every tokenizer exposes the same small surface the pipeline and the trainer use:
``vocab_size`` (int), ``eos_id`` (the document separator id), ``encode(str) -> list[int]``,
``encode_batch(list[str]) -> list[list[int]]``, ``decode(list[int]) -> str`` and ``fingerprint``
(a string that changes whenever the mapping text -> ids changes; it keys the token cache).
A Hugging Face tokenizer also carries the ``chat_template`` of the ``tokenizer_config.json``
beside its ``tokenizer.json`` (None when absent), which :func:`render_chat` applies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from deepsuite.atomic import atomic_write_text
from deepsuite.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# separators looked for when tokenizer_config.json names none (DeepSeek's uses fullwidth bars)
EOS_CANDIDATES = (
    EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|im_end|>", "<s>",
)  # fmt: skip


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and one separator id 256; needs no download and no training.

    ``decode`` is the exact inverse of ``encode`` for any str (separators are dropped).
    """

    vocab_size: int = 257
    eos_id: int = 256
    fingerprint: str = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (fast, Rust) as a pipeline tokenizer.

    ``eos_id`` is the first special token found among ``eos_candidates``; ``ValueError`` when none.
    ``chat_template`` (a Jinja template, or None) and ``special_tokens`` (bos/eos strings for it)
    come from ``tokenizer_config.json``.
    """

    def __init__(
        self,
        tok: Any,
        *,
        fingerprint: str,
        eos_candidates: Sequence[str] = EOS_CANDIDATES,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self._tok = tok
        self.fingerprint = fingerprint
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        eos = next(
            (tok.token_to_id(t) for t in eos_candidates if tok.token_to_id(t) is not None), None
        )
        if eos is None:
            raise DataError(
                f"data.tokenizer: tokenizer has none of the separator tokens {list(eos_candidates)}; "
                "add an EOS token to it"
            )
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json`` (and ``tokenizer_config.json`` with the chat template and
        special tokens, when there are any) into ``folder``; returns the tokenizer.json path."""
        out = Path(folder)
        atomic_write_text(out / "tokenizer.json", self._tok.to_str())
        conf = dict(self.special_tokens)
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        if conf:
            atomic_write_text(out / "tokenizer_config.json", json.dumps(conf, indent=1))
        return out / "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int, out_file: str | Path) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` with the ``tokenizers`` library; save it to ``out_file``.

    Byte-level pre-tokenisation and decoding make ``decode(encode(s)) == s`` for every str.
    ``vocab_size`` counts the 256 byte symbols and the separator, so it must be >= 257.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise DataError(
            f"data.bpe_vocab_size must be an int >= 257 (256 bytes + EOS), got {vocab_size!r}"
        )
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter(texts), trainer=trainer)
    text = tok.to_str()
    atomic_write_text(out_file, text)
    return HFTokenizer(tok, fingerprint="tok-" + hashlib.sha256(text.encode()).hexdigest()[:16])


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a str or as {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _tokenizer_config(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(chat_template, {"bos_token": ..., "eos_token": ...}) from ``tokenizer_config.json``."""
    f = folder / "tokenizer_config.json"
    if not f.is_file():
        return None, {}
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"data.tokenizer: {f} is not valid JSON ({err})") from None
    template = conf.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    special = {k: _token_text(conf.get(k)) for k in ("bos_token", "eos_token")}
    return (template if isinstance(template, str) else None), {
        k: v for k, v in special.items() if v
    }


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """Load a local Hugging Face tokenizer: a ``tokenizer.json`` file or a directory holding one,
    with the chat template and EOS token of a ``tokenizer_config.json`` beside it.

    Directories without ``tokenizer.json`` (e.g. sentencepiece only) are converted with
    ``transformers.AutoTokenizer`` (local files only, no network).
    """
    from tokenizers import Tokenizer as RustTokenizer

    p = Path(path)
    file = p if p.is_file() else p / "tokenizer.json"
    template, special = _tokenizer_config(file.parent)
    if file.is_file():
        # fingerprint the library's own serialisation, not the file's formatting, so a copy
        # saved by HFTokenizer.save (a run's RUN_DIR/tokenizer.json) keys the same token cache
        try:
            tok = RustTokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise DataError(
                f"data.tokenizer: {file} is not a tokenizer.json the tokenizers library can load "
                f"({str(err).strip() or type(err).__name__})"
            ) from err
        text = tok.to_str()
    elif p.is_dir():
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as err:  # OSError, ValueError, ... from transformers
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"data.tokenizer: cannot load a tokenizer from {p} ({first})") from err
        if not getattr(hf, "is_fast", False):
            raise DataError(f"data.tokenizer: {p} holds no tokenizer.json and no fast tokenizer")
        tok = hf.backend_tokenizer
        text = tok.to_str()
    else:
        raise DataError(
            f"data.tokenizer: expected 'byte', 'bpe' or a local tokenizer dir/file, got {str(path)!r} "
            "(no such file or directory)"
        )
    if template:  # the template decides how chat records tokenise: part of the cache key
        text += "\n" + template
    eos = [special["eos_token"]] if "eos_token" in special else []
    return HFTokenizer(
        tok,
        fingerprint="tok-" + hashlib.sha256(text.encode()).hexdigest()[:16],
        eos_candidates=(*eos, *EOS_CANDIDATES),
        chat_template=template,
        special_tokens=special,
    )


def render_chat(
    tok: Tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool
) -> str:
    """The text the tokenizer's chat template makes of ``messages`` (as ``transformers``'
    ``apply_chat_template(tokenize=False)`` renders it: sandboxed Jinja, trimmed blocks).

    Raises ValueError when the tokenizer has no chat template.
    """
    template = getattr(tok, "chat_template", None)
    if not template:
        raise ValueError(
            "data.tokenizer: the tokenizer has no chat_template (tokenizer_config.json); use "
            "prompt/completion records instead of messages"
        )
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **getattr(tok, "special_tokens", {}),
        )
    except TemplateError as err:
        raise ValueError(f"data.tokenizer: the chat template failed: {err}") from None


def tokenizer_from_spec(
    spec: str, *, bpe_vocab_size: int, bpe_texts: Iterator[str] | None, bpe_file: Path
) -> Tokenizer:
    """Resolve ``data.tokenizer``: 'byte', 'bpe' (load ``bpe_file`` or train it on ``bpe_texts``) or a path."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if bpe_file.is_file():
            return load_hf_tokenizer(bpe_file)
        if bpe_texts is None:
            raise ValueError("data.tokenizer='bpe' needs training texts and none were given")
        return train_bpe(bpe_texts, bpe_vocab_size, bpe_file)
    return load_hf_tokenizer(spec)


def describe(tok: Tokenizer) -> str:
    """A one-line JSON summary for logs."""
    return json.dumps({"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "fp": tok.fingerprint})
