"""Load balancing on the built-in corpus: the loss-free paper's comparison, same model, same tokens.

Trains the same small MoE LM (configs/tiny.yaml, one process, EP 1) once per balancing method
with the real trainer, and reports validation loss, global MaxVio on the validation batches
(mean over MoE layers) and mean batch MaxVio over training (mean of the logged per-step
values). MaxVio = max_i load_i / mean load - 1 (docs/formulas.md).

Methods: (a) none (no bias, no loss); (b) classic auxiliary loss (alpha ``--aux-alpha``);
(c) loss-free bias, gamma 0.001; (d) loss-free plus the complementary sequence-wise loss
(alpha 1e-4, as V3); (e) loss-free with the tiny config's gamma 0.01; (f) loss-free, gamma 0.003.

It also prints when the training MaxVio settles: the first step after which the window MaxVio
(``moe/max_vio_global``, the last 10 steps' summed counts, mean over MoE layers) stays under
``--settle`` (0.5), and the balancing bias's spread (max - min over experts, mean over layers)
there. Each expert's bias starts at 0 and moves at most gamma per step (overloaded experts down,
idle ones up), so the spread grows by at most 2 x gamma per step and a method can settle only
once gamma x steps reaches half the spread the router needs: the gamma rule in numbers
(benchmarks/RESULTS.md, "The gamma rule").

    .venv/bin/python benchmarks/balance.py                    # 300 steps each, ~2 min per method
    .venv/bin/python benchmarks/balance.py --steps 600 --methods c,f,e    # the settle steps
    .venv/bin/python benchmarks/balance.py --steps 20 --methods a,c
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "a": ("(a) no balancing", ["moe.bias_update_speed=0"]),
    "b": ("(b) aux loss", ["moe.bias_update_speed=0", "moe.aux_loss_alpha={aux}"]),
    "c": ("(c) loss-free g=0.001", ["moe.bias_update_speed=0.001"]),
    "d": ("(d) loss-free + seq loss", ["moe.bias_update_speed=0.001", "moe.seq_aux_alpha=0.0001"]),
    "e": ("(e) loss-free g=0.01", ["moe.bias_update_speed=0.01"]),
    "f": ("(f) loss-free g=0.003", ["moe.bias_update_speed=0.003"]),
}


def settle(records: list[dict], threshold: float) -> tuple[int | None, float | None]:
    """The first step after which the window MaxVio stays below ``threshold`` (None: it never
    does within the run) and the bias spread (max - min, mean over MoE layers) at that step."""
    series = [(r["step"], r["moe/max_vio_global"]) for r in records if "moe/max_vio_global" in r]
    step = None
    for s, v in reversed(series):
        if v >= threshold:
            break
        step = s
    if step is None:
        return None, None
    at = next(r for r in records if r["step"] == step)
    spreads = [max(b) - min(b) for k, b in at.items() if k.endswith("/bias") and b]
    return step, statistics.fmean(spreads) if spreads else None


def run_one(key: str, a: argparse.Namespace) -> dict:
    """Train one method in its own process; -> summary numbers."""
    label, over = METHODS[key]
    run_dir = Path(a.out) / key
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed
    over = [o.format(aux=a.aux_alpha) for o in over]
    cmd = [
        sys.executable, str(ROOT / "train" / "train.py"), a.config, "parallel.ep=1",
        f"train.steps={a.steps}", f"train.run_dir={run_dir}", f"train.eval_every={a.steps}",
        f"train.save_every={a.steps}", "logging.moe_every=1", "logging.wandb=disabled", *over,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"{label}: trainer exited {p.returncode}: {tail}")
    s = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    batch = [r["moe/max_vio"] for r in records if "moe/max_vio" in r]
    settle_step, spread = settle(records, a.settle)
    gamma = next((float(o.split("=")[1]) for o in over if "bias_update_speed" in o), 0.0)
    return {
        "label": label,
        "val_loss": s["val"]["loss/val"],
        "val_maxvio_global": s["val"]["moe/val_max_vio_global"],
        "mean_batch_maxvio": statistics.fmean(batch),
        "tokens_per_s": s["tokens_per_s"],
        "gamma": gamma,
        "settle_step": settle_step,
        "bias_spread": spread,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--methods", default="a,b,c,d,e", help="comma list from a,b,c,d,e,f")
    ap.add_argument("--settle", type=float, default=0.5, help="window MaxVio to stay under")
    ap.add_argument("--aux-alpha", type=float, default=0.001, help="(b)'s loss weight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / ".cache" / "bench" / "balance"))
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    keys = [k for k in a.methods.split(",") if k]
    if not keys or any(k not in METHODS for k in keys):
        raise SystemExit(
            f"--methods: expected a comma list from {sorted(METHODS)}, got {a.methods!r}"
        )
    rows = [run_one(k, a) for k in keys]
    toks = a.steps * 16 * 128  # tiny.yaml: global batch 16 x seq 128 (overrides aside)
    print(
        f"Load balancing: {Path(a.config).name}, EP 1, {a.steps} steps (~{toks / 1e3:.0f}k tokens)"
        f", aux alpha {a.aux_alpha}"
    )
    print(
        "| method                   | val loss | val MaxVio (global) | mean batch MaxVio "
        f"| settles (< {a.settle}) | gamma x steps | bias spread there |"
    )
    print(
        "|--------------------------|----------|---------------------|-------------------"
        "|----------------|---------------|-------------------|"
    )
    for r in rows:
        step = r["settle_step"]
        settled = f"step {step}" if step is not None else f"not in {a.steps}"
        budget = f"{r['gamma'] * step:.3f}" if step is not None and r["gamma"] else "-"
        spread = f"{r['bias_spread']:.3f}" if r["bias_spread"] is not None else "-"
        print(
            f"| {r['label']:<25}| {r['val_loss']:>8.4f} | {r['val_maxvio_global']:>19.3f} "
            f"| {r['mean_batch_maxvio']:>17.3f} | {settled:>14} | {budget:>13} | {spread:>17} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
