"""The assembled LM: parameter counts of the V3 shape, causality, losses, MTP alignment."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepsuite.config import load_config
from deepsuite.layers import DeepSeekMoE, SwiGLU
from deepsuite.models import IGNORE_INDEX, DeepSeekLM, count_model_parameters, count_parameters
from deepsuite.training.activation_checkpointing import apply_activation_checkpointing

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "model.vocab_size=64",
    "model.dim=32",
    "model.n_heads=2",
    "model.inter_dim=64",
    "model.n_layers=3",
    "mla.kv_lora_rank=16",
    "mla.qk_nope_head_dim=8",
    "mla.qk_rope_head_dim=4",
    "mla.v_head_dim=8",
    "moe.n_routed_experts=8",
    "moe.n_group=2",
    "moe.topk_group=1",
    "moe.expert_intermediate_size=16",
    "data.seq_len=16",
    "parallel.ep=1",
]


def small_model(*extra: str, seed: int = 0) -> DeepSeekLM:
    torch.manual_seed(seed)
    cfg = load_config(ROOT / "configs/tiny.yaml", [*SMALL, *extra])
    model = DeepSeekLM(cfg)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)  # as training does
    return model


def test_v3_671b_parameter_counts():
    """docs/formulas.md: 671B total; 37.5B activated counting embedding and head; MTP module ~11.6B
    (+ the shared embedding and head it reuses = 13.5B, the '14B' of the report)."""
    cfg = load_config(ROOT / "configs/deepseek_v3_671b.yaml")
    n = count_parameters(cfg)
    assert abs(n.total - 671.0e9) / 671.0e9 < 0.01
    assert abs(n.activated - 37.5e9) / 37.5e9 < 0.01
    dim, vocab = 7168, 129280
    # one MTP depth = MLA 187.1M + MoE 11.320B + proj 2D x D + norms, per docs/formulas.md's breakdown
    expected_mtp = 187.1e6 + 11.320e9 + 2 * dim * dim  # (+ 4 norms, negligible)
    assert abs(n.mtp - expected_mtp) / expected_mtp < 0.01
    assert abs(n.mtp + 2 * vocab * dim - 14e9) / 14e9 < 0.05


def test_counts_match_a_real_model():
    model = small_model()
    n = count_model_parameters(model)
    assert n.total == sum(p.numel() for p in model.parameters())
    moe = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    per_expert = sum(p[0].numel() for p in moe[0].experts.parameters())
    inactive = len(moe) * (8 - 2) * per_expert
    assert n.activated == n.total - inactive


def test_layout_dense_then_moe():
    model = small_model("model.n_dense_layers=1")
    assert isinstance(model.layers[0].ffn, SwiGLU)
    assert all(isinstance(b.ffn, DeepSeekMoE) for b in model.layers[1:])
    assert len(model.moe_layers()) == 2
    tied = small_model("model.tie_embeddings=true")
    assert tied.head.weight is tied.embed.weight


def test_loss_at_init_is_near_uniform_and_backward_reaches_everything():
    model = small_model()
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    out = model(ids, labels)
    assert out.logits.shape == (2, 16, 64)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.3
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # routed experts that received no token have zero grads but not None
    assert no_grad == []


def test_causal():
    model = small_model().eval()
    ids = torch.randint(0, 64, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_ignore_index_and_mtp_targets():
    model = small_model("model.mtp_depth=2", "model.mtp_loss_weight=0.5")
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    labels[:, -1] = IGNORE_INDEX
    out = model(ids, labels)
    # hand-computed MTP: depth k at position t sees emb(token t+k) and predicts token t+k+1
    with torch.no_grad():
        h = model.embed(ids)
        for layer in model.layers:
            h = layer(h)
        losses, target = [], labels
        for module in model.mtp:
            emb = model.embed(target.clamp_min(0))
            target = torch.cat([target[:, 1:], torch.full_like(target[:, :1], IGNORE_INDEX)], 1)
            h = module(h, emb)
            logits = model.head(module.norm(h))
            losses.append(
                F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
            )
    torch.testing.assert_close(out.mtp_loss, torch.stack(losses).mean())
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mtp_loss)


def test_moe_aux_losses_join_the_loss():
    model = small_model("moe.seq_aux_alpha=0.01")
    ids = torch.randint(0, 64, (2, 16))
    out = model(ids, ids)
    assert out.moe_aux_loss is not None and out.moe_aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.moe_aux_loss)


def test_document_masking_makes_a_packed_document_equal_to_itself_alone():
    """With data.document_masking the trainer gives the model a same-document causal mask and
    positions restarting per document: the logits of a document packed after another are then
    those of the document on its own (MoE routing is per token), and differ without it."""
    from deepsuite.data.loader import make_batch, model_inputs

    model = small_model("model.mtp_depth=1").eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 64, (7,), generator=g), torch.randint(0, 64, (10,), generator=g)
    row = torch.cat([a, b, torch.zeros(1, dtype=torch.int64)]).view(1, -1).numpy()
    docs = torch.tensor([0] * 7 + [1] * 11).view(1, -1).numpy()
    batch = make_batch(row, docs)
    with torch.no_grad():
        alone = model(b.view(1, -1)).logits[0]
        masked = model(**model_inputs(batch, "cpu", document_masking=True)).logits[0, 7:]
        plain = model(**model_inputs(batch, "cpu", document_masking=False)).logits[0, 7:]
    torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, alone, rtol=1e-3, atol=1e-3)
    model.train()  # the MTP depth takes the mask too
    out = model(**model_inputs(batch, "cpu", document_masking=True))
    assert out.mtp_loss is not None and torch.isfinite(out.loss)


def _saved_bytes(model: DeepSeekLM, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(loss, bytes of the distinct storages autograd saves outside checkpointed regions)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids).loss
    loss.backward()
    return loss.detach(), sum(seen.values())


def test_activation_checkpointing_same_loss_grads_and_counts_with_less_saved():
    """train.activation_checkpointing=full recomputes each block in backward: loss, gradients
    (aux loss included), routing counts and stats are those of the plain run, each token is
    counted once for the balancing bias, and what autograd keeps shrinks to the block inputs."""
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    for mode in ("none", "full"):
        model = small_model(
            "moe.seq_aux_alpha=0.01", "model.mtp_depth=1", f"train.activation_checkpointing={mode}"
        )
        loss, saved = _saved_bytes(model, ids)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        moe = model.moe_layers()
        runs[mode] = (loss, saved, grads, [m.tokens_per_expert.clone() for m in moe], moe)
    (l0, s0, g0, c0, m0), (l1, s1, g1, c1, m1) = runs["none"], runs["full"]
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys() and any("experts.gate_up_proj" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)
    for a, b in zip(c0, c1, strict=True):
        assert torch.equal(a, b) and int(a.sum()) == 4 * 16 * 2  # T x top-k, counted once
    assert len(c0) == 3  # two main MoE blocks and the MTP block's
    for a, b in zip(m0, m1, strict=True):
        assert torch.equal(a.last_stats.counts_E, b.last_stats.counts_E)
        assert b.aux_loss is not None and b.aux_loss.requires_grad
    assert s1 < s0 / 3, (s1, s0)
    model.eval()  # evaluation never checkpoints (no graph to save)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids).loss, l1)


def test_bad_input():
    model = small_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 16))
    with pytest.raises(ValueError, match="model.vocab_size"):
        DeepSeekLM(load_config(ROOT / "configs/tiny.yaml", ["parallel.ep=1"]))


AUX_YAML = """
model:
  aux_heads:
    - name: skip2
      layer: 1
      offset: 2
      weight: 0.5
      modules:
        - {type: LayerNorm, args: {normalized_shape: "@dim"}}
        - {type: HermiteExpansion, args: {in_features: "@dim", out_features: "@vocab", degree: 3}}
    - name: here
      layer: -1
      offset: 0
      weight: 0.25
      modules:
        - {type: Linear, args: {in_features: "@dim", out_features: "@vocab"}}
