"""Eager vs torch.compile: the MoE layer and a training step, side by side in one process.

Letters: T tokens, D model dim, E routed experts, F expert hidden, K experts per token.
MoE layer forward+backward: eager on the loop path (the CPU default), eager on the device path
(grouped GEMMs: what a GPU runs, and what compiles), compiled (``torch.compile(fullgraph=True)``,
inductor). Training step: DeepSeekLM(config) forward+backward+AdamW, eager vs ``apply_compile``
(every block compiled, as ``train.compile=true`` does). Compile time is reported apart (the
first calls); the timed steps are the median of ``--repeats`` after ``--warmup``, taken in turn
across the variants (interleaved) so that a drifting machine affects them alike.

    .venv/bin/python benchmarks/compiled.py                                  # CPU, tiny.yaml
    python3 benchmarks/compiled.py --device cuda --dtype bf16 --config configs/deepseek_1b.yaml
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepsuite.config import load_config  # noqa: E402
from deepsuite.layers.moe import DeepSeekMoE  # noqa: E402
from deepsuite.models.deepseek import DeepSeekLM  # noqa: E402
from deepsuite.training.compile import apply_compile  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _interleaved(
    steps: dict[str, Callable[[], object]], dev: torch.device, warmup: int, repeats: int
) -> list[tuple[str, float, float]]:
    """(name, seconds of the first call, median seconds of the timed calls) per step; the timed
    calls go round the variants in turn, so a machine whose speed drifts slows all alike."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(step: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    first = {name: timed(step) for name, step in steps.items()}  # compiles on the first call
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    ts: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            ts[name].append(timed(step))
    return [(name, first[name], statistics.median(ts[name])) for name in steps]


def bench_moe(a: argparse.Namespace, dev: torch.device) -> list[tuple[str, float, float]]:
    T, D, E, F, K = a.tokens, a.d_model, a.experts, a.hidden, a.top_k
    torch.manual_seed(0)
    moe = DeepSeekMoE(D, 1, E, K, F).to(dev, DTYPES[a.dtype]).train()
    x = torch.randn(T, D, device=dev, dtype=DTYPES[a.dtype], requires_grad=True)
    g = torch.randn_like(x)
    compiled = torch.compile(lambda i: moe(i)[0], fullgraph=True, backend=a.backend)

    def step(fn: Callable[[torch.Tensor], torch.Tensor], grouped: bool | None) -> Callable:
        def run() -> None:
            moe.experts.use_grouped_mm = grouped
            moe.zero_grad(set_to_none=True)
            fn(x).backward(g)

        return run

    eager = lambda i: moe(i)[0]  # noqa: E731
    steps = {"eager, device path": step(eager, True), "compiled": step(compiled, None)}
    if dev.type != "cuda":  # the loop path is the CPU's
        steps = {"eager, loop path": step(eager, False), **steps}
    return _interleaved(steps, dev, a.warmup, a.repeats)


def bench_train(a: argparse.Namespace, dev: torch.device) -> list[tuple[str, float, float]]:
    cfg = load_config(a.config, ["parallel.ep=1", *a.override])
    if cfg.model.vocab_size <= 0:
        cfg.model.vocab_size = 256 if cfg.data.tokenizer == "byte" else cfg.data.bpe_vocab_size
    B, L, V = a.batch, cfg.data.seq_len, cfg.model.vocab_size
    amp = DTYPES[a.dtype] if a.dtype != "fp32" else None  # fp32 master weights under autocast
    ids = torch.randint(0, V, (B, L + 1), device=dev, generator=None)
    steps = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = DeepSeekLM(cfg).to(dev).train()
        if name == "compiled":
            apply_compile(model, a.backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: DeepSeekLM = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
            loss.backward()
            opt.step()

        steps[name] = step
    return _interleaved(steps, dev, a.warmup, a.repeats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", default="moe,train", help="comma list of moe, train")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--override", action="append", default=[], help="config key=value")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backend", choices=["inductor", "aot_eager"], default="inductor")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    modes = set(a.mode.split(","))
    if not modes <= {"moe", "train"}:
        raise SystemExit(f"--mode: expected a comma list of moe, train; got {a.mode!r}")
    print(
        f"device {a.device}, {a.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"| {'what':<44}| {'variant':<19}| first call s | ms/step | vs eager |")
    print(f"|{'-' * 45}|{'-' * 20}|{'-' * 14}|{'-' * 9}|{'-' * 10}|")

    def table(what: str, rows: list[tuple[str, float, float]], base: str) -> None:
        ref = dict((n, t) for n, _, t in rows)[base]
        for name, first, t in rows:
            print(
                f"| {what:<44}| {name:<19}| {first:>12.1f} | {t * 1e3:>7.1f} | {t / ref:>7.2f}x |"
            )

    if "moe" in modes:
        what = f"MoE T={a.tokens} D={a.d_model} E={a.experts}x{a.hidden} K={a.top_k} S=1"
        rows = bench_moe(a, dev)
        table(what, rows, "eager, device path" if dev.type == "cuda" else "eager, loop path")
    if "train" in modes:
        what = f"train step {Path(a.config).stem} B={a.batch} (+AdamW)"
        table(what, bench_train(a, dev), "eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
