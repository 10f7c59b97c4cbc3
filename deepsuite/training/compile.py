"""torch.compile applied from outside the model, one transformer block at a time (torchtitan's
way): each block compiles once per kind (dense, MoE, MTP) and is reused by every block of that
kind, compile time stays bounded by the block, not the depth, and whatever else runs around the
blocks (embedding, loss, the DeepSpeed engine) stays eager.

``apply_compile(model)`` compiles every child of ``model.layers`` and ``model.mtp`` in place
(``nn.Module.compile``: parameter names and state-dict keys do not change). It composes with
activation checkpointing (``training/activation_checkpointing.py``), which changes how the model
calls its blocks, not the blocks: with ``train.activation_checkpointing=full`` the model calls
each compiled block through a checkpoint, which replays the compiled block in backward. A
checkpoint wrapped around a block as a module and compiled whole (torchtitan's order) gives the
same results too (both tested against eager).

On one device (``LocalDispatcher``) every block is one graph, forward and backward
(``fullgraph=True``: a graph break is an error). With expert parallelism each MoE layer's
dispatch -> experts -> combine runs eagerly, because the all-to-all's split sizes are read on
the host: one graph break per MoE layer (``DeepSeekMoE.forward``), the rest of the block
compiled.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsuite.layers.moe import DeepSeekMoE

__all__ = ["apply_compile", "compiled_blocks"]


def compiled_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules ``apply_compile`` compiles: children of ``model.layers`` and ``model.mtp``."""
    out = []
    for list_name in ("layers", "mtp"):
        blocks = getattr(model, list_name, None)
        if isinstance(blocks, nn.ModuleList):
            out += [(f"{list_name}.{i}", b) for i, b in blocks.named_children()]
    return out


def apply_compile(model: nn.Module, backend: str = "inductor") -> list[str]:
    """Compile every transformer block of ``model`` in place; returns their names.

    ``backend``: "inductor" (generated kernels) or "aot_eager" (traced forward and backward
    graphs run by eager kernels: checks compile-cleanliness quickly). Graph breaks are errors
    unless a MoE layer's dispatcher declares ``traceable = False`` (expert parallelism).
    """
    if backend not in ("inductor", "aot_eager"):
        raise ValueError(f"backend: expected 'inductor' or 'aot_eager', got {backend!r}")
    blocks = compiled_blocks(model)
    if not blocks:
        raise ValueError("model: expected transformer blocks in model.layers / model.mtp")
    moe = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    fullgraph = all(getattr(m.dispatcher, "traceable", True) for m in moe)
    # A checkpointed block's Python side effects (the MoE layers' last_stats / aux_loss) run once
    # in the compiled forward and are not replayed by the recomputation: what the eager layers
    # do too (they skip their bookkeeping while autograd recomputes them).
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if not fullgraph:
        # resume after the eager dispatch -> experts -> combine inside the MoE layer's own frame
        # instead of also splitting every frame that called it: one break per MoE layer, the
        # block in two graphs (without this, four graphs and three breaks)
        torch._dynamo.config.nested_graph_breaks = True
    for _, block in blocks:
        block.compile(backend=backend, fullgraph=fullgraph)
    return [name for name, _ in blocks]