"""


def test_aux_heads_from_config(tmp_path):
    from deepsuite.layers import HermiteExpansion
    from deepsuite.models.aux_heads import token_targets

    path = tmp_path / "aux.yaml"
    path.write_text(AUX_YAML)
    cfg = load_config(path, SMALL)
    torch.manual_seed(0)
    model = DeepSeekLM(cfg)
    assert isinstance(model.aux_heads["skip2"][1], HermiteExpansion)
    ids = torch.randint(0, 64, (2, 16))
    labels = torch.cat([ids[:, 1:], torch.randint(0, 64, (2, 1))], dim=1)
    out = model(ids, labels)
    assert set(out.aux_losses) == {"skip2", "here"}
    torch.testing.assert_close(
        out.loss, out.lm_loss + 0.5 * out.aux_losses["skip2"] + 0.25 * out.aux_losses["here"]
    )
    # hand-computed: head on block 1's output, target = token two positions ahead
    with torch.no_grad():
        h = model.embed(ids)
        for layer in model.layers[:2]:
            h = layer(h)
        logits = model.aux_heads["skip2"](h)
        tokens = torch.cat([ids, labels[:, -1:]], dim=1)
        expect = F.cross_entropy(logits[:, :15].flatten(0, 1), tokens[:, 2:].flatten())
    torch.testing.assert_close(out.aux_losses["skip2"], expect)
    target = token_targets(ids, labels, 0)
    assert torch.equal(target, ids)
    assert (token_targets(ids, labels, -1)[:, 0] == IGNORE_INDEX).all()
    out.loss.backward()
    assert all(p.grad is not None for p in model.aux_heads["skip2"].parameters())
    assert model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.aux_heads=[{name: a, modules: [{type: NoSuchLayer}]}]", "modules[0].type"),
        (
            "model.aux_heads=[{name: a, layer: 9, modules: [{type: Linear}]}]",
            "model.aux_heads[a].layer",
        ),
        (
            "model.aux_heads=[{name: a, target: colour, modules: [{type: Linear}]}]",
            "model.aux_heads[a].target",
        ),
        ("model.aux_heads=[{name: a, modules: []}]", "model.aux_heads[a].modules"),
    ],
)
def test_aux_head_errors_name_the_field(override, fragment):
    from deepsuite.config import ConfigError

    with pytest.raises((ConfigError, ValueError)) as info:
        DeepSeekLM(load_config(ROOT / "configs/tiny.yaml", [*SMALL, override]))
    assert fragment in str(info.value)


def test_meta_build_then_materialize_equals_a_full_build():
    """A rank that holds experts [4, 8) of a layer, built on meta and sharded before allocating,
    gets exactly the values a full build with the same seed gives those experts."""
    cfg = load_config(ROOT / "configs/tiny.yaml", [*SMALL, "model.mtp_depth=1"])
    full = DeepSeekLM(cfg)
    full.reset_parameters(seed=7)
    from deepsuite.distributed.expert_shard import DeepSpeedMoEShard

    with torch.device("meta"):
        meta = DeepSeekLM(cfg)
    for moe in meta.moe_layers():  # what expert parallelism does on EP rank 1 of 2
        moe.experts = DeepSpeedMoEShard(moe.experts.slice_experts(4, 8), 8, 1, "ep_size_2")
    meta.materialize("cpu", seed=7)
    a = dict(full.named_parameters())
    for key, value in meta.named_parameters():
        if ".experts.local." in key:
            ref = a[key.replace(".experts.local.", ".experts.")][4:8]
        else:
            ref = a[key]
        assert torch.equal(value, ref), key
    for key, value in meta.named_buffers():
        assert torch.equal(value, dict(full.named_buffers())[key]), key
    assert not torch.equal(
        a["layers.1.ffn.experts.gate_up_proj"][0], a["layers.1.ffn.experts.gate_up_proj"][1]
    )
    other = DeepSeekLM(cfg)
    other.reset_parameters(seed=8)
    assert not torch.equal(other.embed.weight, full.embed.weight)
