"""Resharding: a run saved at EP 4 resumes at EP 2 and at 1 with the next-step loss of the
uninterrupted EP-4 run; the offline converter round-trips 4 -> 1 -> 2 -> 4 bit-exactly; a ZeRO-3
run at EP 2 x DP 2 converts to ZeRO 1 at EP 2 and back bit-exactly and trains on equal to itself.

All runs use the real trainer (train/train.py under torchrun) on gloo, fp32, ZeRO 1 unless named;
global batch 16 = micro 4 x world x accumulation, so every world size sees the same micro-batches.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch

from deepsuite.atomic import atomic_write_text
from deepsuite.checkpoint import layout as ckpt
from deepsuite.checkpoint.convert import reshard_checkpoint, reshard_main
from deepsuite.checkpoint.full_state import read_full_state, saved_layout
from deepsuite.errors import run_main
from tests.training.runner import Job, assert_ran, losses, run_train, run_trains
from tests.training.test_train import final_state

TAG = "step_00000002"
BASE = [
    "train.steps=4",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "train.export_final=false",
    "moe.bias_update_speed=0.05",  # a bias that really moves: it must travel with the checkpoint
]
TOL = 2e-5  # fp32: only the order of reductions differs between layouts
ZERO1 = ["parallel.zero_stage=1", "parallel.deepspeed_config=configs/deepspeed/zero1.json"]
ZERO3 = ["parallel.zero_stage=3", "parallel.deepspeed_config=configs/deepspeed/zero3.json"]


def _ep(n: int) -> list[str]:
    return [f"parallel.ep={n}"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The uninterrupted EP-4 run; it saves at step 2 (and 4)."""
    run = tmp_path_factory.mktemp("reshard") / "ep4"
    run_train(run, [*BASE, *_ep(4), "train.save_every=2"], nproc=4)
    return run / "checkpoints" / TAG, losses(run)


def _only_tag(src_tag: Path, dst: Path) -> Path:
    """A checkpoints dir holding just ``src_tag`` (so resume picks it), committed as latest."""
    dst.mkdir(parents=True)
    shutil.copytree(src_tag, dst / src_tag.name)
    atomic_write_text(dst / "latest", src_tag.name + "\n")
    return dst


def _same_state(a, b) -> None:
    for part in ("module", "fp32"):
        da, db = getattr(a, part), getattr(b, part)
        assert da.keys() == db.keys(), part
        for k in da:
            assert torch.equal(da[k], db[k]), (part, k)
    for key in ("exp_avg", "exp_avg_sq"):
        assert a.moments[key].keys() == b.moments[key].keys()
        for k in a.moments[key]:
            assert torch.equal(a.moments[key][k], b.moments[key][k]), (key, k)
    assert (a.adam_step, a.lr_last_epoch, a.counters) == (b.adam_step, b.lr_last_epoch, b.counters)


@pytest.fixture(scope="module")
def resumed_smaller(ref, tmp_path_factory) -> dict[int, tuple[Path, CompletedProcess]]:
    """The EP-4 step-2 checkpoint resumed at EP 2 and at EP 1, both runs at once; each test checks
    its own run's exit status."""
    src_tag, base = ref[0], tmp_path_factory.mktemp("resumed_smaller")
    resume = _only_tag(src_tag, base / "from_ep4")
    over = [*BASE, "train.steps=3", f"train.resume={resume}"]
    jobs = {ep: Job(base / f"ep{ep}", [*over, *_ep(ep)], nproc=ep) for ep in (2, 1)}
    procs = run_trains(jobs, check=False)
    return {ep: (jobs[ep].run_dir, procs[ep]) for ep in jobs}


@pytest.mark.parametrize("ep", [2, 1])
def test_ep4_checkpoint_resumes_at_smaller_ep_on_load(ref, resumed_smaller, ep):
    _, ref_losses = ref
    run, proc = resumed_smaller[ep]
    assert_ran(proc)
    assert "resharding" in proc.stdout + proc.stderr
    got = losses(run)
    assert sorted(got) == [3]  # resumed at step 2: the data position came along
    assert got[3] == pytest.approx(ref_losses[3], abs=TOL)
    # a wrong moment, bias or LR position moves the loss by far more than TOL
    assert abs(ref_losses[3] - ref_losses[2]) > 100 * TOL


