"""Host reads of a training step on one device, counted op by op (``HostSyncCounter``) exactly as
a GPU would make them: none on the device path (grouped GEMMs), one per MoE layer on the CPU's
loop path (its slices are sized on the host by design), one more per MoE layer with top-p (the
dispatch must learn how many slots are filled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepsuite.data.loader import make_batch, model_inputs
from deepsuite.host_sync import HostSyncCounter, cuda_syncs
from deepsuite.training.moe_stats import MoEStatsTracker
from tests.models.test_model import small_model

# MTP (its block is a MoE too), the sequence-wise balance loss, packed documents with the
# document mask and per-document positions: every branch a real step takes
STEP = ["model.mtp_depth=1", "moe.seq_aux_alpha=0.01"]


def _batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (2, 17))
    docs = np.sort(rng.integers(0, 4, (2, 17)), axis=1)
    return model_inputs(make_batch(tokens, docs), "cpu", document_masking=True)


def _step_reads(model, grouped: bool) -> HostSyncCounter:
    for moe in model.moe_layers():
        moe.experts.use_grouped_mm = grouped
    batch = _batch()
    with HostSyncCounter() as reads:
        model(**batch).loss.backward()
    return reads


def test_device_path_step_reads_nothing():
    model = small_model(*STEP)
    reads = _step_reads(model, grouped=True)
    assert reads.count == 0, reads.report()
    # the statistics were produced, on the device, without being read
    moe = model.moe_layers()[0]
    assert moe.last_stats is not None and moe.tokens_per_expert.sum() == 2 * 16 * 2


def test_loop_path_reads_once_per_moe_layer_in_the_experts():
    model = small_model(*STEP)
    n_moe = len(model.moe_layers())
    reads = _step_reads(model, grouped=False)
    assert reads.count == n_moe, reads.report()
    assert all("experts.py" in r.where and r.op == "Tensor.tolist" for r in reads.reads)


def test_top_p_reads_the_filled_slot_count_once_per_layer():
    model = small_model(*STEP, "moe.top_p=0.5")
    reads = _step_reads(model, grouped=True)
    assert reads.count == len(model.moe_layers()), reads.report()
    assert all("layers/moe/dispatch.py" in r.where for r in reads.reads)


def test_checkpointed_step_reads_nothing_and_counts_tokens_once():
    model = small_model(*STEP, "train.activation_checkpointing=full")
    assert _step_reads(model, grouped=True).count == 0
    assert model.moe_layers()[0].tokens_per_expert.sum() == 2 * 16 * 2


def test_bias_update_and_statistics_stay_on_the_device():
    """What the trainer does after the backward: move the bias by the counts and hand the
    statistics to the tracker; nothing is read until metrics are asked for."""
    model = small_model(*STEP)
    _step_reads(model, grouped=True)
    tracker = MoEStatsTracker(8, window=4)
    counts = [moe.tokens_per_expert.clone() for moe in model.moe_layers()]
    with HostSyncCounter() as reads:
        for i, (moe, c) in enumerate(zip(model.moe_layers(), counts, strict=True)):
            moe.update_bias(c, 0.01)
            stats = moe.last_stats
            tracker.update(
                i, c, moe.router.expert_bias, entropy=stats.entropy, seq_aux_loss=stats.seq_aux_loss
            )
    assert reads.count == 0, reads.report()
    with HostSyncCounter() as reads:
        metrics = tracker.metrics()
    assert reads.count == 1, reads.report()  # everything the tracker holds, in one transfer
    assert metrics["moe/layer0/load"] == counts[0].tolist()
    assert metrics["moe/layer0/bias"] == model.moe_layers()[0].router.expert_bias.tolist()
    assert metrics["moe/layer0/seq_aux_loss"] > 0


@pytest.mark.parametrize("empty", [True, False])
def test_update_bias_with_no_tokens_leaves_the_bias(empty):
    model = small_model(*STEP, "moe.bias_recenter=true")
    moe = model.moe_layers()[0]
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.linspace(0, 1, 8))
    before = moe.router.expert_bias.clone()
    counts = torch.zeros(8, dtype=torch.int64) if empty else torch.arange(8)
    moe.update_bias(counts, 0.01)
    assert torch.equal(moe.router.expert_bias, before) == empty


def test_top_p_switched_on_after_construction_is_refused():
    """Without top-p the layer's dispatcher takes N = T*K on trust; a router that could leave
    slots empty must come with a dispatcher that looks for them."""
    moe = small_model(*STEP).moe_layers()[0]
    moe.router.top_p = 0.5
    with pytest.raises(ValueError, match="empty_slots=True"):
        moe(torch.randn(4, 32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flex", [False, True])
def test_cuda_step_makes_no_synchronising_call(flex):
    """The driver's own view: ``set_sync_debug_mode`` warns on every synchronising CUDA call.
    A step of fp32 master weights under bf16 autocast (grouped GEMMs), the document mask dense
    or as a FlexAttention block mask, then the bias update: none."""
    model = small_model(*STEP).cuda()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (2, 17))
    docs = np.sort(rng.integers(0, 4, (2, 17)), axis=1)
    batch = model_inputs(make_batch(tokens, docs), "cuda", document_masking=True, flex=flex)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        for moe in model.moe_layers():
            moe.update_bias()

    step()  # warm-up: first-call compilation (flex) and allocations
    syncs = cuda_syncs(step)
    assert not syncs, syncs
