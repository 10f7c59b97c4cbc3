"""Multi-Head Latent Attention (DeepSeek-V2/V3) with a latent KV cache and absorbed decoding.

Legend: B batch, S query tokens, T key tokens, D model dim, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, Q q_lora_rank.

Math (docs/formulas.md, "Multi-head latent attention"): q = W_UQ RMSNorm(W_DQ x) (or q = W_Q x when Q = 0), split per head into
[q_nope (N) ; q_rope (R)]; [c_KV (C) ; k_rope (R)] = W_DKV x with c_KV RMSNorm'd and k_rope shared
by all heads; per head k = [W_UK c_KV ; k_rope], v = W_UV c_KV. Two ways to attend:
  * naive (reference, training): materialise K (B,H,T,N+R) and V (B,H,T,V), then attention;
  * absorbed (decoding): fold W_UK into the query and W_UV into the output, so attention runs as
    multi-query attention over the cached (C + R)-dim latents and never expands K/V.
Submodule names mirror Hugging Face's DeepseekV3Attention for checkpoint mapping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .doc_mask import BlockMask, flex_attention
from .kv_compression import LatentKVCache, compress_kv, mla_cache_values_per_token
from .rope import RotaryPositionEmbedding

_FLEX: list = []  # flex_attention compiled once, on first use (eager calls on CUDA)


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, scale: float) -> Tensor:
    """flex_attention as a fused kernel: inside a compiled block torch.compile traces it; called
    eagerly on CUDA it goes through one compiled wrapper (torchtitan does the same); eagerly on
    the CPU (forward only) it is torch's unfused reference."""
    # v arrives as a strided view (a split of kv_b_proj's output); torch 2.13's compiled CPU
    # flex kernel reads such a v wrongly (errors of O(1), seen on the CPU), so it is copied
    # first, on every device (the copy is one pass over V, small next to the attention)
    v = v.contiguous()
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if not _FLEX:
            _FLEX.append(torch.compile(flex_attention))
        fn = _FLEX[0]
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def _pick(seed_name: str, seed_val: object, ds_name: str, ds_val: object) -> object:
    if seed_val is not None and ds_val is not None and seed_val != ds_val:
        raise ValueError(
            f"{seed_name}={seed_val!r} and {ds_name}={ds_val!r} name the same size; give one"
        )
    return ds_val if ds_val is not None else seed_val


