"""Model FLOPs utilisation (MFU) of the MoE layer and of a whole training step, one device.

Letters: T tokens, D model dim, E routed experts, F expert hidden, K experts per token, S shared.
MFU = useful FLOPs / time / peak. Useful FLOPs count 2 per multiply-add of the ACTIVE weights
(router, K routed + S shared experts), x3 for forward+backward; the training step takes the
planner's ``forward_flops_per_token`` (activated matmul weights + causal attention), x3.
Peak: the datasheet dense bf16 rate (``--peak-tflops``, H100/H200 SXM 989; MFU column) and the
rate this script measures for one 8192^3 matmul on the same device ("achievable" column).

Modes:
  moe    ours (auto path: torch._grouped_mm on CUDA bf16), ours with the per-expert loop path,
         and the dense SwiGLU of the same active FLOPs, bf16 parameters;
  train  DeepSeekLM(config) forward+backward+AdamW, fp32 master weights under bf16 autocast,
         no DeepSpeed (single process).
--compile adds "ours compiled" (torch.compile(fullgraph=True)) to the MoE rows and compiles the
training step's blocks (``apply_compile``, what train.compile=true does).

    python3 benchmarks/mfu.py --mode moe,train --config configs/deepseek_1b.yaml   # on a GPU
    .venv/bin/python benchmarks/mfu.py --device cpu --dtype fp32 --tiny             # CPU smoke
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
from deepsuite.layers.mlp import SwiGLU  # noqa: E402
from deepsuite.layers.moe import DeepSeekMoE  # noqa: E402
from deepsuite.models.deepseek import DeepSeekLM  # noqa: E402
from deepsuite.planner.params import param_breakdown  # noqa: E402
from deepsuite.planner.plan import forward_flops_per_token  # noqa: E402
from deepsuite.training.compile import apply_compile  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _timeit(step: Callable[[], object], dev: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``step`` (device-synchronised)."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    ts = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured FLOP/s of one n^3 matmul (the achievable ceiling on this device)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = _timeit(lambda: a @ b, dev, 3, 10)
    return 2 * n**3 / t


def moe_flops(T: int, D: int, E: int, F: int, K: int, S: int) -> float:
    """Forward+backward FLOPs of the active weights: 3 x 2 x T x (router + (K+S) SwiGLUs)."""
    return 3 * 2 * T * (D * E + (K + S) * 3 * D * F)


def bench_moe(a: argparse.Namespace, dev: torch.device, shape: tuple[int, ...]) -> list[tuple]:
    T, D, E, F, K, S = shape
    dtype = DTYPES[a.dtype]
    torch.manual_seed(0)
    moe = DeepSeekMoE(D, S, E, K, F).to(dev, dtype).train()
    dense = SwiGLU(D, (K + S) * F).to(dev, dtype).train()
    x = torch.randn(T, D, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def step(fn: Callable[[torch.Tensor], torch.Tensor], mod: torch.nn.Module) -> None:
        for p in mod.parameters():
            p.grad = None
        fn(x).backward(g)

    rows = []
    for name, grouped in (("ours (auto)", None), ("ours loop path", False)):
        moe.experts.use_grouped_mm = grouped
        t = _timeit(lambda: step(lambda i: moe(i)[0], moe), dev, a.warmup, a.repeats)
        rows.append((name, t))
    moe.experts.use_grouped_mm = None
    if a.compile:
        fn = torch.compile(lambda i: moe(i)[0], fullgraph=True)
        rows.append(("ours compiled", _timeit(lambda: step(fn, moe), dev, a.warmup, a.repeats)))
    rows.append(("dense floor", _timeit(lambda: step(dense, dense), dev, a.warmup, a.repeats)))
    flops = moe_flops(T, D, E, F, K, S)
    return [(f"T={T} D={D} E={E}x{F} K={K} S={S}", n, t, flops) for n, t in rows]


def bench_train(a: argparse.Namespace, dev: torch.device) -> tuple[str, float, float, int]:
    over = list(a.override)
    cfg = load_config(a.config, over)
    B, L = a.batch, a.seq_len or cfg.data.seq_len
    if cfg.model.vocab_size <= 0:
        cfg = load_config(a.config, [*over, f"model.vocab_size={cfg.data.bpe_vocab_size}"])
    torch.manual_seed(0)
    model = DeepSeekLM(cfg).to(dev).train()
    if a.bf16_params:  # pure bf16 weights and AdamW states (no fp32 master, no autocast)
        model.to(torch.bfloat16)
    if a.loop_experts:
        for m in model.moe_layers():
            m.experts.use_grouped_mm = False
    if a.compile:
        apply_compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    V = cfg.model.vocab_size
    ids = torch.randint(0, V, (B, L + 1), device=dev)
    inp, lab = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    amp = DTYPES[a.dtype] if a.dtype != "fp32" and not a.bf16_params else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = model(inp, labels=lab).loss
        loss.backward()
        opt.step()

    t = _timeit(step, dev, a.warmup, a.repeats)
    fpt = forward_flops_per_token(cfg, param_breakdown(cfg), L)
    n_params = sum(p.numel() for p in model.parameters())
    return f"{Path(a.config).stem} B={B} S={L}", t, 3 * fpt * B * L, n_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", default="moe,train", help="comma list of moe, train")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 peak")
    ap.add_argument("--config", default=str(ROOT / "configs" / "deepseek_1b.yaml"))
    ap.add_argument("--override", action="append", default=[], help="config key=value")
    ap.add_argument("--batch", type=int, default=4, help="sequences per training step")
    ap.add_argument("--seq-len", type=int, default=0, help="0: the config's data.seq_len")
    ap.add_argument("--tokens", default="16384", help="comma list of MoE token counts")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16-params", action="store_true", help="train: bf16 weights, no autocast")
    ap.add_argument("--loop-experts", action="store_true", help="train: experts on the loop path")
    ap.add_argument("--compile", action="store_true", help="also / only compiled (see above)")
    ap.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    modes = set(a.mode.split(","))
    if not modes <= {"moe", "train"}:
        raise SystemExit(f"--mode: expected a comma list of moe, train; got {a.mode!r}")
    if a.tiny:
        a.tokens, a.batch, a.seq_len, a.repeats, a.warmup = "256", 1, 64, 2, 1
        a.override = [*a.override, "model.n_layers=2", "model.dim=128", "model.vocab_size=512"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    measured = matmul_peak(dev, DTYPES[a.dtype], 1024 if a.tiny else 8192)
    peak = a.peak_tflops * 1e12 if a.dtype == "bf16" else measured
    print(
        f"device: {name}  torch {torch.__version__}  dtype {a.dtype}  "
        f"grouped_mm: {hasattr(torch, '_grouped_mm')}  "
        f"bf16 matmul measured: {measured / 1e12:.0f} TFLOP/s  peak used: {peak / 1e12:.0f} TFLOP/s"
    )
    print(
        f"| {'what':<34}| {'variant':<15}| {'ms':>8} | {'TFLOP/s':>8} | {'MFU':>6} | achievable |"
    )
    print(f"|{'-' * 35}|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 12}|")

    def row(what: str, var: str, t: float, flops: float) -> None:
        fs = flops / t
        print(
            f"| {what:<34}| {var:<15}| {t * 1e3:>8.2f} | {fs / 1e12:>8.1f} | "
            f"{fs / peak:>6.1%} | {fs / measured:>10.1%} |",
            flush=True,
        )

    if "moe" in modes:
        cfg = load_config(a.config, a.override)
        m, e = cfg.model, cfg.moe
        shapes = []
        for T in (int(t) for t in a.tokens.split(",")):
            shapes.append((T, 512, 64, 512, 6, 1))  # the CPU comparison shape
            shapes.append(
                (T, m.dim, e.n_routed_experts, e.expert_intermediate_size,
                 e.n_expert_per_token, e.n_shared_experts)
            )  # fmt: skip
        for shape in shapes:
            for r in bench_moe(a, dev, shape):
                row(*r)
    if "train" in modes:
        what, t, flops, n = bench_train(a, dev)
        var = "bf16 weights" if a.bf16_params else f"{a.dtype} autocast"
        var += ", compiled" if a.compile else ""
        row(what + (" loop experts" if a.loop_experts else ""), var, t, flops)
        print(f"train: {n / 1e9:.3f}B parameters")
        if dev.type == "cuda":
            print(f"train peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
