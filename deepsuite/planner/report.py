"""Text report of a plan and the ``deepsuite plan`` command.

deepsuite plan CONFIG --nodes N --gpus-per-node G [--gpu h100|h800] [key=value ...]
deepsuite plan --shipped          the README's four configs on their intended clusters
deepsuite plan CONFIG --min-nodes  the fewest nodes it fits on, and the layout (also with --shipped)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from deepsuite.config import ConfigError, load_config
from deepsuite.planner.layout import HARDWARE, Hardware
from deepsuite.planner.plan import RESERVE, Plan, make_plan, suggestions

# (config, nodes, gpus per node, overrides, activation checkpointing, node-limited M): the
# README's shipped runs. V3: 256 GPUs, EP 64 x EDP 4 under ZeRO 3 (its YAML's layout).
SHIPPED: list[tuple[str, int, int, list[str], bool | None, int]] = [
    ("configs/tiny.yaml", 1, 2, [], False, 0),
    ("configs/deepseek_1b.yaml", 1, 8, [], False, 0),
    ("configs/deepseek_v2_lite_16b.yaml", 4, 8, [], True, 0),
    ("configs/deepseek_v3_671b.yaml", 32, 8, [], None, 4),  # its YAML turns checkpointing on
]


def _b(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _n(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(p: Plan) -> str:
    """The whole plan as text: numbers first, the assumptions they rest on last."""
    lay, pb, hw, st, m = p.layout, p.params, p.hardware, p.states, p.cfg.model
    local_exp = pb.all_experts // lay.ep
    lines = [
        f"== {p.cfg.name}: {lay.nodes} node(s) x {lay.gpus_per_node} GPUs = {lay.world} ranks, "
        f"EP {lay.ep} x EDP {lay.edp}, ZeRO {lay.zero_stage}, {lay.precision}, micro-batch "
        f"{lay.micro_batch} x {lay.seq_len} tokens, grad accum {lay.grad_accum}, global batch "
        f"{lay.global_batch}"
        + (", activation checkpointing" if lay.activation_checkpointing else ""),
        f"parameters (model)    total {_n(pb.total)}  activated/token {_n(pb.activated)}  (dense {_n(pb.dense)}, routed experts {_n(pb.routed_experts)}, MTP {_n(pb.mtp)})",
        f"parameters (per GPU)  {_n(p.params_held)} = dense {_n(pb.all_dense)} + local experts "
        f"{_n(local_exp)} ({m.n_layers - m.n_dense_layers} MoE layers x "
        f"{p.cfg.moe.n_routed_experts // lay.ep} experts)",
        "memory per GPU:",
        f"  weights             {_b(st.weights)}"
        + ("  (partitions + persistent parameters)" if lay.zero_stage == 3 else ""),
        f"  gradients           {_b(st.grads)}  (held when backward ends)",
        f"  optimizer states    {_b(st.optimizer)}  (fp32 master + Adam moments)",
        f"  DeepSpeed buffers   {_b(st.buffers)} held, {_b(st.backward_temp)} during backward, "
        f"{_b(st.step_temp)} inside the optimizer step",
        *(
            [f"  gathered parameters {_b(st.gathered)}  (ZeRO 3: blocks in flight and their grads)"]
            if lay.zero_stage == 3
            else []
        ),
        f"  activations         {_b(p.activations.total)}  (estimate, one micro-batch)",
        f"  peaks               {_b(st.peak_step)} inside the optimizer step, "
        f"{_b(st.peak_backward(p.activations.total))} in forward/backward",
        f"  total               {_b(p.memory_total)} of {_b(p.memory_budget)} usable "
        f"({hw.hbm_bytes / 1e9:.0f} GB less {RESERVE:.0%} reserve)",
        f"  MLA KV cache        {_b(p.kv_cache[0])} per micro-batch at inference "
        f"(plain MHA would need {_b(p.kv_cache[1])}, {p.kv_cache[1] / p.kv_cache[0]:.1f}x)",
        f"FLOPs                 {_n(p.flops_per_token)} per token (fwd+bwd"
        + ("+recompute" if lay.activation_checkpointing else "")
        + f"), {_n(p.flops_per_step_gpu)} per GPU per step, "
        f"{_n(p.flops_per_step_gpu * lay.world)} per step",
        "all-to-all per GPU per step (balanced routing; self-copy / NVLink / InfiniBand):",
    ]
    for label, rows in (("", p.a2a), (f" node-limited M={lay.node_limit}", p.a2a_node_limited)):
        for t in rows or []:
            lines.append(
                f"  {t.scheme + label:<28}{_b(t.self_bytes):>11} /{_b(t.intra_bytes):>11} /"
                f"{_b(t.inter_bytes):>11}"
            )
    r = p.reduce
    lines += [
        f"gradient reduction    dense {_b(r.dense_bytes)} ({'IB' if r.dense_inter else 'NVLink'}),"
        f" experts {_b(r.expert_bytes)} ({'IB' if r.expert_inter else 'NVLink'}) per GPU per step"
        + (" (ZeRO 3: parameter all-gathers included)" if lay.zero_stage == 3 else ""),
        f"step time (estimate)  {p.step_time:.4g} s = compute {p.time_compute:.4g} + all-to-all "
        f"{p.time_a2a:.4g} + reduction {p.time_reduce:.4g} (no overlap; fully overlapped "
        f"{max(p.time_compute, p.time_a2a + p.time_reduce):.4g} s)",
    ]
    if p.fits:
        lines.append("FITS")
    else:
        lines.append(
            f"DOES NOT FIT: needs {_b(p.memory_total)} per GPU, {_b(p.memory_budget)} usable."
        )
        fixes = suggestions(p)
        lines += [f"  change: {s}" for s in fixes] or [
            "  no single setting fixes it: add GPUs (--nodes), raise parallel.ep and the ZeRO "
            "stage together, or shrink the model"
        ]
    lines.append(
        f"assumptions: {hw.name}: {hw.hbm_bytes / 1e9:.0f} GB, {hw.flops / 1e12:.0f} TFLOP/s "
        f"bf16 at MFU {hw.mfu:.2f}, NVLink {hw.nvlink_bw / 1e9:.0f} GB/s, IB "
        f"{hw.ib_bw / 1e9:.0f} GB/s per GPU per direction; balanced routing (i.i.d. scores "
        "through the config's group-limited top-K); DeepSpeed with a torch AdamW; no pipeline "
        f"or tensor parallelism; vocab {p.vocab_size}"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="deepsuite plan",
        description="Capacity plan per GPU: parameters, memory, FLOPs, all-to-all, step time.",
    )
    ap.add_argument("config", nargs="?", help="YAML config (omit with --shipped)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", choices=sorted(HARDWARE), default="h100")
    ap.add_argument("--hbm-gb", type=float, help="override device memory (GB)")
    ap.add_argument("--tflops", type=float, help="override peak bf16 TFLOP/s")
    ap.add_argument("--mfu", type=float, help="override achieved fraction of peak")
    ap.add_argument("--nvlink-gbs", type=float, help="override NVLink GB/s per direction")
    ap.add_argument("--ib-gbs", type=float, help="override InfiniBand GB/s per GPU")
    ap.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="plan with it on (default: train.activation_checkpointing of the config)",
    )
    ap.add_argument("--node-limit", type=int, default=0, help="node-limited routing M (0 = off)")
    ap.add_argument("--vocab-size", type=int, help="when model.vocab_size is 0")
    ap.add_argument("--shipped", action="store_true", help="plan the README's shipped configs")
    ap.add_argument(
        "--min-nodes",
        action="store_true",
        help="search the fewest nodes (of --gpus-per-node GPUs) the config fits on: ZeRO 0-3, "
        "every EP size, activation checkpointing, micro-batch halvings",
    )
    ap.add_argument("--max-nodes", type=int, default=1024, help="upper end of --min-nodes")
    return ap


def plan_main(argv: Sequence[str] | None = None) -> int:
    """``deepsuite plan``: print the plan; exit 1 when it does not fit, 2 on bad input."""
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    hw = HARDWARE[args.gpu].replace(
        hbm_bytes=None if args.hbm_gb is None else args.hbm_gb * 1e9,
        flops=None if args.tflops is None else args.tflops * 1e12,
        mfu=args.mfu,
        nvlink_bw=None if args.nvlink_gbs is None else args.nvlink_gbs * 1e9,
        ib_bw=None if args.ib_gbs is None else args.ib_gbs * 1e9,
    )
    if args.shipped:
        runs = list(SHIPPED)
    elif args.config:
        runs = [
            (args.config, args.nodes, args.gpus_per_node, args.overrides,
             args.activation_checkpointing or None, args.node_limit)
        ]  # fmt: skip
    else:
        parser.error("give a CONFIG or --shipped")
    all_fit = True
    for path, nodes, gpn, overrides, ckpt, m in runs:
        if args.min_nodes:
            code = _print_min_nodes(path, overrides, gpn, hw, m, args)
            if code == 2:
                return 2
            all_fit &= code == 0
            continue
        try:
            cfg = load_config(path, overrides)
            p = make_plan(
                cfg, nodes, gpn, hardware=hw, activation_checkpointing=ckpt, node_limit=m,
                vocab_size=args.vocab_size,
            )  # fmt: skip
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:  # the layout's checks name the setting
            raise ConfigError(f"{path}: {err}") from err
        print(format_plan(p), end="\n\n")
        all_fit &= p.fits
    return 0 if all_fit else 1


def _print_min_nodes(
    path: str, overrides: list[str], gpn: int, hw: Hardware, m: int, args: argparse.Namespace
) -> int:
    """0: found (printed), 1: fits nowhere up to --max-nodes, 2: bad input (printed)."""
    from deepsuite.planner.search import min_nodes

    try:
        cfg = load_config(path, overrides)
        if args.max_nodes < 1:
            raise ValueError(f"--max-nodes: expected a positive int, got {args.max_nodes}")
        found = min_nodes(
            cfg, gpn, hardware=hw, node_limit=m, max_nodes=args.max_nodes,
            vocab_size=args.vocab_size,
        )  # fmt: skip
    except (ConfigError, ValueError, TypeError) as err:
        print(f"deepsuite plan: {path}: {err}")
        return 2
    if found is None:
        print(f"{path}: does not fit on {args.max_nodes} nodes of {gpn} GPUs in any layout\n")
        return 1
    print(f"{path}: {found.describe()}")
    print(format_plan(found.plan), end="\n\n")
    return 0
