"""Expert-parallel dispatch on gloo ranks: bytes on the wire, all-to-all share, EP throughput.

Letters: P ranks, T tokens per rank, D model dim, E experts, K slots per token, F expert hidden.
Part 1 (layer): one DeepSeekMoE (the tiny config's MoE shape by default) sharded over P = 2 and 4
ranks with ``AllToAllDispatcher``; every rank routes its own T tokens. Per rank and forward:
- bytes sent to other ranks (``last_comm_stats.bytes_sent``: dispatch rows + ids/weights +
  combine rows + split counts, less the rows a rank sends itself), against the dedup minimum
  (each (token, remote rank) row crossing once, there and back, payload only: 2 x remote rows x
  D x itemsize) and against a dispatcher without dedup (one row per remote (token, slot):
  2 x remote slots x D x itemsize). Averaged over ranks, sent and received rows are equal, so
  the 2x is exact for the mean;
- share of the forward+backward step spent in the forward's all-to-alls (``a2a_time_s``; the
  backward's exchanges are not timed, so the true share is higher).
Part 2 (trainer): tokens/s of the tiny config at EP 2 on 2 ranks vs 1 rank (EP 1, same global
batch), both with the real trainer for ``--steps`` steps (torchrun for 2 ranks); median per-step
tokens/s from steps 3 on.

    .venv/bin/python benchmarks/ep_dispatch.py                        # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/ep_dispatch.py --ranks 2 --steps 0    # layer part only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def layer_worker(rank: int, world: int, a: dict) -> dict:
    """One EP rank: shard the experts, time fwd+bwd, return this rank's traffic and timings."""
    import torch

    from deepsuite.distributed.dispatch import AllToAllDispatcher
    from deepsuite.layers.moe import DeepSeekMoE

    torch.manual_seed(0)  # identical weights on every rank
    D, E, K, F = a["d_model"], a["experts"], a["top_k"], a["hidden"]
    moe = DeepSeekMoE(D, 1, E, K, F, n_group=a["groups"], topk_group=a["topk_groups"])
    L = E // world
    moe.experts = moe.experts.slice_experts(rank * L, (rank + 1) * L)
    moe.dispatcher = AllToAllDispatcher(E)
    torch.manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(a["tokens"], D, requires_grad=True)
    g = torch.randn_like(x)
    with torch.no_grad():
        ids = moe.router(x).ids_TK
    dest = torch.where(ids >= 0, ids // L, -1)
    remote_slots = int(((dest >= 0) & (dest != rank)).sum())
    steps, a2a = [], []
    for i in range(a["warmup"] + a["repeats"]):
        for p in moe.parameters():
            p.grad = None
        t0 = time.perf_counter()
        moe(x)[0].backward(g)
        dt = time.perf_counter() - t0
        if i >= a["warmup"]:
            steps.append(dt)
            a2a.append(moe.dispatcher.last_comm_stats.a2a_time_s)
    s = moe.dispatcher.last_comm_stats
    row = D * x.element_size()
    self_rows = s.rows_sent - s.rows_sent_remote  # rows to this rank itself never hit the wire
    return {
        "bytes_sent": s.bytes_sent - self_rows * (2 * row + 8 * K),
        "dedup_min": 2 * s.rows_sent_remote * row,
        "no_dedup": 2 * remote_slots * row,
        "rows_remote": s.rows_sent_remote,
        "remote_slots": remote_slots,
        "step_s": statistics.median(steps),
        "a2a_s": statistics.median(a2a),
    }


def trainer_tokens_per_s(ranks: int, steps: int, out: Path) -> float:
    """Median per-step tokens/s (steps 3+) of configs/tiny.yaml at EP ``ranks``, from the
    trainer's metrics.jsonl."""
    run_dir = out / f"ep{ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    over = [f"parallel.ep={ranks}", f"train.steps={steps}", f"train.run_dir={run_dir}",
            f"train.eval_every={steps}", f"train.save_every={steps}", "logging.wandb=disabled"]  # fmt: skip
    train = [str(ROOT / "train" / "train.py"), str(ROOT / "configs" / "tiny.yaml"), *over]
    if ranks == 1:
        cmd = [sys.executable, *train]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", f"--nproc_per_node={ranks}", *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"EP {ranks} run failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r and r["step"] > 2]
    return statistics.median(tps)  # steady state: the first two steps warm up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ranks", default="2,4", help="comma list of EP sizes for the layer part")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--groups", type=int, default=4, help="router groups (n_group)")
    ap.add_argument("--topk-groups", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="trainer steps for part 2 (0: skip)")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "bench" / "ep"))
    a = ap.parse_args(argv)
    from tests.distributed.launch import run_ranks

    cfg = {k: getattr(a, k) for k in ("d_model", "experts", "top_k", "hidden", "groups",
                                      "topk_groups", "tokens", "repeats", "warmup")}  # fmt: skip
    print(
        f"EP dispatch (gloo, OMP 1 per rank): T={a.tokens}/rank D={a.d_model} E={a.experts} "
        f"K={a.top_k} F={a.hidden} groups {a.groups}/{a.topk_groups}, fp32, per rank per forward"
    )
    print(
        "| P | bytes sent | dedup minimum | sent/min | no-dedup bytes | no-dedup/sent "
        "| fwd+bwd ms | fwd a2a ms | a2a share |"
    )
    print("|" + "|".join("-" * w for w in (3, 12, 15, 10, 16, 15, 12, 12, 11)) + "|")
    for P in (int(p) for p in a.ranks.split(",")):
        rs = run_ranks(layer_worker, P, cfg, init="torch", timeout_s=300)
        m = {k: statistics.fmean(r[k] for r in rs) for k in rs[0]}
        print(
            f"| {P} | {m['bytes_sent']:>10.0f} | {m['dedup_min']:>13.0f} "
            f"| {m['bytes_sent'] / m['dedup_min']:>7.3f}x | {m['no_dedup']:>14.0f} "
            f"| {m['no_dedup'] / m['bytes_sent']:>12.3f}x | {m['step_s'] * 1e3:>10.1f} "
            f"| {m['a2a_s'] * 1e3:>10.1f} | {m['a2a_s'] / m['step_s']:>9.1%} |",
            flush=True,
        )
    if a.steps:
        out = Path(a.out)
        t1 = trainer_tokens_per_s(1, a.steps, out)
        t2 = trainer_tokens_per_s(2, a.steps, out)
        print(f"\nTrainer, configs/tiny.yaml, {a.steps} steps, global batch 16 x 128, 2 cores:")
        print("| run | tokens/s | vs 1 rank |\n|-----|----------|-----------|")
        print(f"| 1 rank, EP 1 | {t1:.0f} | 1.00x |")
        print(f"| 2 ranks, EP 2 | {t2:.0f} | {t2 / t1:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
