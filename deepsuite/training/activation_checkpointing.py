"""Activation checkpointing, applied to a built model from outside (as expert parallelism is).

``train.activation_checkpointing=full`` keeps only each block's input during the forward and
recomputes the block, its all-to-alls included, in backward (non-reentrant
``torch.utils.checkpoint``). Main and MTP blocks alike are called through the model's
``call_block``; this module swaps in a checkpointing one. Parameter and module names do not
change (no wrapper module), so checkpoints, initialisation and HF names are those of a plain run.

The recomputation does not count tokens twice: a DeepSeekMoE running inside backward leaves its
balancing counts, statistics and losses to the first pass (``layers/moe/layer.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deepsuite.models.deepseek import DeepSeekLM, call_block

__all__ = ["MODES", "apply_activation_checkpointing", "call_block_checkpointed"]

MODES = ("none", "full")


def call_block_checkpointed(block: nn.Module, *args: Tensor | None) -> Tensor:
    """block(*args), recomputed in backward when training with gradients (else a plain call)."""
    if block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def apply_activation_checkpointing(model: DeepSeekLM, mode: str) -> None:
    """Make ``model`` call its blocks as ``mode`` says ("none": plainly, "full": checkpointed)."""
    if mode not in MODES:
        raise ValueError(
            f"train.activation_checkpointing: expected one of {list(MODES)}, got {mode!r}"
        )
    model.call_block = call_block_checkpointed if mode == "full" else call_block
