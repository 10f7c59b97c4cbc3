"""Host reads and aten ops of the MoE layer and of a training step: this tree vs an older commit.

Letters: T tokens, D model dim, E routed experts, F expert hidden, K experts per token.
The older tree (unpacked by ``git archive`` into a temporary directory) runs in a process of its
own, this one in this process; both count with this tree's ``deepsuite.host_sync.HostSyncCounter`` (loaded by path):
host reads are the ops that make a GPU wait for the host (scalar reads, host copies, ops whose
output size depends on the data); aten ops are every op dispatched (a proxy for kernel launches).

Rows: the MoE layer forward+backward on the device path (grouped GEMMs, what a GPU runs) and on
the CPU's loop path; a training step of configs/tiny.yaml (packed documents with the dense
document mask and per-document positions, one MTP depth, the sequence-wise balance loss)
forward+backward plus the per-step bias update and statistics hand-off, on both paths. On CUDA a
third count comes from the driver itself: the synchronisations ``torch.cuda.set_sync_debug_mode``
reports.

    .venv/bin/python benchmarks/host_reads.py                      # this tree vs feba6bf, CPU
    python3 benchmarks/host_reads.py --device cuda --before DIR    # on a GPU; DIR: an unpacked
                                                                   # older tree (no git there)
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "feba6bf"  # the last commit before the host-read work


def _counter_class():
    """This tree's HostSyncCounter, whatever tree ``deepsuite`` is imported from."""
    if "_host_sync_now" not in sys.modules:
        path = ROOT / "deepsuite" / "host_sync.py"
        spec = importlib.util.spec_from_file_location("_host_sync_now", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_host_sync_now"] = mod
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return sys.modules["_host_sync_now"].HostSyncCounter


def _count(fn) -> dict:
    """Host reads and aten ops of one call of ``fn``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    fn()  # warm-up: lazy initialisation is not part of a step
    with _counter_class()() as reads, Ops():
        fn()
    places = [f"{n} x {place}" for place, n in reads.by_place().most_common()]
    out = {"reads": reads.count, "ops": Ops.n, "where": places}
    if torch.cuda.is_available():  # what the driver sees: every synchronising call
        out["cuda_syncs"] = len(sys.modules["_host_sync_now"].cuda_syncs(fn))
    return out


def worker(a: argparse.Namespace) -> dict:
    """Runs inside the process of one tree (its ``deepsuite`` first on sys.path)."""
    import numpy as np
    import torch

    from deepsuite.config import load_config
    from deepsuite.data.loader import make_batch, model_inputs
    from deepsuite.layers.moe import DeepSeekMoE
    from deepsuite.models import DeepSeekLM
    from deepsuite.training.moe_stats import MoEStatsTracker

    dev = torch.device(a.device)
    torch.manual_seed(0)
    T, D, E, F, K = a.tokens, a.d_model, a.experts, a.hidden, a.top_k
    moe = DeepSeekMoE(D, 1, E, K, F).to(dev).train()
    x = torch.randn(T, D, device=dev, requires_grad=True)
    g = torch.randn_like(x)

    def layer_step() -> None:
        moe(x)[0].backward(g)

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        ["parallel.ep=1", "model.vocab_size=256", "model.mtp_depth=1", "moe.seq_aux_alpha=0.01"],
    )
    model = DeepSeekLM(cfg).to(dev).train()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, cfg.data.seq_len + 1))
    docs = np.sort(rng.integers(0, 6, tokens.shape), axis=1)
    # the dense mask in both trees (the counters cannot watch flex_attention's compiled kernel)
    flex = {"flex": False} if "flex" in inspect.signature(model_inputs).parameters else {}
    batch = model_inputs(make_batch(tokens, docs), dev, document_masking=True, **flex)
    tracker = MoEStatsTracker(cfg.moe.n_routed_experts)

    def train_step() -> None:
        model(**batch).loss.backward()
        for i, m in enumerate(model.moe_layers()):  # what the trainer does after the backward
            counts = m.tokens_per_expert.clone()
            m.update_bias(counts)
            st = m.last_stats
            tracker.update(
                i, counts, m.router.expert_bias, entropy=st.entropy, seq_aux_loss=st.seq_aux_loss
            )

    out = {}
    for path, grouped in (("device path", True), ("loop path", False)):
        if dev.type == "cuda" and not grouped:
            continue  # the loop path is the CPU's
        moe.experts.use_grouped_mm = grouped
        for m in model.moe_layers():
            m.experts.use_grouped_mm = grouped
        out[f"MoE layer fwd+bwd, {path}"] = _count(layer_step)
        out[f"training step, {path}"] = _count(train_step)
    return out


def _run_tree(tree: Path, a: argparse.Namespace) -> dict:
    args = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--device", a.device,
        "--tokens", str(a.tokens), "--d-model", str(a.d_model), "--experts", str(a.experts),
        "--hidden", str(a.hidden), "--top-k", str(a.top_k),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{tree}: worker failed\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--before", default=BEFORE, help="git revision or unpacked tree to compare with; none: skip"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--where", action="store_true", help="list where each host read happens")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    with tempfile.TemporaryDirectory(prefix="host_reads_") as tmp:
        old = Path(a.before) if Path(a.before).is_dir() else Path(tmp)
        if a.before != "none" and not Path(a.before).is_dir():
            archive = subprocess.run(
                ["git", "archive", a.before, "deepsuite", "configs"], cwd=ROOT, capture_output=True
            )
            if archive.returncode != 0:
                raise SystemExit(f"--before {a.before}: {archive.stderr.decode()[-500:]}")
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        before = {} if a.before == "none" else _run_tree(old, a)
    sys.path.insert(0, str(ROOT))
    after = worker(a)
    tag = Path(a.before).name if Path(a.before).is_dir() else a.before
    print(
        f"host reads and aten ops, {a.device}: MoE T={a.tokens} D={a.d_model} E={a.experts}x"
        f"{a.hidden} K={a.top_k} S=1; training step configs/tiny.yaml B=4 S=128 + MTP"
    )
    cuda = any("cuda_syncs" in v for v in after.values())
    cols = [f"reads {tag}", "reads now", f"aten ops {tag}", "aten ops now"]
    cols += [f"CUDA syncs {tag}", "CUDA syncs now"] if cuda else []
    w = max(len(k) for k in after) + 1
    print(f"| {'what':<{w}}| " + " | ".join(cols) + " |")
    print(f"|{'-' * (w + 1)}|" + "|".join("-" * (len(c) + 2) for c in cols) + "|")
    for k, now in after.items():
        was = before.get(k, {})
        vals = [was.get("reads", "-"), now["reads"], was.get("ops", "-"), now["ops"]]
        vals += [was.get("cuda_syncs", "-"), now["cuda_syncs"]] if cuda else []
        cells = " | ".join(f"{v!s:>{len(c)}}" for v, c in zip(vals, cols, strict=True))
        print(f"| {k:<{w}}| {cells} |")
    if a.where:
        for name, res in (("before", before), ("now", after)):
            for k, v in res.items():
                for place in v["where"]:
                    print(f"{name:>6} {k}: {place}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
