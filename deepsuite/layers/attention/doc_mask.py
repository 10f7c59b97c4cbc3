"""Document masks for packed sequences: each token attends only to earlier tokens of its own
document. Two forms of the same mask, from per-token document ids doc_BS (B batch, S sequence):

* ``document_mask``: a dense boolean (B, 1, S, S) keep-mask (same document; the attention ANDs
  its causal mask in). Any attention kernel takes it; it costs S^2 bytes per row and the
  kernels read all of it. The reference.
* ``document_block_mask``: a FlexAttention ``BlockMask`` (same document AND causal), which
  records per 128 x 128 tile whether it is empty, full or partial: the fused kernel skips
  the empty tiles (across documents) and never reads a dense mask. ``MultiHeadLatentAttention``
  runs ``flex_attention`` when given one.

Where FlexAttention runs (torch 2.13): forward and backward on CUDA (the compiled kernel);
forward only on the CPU (there is no CPU backward, eager or compiled), so training on the CPU
uses the dense mask; ``flex_supported`` says which applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: dense masks only
    BlockMask = create_block_mask = flex_attention = None  # type: ignore[assignment,misc]

__all__ = ["BlockMask", "document_block_mask", "document_mask", "flex_supported"]


def flex_supported(device: torch.device | str, training: bool = True) -> bool:
    """Whether ``document_block_mask`` can replace the dense mask on ``device``."""
    if BlockMask is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and not training)


def _check(doc_BS: Tensor) -> None:
    if not isinstance(doc_BS, Tensor) or doc_BS.dim() != 2 or doc_BS.is_floating_point():
        got = f"{tuple(doc_BS.shape)} {doc_BS.dtype}" if isinstance(doc_BS, Tensor) else doc_BS
        raise ValueError(f"doc_BS: expected integer document ids of shape (B, S), got {got}")


def document_mask(doc_BS: Tensor) -> Tensor:
    """Dense boolean (B, 1, S, S): query i may see key j iff they are in the same document."""
    _check(doc_BS)
    return (doc_BS[:, :, None] == doc_BS[:, None, :]).unsqueeze(1)


def document_block_mask(doc_BS: Tensor) -> BlockMask:
    """FlexAttention block mask: query i sees key j iff same document and j <= i."""
    _check(doc_BS)
    if BlockMask is None:
        raise RuntimeError("document_block_mask needs torch.nn.attention.flex_attention")
    B, S = doc_BS.shape

    def same_doc_causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (doc_BS[b, q] == doc_BS[b, k]) & (k <= q)

    return create_block_mask(same_doc_causal, B, None, S, S, device=doc_BS.device)
