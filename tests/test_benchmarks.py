"""The benchmark scripts still run and print their tables (tiny sizes; nothing here is timed).

The figures themselves come from ``benchmarks/run_all`` on a quiet machine; these only keep the
scripts from rotting as the layers change under them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tokens", "64", "--d-model", "32", "--experts", "8", "--hidden", "16", "--top-k", "2"]


def _run(*args: str) -> str:
    p = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_moe_peers_prints_a_row_per_variant():
    out = _run(
        "benchmarks/moe_peers.py", *TINY, "--repeats", "1", "--variants", "ours,ours_amp,dense"
    )
    rows = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ")}
    assert {"ours", "ours_amp", "dense"} <= rows.keys(), out
    assert "not run" not in out, out
    assert "1.00x" in rows["ours"]  # ours against itself


def test_moe_layer_prints_the_reference_ratio():
    out = _run("benchmarks/moe_layer.py", *TINY, "--repeats", "1", "--device", "cpu")
    assert "loop ref" in out and "dense SwiGLU floor" in out, out


def test_mfu_cpu_smoke_reports_both_modes():
    """The GPU MFU script's documented CPU smoke: the MoE layer rows and the training step row."""
    out = _run("benchmarks/mfu.py", "--device", "cpu", "--dtype", "fp32", "--tiny")
    assert "ours (auto)" in out and "dense floor" in out, out
    assert "MFU" in out, out


def test_balance_settle_step_is_the_first_after_which_maxvio_stays_low():
    import importlib.util

    spec = importlib.util.spec_from_file_location("balance", ROOT / "benchmarks/balance.py")
    balance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(balance)
    vio = [3.0, 0.4, 0.9, 0.45, 0.3, 0.2]  # dips under 0.5 at step 2, stays from step 4
    recs = [
        {"step": s, "moe/max_vio_global": v, "moe/layer1/bias": [-0.1 * s, 0.1 * s]}
        for s, v in enumerate(vio, start=1)
    ]
    step, spread = balance.settle(recs, 0.5)
    assert step == 4 and abs(spread - 0.8) < 1e-12
    assert balance.settle(recs, 0.1) == (None, None)
