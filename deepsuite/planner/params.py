"""Closed-form parameter counts of a config, split the way the memory plan needs them.

Every term mirrors a module of ``deepsuite.models.DeepSeekLM`` (a test holds the sum equal to
the model built on the meta device). "Dense" parameters are replicated on every data-parallel
rank; "expert" parameters are the routed experts, sharded over the expert-parallel group.
Convention for "activated" (as ``deepsuite.models.params``): every dense parameter including the
embedding table and the head, plus ``n_expert_per_token`` routed experts per MoE layer; MTP is
reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepsuite.config import Config


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts (numbers of scalars, not bytes) of one config."""

    embed: int  # token embedding table V x D
    head: int  # output projection (0 when tied to the embedding)
    attention: int  # all MLA blocks of the main model (norms inside MLA included)
    dense_ffn: int  # SwiGLU FFNs of the leading dense blocks
    shared_experts: int  # all MoE layers' shared experts
    router: int  # all MoE layers' router weights
    routed_experts: int  # all MoE layers' routed experts (the expert-parallel part)
    norms: int  # block norms and the final norm
    mtp_dense: int  # MTP modules, non-routed part
    mtp_experts: int  # MTP modules, routed experts
    n_moe_layers: int  # in the main model
    activated_routed: int  # routed parameters one token uses in the main model

    @property
    def total(self) -> int:
        """Main model, MTP excluded (the report's 671B convention)."""
        return self.dense + self.routed_experts

    @property
    def dense(self) -> int:
        """Main-model parameters every data-parallel rank holds in full."""
        return (
            self.embed
            + self.head
            + self.attention
            + self.dense_ffn
            + self.shared_experts
            + self.router
            + self.norms
        )

    @property
    def activated(self) -> int:
        return self.dense + self.activated_routed

    @property
    def mtp(self) -> int:
        return self.mtp_dense + self.mtp_experts

    @property
    def all_dense(self) -> int:
        """Dense parameters the engine holds, MTP included."""
        return self.dense + self.mtp_dense

    @property
    def all_experts(self) -> int:
        """Routed-expert parameters the engine holds, MTP included."""
        return self.routed_experts + self.mtp_experts


def attention_params(cfg: Config) -> int:
    """One MLA block: q (direct or low-rank with its norm), kv_a, kv norm, kv_b, o."""
    D, H = cfg.model.dim, cfg.model.n_heads
    a = cfg.mla
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = D * H * qk  # direct query projection
    if a.q_lora_rank:  # low rank: down-projection, its norm, up-projection
        q = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk
    kv_a = D * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv_b = a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv_a + kv_b + H * a.v_head_dim * D


def moe_layer_params(cfg: Config) -> tuple[int, int, int]:
    """One DeepSeekMoE layer: (routed experts, shared experts, router)."""
    D, e = cfg.model.dim, cfg.moe
    routed = 3 * e.n_routed_experts * D * e.expert_intermediate_size
    shared = 3 * D * e.n_shared_experts * e.expert_intermediate_size
    return routed, shared, e.n_routed_experts * D


def param_breakdown(cfg: Config, vocab_size: int | None = None) -> ParamBreakdown:
    """Counts for ``cfg``; ``vocab_size`` replaces a 0 (tokenizer-defined) ``model.vocab_size``."""
    m = cfg.model
    V = vocab_size if vocab_size is not None else m.vocab_size
    if not isinstance(V, int) or V <= 0:
        raise ValueError(
            f"vocab_size: expected a positive int (model.vocab_size is {m.vocab_size}; pass the "
            f"tokenizer's size), got {V!r}"
        )
    D = m.dim
    n_moe = m.n_layers - m.n_dense_layers
    attn = attention_params(cfg)
    routed, shared, router = moe_layer_params(cfg)
    ffn = 3 * D * m.inter_dim
    per_expert = routed // cfg.moe.n_routed_experts
    if m.mtp_depth:
        moe_block = n_moe > 0
        block = 2 * D + attn + ((shared + router) if moe_block else ffn)
        # hidden_norm, embed_norm and the output norm, the [h; emb] projection, one block
        mtp_dense = m.mtp_depth * (3 * D + 2 * D * D + block)
        mtp_experts = m.mtp_depth * (routed if moe_block else 0)
    else:
        mtp_dense = mtp_experts = 0
    return ParamBreakdown(
        embed=V * D,
        head=0 if m.tie_embeddings else V * D,
        attention=m.n_layers * attn,
        dense_ffn=m.n_dense_layers * ffn,
        shared_experts=n_moe * shared,
        router=n_moe * router,
        routed_experts=n_moe * routed,
        norms=m.n_layers * 2 * D + D,
        mtp_dense=mtp_dense,
        mtp_experts=mtp_experts,
        n_moe_layers=n_moe,
        activated_routed=n_moe * cfg.moe.n_expert_per_token * per_expert,
    )
