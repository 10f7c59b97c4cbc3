"""The trainer's own host reads, on the real DeepSpeed engine and gloo ranks: a training step
that does not log reads nothing back from the device (one rank, the device path), or only the
all-to-all's split sizes, once per MoE layer and micro-batch (EP 2); a logging step reads the
step's statistics in one transfer and the MoE tracker's in one more. Reads made inside DeepSpeed
are listed apart (not the trainer's to remove).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.distributed.launch import run_ranks
from tests.training.runner import ROOT, SMALL

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

GRAD_ACCUM = 2


def _worker(rank: int, world: int, run_dir: str, ep: int) -> dict:
    from deepsuite.config import load_config
    from deepsuite.host_sync import HostSyncCounter
    from deepsuite.training.engine import build_run
    from deepsuite.training.trainer import Trainer

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            *SMALL,
            f"train.run_dir={run_dir}",
            f"parallel.ep={ep}",
            "train.micro_batch_size=2",
            f"train.global_batch_size={2 * GRAD_ACCUM * world}",
            "data.document_masking=true",
        ],
    )
    trainer = Trainer(build_run(cfg))
    for _, moe in trainer.layers:  # the device path (grouped GEMMs), what a GPU runs
        getattr(moe.experts, "local", moe.experts).use_grouped_mm = True
    trainer.train_step()  # warm-up: lazy initialisation is not a step
    with HostSyncCounter() as step:
        metrics = trainer.train_step()
    with HostSyncCounter() as logged:
        metrics.update(trainer.tracker.metrics())
        numbers = trainer.read_metrics(metrics)
    return {
        "step": [r.where for r in step.reads],
        "logged": [r.where for r in logged.reads],
        "n_moe": len(trainer.layers),
        "loss": numbers["loss/train"],
        "history": trainer.history,
    }


def _ours(places: list[str]) -> list[str]:
    """The reads made by deepsuite's code (not DeepSpeed's or the standard library's)."""
    return [p for p in places if p.startswith("deepsuite/")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Iterator[dict[int, Future]]:
    """The 1-rank and the 2-rank run started together (each its own processes and run dir);
    each test waits for its own, so a failed run fails its test only."""

    def launch(ep: int) -> list[dict]:
        run_dir = str(tmp_path_factory.mktemp(f"ep{ep}"))
        return run_ranks(_worker, ep, run_dir, ep, init=None, timeout_s=400)

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {ep: pool.submit(launch, ep) for ep in (1, 2)}


@pytest.mark.parametrize("ep", [1, 2])
def test_a_step_reads_only_what_it_must_and_logging_reads_once(launched, ep: int) -> None:
    results = launched[ep].result()
    for res in results:
        mine = _ours(res["step"])
        if ep == 1:
            assert mine == [], mine
        else:  # the split sizes: one read per MoE layer per micro-batch, in the dispatcher
            assert len(mine) == res["n_moe"] * GRAD_ACCUM, mine
            assert all(p.startswith("deepsuite/distributed/dispatch.py") for p in mine), mine
        # one transfer for the tracker's counts, bias and statistics, one for the step's metrics
        # and the loss history; nothing from other code
        assert len(res["logged"]) == 2 and _ours(res["logged"]) == res["logged"], res["logged"]
        assert isinstance(res["loss"], float) and res["history"][-1] == res["loss"]
        assert all(isinstance(v, float) for v in res["history"])  # nothing left on the device
