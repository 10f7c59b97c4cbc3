"""The training job under ZeRO 3 beside expert parallelism, through the real entry point (torchrun).

Two ranks at EP 2 with every parameter partitioned (dense over both ranks, the experts over
their expert-data-parallel group), activation checkpointing, an MTP depth and an auxiliary head
must give the losses, the exported model and the bias of one process on the same global batch;
a run stopped at step 2 and resumed must end bit-identically; bf16 keeps the bias float32; and a
ZeRO-3 checkpoint reads offline into the parameters the engine gathered (resharding to and from
ZeRO 3: tests/distributed/test_reshard.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.runner import Job, assert_ran, losses, metrics, run_train, run_trains
from tests.training.test_train import COMMON, STEPS, final_state

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ZERO3 = ["parallel.zero_stage=3", "parallel.deepspeed_config=configs/deepspeed/zero3.json"]
HEADS = [
    "model.mtp_depth=1",
    "model.aux_heads=[{name: next2, layer: 1, offset: 2, weight: 0.5, modules: ["
    "{type: LayerNorm, args: {normalized_shape: '@dim'}}, "
    "{type: HermiteExpansion, args: {in_features: '@dim', out_features: '@vocab', degree: 3}}]}]",
]
ONE = ["parallel.ep=1", "train.micro_batch_size=4", *HEADS]
EP2_ZERO3 = ["parallel.ep=2", "train.micro_batch_size=2", *ZERO3, *HEADS]
CKPT = ["train.activation_checkpointing=full"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Every launch of this module that needs no other's output, two at a time: the two compared
    runs (checked here), and the bf16 run and the first half of the resumed one (each checked by
    its test, so a failed one fails its test only)."""
    base = tmp_path_factory.mktemp("zero3")
    jobs = {
        "one": Job(base / "one", [*COMMON, *ONE], nproc=1),
        "zero3": Job(base / "zero3", [*COMMON, *EP2_ZERO3, *CKPT]),
        "resumed": Job(base / "resumed", [*COMMON, *EP2_ZERO3, *CKPT, "train.stop_at_step=2"]),
        "bf16": Job(base / "bf16", [*COMMON, *EP2_ZERO3, "train.precision=bf16"]),
    }
    procs = run_trains(jobs, check=False)
    assert_ran(procs["one"])
    assert_ran(procs["zero3"])
    return {name: (jobs[name].run_dir, procs[name]) for name in jobs}


@pytest.fixture(scope="module")
def runs(started):
    """The directory holding the one-process run "one" and the ZeRO-3 run "zero3"."""
    return started["one"][0].parent


def test_zero3_two_ranks_equal_one_process(runs):
    ref, got = losses(runs / "one"), losses(runs / "zero3")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), step
    aux = [r["loss/aux_next2"] for r in metrics(runs / "zero3")]
    ref_aux = [r["loss/aux_next2"] for r in metrics(runs / "one")]
    assert aux == pytest.approx(ref_aux, rel=1e-6)
    a, b = final_state(runs / "one"), final_state(runs / "zero3")
    assert a.keys() == b.keys()
    assert b["layers.1.ffn.experts.gate_proj"].shape[0] == 8  # every expert, gathered
    assert any(k.startswith("mtp.0.block.ffn.experts.") for k in b)
    for key in a:
        assert b[key].shape == a[key].shape, key  # no (0,) partition placeholders
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        if key.endswith("expert_bias"):
            assert torch.equal(a[key], b[key]), key
            assert b[key].dtype == torch.float32 and b[key].abs().sum() > 0


def test_zero3_run_converts_to_hugging_face(runs, tmp_path):
    from safetensors.torch import load_file

    from deepsuite.models.hf import hf_main

    for name in ("one", "zero3"):
        assert hf_main(["to-hf", str(runs / name), str(tmp_path / name)]) == 0
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "zero3" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in b
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_zero3_resume_is_bit_identical(runs, started):
    run_dir, proc = started["resumed"]  # ran with train.stop_at_step=2
    assert_ran(proc)
    files = {p.name for p in (run_dir / "checkpoints" / "step_00000002").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    run_train(run_dir, [*COMMON, *EP2_ZERO3, *CKPT], nproc=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_run"] == STEPS - 2
    ref, got = losses(runs / "zero3"), losses(run_dir)
    assert got == ref  # exact: same layout, same order of operations
    a, b = final_state(runs / "zero3"), final_state(run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_zero3_checkpoint_reads_as_the_engine_gathered_it(runs):
    """The offline reader reassembles every partition (dense over 2 ranks, each EP rank's
    experts over its expert-data-parallel group) into what the engine gathered at export."""
    from deepsuite.checkpoint.full_state import read_full_state

    st = read_full_state(runs / "zero3" / "checkpoints" / f"step_{STEPS:08d}")
    assert st.layout == {"world": 2, "ep": 2, "zero": 3}
    exported = final_state(runs / "zero3")
    assert st.module.keys() == exported.keys()
    for key, t in exported.items():
        assert torch.equal(st.module[key], t), key  # bitwise: fp32, the same tensors
    params = set(st.fp32)
    assert "layers.1.ffn.experts.gate_proj" in params and st.fp32.keys() <= st.module.keys()
    assert st.adam_step == STEPS and st.counters["global_steps"] == STEPS
    for key in ("exp_avg", "exp_avg_sq"):
        assert st.moments[key].keys() == params
        assert all(st.moments[key][n].shape == st.fp32[n].shape for n in params)
    assert st.moments["exp_avg_sq"]["layers.1.ffn.experts.gate_proj"].abs().sum() > 0


def test_zero3_bf16_keeps_the_bias_float32(started):
    run_dir, proc = started["bf16"]
    assert_ran(proc)
    state = final_state(run_dir)
    biases = {k: v for k, v in state.items() if k.endswith("expert_bias")}
    assert biases and all(v.dtype == torch.float32 for v in biases.values())
    for v in biases.values():  # sign-rule steps of gamma in float32, never through bf16
        torch.testing.assert_close(v, (v / 0.01).round() * 0.01, rtol=0, atol=1e-6)
    assert state["layers.1.ffn.experts.gate_proj"].dtype == torch.bfloat16
    assert state["layers.1.ffn.experts.gate_proj"].shape[0] == 8