def test_converter_round_trip_4_1_2_4_and_resumes(ref, tmp_path):
    src_tag, ref_losses = ref
    d1 = reshard_checkpoint(src_tag, tmp_path / "ep1", ep=1)
    d2 = reshard_checkpoint(d1.parent, tmp_path / "ep2", ep=2)
    # the native files at EP 2 load with the stock DeepSpeed load (no resharding on load): a run
    # resuming them, started while the converter writes EP 4 from them
    run = tmp_path / "run_ep2"
    over = [*BASE, *_ep(2), "train.steps=3", f"train.resume={d2.parent}"]
    with ThreadPoolExecutor(1) as pool:
        resumed = pool.submit(run_train, run, over, nproc=2)
        d4 = reshard_checkpoint(d2.parent, tmp_path / "ep4", ep=4)
    for d, (world, ep) in ((d1, (1, 1)), (d2, (2, 2)), (d4, (4, 4))):
        assert ckpt.find_resumable(d.parent) == TAG  # manifest + latest committed
        assert saved_layout(d) == {"world": world, "ep": ep, "zero": 1}
        state = json.loads((d / "trainer_state.json").read_text())
        orig = json.loads((src_tag / "trainer_state.json").read_text())
        assert state["train_loader"] == orig["train_loader"] and state["step"] == 2
    src = read_full_state(src_tag)
    bias = [k for k in src.module if k.endswith("router.expert_bias")]
    assert bias and any(src.module[k].abs().sum() > 0 for k in bias)  # a bias that moved
    assert src.adam_step == 2 and src.moments["exp_avg"]
    _same_state(src, read_full_state(d1))  # 4 -> 1: nothing lost
    _same_state(src, read_full_state(d4))  # ... -> 2 -> 4: bit-exact round trip
    proc = resumed.result()
    assert "resharding" not in proc.stdout + proc.stderr
    assert losses(run)[3] == pytest.approx(ref_losses[3], abs=TOL)


@pytest.mark.slow
def test_zero3_reshards_to_zero1_and_back(tmp_path, capsys):
    """ZeRO 3 at EP 2 x DP 2 (experts partitioned over 2-rank expert-data-parallel groups) ->
    ZeRO 1 at EP 2 on 2 ranks -> ZeRO 3 at EP 2 x DP 2: nothing lost either way; a ZeRO-1 run
    resuming the ZeRO-3 checkpoint, and a ZeRO-3 run resuming the ZeRO-1 one, train on equal to
    the uninterrupted run, and the converted one resumes natively bit-identically."""
    zero3 = [*BASE, *_ep(2), *ZERO3, "train.steps=3", "train.export_final=true"]
    ref = tmp_path / "zero3"
    run_train(ref, [*zero3, "train.save_every=2"], nproc=4)
    src_tag, ref_losses = ref / "checkpoints" / TAG, losses(ref)
    d1 = reshard_checkpoint(src_tag, tmp_path / "z1", ep=2, zero_stage=1)
    back = [str(d1), str(tmp_path / "z3"), "--ep", "2", "--world", "4", "--zero-stage", "3"]
    assert reshard_main(back) == 0  # the command line, as a user types it
    d3 = tmp_path / "z3" / TAG
    assert saved_layout(d1) == {"world": 2, "ep": 2, "zero": 1}
    assert saved_layout(d3) == {"world": 4, "ep": 2, "zero": 3}
    src = read_full_state(src_tag)
    assert src.adam_step == 2 and src.moments["exp_avg"]
    _same_state(src, read_full_state(d1))
    _same_state(src, read_full_state(d3))
    # bad input: one line naming the argument, nothing written
    bad = [str(src_tag), str(tmp_path / "bad"), "--ep", "4", "--world", "2"]
    assert run_main(reshard_main, bad, "deepsuite reshard") == 2  # through the error boundary
    err = capsys.readouterr().err
    assert err.startswith("deepsuite reshard: error: ") and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()

    # three independent resumes, two at a time
    run1, run3, run31 = tmp_path / "run_zero1", tmp_path / "run_zero3", tmp_path / "run_zero31"
    resume = f"train.resume={_only_tag(src_tag, tmp_path / 'from_zero3')}"
    over = [*BASE, *_ep(2), *ZERO1, "train.steps=3", "train.export_final=true", resume]
    procs = run_trains(
        {
            # a ZeRO-1 run resumes the ZeRO-3 checkpoint, resharding on load
            run1: Job(run1, over, nproc=2),
            # a ZeRO-3 run resumes the converted ZeRO-3 checkpoint natively
            run3: Job(run3, [*zero3, f"train.resume={d3.parent}"], nproc=4),
            # on load the other way: a ZeRO-3 run at EP 2 x DP 2 resumes the ZeRO-1 checkpoint
            run31: Job(run31, [*zero3, f"train.resume={d1.parent}"], nproc=4),
        }
    )
    assert "resharding" in procs[run1].stdout + procs[run1].stderr
    assert losses(run1)[3] == pytest.approx(ref_losses[3], rel=1e-6)
    a, b = final_state(ref), final_state(run1)
    biases = [k for k in a if k.endswith("router.expert_bias")]
    assert biases and all(torch.equal(a[k], b[k]) for k in biases)

    assert "resharding" not in procs[run3].stdout + procs[run3].stderr
    assert losses(run3) == {3: ref_losses[3]}
    b = final_state(run3)
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert "resharding" in procs[run31].stdout + procs[run31].stderr
    assert losses(run31)[3] == pytest.approx(ref_losses[3], rel=1e-6)
    b = final_state(run31)
    assert all(torch.equal(a[k], b[k]) for k in biases)
