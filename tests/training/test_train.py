"""The training job end to end, through the real entry point and launchers (gloo on CPU).

N ranks must equal one process on the same global batch: losses, final parameters and the
balancing bias; resume must continue bit-identically; the bias must move once per optimizer step
by the counts summed over every rank and micro-batch.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.training.runner import Job, assert_ran, losses, metrics, run_train, run_trains

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, GAMMA, GLOBAL, SEQ, TOPK = 4, 0.01, 8, 32, 2
# keys that measure the clock, not the run
WALL_CLOCK = re.compile(
    r"^(time|time/.*|perf/(tokens_per_s|step_time_s|mfu)|comm/(rank\d+/)?a2a_time)$"
)
COMMON = [
    f"train.steps={STEPS}",
    f"moe.bias_update_speed={GAMMA}",
    f"train.global_batch_size={GLOBAL}",
]
VARIANTS = {
    # name: (ranks, overrides); all take 2 micro-batches per optimizer step
    "one": (1, ["parallel.ep=1", "train.micro_batch_size=4"]),
    "ep2": (2, ["parallel.ep=2", "train.micro_batch_size=2"]),
    # every block recomputed in backward, its all-to-alls included
    "ep2_ckpt": (
        2,
        ["parallel.ep=2", "train.micro_batch_size=2", "train.activation_checkpointing=full"],
    ),
    "dp2_zero2": (
        2,
        [
            "parallel.ep=1",
            "train.micro_batch_size=2",
            "parallel.deepspeed_config=configs/deepspeed/zero2.json",
        ],
    ),
    # train.compile: every block one inductor graph (generated C++ kernels) ...
    "one_compiled": (1, ["parallel.ep=1", "train.micro_batch_size=4", "train.compile=true"]),
    # ... and with expert parallelism (one graph break per MoE layer) under checkpointing
    "ep2_compiled_ckpt": (
        2,
        [
            "parallel.ep=2",
            "train.micro_batch_size=2",
            "train.activation_checkpointing=full",
            "train.compile=true",
            "train.compile_backend=aot_eager",
        ],
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every variant's run, two at a time (independent runs: each gives what it gives alone)."""
    base = tmp_path_factory.mktemp("train")
    run_trains(
        {n: Job(base / n, [*COMMON, *extra], nproc) for n, (nproc, extra) in VARIANTS.items()}
    )
    return base


AUX_HEAD = (
    "model.aux_heads=[{name: next2, layer: 1, offset: 2, weight: 0.5, modules: ["
    "{type: LayerNorm, args: {normalized_shape: '@dim'}}, "
    "{type: HermiteExpansion, args: {in_features: '@dim', out_features: '@vocab', degree: 3}}]}]"
)


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory):
    """The other EP-2 jobs (other launchers, an auxiliary head, bf16, a run stopped at step 2),
    two at a time; each test checks its own job's exit status (a failed job fails its test only)."""
    base, ep2 = tmp_path_factory.mktemp("ep2_runs"), [*COMMON, *VARIANTS["ep2"][1]]
    jobs = {
        "deepspeed": Job(base / "deepspeed", ep2, launcher="deepspeed"),
        "accelerate": Job(base / "accelerate", ep2, launcher="accelerate"),
        "aux": Job(base / "aux", [*ep2, "train.steps=8", AUX_HEAD]),
        "bf16": Job(base / "bf16", [*ep2, "train.precision=bf16"]),
        # the first half of test_resume_is_bit_identical's run
        "resumed": Job(base / "resumed", [*ep2, "train.stop_at_step=2"]),
    }
    procs = run_trains(jobs, check=False)
    return {name: (jobs[name].run_dir, procs[name]) for name in jobs}


def final_state(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize(
    "name", ["ep2", "ep2_ckpt", "dp2_zero2", "one_compiled", "ep2_compiled_ckpt"]
)
def test_same_run_as_one_eager_process(runs, name):
    """Two ranks (expert or data parallel), checkpointed or compiled blocks (train.compile):
    every step's loss, the final parameters and the balancing bias bit for bit are those of one
    eager process on the same global batch."""
    ref, got = losses(runs / "one"), losses(runs / name)
    assert sorted(ref) == list(range(1, STEPS + 1)) and sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    a, b = final_state(runs / "one"), final_state(runs / name)
    assert a.keys() == b.keys()
    assert any(".ffn.experts.gate_proj" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        if key.endswith("expert_bias"):
            assert torch.equal(a[key], b[key]), key  # sign-rule steps of the same global counts
            assert a[key].dtype == torch.float32
            assert a[key].abs().sum() > 0  # it did move


@pytest.mark.parametrize("name", ["one", "ep2", "ep2_ckpt", "ep2_compiled_ckpt"])
def test_bias_moves_once_per_step_by_global_counts(runs, name):
    records = metrics(runs / name)
    layers = sorted({k.split("/")[1] for r in records for k in r if k.endswith("/load")})
    assert layers, "no per-layer load logged"
    for layer in layers:
        prev = torch.zeros(8)
        for r in records:
            load = torch.tensor(r[f"moe/{layer}/load"], dtype=torch.float64)
            # global batch of every rank and micro-batch: tokens x top-k
            assert load.sum().item() == GLOBAL * SEQ * TOPK
            bias = torch.tensor(r[f"moe/{layer}/bias"], dtype=torch.float32)
            step = (GAMMA * torch.sign(load.mean() - load)).float()
            torch.testing.assert_close(bias - prev, step, rtol=0, atol=2e-7)
            prev = bias


def test_document_masking_reaches_the_model(tmp_path):
    """data.document_masking=true on a corpus of short documents (many boundaries per row): the
    same data and initial weights as the plain run give a different but close first loss."""
    import random

    rng = random.Random(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "expert",
        "router",
        "token",
        "bias",
        "shard",
        "rank",
    ]
    lines = [
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))})
        for _ in range(600)
    ]
    (tmp_path / "short.jsonl").write_text("\n".join(lines) + "\n")
    jobs = {
        masked: Job(
            tmp_path / f"masked_{masked}",
            [
                *COMMON,
                *VARIANTS["one"][1],
                f"data.source={tmp_path / 'short.jsonl'}",
                f"data.document_masking={str(masked).lower()}",
                "train.steps=1",
            ],
            nproc=1,
        )
        for masked in (False, True)
    }
    run_trains(jobs)  # both at once
    first = {masked: losses(job.run_dir)[1] for masked, job in jobs.items()}
    assert first[True] != first[False], first
    assert abs(first[True] - first[False]) < 0.1 * first[False], first


