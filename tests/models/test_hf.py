"""HF DeepSeek-V2/V3 checkpoints: logits equal transformers (fp32), round trips are exact, bad
names give clear errors. transformers builds and saves the tiny models itself (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepsuite.models.hf import (
    HFCheckpointError,
    dequant_fp8,
    hf_main,
    load_hf_model,
    load_hf_weights,
    save_hf_checkpoint,
    weight_map,
)

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
}
COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_routed_experts=8,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=10,
    first_k_dense_replace=1,
    max_position_embeddings=128,
)


def hf_v3(tmp: Path, seed: int = 0, shard: str = "40KB", **kw) -> tuple[Path, torch.nn.Module]:
    """A random DeepSeek-V3 (YaRN, 4 groups keep 2, random balancing bias), saved in shards."""
    torch.manual_seed(seed)
    args = dict(COMMON, q_lora_rank=24, n_shared_experts=1, n_group=4, topk_group=2)
    args.update(num_experts_per_tok=3, routed_scaling_factor=2.5, rope_parameters=YARN, **kw)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**args)).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0.0, 0.1)
    model.save_pretrained(tmp, max_shard_size=shard)
    return tmp, model


def hf_v2(tmp: Path, seed: int = 0, **kw) -> tuple[Path, torch.nn.Module]:
    """A random DeepSeek-V2-Lite-shaped model: no query compression, softmax, 2 shared experts."""
    torch.manual_seed(seed)
    args = dict(COMMON, q_lora_rank=None, n_shared_experts=2, num_experts_per_tok=3)
    args.update(kw)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**args)).eval()
    model.save_pretrained(tmp)
    return tmp, model


def tokens(seed: int = 1, shape=(2, 48)) -> torch.Tensor:
    return torch.randint(
        0, COMMON["vocab_size"], shape, generator=torch.Generator().manual_seed(seed)
    )


def max_err(hf_model, ds_model, ids) -> float:
    with torch.no_grad():
        return (hf_model(ids).logits - ds_model(ids).logits).abs().max().item()


@pytest.mark.parametrize("interleave", [True, False])
def test_v3_yarn_group_routing_logits_match(tmp_path, interleave):
    path, hf = hf_v3(tmp_path, rope_interleave=interleave)
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    cfg, ds = load_hf_model(path)
    assert (cfg.mla.rope_scaling, cfg.moe.n_group, cfg.moe.topk_group) == ("yarn", 4, 2)
    assert cfg.mla.rope_interleave is interleave and cfg.moe.route_scale == 2.5
    ids = tokens()
    err = max_err(hf, ds.eval(), ids)
    assert err <= 1e-4, err
    # the balancing bias matters: zeroing it changes the routing, so the comparison has teeth
    with torch.no_grad():
        for m in ds.moe_layers():
            m.router.expert_bias.zero_()
    assert max_err(hf, ds, ids) > 1e-3


def test_v2_lite_logits_match(tmp_path):
    path, hf = hf_v2(tmp_path)
    cfg, ds = load_hf_model(path)
    assert cfg.mla.q_lora_rank == 0 and cfg.moe.score_func == "softmax"
    assert cfg.moe.n_shared_experts == 2 and not cfg.moe.use_expert_bias
    assert max_err(hf, ds.eval(), tokens()) <= 1e-4


def test_v2_group_limited_logits_match(tmp_path):
    path, hf = hf_v2(
        tmp_path, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5,
    )  # fmt: skip
    cfg, ds = load_hf_model(path)
    assert (cfg.moe.n_group, cfg.moe.topk_group, cfg.moe.route_scale) == (4, 2, 1.5)
    assert max_err(hf, ds.eval(), tokens()) <= 1e-4


def test_v2_zero_masking_differs_only_in_zero_weight_picks(tmp_path):
    """transformers' V2 masks dropped groups with 0.0, the reference with -inf. With softmax
    scores they differ only when kept scores underflow to exactly 0: then transformers may pick
    a dropped-group expert, always with weight 0, so the layer output is the same."""
    path, hf = hf_v2(
        tmp_path, topk_method="group_limited_greedy", n_group=4, topk_group=1, num_experts_per_tok=2
    )
    _cfg, ds = load_hf_model(path)
    hf_moe, ds_moe = hf.model.layers[1].mlp, ds.layers[1].ffn
    x = torch.randn(5, 32)
    with torch.no_grad():  # expert 0 dominates by 300 logits: every other score underflows to 0
        w = torch.zeros(8, 32)
        w[0, 0], w[5, 0] = 300.0, 150.0
        hf_moe.gate.weight.copy_(w)
        ds_moe.router.weight.copy_(w)
        x[:, 0] = 1.0
        _, hf_w, hf_ids = hf_moe.gate(x)
        r = ds_moe.router(x)
        assert (r.ids_TK // 2 == 0).all()  # reference: only the kept group (experts 0, 1)
        assert torch.equal(r.weights_TK.sum(1), hf_w.sum(1))  # picks outside carry weight 0
        assert ((hf_ids // 2 != 0) <= (hf_w == 0)).all()
        assert torch.allclose(hf_moe(x[None]), ds_moe(x[None])[0], atol=1e-5)


def test_v2_norm_topk_prob_follows_reference(tmp_path):
    """transformers ignores norm_topk_prob for V2; the reference normalises the top-k weights
    (and then skips routed_scaling_factor). Logits differ from transformers, and the MoE layer
    equals transformers' experts run with the normalised weights."""
    path, hf = hf_v2(tmp_path, norm_topk_prob=True, routed_scaling_factor=3.0)
    cfg, ds = load_hf_model(path)
    assert cfg.moe.norm_topk_prob and cfg.moe.route_scale == 1.0
    assert max_err(hf, ds.eval(), tokens()) > 1e-3
    hf_moe, ds_moe = hf.model.layers[2].mlp, ds.layers[2].ffn
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        _, w, ids = hf_moe.gate(x)
        w = w / 3.0  # undo transformers' scaling; normalise as the reference does
        ref = hf_moe.experts(x[0], ids, w / w.sum(-1, keepdim=True)) + hf_moe.shared_experts(x[0])
        assert torch.allclose(ds_moe(x)[0][0], ref, atol=1e-5)


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, fname in weight_map(path).items():
        with safe_open(str(path / fname), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("flavor", ["v3", "v2"])
def test_round_trip_is_exact_and_transformers_loads_it(tmp_path, flavor):
    src, hf = (hf_v3 if flavor == "v3" else hf_v2)(tmp_path / "src")
    _cfg, ds = load_hf_model(src)
    save_hf_checkpoint(ds, tmp_path / "out", max_shard_bytes=30_000)
    a, b = _all_tensors(src), _all_tensors(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cls = hf.__class__
    back = cls.from_pretrained(tmp_path / "out").eval()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_mtp_round_trip(tmp_path):
    from deepsuite.config import load_config
    from deepsuite.models import DeepSeekLM
    from deepsuite.models.hf import hf_to_config

    src, _ = hf_v3(tmp_path / "src")
    cfg = hf_to_config(json.loads((src / "config.json").read_text()), mtp_depth=1)
    torch.manual_seed(3)
    model = DeepSeekLM(cfg)
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.expert_bias.normal_()
    save_hf_checkpoint(model, tmp_path / "out")
    names = set(weight_map(tmp_path / "out"))
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.norm.weight"} <= names
    cfg2, back = load_hf_model(tmp_path / "out")
    assert cfg2.model.mtp_depth == 1 and load_config is not None
    sa, sb = model.state_dict(), back.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # HF orders the MTP input as [emb; hidden]: the saved eh_proj has deepsuite's halves swapped
    eh = load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.3.eh_proj.weight"]
    assert torch.equal(eh[:, :32], model.mtp[0].proj.weight[:, 32:])
    _, no_mtp = load_hf_model(tmp_path / "out", mtp=False)
    assert len(no_mtp.mtp) == 0


def _rewrite_single(src: Path, dst: Path, drop: str | None, add: str | None) -> Path:
    tensors = _all_tensors(src)
    if drop:
        tensors.pop(drop)
    if add:
        tensors[add] = torch.zeros(2)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_and_unexpected_names_are_listed(tmp_path):
    src, _ = hf_v2(tmp_path / "src")
    gone = "model.layers.2.mlp.experts.5.up_proj.weight"
    bad = _rewrite_single(src, tmp_path / "bad", drop=gone, add="model.layers.1.mlp.extra.weight")
    _cfg, model = load_hf_model(src)
    with pytest.raises(HFCheckpointError, match=r"missing \(1\): " + gone.replace(".", r"\.")) as e:
        load_hf_weights(model, bad)
    assert "unexpected (1): model.layers.1.mlp.extra.weight" in str(e.value)


def test_architecture_mismatch_names_the_field(tmp_path):
    src, _ = hf_v2(tmp_path / "src")
    other, _ = hf_v2(tmp_path / "other", num_experts_per_tok=2)
    _, model = load_hf_model(src)
    with pytest.raises(HFCheckpointError, match=r"moe\.n_expert_per_token: model 3, checkpoint 2"):
        load_hf_weights(model, other)


def test_fp8_block_dequant_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 1.5, 2.0]])
    scale = torch.tensor([[2.0, 10.0], [0.5, 4.0]])  # blocks of 2 x 2 over a 3 x 3 weight
    w8 = w.to(torch.float8_e4m3fn)
    got = dequant_fp8(w8, scale, (2, 2))
    want = torch.tensor([[2.0, 4.0, 30.0], [8.0, 10.0, 60.0], [0.25, 0.75, 8.0]])
    assert torch.equal(got, want)


