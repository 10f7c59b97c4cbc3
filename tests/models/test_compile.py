"""torch.compile of every transformer block (apply_compile): one graph per block kind, forward
and backward, no graph break (fullgraph=True), the same loss, gradients and balancing counts as
eager, also composed with activation checkpointing in either order. The graphs are traced with
the "aot_eager" backend (dynamo + AOT autograd, eager kernels): compile-cleanliness without the
minutes of CPU kernel generation; inductor's numerics are checked through the trainer
(tests/training/test_train.py) and by test_inductor_block_equals_eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

from deepsuite.data.loader import make_batch, model_inputs
from deepsuite.training.compile import apply_compile, compiled_blocks
from tests.models.test_model import small_model

STEP = ["model.mtp_depth=1", "moe.seq_aux_alpha=0.01"]


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (2, 17))
    docs = np.sort(rng.integers(0, 4, (2, 17)), axis=1)
    return model_inputs(make_batch(tokens, docs), "cpu", document_masking=True)


def _run(model: nn.Module, batches: list[dict]) -> dict:
    """Losses, gradients and token counts over a few forward+backward passes."""
    losses = []
    for b in batches:
        out = model(**b)
        out.loss.backward()
        losses.append(out.loss.detach())
    moe = model.moe_layers()
    return {
        "loss": torch.stack(losses),
        # by position: a checkpoint wrapper renames, never reorders, the parameters
        "grads": [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None],
        "counts": [m.tokens_per_expert.clone() for m in moe],
        "stats": [m.last_stats.counts_E.clone() for m in moe],
        "aux": [m.aux_loss.detach() for m in moe],
    }


def _assert_same(got: dict, ref: dict) -> None:
    torch.testing.assert_close(got["loss"], ref["loss"])
    assert len(got["grads"]) == len(ref["grads"])
    for (_, a), (name, b) in zip(got["grads"], ref["grads"], strict=True):
        torch.testing.assert_close(a, b, msg=name)
    for key in ("counts", "stats"):  # tokens counted once, also when a block is replayed
        for a, b in zip(got[key], ref[key], strict=True):
            assert torch.equal(a, b), key
    for a, b in zip(got["aux"], ref["aux"], strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class Checkpointed(nn.Module):
    """Activation checkpointing applied from outside, around one block (as a trainer's
    parallelize step does before compiling)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


def test_every_block_compiles_as_one_graph_forward_and_backward():
    """fullgraph=True: a graph break would raise. The dense block, the MoE block and the MTP
    module (norms, projection and a MoE block) are three graphs, reused by every block of their
    kind and across batches; the compiled model trains exactly like the eager one."""
    batches = [_batch(0), _batch(1)]
    ref = _run(small_model(*STEP), batches)
    model = small_model(*STEP)
    names = apply_compile(model, "aot_eager")
    assert names == ["layers.0", "layers.1", "layers.2", "mtp.0"]
    _assert_same(_run(model, batches), ref)
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("order", ["checkpoint_then_compile", "compile_inside_checkpoint"])
def test_compile_composes_with_activation_checkpointing(order):
    """Checkpointing wrapped around the blocks then compiled (torchtitan's order: the recompute
    is part of the compiled backward), or a compiled block recomputed by the model's own
    checkpoint: the same losses, gradients, and each token counted once for the balancing."""
    batches = [_batch(0), _batch(1)]
    ref = _run(small_model(*STEP), batches)
    if order == "checkpoint_then_compile":
        model = small_model(*STEP)
        for i, block in enumerate(model.layers):
            model.layers[i] = Checkpointed(block)
        model.mtp[0].block = Checkpointed(model.mtp[0].block)
    else:
        model = small_model(*STEP, "train.activation_checkpointing=full")
    apply_compile(model, "aot_eager")
    _assert_same(_run(model, batches), ref)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_apply_compile_keeps_parameter_names_and_rejects_bad_input():
    model = small_model(*STEP)
    keys = list(model.state_dict())
    apply_compile(model, "aot_eager")
    assert list(model.state_dict()) == keys
    assert [n for n, _ in compiled_blocks(model)] == ["layers.0", "layers.1", "layers.2", "mtp.0"]
    with pytest.raises(ValueError, match="backend"):
        apply_compile(model, "tensorrt")
    with pytest.raises(ValueError, match="transformer blocks"):
        apply_compile(nn.Linear(2, 2))


@pytest.mark.slow
def test_inductor_block_equals_eager():
    """Generated kernels (inductor, C++ on the CPU) for a MoE block, forward and backward."""
    model = small_model(*STEP)
    block = model.layers[1]
    b = _batch(0)
    x = torch.randn(2, 16, 32, requires_grad=True)
    for moe in model.moe_layers():
        moe.experts.use_grouped_mm = True  # what the compiled block runs
    y = block(x, b["attention_mask"], b["position_ids"])
    ref = torch.autograd.grad(y.square().sum(), [x, *block.parameters()])
    block.compile(fullgraph=True)
    yc = block(x, b["attention_mask"], b["position_ids"])
    got = torch.autograd.grad(yc.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
    for a, r in zip(got, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_capture_a_moe_block():
    """Static shapes and no host reads are what CUDA graphs need: inductor's cudagraph trees
    ("reduce-overhead") capture a MoE block, forward and backward, without skipping."""
    model = small_model(*STEP).cuda()
    block = model.layers[1]
    b = _batch(0)
    mask, pos = b["attention_mask"].cuda(), b["position_ids"].cuda()
    block.compile(mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # record, then replay
        x = torch.randn(2, 16, 32, device="cuda", requires_grad=True)
        block(x, mask, pos).square().sum().backward()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
