"""RoPE: rotation properties, offsets, layouts, and inverse frequencies against transformers."""

import math

import pytest
import torch

from deepsuite.layers.attention import (
    RotaryPositionEmbedding,
    rope_inv_freq,
    yarn_correction_range,
    yarn_get_mscale,
)

V3_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
SCALINGS = [None, {"type": "linear", "factor": 4.0}, {"type": "ntk", "factor": 4.0}, V3_YARN]


def _rope(interleaved=False, scaling=None, dim=16, max_seq_len=256):
    return RotaryPositionEmbedding(
        dim, max_seq_len, 10000.0, interleaved=interleaved, scaling=scaling
    )


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_norm_preserved_per_pair(interleaved, scaling):
    rope = _rope(interleaved, scaling)
    q, k = (
        torch.randn(2, 9, 3, 16, dtype=torch.float64),
        torch.randn(2, 9, 1, 16, dtype=torch.float64),
    )
    qr, kr = rope(q, k, 9)
    assert qr.dtype == q.dtype and kr.shape == k.shape
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kr.norm(dim=-1), k.norm(dim=-1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(qr[:, 1:], q[:, 1:])  # positions > 0 really rotate
    torch.testing.assert_close(qr[:, 0], q[:, 0].float().to(q.dtype))  # position 0 is the identity


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_scores_depend_only_on_relative_position(interleaved, scaling):
    rope = _rope(interleaved, scaling)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        qm = rope.rotate(q, *rope.cos_sin(torch.tensor([[m]])))
        kn = rope.rotate(k, *rope.cos_sin(torch.tensor([[n]])))
        return (qm * kn).sum().item()

    for m, n, shift in [(5, 2, 17), (0, 7, 100), (40, 40, 3)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-4  # and it does depend on the distance


@pytest.mark.parametrize("interleaved", [False, True])
def test_offset_decoding_equals_full_sequence(interleaved):
    rope = _rope(interleaved, V3_YARN)
    q, k = torch.randn(2, 12, 4, 16), torch.randn(2, 12, 1, 16)
    qf, kf = rope(q, k)
    parts = [rope(q[:, :5], k[:, :5], start_pos=0)]
    parts += [rope(q[:, t : t + 1], k[:, t : t + 1], start_pos=t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), qf)
    torch.testing.assert_close(torch.cat([p[1] for p in parts], 1), kf)
    # explicit position ids, (S,) and (B, S)
    q2, _ = rope(q[:, 3:7], k[:, 3:7], position_ids=torch.arange(3, 7))
    torch.testing.assert_close(q2, qf[:, 3:7])
    q3, _ = rope(q[:, 3:7], k[:, 3:7], position_ids=torch.arange(3, 7).expand(2, 4))
    torch.testing.assert_close(q3, qf[:, 3:7])


def test_shared_key_head_broadcasts():
    rope = _rope()
    q, k = torch.randn(2, 6, 4, 16), torch.randn(2, 6, 1, 16)
    _, k1 = rope(q, k)
    _, k4 = rope(q, k.expand(-1, -1, 4, -1))
    torch.testing.assert_close(k1.expand(-1, -1, 4, -1), k4)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_layouts_related_by_head_dim_permutation(scaling):
    half, inter = _rope(False, scaling), _rope(True, scaling)
    perm = torch.cat([torch.arange(0, 16, 2), torch.arange(1, 16, 2)])  # interleaved -> halves
    x = torch.randn(2, 7, 3, 16)
    out_inter, _ = inter(x, x)
    out_half, _ = half(x[..., perm], x[..., perm])
    torch.testing.assert_close(out_half, out_inter[..., perm])
    assert not torch.allclose(out_half, half(x, x)[0])  # the layouts really differ


def test_rotation_matches_complex_multiplication():
    """Interleaved RoPE is x * exp(i * pos * inv_freq) on complex pairs (DeepSeek's formulation)."""
    rope = _rope(True)
    x = torch.randn(1, 5, 2, 16, dtype=torch.float64)
    out, _ = rope(x, x)
    ang = torch.arange(5, dtype=torch.float64)[:, None] * rope.inv_freq.double()
    z = (
        torch.view_as_complex(x.view(1, 5, 2, 8, 2).contiguous())
        * torch.polar(torch.ones_like(ang), ang)[None, :, None]
    )
    torch.testing.assert_close(out, torch.view_as_real(z).flatten(-2), rtol=1e-6, atol=1e-6)


def test_yarn_constants_match_deepseek_v3():
    assert yarn_correction_range(64, 10000.0, 4096, 32, 1) == (10, 23)
    rope = RotaryPositionEmbedding(64, 163840, 10000, interleaved=True, scaling=V3_YARN)
    assert yarn_get_mscale(40, 1.0) == pytest.approx(0.1 * math.log(40) + 1)  # 1.3689
    assert rope.softmax_scale_factor == pytest.approx(1.8739, abs=1e-4)  # mscale^2
    assert rope.attention_factor == 1.0
    base = 1.0 / 10000 ** (torch.arange(0, 64, 2).double() / 64)
    torch.testing.assert_close(
        rope.inv_freq[:10].double(), base[:10], rtol=1e-6, atol=0
    )  # extrapolated
    torch.testing.assert_close(
        rope.inv_freq[23:].double(), base[23:] / 40, rtol=1e-6, atol=0
    )  # interpolated
    # DeepSeek's inference-code form: only "mscale" given -> all of it on the softmax scale
    only = {k: v for k, v in V3_YARN.items() if k != "mscale_all_dim"}
    r2 = RotaryPositionEmbedding(64, 163840, 10000, scaling=only)
    assert (
        r2.softmax_scale_factor == pytest.approx(rope.softmax_scale_factor)
        and r2.attention_factor == 1.0
    )


# ---- against transformers' own rope init functions ------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf(rope_type, params, max_pos, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        head_dim=64,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **params},
    )
    if rope_type == "default":
        inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
        return inv, 1.0
    kw = {} if seq_len is None else {"seq_len": seq_len}
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, **kw)


