"""Forward+backward time of DeepSeekMoE vs its per-expert loop reference vs a dense SwiGLU floor.

The dense SwiGLU does the same ACTIVE FLOPs: hidden = (top_k + n_shared) * expert_hidden.
All variants run side by side in one process (interleaved repeats, median reported), training
mode, one fixed output gradient. Target: the MoE within 1.3x of the dense floor.

    .venv/bin/python benchmarks/moe_layer.py                    # default shape, fp32
    .venv/bin/python benchmarks/moe_layer.py --tokens 1024 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from deepsuite.layers.mlp import SwiGLU
from deepsuite.layers.moe import DeepSeekMoE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _step(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    g: torch.Tensor,
    params: list[torch.nn.Parameter],
    sync: Callable[[], None],
) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    sync()
    t0 = time.perf_counter()
    fn(x).backward(g)
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64, help="routed experts")
    ap.add_argument("--hidden", type=int, default=512, help="expert hidden size")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--shared", type=int, default=1, help="shared experts")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip the slow loop reference")
    ap.add_argument(
        "--grouped-mm",
        action="store_true",
        help="also time the torch._grouped_mm experts path on this device/dtype",
    )
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)
    moe = DeepSeekMoE(a.d_model, a.shared, a.experts, a.top_k, a.hidden).to(dev, dtype).train()
    dense = SwiGLU(a.d_model, (a.top_k + a.shared) * a.hidden).to(dev, dtype).train()
    x = torch.randn(a.tokens, a.d_model, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def moe_fast(inp: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
        moe.experts.use_grouped_mm = grouped
        return moe(inp)[0]

    variants: dict[str, tuple[Callable, list]] = {
        "DeepSeekMoE": (moe_fast, list(moe.parameters())),
    }
    if a.grouped_mm:
        variants["DeepSeekMoE grouped_mm"] = (lambda i: moe_fast(i, True), list(moe.parameters()))
    if not a.no_reference:
        variants["per-expert loop ref"] = (
            lambda i: moe.forward_reference(i)[0],
            list(moe.parameters()),
        )
    variants["dense SwiGLU floor"] = (dense, list(dense.parameters()))

    if a.grouped_mm:
        try:
            _step(variants["DeepSeekMoE grouped_mm"][0], x, g, [], sync)
        except (RuntimeError, NotImplementedError) as err:  # e.g. no fp32 grouped_mm kernel
            print(f"skipping grouped_mm: {str(err).splitlines()[0]}")
            del variants["DeepSeekMoE grouped_mm"]
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(a.warmup + a.repeats):
        for name, (fn, params) in variants.items():
            t = _step(fn, x, g, params, sync)
            if i >= a.warmup:
                times[name].append(t)
    moe.experts.use_grouped_mm = None

    counts = moe.last_stats.counts_E if moe.last_stats is not None else None
    vio = float(moe.last_stats.max_vio) if moe.last_stats is not None else float("nan")
    floor = statistics.median(times["dense SwiGLU floor"])
    print(
        f"device={dev} dtype={a.dtype} threads={torch.get_num_threads()} tokens={a.tokens} "
        f"d_model={a.d_model} experts={a.experts}x{a.hidden} top_k={a.top_k} shared={a.shared} "
        f"repeats={a.repeats} (median)  batch MaxVio={vio:.2f}"
        + (
            ""
            if counts is None
            else f" min/max tokens per expert={int(counts.min())}/{int(counts.max())}"
        )
    )
    print(f"{'variant':<26}{'fwd+bwd ms':>12}{'vs dense':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<26}{med * 1e3:>12.1f}{med / floor:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
