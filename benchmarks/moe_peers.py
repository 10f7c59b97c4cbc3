"""MoE layer forward+backward: ours vs the peers vs a dense SwiGLU floor, same shapes and weights.

Letters: T tokens, D model dim, E routed experts, F expert hidden, K experts per token, S shared.
Every variant runs in its OWN process (clean peak memory, the seed package shares our import
name) and gets the same router, routed-expert and shared-expert weights drawn from one seed, so
every router picks the same top-K experts (top-K of the logits does not depend on softmax vs
sigmoid; expert biases are zero). Peak memory: on CUDA, torch's peak allocation above the
weights and inputs; on CPU, the process's peak RSS above its RSS before the first step.

Variants: ours (deepsuite DeepSeekMoE), ours_amp (ours under bf16 autocast: fp32 weights, bf16
GEMMs, fp32 routing; the like-for-like row for titan in an fp32 table), dense (SwiGLU of hidden (K+S)F: same active FLOPs, the
floor), deepspeed (deepspeed.moe.layer.MoE, top-K, drop_tokens=False, shared expert added
beside it), hf (transformers DeepseekV3MoE, default experts kernel), hf_grouped (its
"grouped_mm" experts kernel), titan (torchtitan MoE; its experts always compute in bf16),
seed_eff / seed_loop (deepsuite==1.0.8 EfficientDeepSeekMoE / DeepSeekMoE from the PyPI wheel
unpacked under .cache/peers/seed). A variant that cannot run here is listed with the reason.

    .venv/bin/python benchmarks/moe_peers.py                       # issue shape, fp32 CPU
    .venv/bin/python benchmarks/moe_peers.py --tokens 512 --experts 16 --repeats 1
    python3 benchmarks/moe_peers.py --device cuda --dtype bf16 --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("DEEPSUITE_PEERS", ROOT / ".cache" / "peers"))  # fetch_peers.sh
ALL = [
    "ours",
    "ours_amp",
    "dense",
    "deepspeed",
    "hf",
    "hf_grouped",
    "titan",
    "seed_eff",
    "seed_loop",
]
SLOW = {"seed_loop": 256}  # per-token loop: timed on this many tokens, reported per token


def _rss(field: str = "VmRSS") -> int:
    """This process's resident bytes (VmRSS) or peak resident bytes since the reset (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def _weights(a: argparse.Namespace):
    import torch

    g = torch.Generator().manual_seed(0)
    D, E, F, S = a.d_model, a.experts, a.hidden, a.shared

    def u(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 2 - 1) / shape[-1] ** 0.5

    return {
        "router": u(E, D),
        "gate": u(E, F, D),
        "up": u(E, F, D),
        "down": u(E, D, F),
        "s_gate": u(S * F, D),
        "s_up": u(S * F, D),
        "s_down": u(D, S * F),
    }


