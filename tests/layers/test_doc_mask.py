"""Document masking through FlexAttention (a BlockMask from document ids) against the dense
(B, 1, S, S) mask it replaces: the same logits and losses, MTP included. torch 2.13 runs flex
attention's forward on the CPU (eager and compiled) but has no CPU backward: gradients are
compared on CUDA only (test_flex_gradients_equal_dense_on_cuda, run by benchmarks/gpu_run.sh)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from deepsuite.data.loader import make_batch, model_inputs
from deepsuite.layers.attention import MultiHeadLatentAttention
from deepsuite.layers.attention.doc_mask import (
    document_block_mask,
    document_mask,
    flex_supported,
)
from tests.models.test_model import small_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _batch(seed: int, device: str = "cpu", flex: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (2, 33))
    docs = np.sort(rng.integers(0, 5, (2, 33)), axis=1)  # 1-5 documents per row
    return model_inputs(make_batch(tokens, docs), device, document_masking=True, flex=flex)


def test_block_mask_is_the_dense_mask_with_causality():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 4, 4]])
    dense = document_mask(doc)[:, 0] & torch.ones(6, 6, dtype=torch.bool).tril()
    block = document_block_mask(doc).to_dense()  # (B, 1, S/128, S/128) tiles of 128 x 128
    assert dense.shape == (2, 6, 6) and block.shape == (2, 1, 1, 1)
    assert block.all()  # one partial tile per row: the kernel applies the mask_mod inside
    bm = document_block_mask(doc)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                keep = bm.mask_mod(
                    torch.tensor(b), torch.tensor(0), torch.tensor(q), torch.tensor(k)
                )
                assert bool(keep) == bool(dense[b, q, k]), (b, q, k)


def test_flex_forward_equals_dense_mask_mtp_included():
    """The whole model, eval and train mode (the MTP loss is computed in both), no gradient."""
    model = small_model("model.mtp_depth=1")
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            dense = model(**_batch(0))
            flex = model(**_batch(0, flex=True))
        torch.testing.assert_close(flex.logits, dense.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flex.mtp_loss, dense.mtp_loss)
        torch.testing.assert_close(flex.loss, dense.loss)


def test_compiled_blocks_take_the_block_mask_without_recompiling():
    """Each batch brings a new BlockMask (a new mask_mod closure): the compiled blocks reuse
    their graphs."""
    from torch._dynamo.utils import counters

    from deepsuite.training.compile import apply_compile

    torch._dynamo.reset()
    counters.clear()
    model = small_model("model.mtp_depth=1").eval()
    with torch.no_grad():
        want = [model(**_batch(s)).logits for s in range(3)]
        apply_compile(model, "aot_eager")
        got = [model(**_batch(s, flex=True)).logits for s in range(3)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 3 and not counters["recompiles"]
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_flex_attention_equals_dense_on_the_cpu():
    """torch 2.13's generated CPU flex kernel misreads a strided v (MLA's v is a view of
    kv_b_proj's output): the layer copies v first. Forward only (no CPU flex backward)."""
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(dim=64, n_heads=4, kv_lora_rank=32, qk_rope_head_dim=16)
    doc = torch.sort(torch.randint(0, 5, (2, 40)), dim=1)[0]
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        want = mla(x, document_mask(doc))
        torch._dynamo.reset()
        got = torch.compile(mla, fullgraph=True)(x, document_block_mask(doc))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_flex_support_and_bad_input():
    assert flex_supported("cuda") and not flex_supported("cpu")
    assert flex_supported("cpu", training=False)
    mla = MultiHeadLatentAttention(dim=32, n_heads=2, kv_lora_rank=16, qk_rope_head_dim=8)
    doc = torch.zeros(1, 8, dtype=torch.int64)
    x = torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match="without a cache"):
        mla(x, document_block_mask(doc), cache=mla.new_cache(1, 8))
    with pytest.raises(ValueError, match=r"expected shape \(B\|1, \*, 6, 6\)"):
        mla(x[:, :6], document_block_mask(doc))
    with pytest.raises(ValueError, match="doc_BS"):
        document_block_mask(doc.float())
    with pytest.raises(ValueError, match="doc_BS"):
        document_mask(doc[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x.requires_grad_()
        with pytest.raises(NotImplementedError, match="backward on CPU"):
            mla(x, document_block_mask(doc)).sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_gradients_equal_dense_on_cuda():
    """Forward and every gradient, MTP included, flex (compiled kernel) vs the dense mask."""
    model = small_model("model.mtp_depth=1", "moe.seq_aux_alpha=0.01").cuda()
    grads = {}
    for flex in (False, True):
        model.zero_grad()
        out = model(**_batch(0, "cuda", flex=flex))
        out.loss.backward()
        grads[flex] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (d, gd), (f, gf) = grads[False], grads[True]
    torch.testing.assert_close(f.loss, d.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.mtp_loss, d.mtp_loss, rtol=1e-4, atol=1e-5)
    for k in gd:
        torch.testing.assert_close(gf[k], gd[k], rtol=1e-3, atol=1e-4, msg=k)
