"""Rank detection (pure), EP validation (pure), and fail-fast checks on real gloo ranks."""

from __future__ import annotations

import time

import pytest

from deepsuite.config import validate_expert_parallel
from deepsuite.distributed.env import detect_env, first_slurm_host
from tests.distributed.launch import RankError, run_ranks


def test_torchrun_env() -> None:
    env = {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "x",
    }  # fmt: skip
    e = detect_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (5, 8, 1, 4)
    assert (e.node_rank, e.n_nodes, e.master_addr, e.master_port) == (1, 2, "10.0.0.7", 29400)
    assert e.launcher == "torchrun"


def test_deepspeed_launcher_env() -> None:
    env = {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
        "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "h0", "MASTER_PORT": "29500",
    }  # fmt: skip
    e = detect_env(env)
    assert (e.rank, e.local_world_size, e.node_rank, e.n_nodes) == (3, 2, 1, 2)
    assert e.launcher == "deepspeed"


def test_accelerate_env() -> None:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    e = detect_env(env)
    assert (e.rank, e.world_size, e.launcher, e.n_nodes) == (1, 2, "accelerate", 1)


def test_slurm_one_task_per_gpu() -> None:
    env = {
        "SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
        "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "12345",
    }  # fmt: skip
    e = detect_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size) == (6, 8, 2, 4)
    assert (e.node_rank, e.n_nodes, e.master_addr, e.launcher) == (1, 2, "gpu07", "slurm")
    assert e.master_port == 20000 + 12345 % 20000
    # MASTER_ADDR set by the sbatch script wins (node names may not resolve)
    assert detect_env({**env, "MASTER_ADDR": "127.0.0.1"}).master_addr == "127.0.0.1"


def test_slurm_task_per_node_running_torchrun_uses_torchrun_vars() -> None:
    env = {
        "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "3", "WORLD_SIZE": "4",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "j",
    }  # fmt: skip
    e = detect_env(env)
    assert (e.rank, e.world_size, e.node_rank, e.launcher) == (3, 4, 1, "torchrun")


def test_single_process_and_bad_values() -> None:
    e = detect_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "none")
    with pytest.raises(ValueError, match="RANK"):
        detect_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank"):
        detect_env({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("n1", "n1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-b[1,2]", "a-b1"), ("x,y", "x")],
)
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_validate_expert_parallel_messages() -> None:
    validate_expert_parallel(8, 4, 2)
    with pytest.raises(ValueError, match=r"n_routed_experts=6 is not divisible by parallel.ep=4"):
        validate_expert_parallel(6, 8, 4)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by parallel.ep=4"):
        validate_expert_parallel(8, 6, 4)
    with pytest.raises(ValueError, match=r"parallel.ep=16 exceeds moe.n_routed_experts=8"):
        validate_expert_parallel(8, 16, 16)


def _misconfig_worker(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from deepsuite.distributed import CollectiveTimeoutError, guard_collectives
    from deepsuite.distributed.groups import check_same_config, setup_expert_parallel

    out: dict = {}
    for key, ep, n_exp in (("world", 4, 8), ("experts", 2, 5)):
        try:
            setup_expert_parallel(ep, n_exp)
        except ValueError as err:
            out[key] = str(err)
    check_same_config({"lr": 1e-3, "ep": 2})  # equal: passes
    try:
        check_same_config({"lr": 1e-3 if rank == 0 else 2e-3, "ep": 2})
    except ValueError as err:
        out["config"] = str(err)
    # a peer that never joins the collective: the waiting rank gets a named timeout error
    if rank == 0:
        t0 = time.monotonic()
        try:
            with guard_collectives("train step", step=7):
                dist.all_reduce(torch.ones(3))
        except CollectiveTimeoutError as err:
            out["timeout"] = str(err)
            out["waited"] = time.monotonic() - t0
    else:
        time.sleep(8.0)
    return out


@pytest.mark.distributed
def test_misconfiguration_fails_fast_on_every_rank() -> None:
    results = run_ranks(_misconfig_worker, 2, pg_timeout_s=3.0, timeout_s=120)
    assert not any(isinstance(r, RankError) for r in results)
    for rank, r in enumerate(results):
        assert "world size 2 is not divisible by parallel.ep=4" in r["world"], rank
        assert "n_routed_experts=5 is not divisible by parallel.ep=2" in r["experts"], rank
        assert "ranks [1] resolved a different config" in r["config"], rank
    assert "rank 0" in results[0]["timeout"] and "step 7" in results[0]["timeout"]
    assert results[0]["waited"] < 30
