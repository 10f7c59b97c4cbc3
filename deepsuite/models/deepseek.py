"""A DeepSeek-V3-style decoder LM assembled from ``deepsuite.layers``.

Blocks are pre-norm: x + MLA(RMSNorm(x)), then x + FFN(RMSNorm(x)) where the FFN is a dense SwiGLU
for the first ``n_dense_layers`` blocks and DeepSeekMoE after. Optional multi-token prediction
(DeepSeek-V3 MTP): D sequential modules sharing the embedding and the output head, module k
predicting token t+k+1 from the depth-(k-1) hidden state and the embedding of token t+k.

Letters: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepsuite.config import ModelArgs
from deepsuite.layers.attention import (
    LatentKVCache,
    MultiHeadLatentAttention,
    RotaryPositionEmbedding,
)
from deepsuite.layers.mlp import SwiGLU
from deepsuite.layers.moe import DeepSeekMoE, GroupedExperts
from deepsuite.models.aux_heads import aux_head_loss, build_aux_head

IGNORE_INDEX = -100


def _generator(key: str, device: torch.device) -> torch.Generator:
    """A generator seeded by a stable hash of ``key`` (the same on every rank and run)."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))


def lm_cross_entropy(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    """Mean float32 cross-entropy over the positions that have a target (label != IGNORE_INDEX);
    0, not NaN, when none has one (a fine-tuning micro-batch of prompt tokens only)."""
    flat = labels_BS.reshape(-1)
    total = F.cross_entropy(
        logits_BSV.float().view(-1, logits_BSV.shape[-1]),
        flat,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (flat != IGNORE_INDEX).sum().clamp_min(1)


def build_attention(args: ModelArgs) -> MultiHeadLatentAttention:
    m, a = args.model, args.mla
    return MultiHeadLatentAttention(
        dim=m.dim,
        n_heads=m.n_heads,
        q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        max_seq_len=m.max_seq_len,
        rope_theta=a.rope_theta,
        rope_scaling=a.rope_scaling_dict(),
        norm_eps=m.norm_eps,
        rope_interleave=a.rope_interleave,
    )


def build_moe(args: ModelArgs) -> DeepSeekMoE:
    e = args.moe
    return DeepSeekMoE(
        d_model=args.model.dim,
        n_shared_experts=e.n_shared_experts,
        n_routed_experts=e.n_routed_experts,
        n_expert_per_token=e.n_expert_per_token,
        expert_intermediate_size=e.expert_intermediate_size,
        routing=e.routing(),
        balance=e.balance(),
    )


def call_block(block: nn.Module, *args: Tensor | None) -> Tensor:
    """How :class:`DeepSeekLM` calls a block unless training code swaps in another way (e.g.
    :func:`deepsuite.training.activation_checkpointing.apply_activation_checkpointing`)."""
    return block(*args)


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense SwiGLU or a DeepSeekMoE."""

    def __init__(self, args: ModelArgs, moe: bool) -> None:
        super().__init__()
        dim, eps = args.model.dim, args.model.norm_eps
        self.attn_norm = nn.RMSNorm(dim, eps=eps)
        self.attn = build_attention(args)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        self.ffn: nn.Module = build_moe(args) if moe else SwiGLU(dim, args.model.inter_dim)

    def forward(
        self,
        x_BSD: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
    ) -> Tensor:
        """With ``cache`` the attention writes this chunk's latents at ``start_pos`` and attends
        over everything cached (MLA's latent cache and absorbed decode; see ``generate.py``)."""
        a = self.attn(
            self.attn_norm(x_BSD),
            attention_mask,
            cache=cache,
            start_pos=start_pos,
            position_ids=position_ids,
        )
        x_BSD = x_BSD + a
        h = self.ffn_norm(x_BSD)
        out = self.ffn(h)
        if isinstance(out, tuple):  # DeepSeekMoE returns (output, router_logits)
            out = out[0]
        return x_BSD + out


class MTPModule(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth: h' = Block(W [RMSNorm(h); RMSNorm(emb)]).

    The embedding and output head are the main model's; the output norm is the module's own
    (``shared_head.norm`` in the DeepSeek-V3 release).
    """

    def __init__(self, args: ModelArgs, moe: bool) -> None:
        super().__init__()
        dim, eps = args.model.dim, args.model.norm_eps
        self.hidden_norm = nn.RMSNorm(dim, eps=eps)
        self.embed_norm = nn.RMSNorm(dim, eps=eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = Block(args, moe=moe)
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        h_BSD: Tensor,
        emb_BSD: Tensor,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        joined = torch.cat([self.hidden_norm(h_BSD), self.embed_norm(emb_BSD)], dim=-1)
        return self.block(self.proj(joined), attention_mask, position_ids)


@dataclass
class LMOutput:
    logits: Tensor  # (B, S, V)
    loss: Tensor | None = None  # total: lm + mtp + moe auxiliary losses
    lm_loss: Tensor | None = None
    mtp_loss: Tensor | None = None
    moe_aux_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # per auxiliary head, unweighted


class DeepSeekLM(nn.Module):
    """Decoder-only MoE language model with MLA attention and optional MTP.

    Built from the architecture sections only (``args.model``, ``args.mla``, ``args.moe``; a full
    Config is accepted and its other sections ignored). Training concerns are applied from
    outside, as expert parallelism is: blocks (main and MTP) are called through ``call_block``,
    which activation checkpointing replaces.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        m = args.model
        if m.vocab_size <= 0:
            raise ValueError(
                "model.vocab_size: expected a positive size (resolve 0 from the tokenizer first)"
            )
        self.args = ModelArgs(model=args.model, mla=args.mla, moe=args.moe)
        self.call_block: Callable[..., Tensor] = call_block
        self.embed = nn.Embedding(m.vocab_size, m.dim)
        self.layers = nn.ModuleList(
            Block(self.args, moe=i >= m.n_dense_layers) for i in range(m.n_layers)
        )
        self.norm = nn.RMSNorm(m.dim, eps=m.norm_eps)
        self.head = nn.Linear(m.dim, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        moe_mtp = m.n_dense_layers < m.n_layers
        self.mtp = nn.ModuleList(MTPModule(self.args, moe=moe_mtp) for _ in range(m.mtp_depth))
        self.aux_heads = nn.ModuleDict(
            {h.name: build_aux_head(h, m.dim, m.vocab_size) for h in m.aux_heads}
        )
        # block index -> heads reading its output (negative indices count from the end)
        self._aux_at = {h.layer % m.n_layers: [] for h in m.aux_heads}
        for h in m.aux_heads:
            self._aux_at[h.layer % m.n_layers].append(h)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights, output projections scaled by 1/sqrt(2 n_layers) (GPT-2),
        norm gains 1.

        Each tensor draws from its own generator, seeded by (seed, its unsharded name), and each
        routed expert by (seed, name, global expert id): a rank holding only a slice of the
        experts (built on the meta device and sharded before :meth:`materialize`) gets exactly
        the values one process gives them. ``seed`` defaults to a draw from torch's global RNG,
        so ``torch.manual_seed(s); DeepSeekLM(cfg)`` is reproducible. Auxiliary heads keep their
        layers' own initialisation.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())
        std = self.args.model.init_std
        out_std = std / math.sqrt(2 * self.args.model.n_layers)
        # the routed experts of each MoE layer, wrapped by expert parallelism or not, are named
        # as in the unsharded model: '<layer>.experts.<weight>'
        experts_name = {
            id(m): f"{name}.experts"
            for name, moe in self.named_modules()
            if isinstance(moe, DeepSeekMoE)
            for m in moe.experts.modules()
            if isinstance(m, GroupedExperts)
        }
        for mod_name, module in self.named_modules():
            if mod_name.startswith("aux_heads"):
                continue
            for p_name, p in module.named_parameters(recurse=False):
                if p.is_meta:
                    continue
                name = f"{experts_name.get(id(module), mod_name)}.{p_name}"
                if p.dim() == 1:  # norm gains
                    p.fill_(1.0)
                    continue
                sd = (
                    out_std
                    if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                    else std
                )
                if isinstance(module, GroupedExperts):  # one stream per GLOBAL expert it holds
                    for i in range(p.shape[0]):
                        key = f"{seed}/{name}/{module.first_expert + i}"
                        p[i].normal_(0.0, sd, generator=_generator(key, p.device))
                else:
                    p.normal_(0.0, sd, generator=_generator(f"{seed}/{name}", p.device))

    @torch.no_grad()
    def allocate(self, device: torch.device | str) -> None:
        """Give a model built on the meta device (experts possibly sharded already) storage on
        ``device``, uninitialised except its buffers (rope tables, zero balancing bias and
        counters): for weights about to be loaded from a checkpoint."""
        self.to_empty(device=device)
        for m in self.modules():
            if isinstance(m, RotaryPositionEmbedding):
                m.reset_parameters()  # the non-persistent inv_freq buffer
        for moe in self.moe_layers():
            moe.router.expert_bias.zero_()
            moe.tokens_per_expert.zero_()

    @torch.no_grad()
    def materialize(self, device: torch.device | str, seed: int) -> None:
        """Allocate a model built on the meta device (experts possibly sharded already) on
        ``device`` and initialise it exactly as a full build with the same seed would be."""
        self.allocate(device)
        torch.manual_seed(seed)
        for head in self.aux_heads.values():
            for m in head.modules():
                if m is not head and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.reset_parameters(seed)

    def moe_layers(self) -> list[DeepSeekMoE]:
        """Every DeepSeekMoE in the model (main blocks first, then MTP blocks), in a fixed order."""
        return [m for m in self.modules() if isinstance(m, DeepSeekMoE)]

    def new_caches(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None
    ) -> list[LatentKVCache]:
        """One empty MLA latent cache per block (C + R values per token), for ``forward_cached``."""
        return [b.attn.new_cache(batch_size, max_len, dtype=dtype) for b in self.layers]

    def forward_cached(
        self,
        input_ids: Tensor,
        caches: list[LatentKVCache],
        start_pos: int,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Inference on a chunk of new tokens (B, S) at cache position ``start_pos``: every block
        writes its latents to its cache and attends over all cached tokens (the absorbed path for
        short chunks). ``attention_mask`` (B, start_pos + S) marks real keys (left padding off).
        Returns the float32 logits (B, V) of the chunk's last position only."""
        if len(caches) != len(self.layers):
            raise ValueError(
                f"caches: expected {len(self.layers)} (one per block), got {len(caches)}"
            )
        h_BSD = self.embed(input_ids)
        for layer, cache in zip(self.layers, caches, strict=True):
            h_BSD = layer(h_BSD, attention_mask, position_ids, cache=cache, start_pos=start_pos)
        return self.head(self.norm(h_BSD[:, -1])).float()

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> LMOutput:
        """input_ids (B, S) int64; labels (B, S) with IGNORE_INDEX for positions without a target."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids: expected an integer (batch, seq) tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        emb_BSD = self.embed(input_ids)
        h_BSD = emb_BSD
        aux_losses: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            h_BSD = self.call_block(layer, h_BSD, attention_mask, position_ids)
            if labels is not None:
                for head_cfg in self._aux_at.get(i, ()):
                    head = self.aux_heads[head_cfg.name]
                    aux_losses[head_cfg.name] = aux_head_loss(
                        head, head_cfg, h_BSD, input_ids, labels
                    )
        logits = self.head(self.norm(h_BSD))
        if labels is None:
            return LMOutput(logits=logits)

        lm_loss = lm_cross_entropy(logits, labels)
        total = lm_loss
        mtp_loss = None
        if len(self.mtp):
            mtp_loss = self._mtp_loss(h_BSD, emb_BSD, labels, position_ids, attention_mask)
            total = total + self.args.model.mtp_loss_weight * mtp_loss
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        moe_aux = torch.stack(aux).sum() if aux else None
        if moe_aux is not None:
            total = total + moe_aux
        for head_cfg in self.args.model.aux_heads:
            total = total + head_cfg.weight * aux_losses[head_cfg.name]
        return LMOutput(
            logits=logits,
            loss=total,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            moe_aux_loss=moe_aux,
            aux_losses=aux_losses,
        )

    def _mtp_loss(
        self,
        h_BSD: Tensor,
        emb_BSD: Tensor,
        labels: Tensor,
        position_ids: Tensor | None,
        attention_mask: Tensor | None,
    ) -> Tensor:
        """Mean over depths k of the cross-entropy for token t+k+1 (labels are already t+1)."""
        losses = []
        ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
        target = labels
        for module in self.mtp:
            # depth k sees the embedding of token t+k (the previous depth's target) and predicts t+k+1
            next_emb = self.embed(target.clamp_min(0))
            target = torch.cat([target[:, 1:], ignore], dim=1)
            h_BSD = self.call_block(module, h_BSD, next_emb, position_ids, attention_mask)
            losses.append(lm_cross_entropy(self.head(module.norm(h_BSD)), target))
        return torch.stack(losses).mean()
