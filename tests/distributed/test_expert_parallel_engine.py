"""THE KEYSTONE: N-rank expert parallel under the DeepSpeed engine == one process.

A small net of DeepSeekMoE layers (top-2, a shared expert, group-limited routing, biases that
starve some experts and whole EP ranks) trained 10 SGD steps with loss-free bias balancing under
ZeRO 0, 1, 2 and 3, for EP=2 (2 ranks), EP=4 (4 ranks) and EP2 x DP2 (4 ranks: expert-data-
parallel groups of 2), against the same net trained on the whole global batch in this process.
Compared: every step's loss, the first step's gradients, the parameters after one and after ten
steps (gathered from their ZeRO-3 partitions), and the bias. Under ZeRO 3 the parameters must
really be partitioned: dense ones over the world, each rank's experts over its EDP group.
Letters: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.distributed.expert_shard import full_name
from tests.distributed.launch import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

D, E, T_GLOBAL, STEPS, LR, WD, GAMMA = 16, 8, 32, 10, 0.2, 0.01, 0.01
STAGES = (0, 1, 2, 3)


class TinyMoENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from deepsuite.layers.moe import DeepSeekMoE

        torch.manual_seed(1234)
        self.inp = nn.Linear(D, D)
        self.moes = nn.ModuleList(
            DeepSeekMoE(D, 1, E, 2, 8, n_group=4, topk_group=2, route_scale=2.5) for _ in range(2)
        )
        self.head = nn.Linear(D, D)
        with torch.no_grad():  # starve experts 2, 3 (layer 0) and 4..7 (layer 1)
            self.moes[0].router.expert_bias[2:4] = -100.0
            self.moes[1].router.expert_bias[4:8] = -100.0

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_TD)
        for moe in self.moes:
            h = h + moe(h)[0]
        return self.head(h)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(T_GLOBAL, D, generator=g), torch.randn(T_GLOBAL, D, generator=g)


def _reference() -> dict:
    model = TinyMoENet()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    plain = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": WD}, {"params": plain}], lr=LR)
    out: dict = {"loss": []}
    for step in range(STEPS):
        x, y = _batch(step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if step == 0:
            out["grad"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for moe in model.moes:
            moe.update_bias(None, GAMMA)
        if step == 0:
            out["param1"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        out["loss"].append(loss.item())
    out["param"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["bias"] = [m.router.expert_bias.clone() for m in model.moes]
    return out


def _full_params(engine) -> dict:
    """Every parameter at full size (ZeRO 3: all-gathered from its partitions; else as held)."""
    from deepspeed.runtime.zero import GatheredParameters

    params = dict(engine.module.named_parameters())
    with GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def _partition_sizes(engine) -> dict:
    """ZeRO 3: name -> (elements this rank stores, size of the group it is partitioned over)."""
    import torch.distributed as dist

    return {
        n: (p.ds_tensor.numel(), dist.get_world_size(p.ds_process_group), p.ds_numel)
        for n, p in engine.module.named_parameters()
    }


def _ds_config(stage: int, world: int) -> dict:
    zero = {"stage": stage, "reduce_scatter": True, "contiguous_gradients": True}
    if stage == 3:  # partition every parameter, however small (DeepSpeed keeps < 1e5 whole)
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _build_engine(groups, cfg: dict):
    import deepspeed

    from deepsuite.distributed.expert_parallel import apply_expert_parallel, moe_param_groups

    model = TinyMoENet()
    apply_expert_parallel(model, groups, zero_stage=cfg["zero_optimization"]["stage"])
    opt = torch.optim.SGD(moe_param_groups(model, WD), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _train_step(engine, rank: int, world: int, step: int) -> float:
    from deepsuite.distributed import guard_collectives
    from deepsuite.distributed.expert_parallel import sync_and_update_bias

    n = T_GLOBAL // world
    x, y = _batch(step)
    with guard_collectives("train step", step):
        loss = F.mse_loss(engine(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n])
        engine.backward(loss)
        engine.step()
        sync_and_update_bias(engine.module, GAMMA)
    return loss.item()


def _checkpoint_roundtrip(engine, groups, cfg: dict, rank: int, world: int, ckpt: str) -> dict:
    """Save, load into a fresh engine, take one more step on both: must stay identical."""
    import os

    import torch.distributed as dist

    engine.save_checkpoint(ckpt, tag="t")
    dist.barrier()
    files = sorted(os.listdir(os.path.join(ckpt, "t")))
    fresh = _build_engine(groups, cfg)
    fresh.load_checkpoint(ckpt, tag="t")  # strict: every key of the module state
    sd_a, sd_b = engine.module.state_dict(), fresh.module.state_dict()
    pa, pb = _full_params(engine), _full_params(fresh)
    same_after_load = (
        sd_a.keys() == sd_b.keys()
        and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        and all(torch.equal(pa[k], pb[k]) for k in pa)
    )
    loss_a = _train_step(engine, rank, world, STEPS)
    loss_b = _train_step(fresh, rank, world, STEPS)
    pa, pb = _full_params(engine), _full_params(fresh)
    same_next = all(torch.equal(pa[k], pb[k]) for k in pa)
    return {"files": files, "same_after_load": same_after_load, "same_next": same_next,
            "losses": (loss_a, loss_b)}  # fmt: skip


def _engine_worker(rank: int, world: int, eps: list[int], ckpt_root: str | None = None) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from deepsuite.distributed import check_same_config, guard_collectives, setup_expert_parallel
    from deepsuite.distributed.expert_parallel import (
        apply_expert_parallel,
        moe_param_groups,
        sync_and_update_bias,
        verify_bias_identical,
    )

    results = {}
    for ep in eps:
        groups = setup_expert_parallel(ep, E)
        for stage in STAGES:
            cfg = _ds_config(stage, world)
            check_same_config(cfg)
            model = TinyMoENet()
            apply_expert_parallel(model, groups, zero_stage=stage)
            opt = torch.optim.SGD(moe_param_groups(model, WD), lr=LR)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            # ZeRO 0-2 see a DeepSpeed MoE; ZeRO 3 (which refuses one) places tagged params
            assert engine.has_moe_layers == (stage < 3)
            n = T_GLOBAL // world
            rec: dict = {"loss": [], "ep_rank": groups.ep_rank, "L": E // ep}
            if stage == 3:
                rec["partition"] = _partition_sizes(engine)
            for step in range(STEPS):
                x, y = _batch(step)
                with guard_collectives("train step", step):
                    loss = F.mse_loss(
                        engine(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]
                    )
                    engine.backward(loss)
                    if step == 0:
                        rec["grad"] = {
                            nm: safe_get_full_grad(p).clone()
                            for nm, p in engine.module.named_parameters()
                        }
                    engine.step()
                    sync_and_update_bias(engine.module, GAMMA)
                if step == 0:
                    rec["param1"] = _full_params(engine)
                rec["loss"].append(loss.item())
            verify_bias_identical(engine.module)
            rec["param"] = _full_params(engine)
            rec["bias"] = [m.router.expert_bias.clone() for m in engine.module.moes]
            rec["a2a"] = engine.module.moes[0].dispatcher.last_comm_stats
            if ckpt_root is not None:
                ckpt = f"{ckpt_root}/ep{ep}_zero{stage}"
                rec["ckpt"] = _checkpoint_roundtrip(engine, groups, cfg, rank, world, ckpt)
            results[(ep, stage)] = rec
            del engine, opt, model
    return results


def _compare(results: list[dict], ref: dict, world: int, eps: list[int]) -> None:
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for ep in eps:
        for stage in STAGES:
            tag = f"world={world} ep={ep} zero={stage}"
            recs = [r[(ep, stage)] for r in results]
            losses = torch.tensor([rec["loss"] for rec in recs]).mean(0)
            torch.testing.assert_close(
                losses, torch.tensor(ref["loss"]), **tol, msg=lambda m, t=tag: f"{t} loss: {m}"
            )
            for rec in recs:
                lo, hi = rec["ep_rank"] * rec["L"], (rec["ep_rank"] + 1) * rec["L"]
                for key in ("grad", "param1", "param"):
                    for name, got in rec[key].items():
                        want = ref[key][full_name(name)]
                        if ".experts.local." in name:
                            want = want[lo:hi]
                        torch.testing.assert_close(
                            got, want, **tol, msg=lambda m, t=f"{tag} {key} {name}": f"{t}: {m}"
                        )
                for got, want in zip(rec["bias"], ref["bias"], strict=True):
                    assert torch.equal(got, want), f"{tag} bias {got} != {want}"
                    assert got.dtype == torch.float32
                if stage == 3:
                    _check_partitioned(rec["partition"], tag, world, ep)


def _check_partitioned(sizes: dict, tag: str, world: int, ep: int) -> None:
    """Dense parameters stored as 1/world, each rank's experts as 1/EDP of the local slice."""
    for name, (stored, group, numel) in sizes.items():
        want_group = world // ep if ".experts.local." in name else world
        assert group == want_group, f"{tag} {name}: partitioned over {group} ranks"
        assert stored == -(-numel // group), f"{tag} {name}: stores {stored} of {numel}"


def test_expert_parallel_matches_single_process_two_ranks(tmp_path) -> None:
    ref = _reference()
    results = run_ranks(_engine_worker, 2, [2], str(tmp_path), init="deepspeed", timeout_s=600)
    _compare(results, ref, 2, [2])
    # checkpoints: one file per GLOBAL expert (both EP ranks' shards), exact reload and next step
    want = {
        f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(E)
    }
    for stage in STAGES:
        for r in results:
            ck = r[(2, stage)]["ckpt"]
            if stage < 3:
                assert want <= set(ck["files"]), (stage, sorted(want - set(ck["files"])))
            else:  # ZeRO 3: the experts live in each rank's partition files, no per-expert file
                assert not want & set(ck["files"]), ck["files"]
                assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(
                    ck["files"]
                ), ck["files"]
            assert ck["same_after_load"] and ck["same_next"], (stage, ck)
            assert ck["losses"][0] == ck["losses"][1]
    # the starving bias left rank 1 without tokens in layer 1 and the run still matched
    assert ref["bias"][1][4:].max() < -99


def test_expert_parallel_matches_single_process_four_ranks() -> None:
    ref = _reference()
    results = run_ranks(_engine_worker, 4, [4, 2], init="deepspeed", timeout_s=600)
    _compare(results, ref, 4, [4, 2])
