"""Launch N real gloo ranks on 127.0.0.1 for tests (reusable by any multi-process test).

    from tests.distributed.launch import run_ranks
    results = run_ranks(my_worker, 4, arg1, init="torch")   # my_worker(rank, world, arg1) -> Any

``fn`` must be a module-level function (it is pickled by name into spawned processes). Each rank
gets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT and
OMP_NUM_THREADS=1 set, the cache dirs kept under the checkout's .cache, and (``init``):
"torch" -> torch.distributed.init_process_group("gloo"), "deepspeed" ->
deepsuite.distributed.init_distributed (the DeepSpeed comm backend), None -> fn initialises itself.
Return values travel back through torch.save files. A failure on any rank raises RanksFailed with
every failing rank's traceback (or, with ``expect_failure=True``, is returned as a RankError).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DEEPSUITE_CACHE", ROOT / ".cache"))


@dataclass(frozen=True)
class RankError:
    """What a rank raised: exception type name, message and formatted traceback."""

    rank: int
    type_name: str
    message: str
    traceback: str


class RanksFailed(RuntimeError):
    """At least one rank raised or hung."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple,
    out_path: str,
    init: str | None,
    pg_timeout_s: float,
    extra_env: dict[str, str],
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **extra_env,
        }
    )
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        if init == "torch":
            from datetime import timedelta

            dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout_s))
        elif init == "deepspeed":
            from deepsuite.distributed.env import init_distributed

            init_distributed(backend="gloo", timeout_s=pg_timeout_s)
        result: Any = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out_path)
    except BaseException as err:
        info = RankError(rank, type(err).__name__, str(err), traceback.format_exc())
        torch.save({"ok": False, "error": info.__dict__}, out_path)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    init: str | None = "torch",
    timeout_s: float = 180.0,
    pg_timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    expect_failure: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return results.

    Args:
        timeout_s: wall-clock limit for the whole launch; ranks still alive then are killed.
        pg_timeout_s: process-group timeout each rank initialises with.
        env: extra environment for every rank.
        expect_failure: return RankError objects for failing ranks instead of raising.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    if init not in ("torch", "deepspeed", None):
        raise ValueError(f"init: expected 'torch', 'deepspeed' or None, got {init!r}")
    extra = {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(CACHE / "torch_extensions"),
        "HF_HOME": str(CACHE / "hf"),
        "WANDB_DIR": str(CACHE / "wandb"),
        "TMPDIR": str(CACHE / "tmp"),
        **(env or {}),
    }
    (CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(dir=CACHE / "tmp") as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_child,
                args=(fn, r, world_size, port, args, outs[r], init, pg_timeout_s, extra),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        first_fail: float | None = None
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            failed = any(p.exitcode not in (None, 0) for p in procs) or any(
                not p.is_alive() and _failed(outs[r]) for r, p in enumerate(procs)
            )
            if failed and first_fail is None:
                first_fail = now
            # peers of a failed rank usually block in a collective: give them a grace period
            grace = pg_timeout_s + 15 if expect_failure else 10.0
            if now > deadline or (first_fail is not None and now - first_fail > grace):
                break
            time.sleep(0.05)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        results: list[Any] = []
        errors: list[RankError] = []
        for r in range(world_size):
            if r in hung or not os.path.exists(outs[r]):
                why = (
                    "hung until the launch timeout"
                    if r in hung
                    else (
                        f"exited with code {procs[r].exitcode} before reporting (check stderr: an "
                        "import-time error, or a script without an if __name__ == '__main__' guard)"
                    )
                )
                err = RankError(r, "Hung" if r in hung else "Died", why, "")
                errors.append(err)
                results.append(err)
                continue
            rec = torch.load(outs[r], weights_only=False)
            if rec["ok"]:
                results.append(rec["result"])
            else:
                err = RankError(**rec["error"])
                errors.append(err)
                results.append(err)
    if errors and not expect_failure:
        detail = "\n".join(
            f"--- rank {e.rank}: {e.type_name}: {e.message}\n{e.traceback}" for e in errors
        )
        raise RanksFailed(f"{len(errors)} of {world_size} ranks failed:\n{detail}")
    return results


def _failed(path: str) -> bool:
    if not os.path.exists(path):
        return True
    try:
        return not torch.load(path, weights_only=False)["ok"]
    except Exception:
        return False
