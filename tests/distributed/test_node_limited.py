"""Node-limited routing: router groups = EP ranks or nodes, so each token reaches <= M of them,
and the all-to-all sends exactly one row per distinct (token, destination rank)."""

from __future__ import annotations

import pytest
import torch

from deepsuite.distributed.topology import resolve_group_limit
from tests.distributed.launch import run_ranks


def test_ranks_derives_and_checks_n_group():
    # n_group=1 (unset) derives one group per EP rank; M stays topk_group
    lim = resolve_group_limit("ranks", 16, 1, 2, ep=4, ranks_per_node=4, world_size=4)
    assert (lim.n_group, lim.topk_group, lim.n_units) == (4, 2, 4)
    with pytest.raises(ValueError, match=r"moe.n_group=8 .*set moe.n_group=4"):
        resolve_group_limit("ranks", 16, 8, 2, ep=4, ranks_per_node=4, world_size=4)
    with pytest.raises(ValueError, match=r"moe.topk_group: expected at most 4"):
        resolve_group_limit("ranks", 16, 4, 5, ep=4, ranks_per_node=4, world_size=4)
    assert resolve_group_limit("experts", 16, 8, 3, 4, 4, 4).n_group == 8  # untouched


def test_nodes_uses_detected_topology():
    # ep 8 over nodes of 4 ranks: 2 node groups of 8 experts each
    lim = resolve_group_limit("nodes", 16, 1, 1, ep=8, ranks_per_node=4, world_size=8)
    assert (lim.n_group, lim.n_units) == (2, 2)
    with pytest.raises(ValueError, match="fits on one node"):
        resolve_group_limit("nodes", 16, 1, 1, ep=4, ranks_per_node=4, world_size=8)
    with pytest.raises(ValueError, match="not a multiple of the 4 ranks per node"):
        resolve_group_limit("nodes", 16, 1, 1, ep=6, ranks_per_node=4, world_size=12)
    with pytest.raises(ValueError, match="whole number of nodes"):
        resolve_group_limit("nodes", 16, 1, 1, ep=4, ranks_per_node=3, world_size=4)


def _worker(rank: int, world: int, unit: str, M: int) -> dict:
    import torch.distributed as dist

    from deepsuite.distributed.dispatch import AllToAllDispatcher
    from deepsuite.distributed.env import detect_env
    from deepsuite.layers.moe import DeepSeekMoE

    per_node = 2  # as two torchrun agents of 2 ranks would set it
    env = detect_env(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % per_node),
         "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(rank // per_node)}
    )  # fmt: skip
    E = 16
    lim = resolve_group_limit(unit, E, 1, M, world, env.local_world_size, env.world_size)
    torch.manual_seed(0)
    moe = DeepSeekMoE(32, 0, E, 4, 16, n_group=lim.n_group, topk_group=lim.topk_group)
    moe.router.expert_bias.copy_(torch.randn(E))  # routing far from uniform
    torch.manual_seed(100 + rank)
    x = torch.randn(64, 32)
    ref, _ = moe.forward_reference(x)  # every expert on this rank: the oracle
    L = E // world
    moe.experts = moe.experts.slice_experts(rank * L, (rank + 1) * L)
    moe.dispatcher = AllToAllDispatcher(E, None)
    out, _ = moe(x)
    ids = moe.router(x).ids_TK
    rank_of = ids // (E // world)  # expert -> EP rank
    node_of = rank_of // env.local_world_size
    dist.barrier()
    return {
        "n_group": lim.n_group,
        "ranks_per_token": [len(set(r.tolist())) for r in rank_of],
        "nodes_per_token": [len(set(n.tolist())) for n in node_of],
        "rows_sent": moe.dispatcher.last_comm_stats.rows_sent,
        "slots": moe.dispatcher.last_comm_stats.slots,
        "max_err": float((out - ref).abs().max()),
    }


CASES = [("ranks", 2), ("nodes", 1)]


def _cases_worker(rank: int, world: int) -> dict[tuple[str, int], dict]:
    """Every case in one launch of the 4 ranks (each case seeds and builds its own layer)."""
    return {(unit, M): _worker(rank, world, unit, M) for unit, M in CASES}


@pytest.fixture(scope="module")
def launched() -> list[dict[tuple[str, int], dict]]:
    return run_ranks(_cases_worker, 4)


@pytest.mark.parametrize(("unit", "M"), CASES)
def test_each_token_reaches_at_most_M_units_and_a2a_rows_are_the_dedup_minimum(launched, unit, M):
    res = [rank[(unit, M)] for rank in launched]
    for r in res:
        per_token = r["ranks_per_token"] if unit == "ranks" else r["nodes_per_token"]
        assert r["n_group"] == (4 if unit == "ranks" else 2)
        assert max(per_token) <= M
        assert max(per_token) == M  # the limit binds (bias makes tokens want more)
        # one row per distinct (token, rank): the minimum the routing implies
        assert r["rows_sent"] == sum(r["ranks_per_token"])
        assert r["rows_sent"] < r["slots"]  # K=4 slots per token collapsed onto <= M ranks' rows
        assert r["max_err"] < 1e-5  # the expert-parallel layer still equals the per-expert loop