def test_resume_is_bit_identical(runs, ep2_runs):
    run_dir, proc = ep2_runs["resumed"]  # ran with train.stop_at_step=2
    assert_ran(proc)
    extra = VARIANTS["ep2"][1]
    first = json.loads((run_dir / "summary.json").read_text())
    assert first["steps"] == 2 and not (run_dir / "final").exists()
    run_train(run_dir, [*COMMON, *extra], nproc=2)
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["steps"] == STEPS and second["steps_this_run"] == STEPS - 2
    ref = losses(runs / "ep2")
    got = losses(run_dir)
    for step in range(1, STEPS + 1):
        assert got[step] == ref[step], step  # exact: same world size, same order of operations
    a, b = final_state(runs / "ep2"), final_state(run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # every logged key, the windowed MoE metrics included (their window is in the checkpoint),
    # equals the uninterrupted run's; only wall-clock figures may differ
    ref_log = {r["step"]: r for r in metrics(runs / "ep2")}
    got_log = {r["step"]: r for r in metrics(run_dir)}
    assert sorted(got_log) == sorted(ref_log) == list(range(1, STEPS + 1))
    assert got_log[3]["moe/window_steps"] == 3  # the resumed step's window reaches back
    for step, ref in ref_log.items():
        want = {k: v for k, v in ref.items() if not WALL_CLOCK.match(k)}
        got = {k: v for k, v in got_log[step].items() if not WALL_CLOCK.match(k)}
        assert got.keys() == want.keys(), (step, got.keys() ^ want.keys())
        for key, value in want.items():
            assert got[key] == value, (step, key, got[key], value)


def test_checkpoint_is_committed_with_a_manifest(runs):
    from deepsuite.checkpoint.layout import find_resumable, verify_checkpoint

    ckpt = runs / "ep2" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert tag == f"step_{STEPS:08d}"
    assert verify_checkpoint(ckpt / tag) is None
    assert find_resumable(ckpt) == tag
    expert_files = list((ckpt / tag).glob("layer_*_expert_*_model_states.pt"))
    assert len(expert_files) == 3 * 8  # every expert of every MoE layer, from both EP ranks
    for f in expert_files[:3]:
        torch.load(f, weights_only=True)


@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_launchers_run_the_same_job(runs, ep2_runs, launcher):
    run_dir, proc = ep2_runs[launcher]
    assert_ran(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS, proc.stdout[-2000:]
    # the same two ranks, whoever started them: the same losses as under torchrun
    ref = losses(runs / "ep2")
    for step, value in losses(run_dir).items():
        assert value == pytest.approx(ref[step], rel=1e-6), (launcher, step)


def test_bad_world_fails_fast_on_every_rank(tmp_path):
    start = time.monotonic()
    proc = run_train(
        tmp_path / "bad",
        ["train.micro_batch_size=4", "train.global_batch_size=12"],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert (
        text.count(
            "train.global_batch_size: expected a multiple of train.micro_batch_size x world size"
        )
        >= 2
    )
    assert time.monotonic() - start < 120
    shutil.rmtree(tmp_path / "bad", ignore_errors=True)


def test_aux_head_trains_with_the_model(ep2_runs):
    run_dir, proc = ep2_runs["aux"]
    assert_ran(proc)
    series = [r["loss/aux_next2"] for r in metrics(run_dir)]
    assert len(series) == 8
    assert series[-1] < series[0] - 0.2  # the head learns, through the sharded model


def test_bf16_keeps_the_bias_float32(ep2_runs):
    run_dir, proc = ep2_runs["bf16"]
    assert_ran(proc)
    state = final_state(run_dir)
    biases = {k: v for k, v in state.items() if k.endswith("expert_bias")}
    assert biases and all(v.dtype == torch.float32 for v in biases.values())
    # a few sign-rule steps of 0.01 in float32 stay within 1e-6 of a multiple of 0.01; a bf16
    # round trip of 0.03 would be off by 3e-5
    for v in biases.values():
        torch.testing.assert_close(v, (v / GAMMA).round() * GAMMA, rtol=0, atol=1e-6)
    assert state["layers.1.ffn.experts.gate_proj"].dtype == torch.bfloat16
    values = list(losses(run_dir).values())
    assert len(values) == STEPS and all(v == v and v < 6.0 for v in values)