def test_fp8_checkpoint_loads(tmp_path):
    src, _hf = hf_v2(tmp_path / "src")
    tensors = _all_tensors(src)
    name = "model.layers.2.mlp.experts.1.gate_proj.weight"  # [16, 32]: 2 x 4 blocks of 8 x 8
    scale = torch.rand(2, 4) + 0.5
    w8 = (tensors[name] / scale.repeat_interleave(8, 0).repeat_interleave(8, 1)).to(
        torch.float8_e4m3fn
    )
    tensors[name], tensors[name + "_scale_inv"] = w8, scale
    dst = tmp_path / "fp8"
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    hf_cfg = json.loads((src / "config.json").read_text())
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [8, 8]}
    (dst / "config.json").write_text(json.dumps(hf_cfg))
    _, ds = load_hf_model(dst)
    got = ds.layers[2].ffn.experts.gate_proj[1]
    assert torch.equal(got, dequant_fp8(w8, scale, (8, 8)))
    assert (got - _all_tensors(src)[name]).abs().max() < 0.1 * _all_tensors(src)[name].abs().max()


def test_convert_cli_both_directions(tmp_path, capsys):
    src, _hf = hf_v3(tmp_path / "src")
    assert hf_main(["to-deepsuite", str(src), str(tmp_path / "ds")]) == 0
    assert (tmp_path / "ds" / "config.yaml").is_file()
    assert (
        hf_main(["to-hf", str(tmp_path / "ds"), str(tmp_path / "hf"), "--max-shard-size", "30KB"])
        == 0
    )
    a, b = _all_tensors(src), _all_tensors(tmp_path / "hf")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(set(weight_map(tmp_path / "hf").values())) > 1
    assert "wrote" in capsys.readouterr().out