def _build(name: str, a: argparse.Namespace):
    """-> (module, fn(x_TD) -> y_TD). Copies the shared weights in (same routing for all)."""
    import torch

    w = _weights(a)
    D, E, F, K, S = a.d_model, a.experts, a.hidden, a.top_k, a.shared

    def put(dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.no_grad():
            dst.copy_(src.reshape(dst.shape))

    if name in ("ours", "ours_amp"):
        from deepsuite.layers.moe import DeepSeekMoE

        m = DeepSeekMoE(D, S, E, K, F)
        put(m.router.weight, w["router"])
        for k in ("gate", "up", "down"):
            put(getattr(m.experts, f"{k}_proj"), w[k])
            put(getattr(m.shared_experts, f"{k}_proj").weight, w["s_" + k])
        if a.grouped_mm is not None:
            m.experts.use_grouped_mm = a.grouped_mm == "on"
        if name == "ours":
            return m, lambda x: m(x)[0]

        def amp(x: torch.Tensor) -> torch.Tensor:  # fp32 weights, bf16 compute (router fp32)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                y = m(x)[0]
            return y.to(x.dtype)

        return m, amp
    if name == "dense":
        from deepsuite.layers.mlp import SwiGLU

        m = SwiGLU(D, (K + S) * F)
        return m, m
    if name == "deepspeed":
        import deepspeed
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE

        from deepsuite.layers.mlp import SwiGLU

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(k, v)
            deepspeed.init_distributed(dist_backend="gloo")
        m = torch.nn.Module()
        m.moe = MoE(D, SwiGLU(D, F), num_experts=E, ep_size=1, k=K, drop_tokens=False)
        m.moe.set_deepspeed_parallelism()
        m.shared = SwiGLU(D, S * F)
        put(m.moe.deepspeed_moe.gate.wg.weight, w["router"])
        for e, ex in enumerate(m.moe.deepspeed_moe.experts.deepspeed_experts):
            for k in ("gate", "up", "down"):
                put(getattr(ex, f"{k}_proj").weight, w[k][e])
        for k in ("gate", "up", "down"):
            put(getattr(m.shared, f"{k}_proj").weight, w["s_" + k])
        return m, lambda x: m.moe(x)[0] + m.shared(x)
    if name in ("hf", "hf_grouped"):
        from transformers.models.deepseek_v3 import configuration_deepseek_v3 as c
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod

        kw = {"experts_implementation": "grouped_mm"} if name == "hf_grouped" else {}
        cfg = c.DeepseekV3Config(
            hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K,
            n_shared_experts=S, n_group=1, topk_group=1, routed_scaling_factor=1.0, **kw,
        )  # fmt: skip
        m = mod.DeepseekV3MoE(cfg)
        put(m.gate.weight, w["router"])
        put(m.experts.gate_up_proj, torch.cat([w["gate"], w["up"]], dim=1))
        put(m.experts.down_proj, w["down"])
        for k in ("gate", "up", "down"):
            put(getattr(m.shared_experts, f"{k}_proj").weight, w["s_" + k])
        return m, lambda x: m(x.unsqueeze(0)).squeeze(0)
    if name == "titan":
        sys.path.insert(0, str(PEERS / "tt"))
        from torchtitan.models.common import moe as tm
        from torchtitan.models.common.feed_forward import FeedForward
        from torchtitan.models.common.linear import Linear
        from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

        def lin(i: int, o: int) -> Linear.Config:
            return Linear.Config(in_features=i, out_features=o)

        cfg = tm.MoE.Config(
            num_experts=E,
            routed_experts=tm.RoutedExperts.Config(
                inner_experts=tm.GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E),
                token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K),
            ),
            router=tm.TokenChoiceTopKRouter.Config(
                num_experts=E, gate=lin(D, E), top_k=K, score_func="sigmoid", route_norm=True
            ),
            load_balance_coeff=None,
            shared_experts=FeedForward.Config(w1=lin(D, S * F), w2=lin(S * F, D), w3=lin(D, S * F)),
        )
        m = cfg.build()
        put(m.router.gate.weight, w["router"])
        ie = m.routed_experts.inner_experts
        put(ie.w1_EFD, w["gate"]), put(ie.w3_EFD, w["up"]), put(ie.w2_EDF, w["down"])
        put(m.shared_experts.w1.weight, w["s_gate"])
        put(m.shared_experts.w3.weight, w["s_up"])
        put(m.shared_experts.w2.weight, w["s_down"])
        return m, lambda x: m(x.unsqueeze(0)).squeeze(0)
    if name in ("seed_eff", "seed_loop"):
        import importlib.util

        # load only the seed's layers/moe.py (it imports torch alone; the package __init__
        # pulls in Lightning), with the unpacked wheel first on sys.path
        sys.path.insert(0, str(PEERS / "seed"))
        path = PEERS / "seed" / "deepsuite" / "layers" / "moe.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run benchmarks/fetch_peers.sh first")
        spec = importlib.util.spec_from_file_location("seed_moe", path)
        sm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sm)
        cls = sm.EfficientDeepSeekMoE if name == "seed_eff" else sm.DeepSeekMoE
        m = cls(d_model=D, n_shared_experts=S, n_routed_experts=E, n_expert_per_token=K, d_ffn=F)
        put(m.router.gate.weight, w["router"])
        for e, ex in enumerate(m.routed_experts):
            for k in ("gate", "up", "down"):
                put(getattr(ex, f"{k}_proj").weight, w[k][e])
        for s, ex in enumerate(m.shared_experts):
            put(ex.gate_proj.weight, w["s_gate"][s * F : (s + 1) * F])
            put(ex.up_proj.weight, w["s_up"][s * F : (s + 1) * F])
            put(ex.down_proj.weight, w["s_down"][:, s * F : (s + 1) * F])
        return m, lambda x: m(x.view(1, -1, D))[0].view(-1, D)
    raise ValueError(f"variant: expected one of {ALL}, got {name!r}")


