"""Expert parallelism on 2 real gloo ranks: exactly one host read per MoE layer per forward (the
all-to-all's split sizes, counts and rows read together), none in backward, one more per layer
when activation checkpointing replays the forward; under torch.compile, exactly one graph break
per MoE layer; and each rank's loss and gradients those of one process on the same batch."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed.launch import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _worker(rank: int, world: int, ckpt: str) -> dict:
    from deepsuite.distributed import setup_expert_parallel
    from deepsuite.distributed.expert_parallel import apply_expert_parallel
    from deepsuite.host_sync import HostSyncCounter
    from deepsuite.training.compile import apply_compile
    from tests.models.test_host_reads import STEP, _batch
    from tests.models.test_model import small_model

    model = small_model(*STEP, f"train.activation_checkpointing={ckpt}")
    ref = copy.deepcopy(model)
    apply_expert_parallel(model, setup_expert_parallel(world, 8))
    for moe, moe_ref in zip(model.moe_layers(), ref.moe_layers(), strict=True):
        moe.experts.local.use_grouped_mm = True  # the device path
        moe_ref.experts.use_grouped_mm = True
    batch = _batch(seed=rank)  # each rank its own tokens
    with HostSyncCounter() as fwd:
        out = model(**batch)
    with HostSyncCounter() as bwd:
        out.loss.backward()
    want = ref(**batch)
    want.loss.backward()
    res = {
        "n_moe": len(model.moe_layers()),
        "fwd": [r.where for r in fwd.reads],
        "bwd": [r.where for r in bwd.reads],
        "eager": _compare(model, ref, out.loss, want.loss),
    }
    if ckpt == "none":  # the compiled blocks: same loss and gradients, one break per MoE layer
        apply_compile(model, "aot_eager")
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        res["compiled"] = _compare(model, ref, out.loss, want.loss)
        x = torch.randn(2, 16, 32)
        explain = torch._dynamo.explain(model.layers[1].forward)(
            x, batch["attention_mask"], batch["position_ids"]
        )
        res["graphs"] = (explain.graph_count, explain.graph_break_count)
    return res


def _compare(model, ref, loss, want) -> dict:
    grads = [
        (n, p.grad.clone(), q.grad.clone())
        for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True)
        if ".experts." not in n  # a shard's gradients also hold the other rank's tokens
    ]
    return {"loss": (loss.detach(), want.detach()), "grads": grads}


def _both_worker(rank: int, world: int) -> dict[str, dict]:
    """Both settings in one launch: "full" first, all eager, then "none" and its compiled
    blocks (each on a model and expert-parallel groups of its own)."""
    return {ckpt: _worker(rank, world, ckpt) for ckpt in ("full", "none")}


@pytest.fixture(scope="module")
def launched() -> list[dict[str, dict]]:
    return run_ranks(_both_worker, 2, init="deepspeed", timeout_s=300)


@pytest.mark.parametrize("ckpt", ["none", "full"])
def test_one_read_per_moe_layer_and_one_graph_break(launched, ckpt):
    for r in (rank[ckpt] for rank in launched):
        n = r["n_moe"]
        assert n == 3  # two main MoE blocks and the MTP block's
        assert len(r["fwd"]) == n and all("distributed/dispatch.py" in w for w in r["fwd"])
        assert len(r["bwd"]) == (n if ckpt == "full" else 0), r["bwd"]
        for run in ("eager", "compiled") if ckpt == "none" else ("eager",):
            torch.testing.assert_close(*r[run]["loss"])
            for name, got, want in r[run]["grads"]:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{run} {name}")
        if ckpt == "none":  # dispatch -> experts -> combine run eagerly: two graphs, one break
            assert r["graphs"] == (2, 1)
