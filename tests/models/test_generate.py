"""Generation: cached greedy decoding equals recomputing the whole sequence each step (ragged
batches included), the sampling filters equal a per-row reference, and transformers' greedy
``generate`` gives the same tokens on the tiny DeepSeek-V3 and V2 checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from deepsuite.config import load_config
from deepsuite.models import DeepSeekLM
from deepsuite.models.generate import (
    GenerationError,
    SamplingConfig,
    cache_bytes_per_token,
    filter_logits,
    generate,
    next_tokens,
)

SMALL = [
    "model.vocab_size=97",
    "model.dim=32",
    "model.n_layers=3",
    "model.n_heads=2",
    "model.inter_dim=64",
    "model.max_seq_len=64",
    "mla.q_lora_rank=16",
    "mla.kv_lora_rank=16",
    "mla.qk_nope_head_dim=8",
    "mla.qk_rope_head_dim=8",
    "mla.v_head_dim=8",
    "mla.rope_scaling=yarn",
    "mla.rope_factor=4",
    "mla.original_max_seq_len=16",
    "moe.n_routed_experts=8",
    "moe.n_group=4",
    "moe.topk_group=2",
    "moe.expert_intermediate_size=16",
    "data.seq_len=32",
    "model.init_std=0.2",  # peaked logits: no near-ties for float noise to flip
]


@pytest.fixture(scope="module")
def model() -> DeepSeekLM:
    torch.manual_seed(0)
    m = DeepSeekLM(load_config(None, SMALL)).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.router.expert_bias.normal_(0.0, 0.2)
    return m


def greedy_reference(model: DeepSeekLM, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """Argmax of a full forward over the whole sequence, one token at a time (no cache)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t == eos:
                break
    return out


def test_cached_greedy_equals_full_recompute_for_a_ragged_batch(model):
    prompts = [[5, 9, 33, 70, 7, 1, 2], [11, 12], [40, 41, 42, 43]]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0))
    for p, g in zip(prompts, got, strict=True):
        assert g == greedy_reference(model, p, 12, None)


def test_rows_stop_at_eos_and_streaming_sees_every_token(model):
    prompts = [[5, 9, 33], [11, 12, 13, 14]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0))
    eos = free[0][3]  # row 0 stops at its 4th token
    seen: list[list[int | None]] = []
    got = generate(
        model, prompts, SamplingConfig(max_new_tokens=10, temperature=0, eos_id=eos),
        on_step=seen.append,
    )  # fmt: skip
    assert got[0] == free[0][: free[0].index(eos) + 1]
    cut = got[1].index(eos) + 1 if eos in got[1] else 10
    assert got[1] == free[1][:cut]
    for i, row in enumerate(got):
        assert [s[i] for s in seen if s[i] is not None] == row


def filter_reference(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Per row, in Python: keep the k best ids, then the fewest best whose mass reaches p."""
    out = torch.full_like(logits, float("-inf"))
    for b, row in enumerate(logits.tolist()):
        order = sorted(range(len(row)), key=lambda i: -row[i])
        keep = order[:top_k] if top_k else order
        z = sum(math.exp(row[i]) for i in keep)
        mass, kept = 0.0, []
        for i in keep:
            if kept and mass >= top_p:
                break
            kept.append(i)
            mass += math.exp(row[i]) / z
        for i in kept:
            out[b, i] = row[i]
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (5, 1.0), (7, 0.8), (0, 1.0), (1, 0.3)])
def test_filter_logits_equals_reference(top_k, top_p):
    logits = torch.randn(4, 23, generator=torch.Generator().manual_seed(top_k))
    assert torch.equal(filter_logits(logits, top_k, top_p), filter_reference(logits, top_k, top_p))


def test_sampling_is_seeded_and_stays_in_the_filtered_set(model):
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=3, seed=7)
    prompts = [[5, 9, 33], [2, 3]]
    a, b = generate(model, prompts, cfg), generate(model, prompts, cfg)
    assert a == b
    c = generate(model, prompts, SamplingConfig(**{**cfg.__dict__, "seed": 8}))
    assert c != a
    logits = torch.randn(64, 97, generator=torch.Generator().manual_seed(0))
    draws = next_tokens(logits, cfg, torch.Generator().manual_seed(1))
    assert (logits.topk(3).indices == draws[:, None]).any(dim=1).all()


def test_bad_arguments_name_the_problem(model):
    with pytest.raises(
        GenerationError, match="prompt 1: 70 tokens, longer than model.max_seq_len=64"
    ):
        generate(model, [[1, 2], [3] * 70], SamplingConfig(max_new_tokens=1))
    with pytest.raises(GenerationError, match=r"max_new_tokens=40: prompt 0 has 30 tokens"):
        generate(model, [[1] * 30], SamplingConfig(max_new_tokens=40))
    with pytest.raises(GenerationError, match="prompt 0: token id 97 outside"):
        generate(model, [[97]], SamplingConfig(max_new_tokens=1))
    with pytest.raises(GenerationError, match="prompt 0: empty"):
        generate(model, [[]], SamplingConfig(max_new_tokens=1))
    with pytest.raises(GenerationError, match="top_p: expected a number in"):
        SamplingConfig(top_p=0.0)


def test_cache_bytes_per_token_is_layers_times_latent(model):
    a = model.args.mla
    assert cache_bytes_per_token(model) == 3 * (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    caches = model.new_caches(2, 10)
    assert sum(c.bytes_per_token for c in caches) == cache_bytes_per_token(model)


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :], mask[i, P - len(p) :] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("flavor", ["v3", "v2"])
def test_greedy_equals_transformers_generate(flavor, request):
    """Tiny random checkpoints from transformers itself (V3: groups, YaRN, nonzero bias; V2:
    softmax, no bias): deepsuite's cached decode gives transformers' greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from deepsuite.checkpoint.pretrained import load_pretrained

    path = request.getfixturevalue(f"tiny_{flavor}")
    _src, ours = load_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [[0, 50, 51, 52, 300, 7, 9], [0, 400, 401], [0, 3, 4, 5, 6]]
    got = generate(ours, prompts, SamplingConfig(max_new_tokens=24, temperature=0, eos_id=0))
    ids, mask = _left_padded(prompts, 0)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
            eos_token_id=0, pad_token_id=0,
        )[:, ids.shape[1] :].tolist()  # fmt: skip
    for g, r in zip(got, ref, strict=True):
        assert g == r[: len(g)] and all(t == 0 for t in r[len(g) :])
