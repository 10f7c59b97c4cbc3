"""The CUDA path end to end on one node: expert parallelism over every local GPU, nccl, DeepSpeed
on CUDA, a few steps of train/train.py under torchrun.

Skipped, with the reason, without CUDA; benchmarks/gpu_run.sh runs it on a GPU machine. The CPU
suite covers the same loop on gloo: what only a GPU shows is whether every collective of the loop
runs on nccl (which takes no CPU tensors) and the engine on CUDA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deepsuite.checkpoint.layout import tag_for_step, verify_checkpoint
from tests.training.runner import losses, run_train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs CUDA (no GPU visible): benchmarks/gpu_run.sh runs it on a GPU machine",
    ),
]

STEPS = 4


def test_expert_parallel_over_the_local_gpus_on_nccl(tmp_path: Path) -> None:
    n = torch.cuda.device_count()
    run_dir = tmp_path / "cuda"
    proc = run_train(
        run_dir,
        [
            f"train.steps={STEPS}",
            "train.save_every=2",
            f"parallel.ep={n}",
            "parallel.backend=nccl",  # not "auto": an init on gloo would be an error, not a pass
            f"moe.n_routed_experts={8 * n}",  # n experts per GPU, divisible by the 4 groups
            "train.micro_batch_size=2",
            f"train.global_batch_size={2 * n}",
        ],
        nproc=n,
        extra_env={"DS_ACCELERATOR": "cuda"},
    )
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), proc.stdout[-4000:]
    assert all(math.isfinite(v) for v in got.values()), got
    # every save first checks the balancing bias is identical on every rank (and raises if not):
    # the run reached its last checkpoint, written by all n ranks
    tag = run_dir / "checkpoints" / tag_for_step(STEPS)
    assert verify_checkpoint(tag) is None
    state = json.loads((tag / "trainer_state.json").read_text())
    assert state["world_size"] == n and state["config"]["parallel"]["ep"] == n
    experts = {p.name.split("_mp_rank")[0] for p in tag.glob("layer_*_expert_*")}
    assert len(experts) == 3 * 8 * n, sorted(experts)  # 3 MoE layers, every GPU's shard written
