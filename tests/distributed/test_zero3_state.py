"""A full state poured into a ZeRO-3 engine, and read back from its checkpoint, bit for bit.

EP 2 x DP 2 on 4 gloo ranks, every parameter partitioned (no persistent whole copies), sizes
chosen odd so stage 3 pads the last partition of every parameter (dense ones over 4 ranks, each
EP rank's 3 experts over its 2-rank expert-data-parallel group). DeepSpeed's own full-state
getters (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, which all-gather the
partitions) are the reference for what :func:`load_full_state` wrote; the engine's own save, read
offline by :func:`read_full_state`, must give the poured state back, in fp32 and in bf16 (bf16
weights beside fp32 masters, the balancing bias float32). The training runs that
resume across ZeRO 3 and 1 are in test_reshard.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.distributed.launch import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

D, E, F, EP = 15, 6, 7, 2  # odd: 225-, 15-, 315-element tensors do not split evenly


class OddNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from deepsuite.layers.moe import DeepSeekMoE

        torch.manual_seed(7)
        self.inp = nn.Linear(D, D)
        self.moe = DeepSeekMoE(D, 1, E, 2, F)
        self.head = nn.Linear(D, 3)


def _state(bf16: bool):
    """A FullState unlike any initialisation: random weights, bias, moments; Adam step 3. In bf16
    the module holds the masters rounded to bf16 (what stage 3 copies after each step)."""
    from deepsuite.checkpoint.full_state import FullState

    g = torch.Generator().manual_seed(11)
    net = OddNet()
    module = {
        k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in net.state_dict().items()
    }
    buffers = {n for n, _ in net.named_buffers()}
    params = [
        n for n in module if n not in buffers
    ]  # the files' names: experts' gate_proj, up_proj
    moments = {
        "exp_avg": {n: torch.randn(module[n].shape, generator=g) for n in params},
        "exp_avg_sq": {n: torch.rand(module[n].shape, generator=g) for n in params},
    }
    fp32 = {n: module[n] for n in params}
    if bf16:
        module.update({n: fp32[n].to(torch.bfloat16) for n in params})
    return FullState(module, fp32, moments, adam_step=3, lr_last_epoch=0, counters={})


def _worker(rank: int, world: int, tmp: str, bf16: bool) -> dict:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from deepsuite.checkpoint.full_state import MOMENTS, read_full_state
    from deepsuite.checkpoint.load import load_full_state
    from deepsuite.distributed import setup_expert_parallel
    from deepsuite.distributed.expert_parallel import (
        apply_expert_parallel,
        full_state_dict,
        moe_param_groups,
    )
    from deepsuite.distributed.expert_shard import expert_slices, full_name
    from deepsuite.layers.moe import fuse_gate_up

    state = _state(bf16)
    model = OddNet()
    apply_expert_parallel(model, setup_expert_parallel(EP, E), zero_stage=3)
    opt = torch.optim.AdamW(moe_param_groups(model, 0.01), lr=1e-3)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}  # partition even tiny ones
    cfg = {
        "train_batch_size": world,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    load_full_state(engine, model, state)

    # the engine's parameters are fused (gate_up_proj); the state keeps the files' names
    fp32 = fuse_gate_up(dict(state.fp32))
    moments = {k: fuse_gate_up(dict(v)) for k, v in state.moments.items()}
    slices = expert_slices(model)
    wrong, padded = [], []
    for name, p in model.named_parameters():
        fname, held = full_name(name), slices.get(name)

        def local(t, held=held):
            return t if held is None else t[held.start : held.stop]

        if p.ds_tensor.numel() * dist.get_world_size(p.ds_process_group) != p.ds_numel:
            padded.append(fname)
        if not torch.equal(safe_get_full_fp32_param(p), local(fp32[fname])):
            wrong.append(("fp32", fname))
        for key in MOMENTS:
            got = safe_get_full_optimizer_state(p, key)
            if not torch.equal(got, local(moments[key][fname])):
                wrong.append((key, fname))
    gathered = full_state_dict(model)
    wrong += [("module", k) for k in state.module if not torch.equal(gathered[k], state.module[k])]

    engine.save_checkpoint(tmp, tag="t")
    if rank == 0:  # what read_full_state takes the layout from (the trainer writes it)
        meta = {"world_size": world, "config": {"parallel": {"ep": EP}}}
        (Path(tmp) / "t" / "trainer_state.json").write_text(json.dumps(meta))
    dist.barrier()
    back = read_full_state(Path(tmp) / "t")
    for part in ("module", "fp32"):
        a, b = getattr(state, part), getattr(back, part)
        wrong += [(f"read {part}", k) for k in a if k not in b or not torch.equal(a[k], b[k])]
    for key in MOMENTS:
        a, b = state.moments[key], back.moments[key]
        wrong += [(f"read {key}", k) for k in a if k not in b or not torch.equal(a[k], b[k])]
    return {"wrong": wrong, "padded": padded, "step": back.adam_step, "layout": back.layout}


def _both_worker(rank: int, world: int, tmp: str) -> dict[bool, dict]:
    """fp32, then bf16, in one launch of the 4 ranks (each its own engine and checkpoint dir)."""
    return {bf16: _worker(rank, world, f"{tmp}/bf16={bf16}", bf16) for bf16 in (False, True)}


@pytest.fixture(scope="module")
def poured(tmp_path_factory) -> list[dict[bool, dict]]:
    tmp = tmp_path_factory.mktemp("zero3_state")
    return run_ranks(_both_worker, 4, str(tmp), init="deepspeed", timeout_s=600)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_zero3_state_poured_and_read_back_bitwise(poured, bf16):
    results = [r[bf16] for r in poured]
    for r in results:
        assert r["wrong"] == []
        assert r["step"] == 3 and r["layout"] == {"world": 4, "ep": EP, "zero": 3}
    # the padded last partitions were really there: dense over 4 ranks, experts over 2
    assert {"inp.weight", "moe.experts.down_proj"} <= set(results[0]["padded"])
