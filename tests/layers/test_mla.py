"""MLA: naive vs absorbed, cached decoding vs full forward, masks, seed snippets, HF oracle, errors."""

import itertools

import pytest
import torch

from deepsuite.layers.attention import (
    MultiHeadLatentAttention,
    RotaryPositionEmbedding,
)

YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
CONFIGS = {
    "v2lite": {"q_lora_rank": 0},
    "qlora": {"q_lora_rank": 24},
    "qlora_yarn": {"q_lora_rank": 24, "rope_scaling": YARN},
    "rotate_half": {"q_lora_rank": 0, "rope_interleave": False},
}


def _mla(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = {"dim": 64, "n_heads": 4, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "max_seq_len": 128}
    args.update({"qk_nope_head_dim": 12, "v_head_dim": 10})
    args.update(kw)
    m = MultiHeadLatentAttention(**args).to(dtype)
    with torch.no_grad():  # non-trivial norm weights so a wrong norm placement shows
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


def _x(B=2, S=11, dtype=torch.float64, seed=1):
    return torch.randn(B, S, 64, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _explicit_mla(m, x, mask_BT=None):
    """From-the-formulas MLA (docs/formulas.md), written independently of the module's code paths."""
    B, S, _ = x.shape
    H, N, R, V = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    q = m.q_proj(x) if m.q_lora_rank == 0 else m.q_b_proj(m.q_a_layernorm(m.q_a_proj(x)))
    q = q.view(B, S, H, N + R)
    kv = m.kv_a_proj_with_mqa(x)
    c, kr = m.kv_a_layernorm(kv[..., : m.kv_lora_rank]), kv[..., m.kv_lora_rank :]
    q_pe, k_pe = m.rope(q[..., N:], kr.unsqueeze(2))
    w = m.kv_b_proj.weight.view(H, N + V, -1)
    k_nope = torch.einsum("btc,hnc->bhtn", c, w[:, :N])
    v = torch.einsum("btc,hvc->bhtv", c, w[:, N:])
    scores = torch.einsum("bshn,bhtn->bhst", q[..., :N], k_nope)
    scores = (scores + torch.einsum("bshr,btr->bhst", q_pe, k_pe[:, :, 0])) * m.softmax_scale
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    if mask_BT is not None:
        keep = keep & mask_BT[:, None, None, :]
    p = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return m.o_proj(torch.einsum("bhst,bhtv->bshv", p, v).flatten(2))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_naive_absorbed_reference_and_formulas_agree(cfg):
    m, x = _mla(**CONFIGS[cfg]), _x()
    naive = m(x)
    assert naive.shape == (2, 11, 64)
    torch.testing.assert_close(m(x, absorb=True), naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(naive, _explicit_mla(m, x), rtol=1e-10, atol=1e-12)
    m.use_sdpa = False  # explicit-softmax reference instead of torch SDPA
    torch.testing.assert_close(m(x), naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x, absorb=True), naive, rtol=1e-10, atol=1e-12)


def test_yarn_changes_softmax_scale_by_mscale_squared():
    plain, yarn = _mla(), _mla(rope_scaling=YARN)
    assert yarn.softmax_scale / plain.softmax_scale == pytest.approx(yarn.rope.softmax_scale_factor)
    assert yarn.rope.softmax_scale_factor == pytest.approx(1.8739, abs=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("growable", [False, True])
def test_cached_decoding_equals_full_forward(cfg, growable):
    m, x = _mla(**CONFIGS[cfg]), _x(S=40)
    full = m(x)
    # prefill 7, then token by token
    cache = m.new_cache(2, None if growable else 40)
    outs = [m(x[:, :7], cache=cache)]
    outs += [m(x[:, t : t + 1], cache=cache, start_pos=t) for t in range(7, 40)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-11)
    assert cache.length == 40 and (growable or cache.capacity == 40)
    # chunked, uneven chunks, naive math over the cache must agree too
    cache = m.new_cache(2, None if growable else 64)
    bounds = [0, 5, 6, 19, 33, 40]
    outs = [
        m(x[:, a:b], cache=cache, start_pos=a, absorb=bool(i % 2))
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-11)


def test_cache_rewind_re_decodes():
    m, x = _mla(), _x(S=12)
    cache = m.new_cache(2, 12)
    m(x, cache=cache)
    y = torch.randn_like(x[:, 8:])
    out = m(y, cache=cache, start_pos=8)  # overwrite the tail
    ref = m(torch.cat([x[:, :8], y], 1))[:, 8:]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_cached_decoding_float32_and_bf16_cache():
    m, x = (
        _mla(dtype=torch.float32, q_lora_rank=24, rope_scaling=YARN),
        _x(S=16, dtype=torch.float32),
    )
    full = m(x)
    cache = m.new_cache(2, 16)
    outs = [m(x[:, :4], cache=cache)] + [
        m(x[:, t : t + 1], cache=cache, start_pos=t) for t in range(4, 16)
    ]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)
    cache16 = m.new_cache(2, 16, dtype=torch.bfloat16)
    out16 = m(x, cache=cache16)
    assert cache16.c_kv.dtype == torch.bfloat16
    torch.testing.assert_close(out16, full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cfg", ["v2lite", "qlora_yarn"])
def test_padding_does_not_change_real_positions(cfg):
    m = _mla(**CONFIGS[cfg])
    lengths = [11, 6]
    x = _x(S=11)
    mask = torch.tensor([[1] * n + [0] * (11 - n) for n in lengths])
    out = m(x, mask)
    assert torch.isfinite(out).all()
    garbage = x.clone()
    garbage[1, 6:] = 100 * torch.randn(5, 64, dtype=x.dtype)
    out_g = m(garbage, mask)
    for b, n in enumerate(lengths):
        alone = m(x[b : b + 1, :n])
        torch.testing.assert_close(out[b : b + 1, :n], alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out_g[b : b + 1, :n], alone, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m(x, mask.bool(), absorb=True), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, _explicit_mla(m, x, mask.bool()), rtol=1e-10, atol=1e-12)


def test_left_padding_with_position_ids_and_cache():
    m, x = _mla(), _x(S=9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # row 1: 4 pads on the left, 5 real tokens
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = m(x, mask, position_ids=pos)
    assert (
        torch.isfinite(out).all() and out[1, :4].abs().max() == 0
    )  # fully-masked pad rows are zero
    alone = m(x[1:, 4:])
    torch.testing.assert_close(out[1:, 4:], alone, rtol=1e-10, atol=1e-12)
    # the same through a cache: prefill 6 then decode, padding mask over all keys so far
    cache = m.new_cache(2, 9)
    outs = [m(x[:, :6], mask[:, :6], cache=cache, position_ids=pos[:, :6])]
    for t in range(6, 9):
        outs.append(
            m(
                x[:, t : t + 1],
                mask[:, : t + 1],
                cache=cache,
                start_pos=t,
                position_ids=pos[:, t : t + 1],
            )
        )
    torch.testing.assert_close(torch.cat(outs, 1), out, rtol=1e-9, atol=1e-11)


def test_four_d_boolean_mask_and_non_causal():
    m, x = _mla(), _x(S=6)
    full = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(m(x, full), m(x))  # ANDed with causal
    nc = _mla(causal=False)
    tri = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    torch.testing.assert_close(nc(x, tri), m(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(nc(x), m(x))


def test_gradients_flow_and_dropout_only_in_training():
    m = _mla(dtype=torch.float32, dropout=0.5)
    x = _x(dtype=torch.float32).requires_grad_()
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    torch.testing.assert_close(m(x), m(x))  # eval: deterministic
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_seed_readme_snippets_run_as_written():
    mla = MultiHeadLatentAttention(
        d=2048,  # Model dimension
        n_h=16,  # Number of heads
        d_h_c=256,  # Compressed KV dimension
        d_h_r=64,  # RoPE dimension per head
    )
    x = torch.randn(2, 5, 2048)
    attention_mask = torch.ones(2, 5)
    output = mla(x, attention_mask)  # (batch, seq_len, d)
    assert output.shape == (2, 5, 2048)
    assert mla.qk_nope_head_dim == mla.v_head_dim == 128 and mla.kv_lora_rank == 256
    assert mla.cache_values_per_token == 256 + 64
    torch.testing.assert_close(output, mla(x), rtol=1e-5, atol=1e-6)

    rope = RotaryPositionEmbedding(
        dim=64,  # Dimension per head
        max_seq_len=2048,
        base=10000,
    )
    q, k, seq_len = torch.randn(2, 7, 4, 64), torch.randn(2, 7, 4, 64), 7
    q_rotated, k_rotated = rope(q, k, seq_len)
    assert q_rotated.shape == q.shape and k_rotated.shape == k.shape


def test_seed_and_deepseek_names_are_twins():
    a = MultiHeadLatentAttention(d=64, n_h=4, d_h_c=32, d_h_r=8)
    b = MultiHeadLatentAttention(dim=64, n_heads=4, kv_lora_rank=32, qk_rope_head_dim=8)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }
    MultiHeadLatentAttention(d=64, dim=64, n_h=4, kv_lora_rank=32)  # same value twice is fine
    with pytest.raises(ValueError, match="d=64 and dim=32"):
        MultiHeadLatentAttention(d=64, dim=32, n_h=4, d_h_c=32)
    with pytest.raises(ValueError, match="d_h_c=32 and kv_lora_rank=16"):
        MultiHeadLatentAttention(d=64, n_h=4, d_h_c=32, kv_lora_rank=16)


def test_parameter_names_and_v3_sizes():
    with torch.device("meta"):
        m = MultiHeadLatentAttention(
            dim=7168, n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, rope_scaling=dict(YARN, original_max_position_embeddings=4096),
        )  # fmt: skip
    sizes = {n: p.numel() for n, p in m.named_parameters()}
    assert set(sizes) == {
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight",
    }  # fmt: skip
    assert round(sizes["q_a_proj.weight"] / 1e6, 1) == 11.0
    assert round(sizes["q_b_proj.weight"] / 1e6, 1) == 37.7
    assert round(sizes["kv_a_proj_with_mqa.weight"] / 1e6, 1) == 4.1
    assert round(sizes["kv_b_proj.weight"] / 1e6, 1) == 16.8
    assert round(sizes["o_proj.weight"] / 1e6, 1) == 117.4
    norms = sizes["q_a_layernorm.weight"] + sizes["kv_a_layernorm.weight"]
    assert round((sum(sizes.values()) - norms) / 1e6, 1) == 187.1
    assert m.cache_values_per_token == 576
    assert "rope.inv_freq" not in m.state_dict()  # non-persistent, like HF's rotary buffer
    m.to_empty(device="cpu")
    m.rope.reset_parameters()
    assert torch.isfinite(m.rope.inv_freq).all() and m.rope.inv_freq[0] == 1.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        MultiHeadLatentAttention(d=65, n_h=4, d_h_c=32, d_h_r=8)
    MultiHeadLatentAttention(d=65, n_h=4, d_h_c=32, d_h_r=8, qk_nope_head_dim=16, v_head_dim=16)
    with pytest.raises(ValueError, match="even"):
        MultiHeadLatentAttention(d=64, n_h=4, d_h_c=32, d_h_r=7)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MultiHeadLatentAttention(d=64, n_h=4)
    with pytest.raises(ValueError, match="n_heads"):
        MultiHeadLatentAttention(d=64, n_h=0, d_h_c=32)
    with pytest.raises(ValueError, match="q_lora_rank"):
        MultiHeadLatentAttention(d=64, n_h=4, d_h_c=32, q_lora_rank=-1)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadLatentAttention(d=64, n_h=4, d_h_c=32, dropout=1.0)
    m = _mla(dtype=torch.float32)
    x = _x(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 64\)"):
        m(x[0])
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 64\)"):
        m(x[..., :32])
    with pytest.raises(TypeError, match="dtype"):
        m(x.double())
    with pytest.raises(TypeError, match="dtype"):
        m(x.long())
    with pytest.raises(ValueError, match="max_seq_len=128"):
        m(_x(S=130, dtype=torch.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        m(x, torch.ones(2, 5))
    with pytest.raises(TypeError, match="boolean"):
        m(x, torch.ones(2, 1, 11, 11))
    cache = m.new_cache(2, 8)
    with pytest.raises(ValueError, match="max_len=8"):
        m(x, cache=cache)
    with pytest.raises(ValueError, match="start_pos"):
        m(x[:, :2], cache=m.new_cache(2, 8), start_pos=3)  # would leave a hole
    with pytest.raises(ValueError, match="c_kv"):
        m(x[:1, :2], cache=m.new_cache(2, 8))


# ---- oracle: Hugging Face transformers' DeepseekV3Attention -----------------------------------
@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("interleave", [True, False])
def test_matches_transformers_deepseek_v3_attention(q_lora_rank, interleave):
    tr = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    cfg = tr.DeepseekV3Config(
        vocab_size=32, hidden_size=64, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32,
        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, max_position_embeddings=1280,
        rope_interleave=interleave, attention_bias=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = hf.DeepseekV3Attention(cfg, layer_idx=0).double().eval()
    rot = hf.DeepseekV3RotaryEmbedding(cfg).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    m = _mla(
        q_lora_rank=q_lora_rank or 0,
        max_seq_len=1280,
        rope_scaling=YARN,
        rope_interleave=interleave,
    )
    missing, unexpected = m.load_state_dict(ref.state_dict(), strict=True)
    assert not missing and not unexpected
    x = _x(S=13)
    pos = torch.arange(13).unsqueeze(0).expand(2, -1)
    causal = torch.full((13, 13), float("-inf"), dtype=torch.float64).triu(1).expand(2, 1, 13, 13)
    want, _ = ref(x, position_embeddings=rot(x, pos), attention_mask=causal)
    # HF computes RMSNorm and cos/sin in float32 even for float64 modules: float32-level tolerance
    # (a wrong scale, layout or weight split is off by ~1e-1)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x, cache=m.new_cache(2)), want, rtol=1e-5, atol=1e-5)
    assert (m(x) - want).abs().max() < 1e-5 * want.abs().max()
    assert m.softmax_scale == pytest.approx(ref.scaling)


def test_long_prefill_through_cache_runs_naive_and_matches():
    m, x = _mla(), _x(S=100)
    full = m(x)
    cache = m.new_cache(2, 100)
    assert m.absorb_max_query_len < 90  # the 90-token prefill takes the naive path over the cache
    outs = [m(x[:, :90], cache=cache)] + [
        m(x[:, t : t + 1], cache=cache, start_pos=t) for t in range(90, 100)
    ]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(
        m(x[:, :90], cache=m.new_cache(2), absorb=True), full[:, :90], rtol=1e-9, atol=1e-11
    )
