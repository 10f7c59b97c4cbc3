"""Attention layers: rotary embeddings, Multi-Head Latent Attention, the latent KV cache."""

from .kv_compression import (
    LatentKVCache,
    compress_kv,
    mha_cache_values_per_token,
    mla_cache_values_per_token,
)
from .mla import MultiHeadLatentAttention, attention_reference
from .rope import (
    RopeScaling,
    RotaryPositionEmbedding,
    rope_inv_freq,
    yarn_correction_range,
    yarn_get_mscale,
)

__all__ = [
    "LatentKVCache",
    "MultiHeadLatentAttention",
    "RopeScaling",
    "RotaryPositionEmbedding",
    "attention_reference",
    "compress_kv",
    "mha_cache_values_per_token",
    "mla_cache_values_per_token",
    "rope_inv_freq",
    "yarn_correction_range",
    "yarn_get_mscale",
]
