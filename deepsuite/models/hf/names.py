"""Every Hugging Face weight name of a DeepSeek-V2/V3 checkpoint, tied to its deepsuite tensor.

A :class:`Slot` says where one HF tensor lives in the (unsharded) deepsuite state dict:
``ds`` is the deepsuite key, ``expert`` the row of a stacked ``[E, ...]`` expert tensor, and
``kind`` how the values move:
  * ``copy``: the same tensor;
  * ``eh_proj``: the MTP projection. HF/vLLM order its input as [enorm(emb); hnorm(h)], deepsuite's
    ``MTPModule.proj`` as [hidden_norm(h); embed_norm(emb)]: the two input halves swap;
  * ``shared``: an HF copy of a tensor deepsuite shares (the MTP layer's embed_tokens and
    shared_head.head = the main embedding and head): written on save, checked on load (see
    ``io.py``). The MTP output norm (shared_head.norm) is the MTP module's own ``norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepsuite.config import ModelArgs

_ATTN_V3 = ("q_a_proj", "q_a_layernorm", "q_b_proj")
_ATTN_KV = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Slot:
    """One HF tensor: its name, the deepsuite key it maps to, expert row, and transfer kind."""

    hf: str
    ds: str
    expert: int | None = None
    kind: str = "copy"  # "copy" | "eh_proj" | "shared"


def _block(cfg: ModelArgs, hf: str, ds: str, moe: bool, *, v3: bool) -> list[Slot]:
    """Slots of one decoder block: HF prefix ``hf`` (model.layers.i.), deepsuite prefix ``ds``."""
    q = _ATTN_V3 if cfg.mla.q_lora_rank else ("q_proj",)
    out = [
        Slot(f"{hf}input_layernorm.weight", f"{ds}attn_norm.weight"),
        Slot(f"{hf}post_attention_layernorm.weight", f"{ds}ffn_norm.weight"),
    ]
    out += [Slot(f"{hf}self_attn.{n}.weight", f"{ds}attn.{n}.weight") for n in q + _ATTN_KV]
    if not moe:
        out += [Slot(f"{hf}mlp.{n}.weight", f"{ds}ffn.{n}.weight") for n in _MLP]
        return out
    out.append(Slot(f"{hf}mlp.gate.weight", f"{ds}ffn.router.weight"))
    if v3:
        out.append(Slot(f"{hf}mlp.gate.e_score_correction_bias", f"{ds}ffn.router.expert_bias"))
    for e in range(cfg.moe.n_routed_experts):
        out += [
            Slot(f"{hf}mlp.experts.{e}.{n}.weight", f"{ds}ffn.experts.{n}", expert=e) for n in _MLP
        ]
    if cfg.moe.n_shared_experts:
        out += [
            Slot(f"{hf}mlp.shared_experts.{n}.weight", f"{ds}ffn.shared_experts.{n}.weight")
            for n in _MLP
        ]
    return out


def hf_slots(cfg: ModelArgs, *, v3: bool = True) -> list[Slot]:
    """All slots of a checkpoint for ``cfg``, in HF order (embedding, layers, norm, head, MTP).

    ``v3`` adds the balancing bias (``gate.e_score_correction_bias``) of every MoE layer. MTP
    module k is HF layer ``n_layers + k`` (as in the DeepSeek-V3 release).
    """
    m = cfg.model
    slots = [Slot("model.embed_tokens.weight", "embed.weight")]
    for i in range(m.n_layers):
        moe = i >= m.n_dense_layers
        slots += _block(cfg, f"model.layers.{i}.", f"layers.{i}.", moe, v3=v3)
    slots.append(Slot("model.norm.weight", "norm.weight"))
    if not m.tie_embeddings:
        slots.append(Slot("lm_head.weight", "head.weight"))
    moe_mtp = m.n_dense_layers < m.n_layers
    for k in range(m.mtp_depth):
        hf, ds = f"model.layers.{m.n_layers + k}.", f"mtp.{k}."
        slots += [
            Slot(f"{hf}enorm.weight", f"{ds}embed_norm.weight"),
            Slot(f"{hf}hnorm.weight", f"{ds}hidden_norm.weight"),
            Slot(f"{hf}eh_proj.weight", f"{ds}proj.weight", kind="eh_proj"),
            Slot(f"{hf}embed_tokens.weight", "embed.weight", kind="shared"),
            Slot(f"{hf}shared_head.norm.weight", f"{ds}norm.weight"),
            Slot(f"{hf}shared_head.head.weight", "head.weight", kind="shared"),
        ]
        slots += _block(cfg, hf, f"{ds}block.", moe_mtp, v3=v3)
    return slots


def mtp_layers_present(names: set[str], n_layers: int) -> int:
    """How many consecutive HF layers past ``n_layers`` (MTP modules) have weights in ``names``."""
    k = 0
    while any(n.startswith(f"model.layers.{n_layers + k}.") for n in names):
        k += 1
    return k
