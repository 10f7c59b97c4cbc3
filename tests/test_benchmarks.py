"""The benchmark scripts still run and print their tables (tiny sizes; nothing here is timed).

The figures themselves come from ``benchmarks/run_all`` on a quiet machine; these only keep the
scripts from rotting as the layers change under them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_generate_decode_prints_both_and_agrees():
    out = _run(
        "benchmarks/generate_decode.py", "--models", "tiny", "--context", "32", "--new", "3",
        "--repeats", "1", "--threads", "1",
    )  # fmt: skip
    row = next(ln for ln in out.splitlines() if ln.startswith("| tiny"))
    assert row.rstrip().endswith("| yes |"), out  # the same greedy tokens as transformers


@pytest.mark.slow
def test_host_reads_compares_two_trees():
    """HEAD unpacked by git archive vs the working tree, each in its own process."""
    out = _run("benchmarks/host_reads.py", "--before", "HEAD", "--tokens", "64")
    rows = {
        ln.split("|")[1].strip(): ln.split("|")[2:-1] for ln in out.splitlines() if "path" in ln
    }
    assert set(rows) == {
        "MoE layer fwd+bwd, device path",
        "training step, device path",
        "MoE layer fwd+bwd, loop path",
        "training step, loop path",
    }, out
    assert rows["training step, device path"][1].strip() == "0", out  # reads now
    assert int(rows["training step, loop path"][1]) == 4, out  # one per MoE layer, by design


def test_gate_up_prints_both_paths_against_an_older_tree():
    """HEAD's experts (already fused) against the working tree's: the same GEMMs, the same output."""
    out = _run(
        "benchmarks/gate_up.py", "--before", "HEAD", "--tokens", "32", "--d-model", "32",
        "--hidden", "16", "--experts", "4", "--top-k", "2", "--repeats", "1",
    )  # fmt: skip
    rows = {tuple(ln.split()[:2]): ln.split()[2:] for ln in out.splitlines()[2:]}
    assert set(rows) == {(p, w) for p in ("loop", "grouped_mm") for w in ("before", "now")}, out
    for path in ("loop", "grouped_mm"):
        assert rows[(path, "now")][:2] == rows[(path, "before")][:2], out  # GEMMs, aten ops
        assert float(rows[(path, "now")][-1]) == 0.0, out  # max |dy|
    assert rows[("grouped_mm", "now")][0] == "6", out  # two grouped GEMMs forward, four back


def test_compiled_prints_eager_and_compiled_rows():
    out = _run(
        "benchmarks/compiled.py", *TINY, "--batch", "1", "--repeats", "1", "--warmup", "1",
        "--backend", "aot_eager", "--override", "model.n_layers=2", "--device", "cpu",
    )  # fmt: skip
    assert "| compiled" in out and "eager, loop path" in out and "1.00x" in out, out


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
