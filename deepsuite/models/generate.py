"""Text generation from a :class:`~deepsuite.models.DeepSeekLM`: batched greedy decoding and
sampling (temperature, top-k, top-p) over MLA's latent KV cache, single device.

Letters: B prompts (batch rows), P the longest prompt, T cached tokens, V vocabulary.

Prompts of different lengths are left-padded to P: a (B, T) key mask hides the padding and each
row's rotary positions count from its own first token, so a row decodes exactly as it would
alone (Hugging Face's ``generate`` does the same). The prompt runs as one chunk (prefill), then
one token per step; every block keeps only its C + R latent values per token and decodes with
the absorbed path (``MultiHeadLatentAttention.forward`` with ``cache=``). A row stops at
``eos_id``; finished rows are fed ``pad_id`` until every row is done or ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deepsuite.errors import ConfigError
from deepsuite.models.deepseek import DeepSeekLM


class GenerationError(ConfigError):
    """A generation argument or prompt is unusable; the message names it."""


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    temperature 0 is greedy (argmax; ties to the lower id); otherwise logits / temperature are
    cut to the ``top_k`` best (0: all) and then to the smallest set whose probability reaches
    ``top_p`` (1.0: all), and one token is drawn with a generator seeded by ``seed``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "an int >= 1"),
            ("temperature", self.temperature >= 0, "a number >= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, "an int >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise GenerationError(f"{name}: expected {expected}, got {getattr(self, name)!r}")


def filter_logits(logits_BV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with every token outside the top-k and outside the top-p nucleus set to -inf.

    The nucleus keeps the fewest best tokens whose softmax probabilities sum to at least
    ``top_p`` (the best token always stays).
    """
    out = logits_BV.float()
    V = out.shape[-1]
    if 0 < top_k < V:
        kth = out.topk(top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = out.sort(dim=-1, descending=True)
        before_BV = sorted_BV.softmax(-1).cumsum(-1) - sorted_BV.softmax(-1)  # mass above each
        drop_BV = before_BV >= top_p
        drop_BV[:, 0] = False
        out = out.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return out


def next_tokens(
    logits_BV: Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> Tensor:
    """(B,) next ids: argmax at temperature 0, else one draw from the filtered distribution."""
    if cfg.temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = filter_logits(logits_BV / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, model: DeepSeekLM) -> None:
    """Raise :class:`GenerationError` naming the prompt that is empty, holds an id outside the
    vocabulary, or does not fit ``model.max_seq_len`` with ``max_new_tokens`` more tokens."""
    m = model.args.model
    if not prompts:
        raise GenerationError("prompts: expected at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i}: empty after tokenisation")
        bad = [t for t in p if not 0 <= int(t) < m.vocab_size]
        if bad:
            raise GenerationError(
                f"prompt {i}: token id {bad[0]} outside the model's vocabulary "
                f"(model.vocab_size={m.vocab_size})"
            )
        if len(p) > m.max_seq_len:
            raise GenerationError(
                f"prompt {i}: {len(p)} tokens, longer than model.max_seq_len={m.max_seq_len}"
            )
        if len(p) + max_new_tokens > m.max_seq_len:
            raise GenerationError(
                f"max_new_tokens={max_new_tokens}: prompt {i} has {len(p)} tokens and "
                f"{len(p)} + {max_new_tokens} exceeds model.max_seq_len={m.max_seq_len}; "
                f"ask for at most {m.max_seq_len - len(p)} new tokens"
            )


@torch.no_grad()
def generate(
    model: DeepSeekLM,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    pad_id: int = 0,
    on_step: Callable[[list[int | None]], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (the eos, when reached, included; nothing after it).

    ``on_step`` is called after every decoding step with each row's new token (None for rows
    already finished), for streaming. The model runs in eval mode on its own device and dtype.
    """
    check_prompts(prompts, cfg.max_new_tokens, model)
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    lengths_B = torch.tensor([len(p) for p in prompts], device=device)
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids_BP[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
    pad_B = P - lengths_B
    total = P + cfg.max_new_tokens
    ragged = bool((pad_B > 0).any())
    # keys to attend: everything but the left padding (None when no row is padded)
    keep_BT = (torch.arange(total, device=device) >= pad_B[:, None]) if ragged else None
    pos_BP = (torch.arange(P, device=device) - pad_B[:, None]).clamp_min(0)
    caches = model.new_caches(B, total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    mask = None if keep_BT is None else keep_BT[:, :P]
    logits_BV = model.forward_cached(ids_BP, caches, 0, mask, pos_BP)
    out: list[list[int]] = [[] for _ in range(B)]
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(cfg.max_new_tokens):
        tok_B = next_tokens(logits_BV, cfg, gen).masked_fill(done_B, pad_id)
        new: list[int | None] = []
        for i, (t, d) in enumerate(zip(tok_B.tolist(), done_B.tolist(), strict=True)):
            new.append(None if d else t)
            if not d:
                out[i].append(t)
        if on_step is not None:
            on_step(new)
        if cfg.eos_id is not None:
            done_B |= tok_B == cfg.eos_id
        if bool(done_B.all()) or step == cfg.max_new_tokens - 1:
            break
        T = P + step
        mask = None if keep_BT is None else keep_BT[:, : T + 1]
        pos_B1 = (lengths_B + step)[:, None]
        logits_BV = model.forward_cached(tok_B[:, None], caches, T, mask, pos_B1)
    model.train(was_training)
    return out


def cache_bytes_per_token(model: DeepSeekLM, dtype: torch.dtype | None = None) -> int:
    """Bytes the latent caches hold per token over all blocks: n_layers * (C + R) * itemsize."""
    item = torch.empty((), dtype=dtype or model.embed.weight.dtype).element_size()
    return sum(b.attn.cache_values_per_token for b in model.layers) * item
