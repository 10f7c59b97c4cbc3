"""Who am I in the job: rank detection for torchrun, the deepspeed launcher, accelerate and SLURM."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from deepsuite.errors import LaunchError

__all__ = [
    "DistEnv",
    "detect_env",
    "first_slurm_host",
    "init_distributed",
    "resolve_backend",
    "start_process_group",
]

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    n_nodes: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "deepspeed" | "accelerate" | "slurm" | "none"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None or not first.group(1):
        raise LaunchError(f"SLURM_JOB_NODELIST: cannot parse a host from {nodelist!r}")
    prefix, ranges = first.group(1), first.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_tasks_per_node(value: str) -> int:
    """'4(x2),3' -> 4: the first node's task count."""
    m = re.match(r"(\d+)", value)
    if m is None:
        raise LaunchError(f"SLURM_TASKS_PER_NODE: cannot parse {value!r}")
    return int(m.group(1))


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError as err:
                raise LaunchError(f"{name}: expected an integer, got {env[name]!r}") from err
    if default is None:
        raise LaunchError(f"{' / '.join(names)}: expected one of these environment variables")
    return default


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's environment variables (``os.environ`` by default).

    torchrun / deepspeed / accelerate set RANK and friends (precedence over SLURM, so one SLURM
    task per node running torchrun works). With SLURM alone (one task per GPU) the ranks come from
    SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and MASTER_ADDR from the first host of the node
    list unless MASTER_ADDR is set; MASTER_PORT defaults to one derived from the job id.
    """
    env = os.environ if environ is None else environ
    if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", default=0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
        if any(k.startswith("ACCELERATE_") for k in env):
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env or "DS_LAUNCHER" in env or "LOCAL_SIZE" in env:
            launcher = "deepspeed"
        else:
            launcher = "torchrun"
        node_rank = _int(env, "GROUP_RANK", "NODE_RANK", "CROSS_RANK", default=rank // local_world)
        n_nodes = _int(env, "CROSS_SIZE", default=max(1, world // max(local_world, 1)))
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", default=DEFAULT_PORT)
    elif env.get("SLURM_PROCID", "") != "" and env.get("SLURM_NTASKS", "") != "":
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID", default=0)
        if env.get("SLURM_NTASKS_PER_NODE", "") != "":
            local_world = _slurm_tasks_per_node(env["SLURM_NTASKS_PER_NODE"])
        elif env.get("SLURM_TASKS_PER_NODE", "") != "":
            local_world = _slurm_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        else:
            local_world = 1
        node_rank = _int(env, "SLURM_NODEID", default=rank // local_world)
        n_nodes = _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        job = _int(env, "SLURM_JOB_ID", default=0)
        port = _int(env, "MASTER_PORT", default=20000 + job % 20000)
        launcher = "slurm"
    else:
        rank, world, local_rank, local_world, node_rank, n_nodes = 0, 1, 0, 1, 0, 1
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int(env, "MASTER_PORT", default=DEFAULT_PORT)
        launcher = "none"
    if not 0 <= rank < world:
        raise LaunchError(f"rank: expected 0 <= rank < world_size={world}, got {rank}")
    if not 0 <= local_rank < max(local_world, 1):
        raise LaunchError(
            f"local_rank: expected 0 <= local_rank < local_world_size={local_world}, "
            f"got {local_rank}"
        )
    return DistEnv(rank, world, local_rank, local_world, node_rank, n_nodes, addr, port, launcher)


def _init_on_agent_store(backend: str, info: DistEnv, timeout: timedelta) -> None:
    """Start the default group on torchrun's agent store under a per-attempt key prefix.

    Under ``torchrun --max-restarts`` the agent keeps the same store (and port) for every restart
    attempt and torch adds no prefix, so a rank of attempt 1 can read rank 0's address from
    attempt 0 and fail with "Gloo connectFullMesh ... Connection refused" (seen with torch 2.13
    and a plain script). Prefixing the keys with TORCHELASTIC_RESTART_COUNT keeps attempts apart.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"deepsuite/attempt_{attempt}", store),
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )


def resolve_backend(backend: str = "auto") -> str:
    """The torch.distributed backend for ``backend``: "auto" is nccl where CUDA is visible (as
    DeepSpeed's accelerator then is CUDA), gloo on the CPU; "nccl" without CUDA is an error."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend: expected 'auto', 'gloo' or 'nccl', got {backend!r}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("parallel.backend: 'nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    return backend


def start_process_group(backend: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Start torch.distributed's default process group (torch only, DeepSpeed not imported).

    A lone process (no launcher, world size 1) needs no rendezvous: its group lives on an
    in-memory store and binds no port, so any number of such runs share a machine. Under
    ``torchrun`` the group lives on the agent's store (:func:`_init_on_agent_store`); otherwise
    on ``env://`` (MASTER_ADDR / MASTER_PORT). Idempotent.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s: expected > 0 seconds, got {timeout_s}")
    info = detect_env()
    backend = resolve_backend(backend)
    # deepspeed reads env:// variables; SLURM-only launches do not set them
    for key, value in {
        "RANK": info.rank,
        "WORLD_SIZE": info.world_size,
        "LOCAL_RANK": info.local_rank,
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": info.master_port,
    }.items():
        os.environ.setdefault(key, str(value))
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if dist.is_initialized():
        return info
    timeout = timedelta(seconds=timeout_s)
    if info.launcher == "none" and info.world_size == 1:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _init_on_agent_store(backend, info, timeout)
    else:
        dist.init_process_group(
            backend, rank=info.rank, world_size=info.world_size, timeout=timeout
        )
    return info


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Keep DeepSpeed's 'deepspeed_shm_comm_op built successfully' line (a print, 0.19) off
    stdout; anything else it prints is passed on."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [ln for ln in buf.getvalue().splitlines() if not ln.endswith("built successfully")]
        if kept:
            print("\n".join(kept), file=sys.stdout, flush=True)


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Detect the environment, start torch.distributed (:func:`start_process_group`) and wrap
    it in DeepSpeed's comm layer (``deepspeed.init_distributed``).

    Args:
        backend: "auto" (nccl with CUDA, else gloo), "gloo" or "nccl".
        timeout_s: process-group timeout in seconds: a collective waiting longer raises (see
            ``deepsuite.distributed.comm.guard_collectives`` for a rank/step-naming error).

    Returns:
        The detected DistEnv. Idempotent: a second call only re-reads the environment.
    """
    info = start_process_group(backend, timeout_s)
    import deepspeed

    with _quiet_stdout():  # deepspeed only wraps the group started above
        deepspeed.init_distributed(
            dist_backend=resolve_backend(backend),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=timeout_s),
            verbose=False,
        )
    return info
