"""Failing together: an error on some ranks reaches every rank in one collective (2 gloo ranks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from deepsuite.distributed.agree import fail_together
from deepsuite.errors import DataError
from tests.distributed.launch import run_ranks

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


SCENARIOS = {  # name: which rank fails, and how
    "known-on-one": {1: "known"},
    "known-on-all": {0: "known", 1: "known"},
    "bug-on-one": {0: "bug"},
    "none": {},
}


def _phases(rank: int, world: int) -> dict[str, tuple[str, str, str]]:
    """Every scenario in turn on the same ranks: (exception type, message, traceback)."""
    out = {}
    for name, failing in SCENARIOS.items():
        try:
            with fail_together("the phase"):
                kind = failing.get(rank)
                if kind == "known":
                    raise DataError(f"data.source: missing on rank {rank}")
                if kind == "bug":
                    raise KeyError("bug")
            out[name] = ("passed", "", "")
        except Exception as err:
            out[name] = (type(err).__name__, str(err), traceback.format_exc())
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_phases, 2)


def test_a_known_error_on_one_rank_stops_every_rank_with_its_message(ranks):
    got = [r["known-on-one"] for r in ranks]
    assert [t for t, _, _ in got] == ["DataError", "DataError"]
    assert {m for _, m, _ in got} == {
        "data.source: missing on rank 1 (found by rank 1 in the phase)"
    }


def test_every_rank_failing_keeps_the_first_message_unchanged(ranks):
    assert {r["known-on-all"][1] for r in ranks} == {"data.source: missing on rank 0"}


def test_a_bug_keeps_its_traceback_and_names_the_rank_elsewhere(ranks):
    (t0, _, tb0), (t1, m1, _) = ranks[0]["bug-on-one"], ranks[1]["bug-on-one"]
    assert t0 == "KeyError" and 'raise KeyError("bug")' in tb0
    assert t1 == "RankFailed"
    assert "rank 0 failed in the phase with an unexpected error (KeyError" in m1


def test_no_error_is_a_barrier(ranks):
    assert [r["none"][0] for r in ranks] == ["passed", "passed"]


def test_a_lone_process_binds_no_port():
    """Two plain runs on one machine must not collide: with MASTER_PORT taken by another
    process, a lone process still starts its group (an in-memory store, no TCP port)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
        code = (
            "import torch.distributed as dist\n"
            "from deepsuite.distributed.env import start_process_group\n"
            "start_process_group('gloo', 30)\n"
            "t = __import__('torch').ones(1); dist.all_reduce(t); print(int(t.item()))\n"
        )
        p = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "1"
