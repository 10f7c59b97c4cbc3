"""MLA's latent KV compression and the latent KV cache.

Legend: B batch, S new tokens, T cached tokens (keys), D model dim, C kv_lora_rank (latent),
R qk_rope_head_dim (shared rotary key).

Per token and layer MLA caches only the normalised latent c_KV (C values) and the shared rotary
key k_rope (R values): 512 + 64 = 576 for DeepSeek-V3, against 2 * H * d_h = 32768 for plain MHA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def compress_kv(
    x_BSD: Tensor, kv_a_proj_with_mqa: nn.Linear, kv_a_layernorm: nn.Module, kv_lora_rank: int
) -> tuple[Tensor, Tensor]:
    """Down-project x to ``[c_KV ; k_rope] = W_DKV x`` and normalise the latent.

    Returns c_KV (B, S, C) after RMSNorm and the *un-rotated* shared rope key (B, S, R).
    """
    kv_BSX = kv_a_proj_with_mqa(x_BSD)
    c_BSC, kr_BSR = kv_BSX.split([kv_lora_rank, kv_BSX.shape[-1] - kv_lora_rank], dim=-1)
    return kv_a_layernorm(c_BSC), kr_BSR


def mla_cache_values_per_token(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """Values MLA caches per token per layer: C + R (576 for DeepSeek-V3)."""
    return kv_lora_rank + qk_rope_head_dim


def mha_cache_values_per_token(n_heads: int, head_dim: int) -> int:
    """Values plain multi-head attention caches per token per layer: K and V, 2 * H * d_h."""
    return 2 * n_heads * head_dim


class LatentKVCache:
    """Per-layer cache of ``[c_KV ; rotated k_rope]`` rows in one (B, L, C + R) buffer.

    ``c_kv`` (B, L, C) and ``k_rope`` (B, L, R) are views of it; one buffer lets the absorbed decode
    path use the rows directly as its single key head, with no copy per step.
    Preallocated for ``max_len`` tokens, or growable (``max_len=None``: capacity doubles as needed).
    ``update`` writes S new tokens at ``[start_pos, start_pos + S)`` and returns the (B, T, C + R)
    rows of ``[0, start_pos + S)``. Positions past the write are forgotten (``length`` becomes
    ``start_pos + S``), so rewinding and re-decoding works.
    """

    def __init__(
        self,
        batch_size: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = {
            "batch_size": batch_size,
            "kv_lora_rank": kv_lora_rank,
            "qk_rope_head_dim": qk_rope_head_dim,
        }
        for name, v in sizes.items():
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None (growable), got {max_len!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.batch_size, self.kv_lora_rank, self.qk_rope_head_dim = (
            batch_size,
            kv_lora_rank,
            qk_rope_head_dim,
        )
        self.max_len, self.growable = max_len, max_len is None
        cap = max_len if max_len is not None else 16
        self.kv = torch.zeros(
            batch_size, cap, kv_lora_rank + qk_rope_head_dim, dtype=dtype, device=device
        )
        self.length = 0

    @property
    def c_kv(self) -> Tensor:
        """(B, L, C) view of the latents (whole capacity; the first ``length`` rows are valid)."""
        return self.kv[..., : self.kv_lora_rank]

    @property
    def k_rope(self) -> Tensor:
        """(B, L, R) view of the rotated shared rope keys."""
        return self.kv[..., self.kv_lora_rank :]

    @property
    def capacity(self) -> int:
        return self.kv.shape[1]

    @property
    def values_per_token(self) -> int:
        """C + R values per token (per batch row)."""
        return mla_cache_values_per_token(self.kv_lora_rank, self.qk_rope_head_dim)

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token (per batch row) at the cache dtype."""
        return self.values_per_token * self.kv.element_size()

    def nbytes(self) -> int:
        """Bytes held by the allocated buffer."""
        return self.kv.nbytes

    def reset(self) -> None:
        """Forget all tokens (keeps the allocation)."""
        self.length = 0

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        new = self.kv.new_zeros(self.batch_size, cap, self.kv.shape[2])
        new[:, : self.length] = self.kv[:, : self.length]
        self.kv = new

    def update(self, c_BSC: Tensor, kr_BSR: Tensor, start_pos: int) -> Tensor:
        """Write S tokens at ``start_pos``; return the (B, T, C + R) rows, T = start_pos + S."""
        S = c_BSC.shape[1] if c_BSC.dim() == 3 else -1
        if c_BSC.shape != (self.batch_size, S, self.kv_lora_rank):
            raise ValueError(
                f"c_kv must be ({self.batch_size}, S, {self.kv_lora_rank}), got {tuple(c_BSC.shape)}"
            )
        if kr_BSR.shape != (self.batch_size, S, self.qk_rope_head_dim):
            got = tuple(kr_BSR.shape)
            raise ValueError(
                f"k_rope must be ({self.batch_size}, {S}, {self.qk_rope_head_dim}), got {got}"
            )
        if not isinstance(start_pos, int) or not 0 <= start_pos <= self.length:
            raise ValueError(
                f"start_pos must be an int in [0, cached length {self.length}], got {start_pos!r}"
            )
        end = start_pos + S
        if end > self.capacity:
            if not self.growable:
                raise ValueError(
                    f"cache is full: writing up to position {end} > max_len={self.max_len}"
                )
            self._grow(end)
        self.kv[:, start_pos:end, : self.kv_lora_rank] = c_BSC.to(self.kv.dtype)
        self.kv[:, start_pos:end, self.kv_lora_rank :] = kr_BSR.to(self.kv.dtype)
        self.length = end
        return self.kv[:, :end]