def worker(name: str, a: argparse.Namespace) -> dict:
    """Build one variant, time fwd+bwd, return {ms, tok_s, peak_mib, tokens}."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    tokens = min(a.tokens, SLOW.get(name, a.tokens))
    m, fn = _build(name, a)
    m.to(dev, dtype).train()
    torch.manual_seed(1)
    x = torch.randn(tokens, a.d_model, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    params = [p for p in m.parameters() if p.requires_grad]
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(a.warmup + a.repeats):
        for p in params:
            p.grad = None
        x.grad = None
        sync()
        if i == a.warmup:  # peak memory of the timed steps, above what lives between steps
            if cuda:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                base = _rss()
                _reset_peak_rss()
        t0 = time.perf_counter()
        fn(x).backward(g)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    t = sorted(times)[len(times) // 2]
    return {"ms": t * 1e3, "tok_s": tokens / t, "peak_mib": (peak - base) / 2**20, "tokens": tokens}


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512, help="expert hidden size F")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: as is)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (at least 1)")
    ap.add_argument("--grouped-mm", choices=["on", "off"], help="force ours' grouped_mm path")
    ap.add_argument("--variants", default=",".join(ALL), help="comma list from " + ",".join(ALL))
    ap.add_argument("--timeout", type=float, default=600, help="seconds per variant")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a)), flush=True)
        return 0
    names = [n for n in a.variants.split(",") if n]
    bad = [n for n in names if n not in ALL]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; expected names from {ALL}")
    argv = list(sys.argv[1:] if argv is None else argv)
    rows: dict[str, dict] = {}
    for n in names:
        cmd = [sys.executable, __file__, *argv, "--worker", n]
        # fixed mmap threshold: large freed buffers go back to the OS, so RSS tracks live tensors
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if out:
                rows[n] = json.loads(out[-1][7:])
            else:
                err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                rows[n] = {"error": err[:110]}
        except subprocess.TimeoutExpired:
            rows[n] = {"error": f"over {a.timeout:.0f} s"}
    print(
        f"MoE fwd+bwd  device={a.device} dtype={a.dtype} threads={a.threads or 'default'} "
        f"T={a.tokens} D={a.d_model} E={a.experts} F={a.hidden} K={a.top_k} S={a.shared} "
        f"(median of {a.repeats})"
    )
    ours = rows.get("ours", {}).get("tok_s")
    dense = rows.get("dense", {}).get("tok_s")
    print(
        f"| {'variant':<11}| {'ms/step':>9} | {'tokens/s':>9} | {'peak MiB':>8} "
        f"| {'time vs ours':>12} | {'time vs dense':>13} |"
    )
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 14}|{'-' * 15}|")
    for n, r in rows.items():
        if "error" in r:
            print(f"| {n:<11}| not run: {r['error']}")
            continue
        ms = r["ms"] * a.tokens / r["tokens"]  # per-token loops are scaled to the full batch
        vo = f"{ours / r['tok_s']:.2f}x" if ours else "-"
        vd = f"{dense / r['tok_s']:.2f}x" if dense else "-"
        note = "" if r["tokens"] == a.tokens else f" ({r['tokens']} tok, scaled)"
        print(
            f"| {n:<11}| {ms:>9.1f} | {r['tok_s']:>9.0f} | {r['peak_mib']:>8.0f} "
            f"| {vo:>12} | {vd:>13} |{note}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
