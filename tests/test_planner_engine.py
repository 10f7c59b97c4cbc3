"""The planner against real DeepSpeed engines on gloo ranks (tiny config).

Memory: for EP 1, 2 and 4 and ZeRO 0, 1 and 2, the bytes each rank's engine holds in parameters,
gradients (after a backward) and optimizer states (after a step) -- summed over the distinct
storages of the module's parameters and .grad, the ZeRO optimizer's gradient partitions, its
fp32 master partitions and the torch optimizer's state -- equal ``model_state_bytes`` within 5%.
All-to-all: the dispatcher's own byte count equals ``dispatcher_bytes`` of the routing it was
given, exactly, per rank and layer; and once the bias has balanced the load, it is within 10% of
the balanced-routing estimate. One launch per world size (2 and 4), several engines in each.
Letters: T tokens per rank, K slots, P EP ranks.
"""

from __future__ import annotations

import pytest
import torch

from deepsuite.config import load_config
from deepsuite.planner import (
    Layout,
    balanced_rows_per_token,
    dispatcher_bytes,
    model_state_bytes,
    param_breakdown,
    zero_grad_buffer,
    zero_param_groups,
)
from tests.distributed.launch import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

B, S, V = 2, 32, 257  # micro-batch, sequence length, byte vocabulary
BALANCE_STEPS, GAMMA = 6, 0.02


def _cfg(ep: int, stage: int, world: int):
    return load_config(
        "configs/tiny.yaml",
        [
            f"parallel.ep={ep}",
            f"parallel.zero_stage={stage}",
            f"train.micro_batch_size={B}",
            f"train.global_batch_size={B * world}",
            f"data.seq_len={S}",
            f"model.vocab_size={V}",
        ],
    )


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _held_bytes(engine) -> dict[str, int]:
    """Distinct storages the engine holds, by role (a storage is counted once, first role wins)."""
    params = [p for p in engine.module.parameters()]
    zo = engine.optimizer
    base = getattr(zo, "optimizer", zo)  # the torch AdamW inside DeepSpeed's ZeRO optimizer
    master = [p for g in base.param_groups for p in g["params"]]
    grads = [p.grad for p in params + master if p.grad is not None]
    avg = getattr(zo, "averaged_gradients", {}) or {}
    grads += [t for ts in avg.values() for t in (ts or [])]
    grads += [getattr(zo, "grads_in_partition", None)]
    states = [v for st in base.state.values() for v in st.values()] + master
    seen: set[int] = set()
    out = {}
    for role, ts in (("weights", params), ("grads", grads), ("optimizer", states)):
        got = {k: n for k, n in _storages(ts).items() if k not in seen}
        seen |= got.keys()
        out[role] = sum(got.values())
    return out


def _worker(rank: int, world: int, eps: list[int]) -> dict:
    import deepspeed

    from deepsuite.distributed import setup_expert_parallel
    from deepsuite.distributed.engine import deepspeed_config
    from deepsuite.distributed.expert_parallel import (
        apply_expert_parallel,
        moe_param_groups,
        sync_and_update_bias,
    )
    from deepsuite.models import DeepSeekLM

    results: dict = {}
    for ep in eps:
        groups = setup_expert_parallel(ep, 16) if ep > 1 else None
        for stage in (0, 1, 2):
            cfg = _cfg(ep, stage, world)
            torch.manual_seed(cfg.train.seed)
            model = DeepSeekLM(cfg)
            if groups is not None:
                apply_expert_parallel(model, groups)
            o = cfg.optim
            opt = torch.optim.AdamW(moe_param_groups(model, o.weight_decay), lr=o.lr)
            ds = deepspeed_config(cfg, cfg.grad_accumulation_steps(world))
            ds["zero_allow_untested_optimizer"] = True
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=opt, config=ds, dist_init_required=False
            )
            g = torch.Generator().manual_seed(1000 + rank)
            rec: dict = {}
            steps = BALANCE_STEPS if (ep > 1 and stage == 0) else 1
            ids_seen: dict[int, torch.Tensor] = {}
            hooks = [
                moe.router.register_forward_hook(
                    lambda _m, _i, out, i=i, d=ids_seen: d.__setitem__(
                        i, out.ids_TK.detach().clone()
                    )
                )
                for i, moe in enumerate(engine.module.moe_layers())
            ]
            for step in range(steps + 1):
                ids = torch.randint(0, V, (B, S), generator=g)
                loss = engine(ids, labels=ids).loss
                if ep > 1 and step in (0, steps):
                    key = "first" if step == 0 else "last"
                    rec[key] = [
                        (
                            ids_seen[i],
                            moe.dispatcher.last_comm_stats.bytes_sent,
                        )
                        for i, moe in enumerate(engine.module.moe_layers())
                    ]
                engine.backward(loss)
                if step < steps:
                    engine.step()
                    sync_and_update_bias(engine.module, GAMMA)
            # now: optimizer states exist (a step was taken) and this backward's grads are held
            rec["held"] = _held_bytes(engine)
            for h in hooks:
                h.remove()
            results[(ep, stage)] = rec
            del engine, opt, model
    return results


