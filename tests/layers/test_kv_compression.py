"""Latent KV compression and LatentKVCache: sizes, write/read semantics, growth, errors."""

import pytest
import torch

from deepsuite.layers.attention import (
    LatentKVCache,
    MultiHeadLatentAttention,
    compress_kv,
    mha_cache_values_per_token,
    mla_cache_values_per_token,
)


def test_v3_cache_holds_576_values_per_token():
    assert mla_cache_values_per_token(512, 64) == 576
    assert mha_cache_values_per_token(128, 128) == 32768
    assert mha_cache_values_per_token(128, 128) / mla_cache_values_per_token(
        512, 64
    ) == pytest.approx(56.9, abs=0.05)
    cache = LatentKVCache(1, 512, 64, max_len=3, dtype=torch.bfloat16)
    assert cache.values_per_token == 576 and cache.bytes_per_token == 1152
    assert cache.nbytes() == 3 * 1152  # one batch row, three tokens: nothing else is stored
    with torch.device("meta"):
        mla = MultiHeadLatentAttention(dim=7168, n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)  # fmt: skip
    c = mla.new_cache(2, 5, device="cpu")
    assert c.c_kv.shape == (2, 5, 512) and c.k_rope.shape == (2, 5, 64)
    assert c.c_kv[0, 0].numel() + c.k_rope[0, 0].numel() == 576


def test_compress_kv_splits_and_normalises():
    torch.manual_seed(0)
    proj, norm = torch.nn.Linear(16, 10 + 4, bias=False), torch.nn.RMSNorm(10, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16)
    c, kr = compress_kv(x, proj, norm, 10)
    raw = x @ proj.weight.T
    want = (
        raw[..., :10] / raw[..., :10].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    )
    torch.testing.assert_close(c, want)
    torch.testing.assert_close(kr, raw[..., 10:])


def test_update_returns_prefix_and_supports_rewind():
    cache = LatentKVCache(2, 3, 2, max_len=6)
    a, ka = torch.randn(2, 4, 3), torch.randn(2, 4, 2)
    rows = cache.update(a, ka, 0)
    torch.testing.assert_close(rows, torch.cat([a, ka], -1))
    torch.testing.assert_close(cache.c_kv[:, :4], a)
    torch.testing.assert_close(cache.k_rope[:, :4], ka)
    b, kb = torch.randn(2, 1, 3), torch.randn(2, 1, 2)
    rows = cache.update(b, kb, 4)
    assert cache.length == 5 and rows.shape == (2, 5, 5)
    torch.testing.assert_close(rows[..., :3], torch.cat([a, b], 1))
    rows = cache.update(b, kb, 2)  # rewind: tokens past 3 are forgotten
    assert cache.length == 3
    torch.testing.assert_close(rows[..., :3], torch.cat([a[:, :2], b], 1))
    torch.testing.assert_close(rows[..., 3:], torch.cat([ka[:, :2], kb], 1))
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="start_pos"):
        cache.update(b, kb, 1)


def test_growable_cache_keeps_contents():
    cache = LatentKVCache(1, 4, 2)
    assert cache.growable and cache.capacity == 16
    data = torch.randn(1, 40, 4)
    kr = torch.randn(1, 40, 2)
    for t in range(0, 40, 7):
        cache.update(data[:, t : t + 7], kr[:, t : t + 7], t)
    assert cache.capacity >= 40 and cache.length == 40
    torch.testing.assert_close(cache.c_kv[:, :40], data)
    torch.testing.assert_close(cache.k_rope[:, :40], kr)


def test_cache_errors():
    with pytest.raises(ValueError, match="batch_size"):
        LatentKVCache(0, 4, 2)
    with pytest.raises(ValueError, match="max_len"):
        LatentKVCache(1, 4, 2, max_len=0)
    with pytest.raises(TypeError, match="dtype"):
        LatentKVCache(1, 4, 2, dtype=torch.int32)
    cache = LatentKVCache(2, 4, 2, max_len=3)
    with pytest.raises(ValueError, match="max_len=3"):
        cache.update(torch.randn(2, 4, 4), torch.randn(2, 4, 2), 0)
    with pytest.raises(ValueError, match="c_kv"):
        cache.update(torch.randn(2, 1, 5), torch.randn(2, 1, 2), 0)
    with pytest.raises(ValueError, match="k_rope"):
        cache.update(torch.randn(2, 1, 4), torch.randn(2, 1, 3), 0)