def _positive(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def attention_reference(
    q_BHSE: Tensor,
    k_BHTE: Tensor,
    v_BHTV: Tensor,
    mask_BHST: Tensor | None,
    scale: float,
    dropout: float = 0.0,
) -> Tensor:
    """Explicit softmax(q k^T * scale) v in float32 or wider; k/v may have 1 head; mask True = keep."""
    ft = torch.promote_types(q_BHSE.dtype, torch.float32)
    s = torch.matmul(q_BHSE.to(ft), k_BHTE.to(ft).transpose(-1, -2)) * scale
    if mask_BHST is not None:
        s = s.masked_fill(~mask_BHST, float("-inf"))
    p = F.dropout(s.softmax(dim=-1), p=dropout) if dropout else s.softmax(dim=-1)
    return torch.matmul(p, v_BHTV.to(ft)).to(q_BHSE.dtype)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3 Multi-Head Latent Attention.

    Seed names ``d, n_h, d_h_c, d_h_r`` equal ``dim, n_heads, kv_lora_rank, qk_rope_head_dim``;
    giving both twins with different values is an error. ``qk_nope_head_dim`` and ``v_head_dim``
    default to ``dim // n_heads``; ``qk_rope_head_dim`` to 64. ``q_lora_rank`` 0 (or None) means no
    query compression (V2-Lite). ``rope_scaling`` is a Hugging Face-style dict (see ``rope.py``);
    YaRN multiplies the softmax scale by mscale^2. ``rope_interleave`` picks the DeepSeek
    (interleaved, default) or rotate-half layout of the rope dims.

    ``forward(x, attention_mask)`` maps (B, S, dim) to (B, S, dim). Without a cache it runs the
    naive path; with ``cache=`` (see ``new_cache``) it writes the latents at
    ``[start_pos, start_pos + S)`` and attends over ``[0, start_pos + S)`` with the absorbed path.
    """

    def __init__(
        self,
        d: int | None = None,
        n_h: int | None = None,
        d_h_c: int | None = None,
        d_h_r: int | None = None,
        *,
        dim: int | None = None,
        n_heads: int | None = None,
        q_lora_rank: int | None = 0,
        kv_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        max_seq_len: int = 4096,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        norm_eps: float = 1e-6,
        causal: bool = True,
        dropout: float = 0.0,
        rope_interleave: bool = True,
    ) -> None:
        super().__init__()
        dim = _positive("dim (d)", _pick("d", d, "dim", dim))
        n_heads = _positive("n_heads (n_h)", _pick("n_h", n_h, "n_heads", n_heads))
        kv_lora_rank = _pick("d_h_c", d_h_c, "kv_lora_rank", kv_lora_rank)
        if kv_lora_rank is None:
            raise ValueError("kv_lora_rank (d_h_c), the latent KV size, is required")
        self.kv_lora_rank = _positive("kv_lora_rank (d_h_c)", kv_lora_rank)
        rope_dim = _pick("d_h_r", d_h_r, "qk_rope_head_dim", qk_rope_head_dim)
        self.qk_rope_head_dim = _positive(
            "qk_rope_head_dim (d_h_r)", 64 if rope_dim is None else rope_dim
        )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim (d_h_r) must be even, got {self.qk_rope_head_dim}")
        if (qk_nope_head_dim is None or v_head_dim is None) and dim % n_heads:
            raise ValueError(
                f"dim={dim} is not divisible by n_heads={n_heads}; give qk_nope_head_dim and v_head_dim"
            )
        self.qk_nope_head_dim = _positive("qk_nope_head_dim", qk_nope_head_dim or dim // n_heads)
        self.v_head_dim = _positive("v_head_dim", v_head_dim or dim // n_heads)
        q_lora_rank = 0 if q_lora_rank is None else q_lora_rank
        if isinstance(q_lora_rank, bool) or not isinstance(q_lora_rank, int) or q_lora_rank < 0:
            raise ValueError(
                f"q_lora_rank must be an int >= 0 (0 = no query compression), got {q_lora_rank!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.n_heads, self.q_lora_rank = dim, n_heads, q_lora_rank
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.causal, self.dropout, self.use_sdpa = bool(causal), float(dropout), True
        self.absorb_max_query_len = 64  # see forward's ``absorb``
        H, N, R, V, C = (
            n_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            kv_lora_rank,
        )

        if q_lora_rank == 0:
            self.q_proj = nn.Linear(dim, H * (N + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, H * (N + R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, C + R, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(C, eps=norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (N + V), bias=False)
        self.o_proj = nn.Linear(H * V, dim, bias=False)
        self.rope = RotaryPositionEmbedding(
            R, max_seq_len, rope_theta, interleaved=rope_interleave, scaling=rope_scaling
        )
        self.softmax_scale = self.qk_head_dim**-0.5 * self.rope.softmax_scale_factor

    def reset_parameters(self) -> None:
        """Re-initialise weights and the rope buffer (e.g. after ``to_empty`` from the meta device)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    @property
    def cache_values_per_token(self) -> int:
        """Values cached per token: kv_lora_rank + qk_rope_head_dim (576 for DeepSeek-V3)."""
        return mla_cache_values_per_token(self.kv_lora_rank, self.qk_rope_head_dim)

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> LatentKVCache:
        """An empty cache for this layer (preallocated for ``max_len``, growable if None)."""
        w = self.kv_a_proj_with_mqa.weight
        return LatentKVCache(
            batch_size, self.kv_lora_rank, self.qk_rope_head_dim, max_len,
            dtype=dtype or w.dtype, device=device or w.device,
        )  # fmt: skip

    # ---- masks -------------------------------------------------------------------------------
    def _mask(
        self, attention_mask: Tensor | None, B: int, S: int, T: int, offset: int, device
    ) -> Tensor | None:
        """Boolean keep-mask broadcastable to (B, H, S, T), or None when every key is visible."""
        mask = None
        if self.causal and not (S == 1 and offset + S == T):
            i = torch.arange(S, device=device).unsqueeze(1) + offset
            mask = (torch.arange(T, device=device).unsqueeze(0) <= i).view(1, 1, S, T)  # no B copy
        if attention_mask is None:
            return mask
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                "attention_mask must be a tensor (B, T) padding mask or a boolean (B, 1|H, S, T) mask"
            )
        am = attention_mask.to(device)
        if am.dim() == 2:
            if am.shape != (B, T):
                raise ValueError(
                    f"padding attention_mask must have shape ({B}, {T}) (keys), got {tuple(am.shape)}"
                )
            am = (am != 0).view(B, 1, 1, T)
        elif am.dim() == 4:
            if am.dtype != torch.bool:
                raise TypeError(
                    f"a 4-D attention_mask must be boolean (True = attend), got {am.dtype}"
                )
            if (
                am.shape[0] not in (1, B)
                or am.shape[1] not in (1, self.n_heads)
                or am.shape[2:] != (S, T)
            ):
                raise ValueError(
                    f"4-D attention_mask must be (B|1, 1|{self.n_heads}, {S}, {T}), got {tuple(am.shape)}"
                )
        else:
            raise ValueError(
                f"attention_mask must be 2-D (B, T) or 4-D (B, 1|H, S, T), got {am.dim()}-D"
            )
        return am if mask is None else mask & am

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, padded: bool) -> Tensor:
        """Attention on (B, H, S, E) q, (B, H, T, E) k and (B, H, T, V) v -> (B, H, S, V)."""
        p = self.dropout if self.training else 0.0
        dead = None
        if padded and mask is not None:  # a causal mask alone never hides a whole row
            # rows with no visible key (e.g. left padding) would be NaN: attend anywhere, then zero
            dead = ~mask.any(dim=-1, keepdim=True)
            mask = mask | dead
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, scale=self.softmax_scale
            )
        else:
            o = attention_reference(q, k, v, mask, self.softmax_scale, p)
        return o if dead is None else o.masked_fill(dead, 0.0)

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        x_BSD: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: LatentKVCache | None = None,
        start_pos: int = 0,
        position_ids: Tensor | None = None,
        absorb: bool | None = None,
    ) -> Tensor:
        """(B, S, dim) -> (B, S, dim).

        attention_mask: None, a (B, T) padding mask over the keys (1/True = keep; T = S without a
        cache, start_pos + S with one), a boolean (B|1, 1|H, S, T) mask (ANDed with causal), or
        a FlexAttention ``BlockMask`` (e.g. ``document_block_mask``; it replaces the whole mask,
        causality included), attended by ``flex_attention`` (no cache, no dropout).
        cache: a ``LatentKVCache``; writes at ``start_pos`` and attends over ``[0, start_pos + S)``.
        position_ids: rope positions (S,) or (B, S); default ``start_pos + arange(S)``.
        absorb: force the absorbed (True) or naive (False) path; default: absorbed when a cache is
            given and S <= ``absorb_max_query_len`` (64): decoding steps and short chunks. Long
            chunks (prefill) run naive over the cached latents: expanding K/V once is cheaper than
            ~3.4x wider per-head scores, and the absorbed fold would need an (H*S, T) mask.
        """
        if not isinstance(x_BSD, Tensor) or x_BSD.dim() != 3 or x_BSD.shape[-1] != self.dim:
            got = tuple(x_BSD.shape) if isinstance(x_BSD, Tensor) else type(x_BSD).__name__
            raise ValueError(f"x must be (batch, seq_len, {self.dim}), got {got}")
        w = self.kv_a_proj_with_mqa.weight
        if x_BSD.dtype != w.dtype:
            raise TypeError(
                f"x dtype {x_BSD.dtype} does not match the layer's parameter dtype {w.dtype}"
            )
        B, S, _ = x_BSD.shape
        H, N, R = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if absorb is None:
            absorb = cache is not None and self.absorb_max_query_len >= S
        flex = BlockMask is not None and isinstance(attention_mask, BlockMask)
        if flex:
            self._check_block_mask(attention_mask, B, S, cache, absorb)
        padded = attention_mask is not None and not flex

        if self.q_lora_rank == 0:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope_BSHN, q_pe_BSHR = q.view(B, S, H, N + R).split([N, R], dim=-1)
        c_BSC, kr_BSR = compress_kv(
            x_BSD, self.kv_a_proj_with_mqa, self.kv_a_layernorm, self.kv_lora_rank
        )

        cos, sin = self.rope.cos_sin(self.rope.positions(B, S, start_pos, position_ids))
        q_pe_BSHR = self.rope.rotate(q_pe_BSHR, cos, sin)
        kr_BSR = self.rope.rotate(kr_BSR.unsqueeze(2), cos, sin).squeeze(2)

        kv_BTE = None  # the cache's [c_KV ; k_rope] rows, the absorbed path's single key head
        if cache is not None:
            kv_BTE = cache.update(c_BSC, kr_BSR, start_pos).to(x_BSD.dtype)
            c_BTC, kr_BTR = kv_BTE[..., : self.kv_lora_rank], kv_BTE[..., self.kv_lora_rank :]
            offset = start_pos
        else:
            c_BTC, kr_BTR, offset = c_BSC, kr_BSR, 0
        T = c_BTC.shape[1]
        mask = attention_mask if flex else self._mask(attention_mask, B, S, T, offset, x_BSD.device)
        if absorb:
            o_BSHV = self._absorbed(q_nope_BSHN, q_pe_BSHR, c_BTC, kr_BTR, mask, padded, kv_BTE)
        else:
            o_BSHV = self._naive(q_nope_BSHN, q_pe_BSHR, c_BTC, kr_BTR, mask, padded)
        return self.o_proj(o_BSHV.flatten(2))

    def _w_kv_b(self) -> tuple[Tensor, Tensor]:
        """W_UK (H, N, C) and W_UV (H, V, C) as views of kv_b_proj.weight."""
        w_HXC = self.kv_b_proj.weight.view(
            self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        return w_HXC.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def _check_block_mask(self, bm: BlockMask, B: int, S: int, cache, absorb: bool) -> None:
        if cache is not None or absorb:
            raise ValueError("a BlockMask attention_mask works without a cache (training, prefill)")
        if self.dropout and self.training:
            raise ValueError("a BlockMask attention_mask needs dropout 0 (flex_attention has none)")
        if bm.shape[0] not in (1, B) or tuple(bm.shape[-2:]) != (S, S):
            raise ValueError(
                f"BlockMask attention_mask: expected shape (B|1, *, {S}, {S}), got {tuple(bm.shape)}"
            )

    def _naive(self, q_nope_BSHN, q_pe_BSHR, c_BTC, kr_BTR, mask, padded) -> Tensor:
        """Reference: expand the latents to per-head K/V, then attention (``mask`` may be a
        FlexAttention BlockMask)."""
        B, T, H = c_BTC.shape[0], c_BTC.shape[1], self.n_heads
        kv_BTHX = self.kv_b_proj(c_BTC).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope_BTHN, v_BTHV = kv_BTHX.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_BTHE = torch.cat((k_nope_BTHN, kr_BTR.unsqueeze(2).expand(-1, -1, H, -1)), dim=-1)
        q_BSHE = torch.cat((q_nope_BSHN, q_pe_BSHR), dim=-1)
        q, k, v = q_BSHE.transpose(1, 2), k_BTHE.transpose(1, 2), v_BTHV.transpose(1, 2)
        if BlockMask is not None and isinstance(mask, BlockMask):
            o = _flex_attention(q, k, v, mask, self.softmax_scale)
        elif self.use_sdpa and self.causal and not padded and q.shape[2] == T > 1:
            # plain causal self-attention: let SDPA pick a flash kernel instead of reading a mask
            p = self.dropout if self.training else 0.0
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale
            )
        else:
            o = self._attend(q, k, v, mask, padded)
        return o.transpose(1, 2)  # (B, S, H, V)

    def _absorbed(self, q_nope_BSHN, q_pe_BSHR, c_BTC, kr_BTR, mask, padded, kv_BTE=None) -> Tensor:
        """Fold W_UK into q and W_UV into the output: multi-query attention over (C + R) latents.

        The single shared K/V head lets all H*S query rows attend as one head (as FlashMLA does);
        torch's CPU SDPA with ``enable_gqa`` was ~30x slower than this fold.
        """
        B, S, H = q_nope_BSHN.shape[:3]
        T = c_BTC.shape[1]
        w_uk_HNC, w_uv_HVC = self._w_kv_b()
        q_lat_BHSC = torch.einsum("bshn,hnc->bhsc", q_nope_BSHN, w_uk_HNC)
        q_B1XE = torch.cat((q_lat_BHSC, q_pe_BSHR.transpose(1, 2)), dim=-1).reshape(B, 1, H * S, -1)
        if kv_BTE is None:
            kv_BTE = torch.cat((c_BTC, kr_BTR), dim=-1)
        if mask is not None:
            mask = mask.expand(mask.shape[0], H, S, T).reshape(mask.shape[0], 1, H * S, T)
        o_lat_B1XC = self._attend(q_B1XE, kv_BTE.unsqueeze(1), c_BTC.unsqueeze(1), mask, padded)
        return torch.einsum("bhsc,hvc->bshv", o_lat_B1XC.view(B, H, S, -1), w_uv_HVC)
