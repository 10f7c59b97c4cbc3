"""Fused gate/up experts (this tree) vs the same experts with gate and up as two GEMMs (an older
tree's ``layers/moe/experts.py``), side by side in one process.

Letters: T tokens, D model dim, E experts, F expert hidden, K experts per token, N = T x K rows.

Both modules hold the same weights (the fused one loads the older one's state dict: the names
are the same) and take the same rows sorted by expert, the same counts and the same output
gradient; forward+backward of the experts alone (what the fusion changes), on the loop path
(the CPU's) and the grouped-GEMM path (the GPU's, also run on the CPU). Printed per path: GEMMs
and aten ops per forward+backward (counted by a dispatch mode, a proxy for kernel launches),
median time, and the ratio now / before, with the largest output difference.

    .venv/bin/python benchmarks/gate_up.py                       # vs 6e49e12, CPU
    .venv/bin/python benchmarks/gate_up.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepsuite.layers.moe import GroupedExperts

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "6e49e12"  # the last commit with gate and up as two parameters
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GEMMS = {"mm", "addmm", "_grouped_mm", "grouped_mm"}


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.gemms += func.overloadpacket.__name__ in GEMMS
        return func(*args, **(kwargs or {}))


def _older_experts(rev: str, tmp: str) -> type:
    """The older tree's GroupedExperts (``rev``: a git revision, or that tree's experts.py where
    there is no git history), loaded beside this one (its relative imports resolve to this
    tree's dispatch and grouped_mm, whose interfaces it used unchanged)."""
    path = Path(rev)
    if not path.is_file():
        src = subprocess.run(
            ["git", "show", f"{rev}:deepsuite/layers/moe/experts.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if src.returncode:
            raise SystemExit(f"--before {rev}: {src.stderr.strip()[-300:]}")
        path = Path(tmp) / "experts_before.py"
        path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("deepsuite.layers.moe._experts_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.GroupedExperts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512, help="expert hidden size F")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--before", default=BEFORE, help="git revision with unfused experts, or its experts.py"
    )
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        Old = _older_experts(a.before, tmp)
    torch.manual_seed(0)
    old = Old(a.experts, a.d_model, a.hidden).to(dev, dtype)
    new = GroupedExperts(a.experts, a.d_model, a.hidden).to(dev, dtype)
    new.load_state_dict(old.state_dict())
    n = a.tokens * a.top_k
    ids = torch.randint(0, a.experts, (n,), generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(ids, minlength=a.experts).to(dev)
    x = torch.randn(n, a.d_model, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(n, a.d_model, device=dev, dtype=dtype)

    def step(mod: torch.nn.Module) -> tuple[float, torch.Tensor]:
        for p in (*mod.parameters(), x):
            p.grad = None
        sync()
        t0 = time.perf_counter()
        y = mod(x, counts)
        y.backward(g)
        sync()
        return time.perf_counter() - t0, y.detach()

    print(
        f"device={dev} dtype={a.dtype} threads={torch.get_num_threads()} rows N={n} "
        f"(T={a.tokens} x K={a.top_k}) D={a.d_model} E={a.experts} F={a.hidden} "
        f"repeats={a.repeats} (median); before = {a.before}"
    )
    print(
        f"{'path':<12}{'':<8}{'GEMMs':>7}{'aten ops':>10}{'ms':>9}{'now/before':>12}{'max |dy|':>10}"
    )
    for path, grouped in (("loop", False), ("grouped_mm", True)):
        old.use_grouped_mm = new.use_grouped_mm = grouped
        rows = {}
        for name, mod in (("before", old), ("now", new)):
            step(mod)  # warm-up: first calls pay one-time dispatch and allocation costs
            with _Ops() as ops:
                _, y = step(mod)
            rows[name] = [ops.gemms, ops.ops, [], y]
        for _ in range(a.repeats):  # interleaved: both see the same machine state
            for name, mod in (("before", old), ("now", new)):
                rows[name][2].append(step(mod)[0])
        ms = {k: statistics.median(v[2]) * 1e3 for k, v in rows.items()}
        diff = float((rows["now"][3].float() - rows["before"][3].float()).abs().max())
        for name in ("before", "now"):
            gemms, n_ops = rows[name][:2]
            ratio = f"{ms['now'] / ms['before']:.2f}x" if name == "now" else ""
            dy = f"{diff:.1e}" if name == "now" else ""
            print(f"{path:<12}{name:<8}{gemms:>7}{n_ops:>10}{ms[name]:>9.1f}{ratio:>12}{dy:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