def _check_memory(results: list[dict], world: int, eps: list[int]) -> None:
    for ep in eps:
        for stage in (0, 1, 2):
            cfg = _cfg(ep, stage, world)
            lay = Layout(1, world, ep, stage, B, S, B * world, "fp32")
            gbuf = zero_grad_buffer(zero_param_groups(cfg, ep), lay)
            for rank, res in enumerate(results):
                want = model_state_bytes(param_breakdown(cfg), lay, gbuf[rank] if stage else None)
                held = res[(ep, stage)]["held"]
                got = sum(held.values())
                tag = f"world {world} ep {ep} zero {stage} rank {rank}: held {held}, plan {want}"
                assert abs(got - want.total) <= 0.05 * want.total, tag
                # each part on its own too (the 5% budget is DeepSpeed's alignment padding)
                assert abs(held["weights"] - want.weights) <= 0.05 * want.weights, tag
                assert abs(held["grads"] - want.grads) <= 0.05 * want.grads, tag
                assert abs(held["optimizer"] - want.optimizer) <= 0.05 * want.optimizer, tag


def _check_a2a(results: list[dict], world: int, ep: int) -> None:
    cfg = _cfg(ep, 0, world)
    K, D, E = cfg.moe.n_expert_per_token, cfg.model.dim, cfg.moe.n_routed_experts
    from deepsuite.planner import rows_from_routing

    recs = [r[(ep, 0)] for r in results]
    for key in ("first", "last"):
        n_layers = len(recs[0][key])
        for layer in range(n_layers):
            for group0 in range(0, world, ep):  # each EP group exchanges on its own
                members = range(group0, group0 + ep)
                send = {r: rows_from_routing(recs[r][key][layer][0], E, ep) for r in members}
                for r in members:
                    recv = [send[s][r - group0] for s in members]
                    fwd, _ = dispatcher_bytes(send[r], recv, D, K, 4)
                    assert fwd == recs[r][key][layer][1], (key, layer, r, fwd)
    # balanced: after the bias has worked, measured bytes vs the estimate for T = B*S tokens
    lay = Layout(1, world, ep, 0, B, S, B * world, "fp32")
    _, rows_P, _ = balanced_rows_per_token(cfg, lay)
    T = B * S
    send = [round(float(x) * T) for x in rows_P]
    expect, _ = dispatcher_bytes(send, send, D, K, 4)
    got = [b for rec in recs for _, b in rec["last"]]
    mean = sum(got) / len(got)
    assert abs(mean - expect) <= 0.10 * expect, (mean, expect, got)


def test_planner_matches_engine_two_ranks() -> None:
    results = run_ranks(_worker, 2, [1, 2], init="deepspeed", timeout_s=600)
    _check_memory(results, 2, [1, 2])
    _check_a2a(results, 2, 2)


def test_planner_matches_engine_four_ranks() -> None:
    results = run_ranks(_worker, 4, [4, 2], init="deepspeed", timeout_s=600)
    _check_memory(results, 4, [4, 2])
    _check_a2a(results, 4, 4)
    _check_a2a(results, 4, 2)