@pytest.mark.parametrize(
    ("rope_type", "params"),
    [
        ("default", {}),
        ("linear", {"factor": 8.0}),
        ("yarn", {k: v for k, v in V3_YARN.items() if k != "type"}),
        (
            "yarn",
            {
                "factor": 16.0,
                "original_max_position_embeddings": 2048,
                "beta_fast": 16,
                "beta_slow": 2,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
            },
        ),
    ],
)
def test_inv_freq_matches_transformers(rope_type, params):
    hf_inv, hf_factor = _hf(rope_type, params, 163840)
    rope = RotaryPositionEmbedding(64, 163840, 10000.0, scaling={"rope_type": rope_type, **params})
    torch.testing.assert_close(rope.inv_freq, hf_inv.float(), rtol=1e-6, atol=1e-9)
    assert rope.attention_factor == pytest.approx(hf_factor)


@pytest.mark.parametrize("seq_len", [1000, 4096, 10000])
def test_dynamic_ntk_matches_transformers(seq_len):
    hf_inv, _ = _hf("dynamic", {"factor": 4.0}, 4096, seq_len=seq_len)
    rope = RotaryPositionEmbedding(64, 4096, 10000.0, scaling={"type": "dynamic", "factor": 4.0})
    torch.testing.assert_close(
        rope_inv_freq(64, 10000.0, rope.scaling, seq_len), hf_inv, rtol=1e-6, atol=1e-9
    )
    # the module uses the stretched frequencies once positions pass the trained length
    q = torch.randn(1, 1, 1, 64)
    out, _ = rope(q, q, position_ids=torch.tensor([seq_len - 1]))
    ang = (seq_len - 1) * hf_inv.float()
    x1, x2 = q[..., :32], q[..., 32:]
    ref = torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), -1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ---- errors --------------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="even"):
        RotaryPositionEmbedding(dim=63)
    with pytest.raises(ValueError, match="max_seq_len"):
        RotaryPositionEmbedding(dim=8, max_seq_len=0)
    with pytest.raises(ValueError, match="unknown keys"):
        RotaryPositionEmbedding(dim=8, scaling={"type": "yarn", "factr": 4})
    with pytest.raises(ValueError, match="type"):
        RotaryPositionEmbedding(dim=8, scaling={"type": "longrope"})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RotaryPositionEmbedding(dim=8, scaling={"type": "yarn", "factor": 4})
    rope = RotaryPositionEmbedding(dim=8, max_seq_len=16)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="batch, seq_len, n_heads"):
        rope(q[0], q[0])
    with pytest.raises(ValueError, match=r"\(batch, seq_len, n_heads, 8\)"):
        rope(q[..., :6], q[..., :6])
    with pytest.raises(ValueError, match="seq_len=5"):
        rope(q, q, 5)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        rope(q, q, start_pos=13)
    with pytest.raises(TypeError, match="floating"):
        rope(q.long(), q.long())
    with pytest.raises(TypeError, match="position_ids"):
        rope(q, q, position_ids=torch.arange(4.0))
    with pytest.raises(ValueError, match="position_ids"):
        rope(q, q, position_ids=torch.arange(3))
