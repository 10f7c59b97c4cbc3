"""ZeRO 1 vs 2 vs 3 beside expert parallelism, and DeepSpeed's own AutoEP as a peer, on gloo ranks.

Both parts train a DeepSeek-V3-shaped model at EP 2 on 4 CPU ranks (EP 2 x EDP 2, so ZeRO 3
partitions the experts too) and report, per ZeRO stage, tokens/s (median over the timed steps,
the global batch over the slowest rank's step) and the measured peak memory per rank (the most
live tensor bytes any rank reached over one forward+backward and optimizer step, replayed from
the allocator's events, tests/distributed/memory.py), with ratios against the first row.

Part 1 (ours): configs/tiny.yaml, and the same blocks 3x wider on short sequences ("wide", where
the model states outweigh the activations), through the trainer's own engine build
(``build_engine``: torch AdamW, the shipped configs/deepspeed/zero{1,2,3}.json), with the
planner's figure for the same layout beside the measured peak.
Part 2 (peer): one random Hugging Face ``DeepseekV3ForCausalLM`` of the tiny config's shape, saved
once; ours loads it (``load_hf_model``) and DeepSpeed's AutoEP wraps transformers' model of it
(config section ``expert_parallel``, preset ``deepseek_v3``, autoep_size 2, a torch AdamW built by
DeepSpeed, as AutoEP needs); both see the same batches, and their first losses must agree
(the same weights and the same function).

DeepSpeed's buffer sizes are scaled down to the model as they are small next to a real one:
a 5e5-element gradient-reduction bucket (the default, 5e8 elements, is a 2 GB buffer here that
would hide every difference) and, under ZeRO 3, 5e5-element prefetch, live-parameter and reuse
limits with a 1e4-element persistence threshold (the defaults, 5e7 to 1e9 elements, would keep
this whole model gathered through forward and backward, as they keep a few of V3's blocks).

    .venv/bin/python benchmarks/zero_stages.py                 # ~10 min on 2 cores
    .venv/bin/python benchmarks/zero_stages.py --steps 4 --stages 1,3 --shapes wide --no-peer
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = 500_000
PERSIST = 10_000
VOCAB = 257
# name -> (config overrides, micro-batch, sequence length). "tiny": the tiny config, where the
# activations and DeepSpeed's buffers outweigh the model states; "wide": the same blocks 3x wider
# on short sequences, where the model states dominate (what ZeRO 3 is for).
SHAPES = {
    "tiny": ((), 4, 128),
    "wide": (
        ("model.dim=384", "model.inter_dim=1152", "mla.kv_lora_rank=128",
         "moe.expert_intermediate_size=384"),
        1,
        32,
    ),
}  # fmt: skip


def _tiny(stage: int, world: int, shape: str = "tiny"):
    from deepsuite.config import load_config

    extra, micro, seq = SHAPES[shape]
    return load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            "parallel.ep=2",
            f"parallel.zero_stage={stage}",
            f"parallel.deepspeed_config={ROOT}/configs/deepspeed/zero{stage}.json",
            f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * world}",
            f"data.seq_len={seq}",
            f"model.vocab_size={VOCAB}",
            *extra,
        ],
    )


def _zero_section(stage: int) -> dict:
    """The shipped JSON's zero_optimization with DeepSpeed's buffers scaled to this model."""
    zero = {**_read_json(stage)["zero_optimization"], "reduce_bucket_size": BUCKET}
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=BUCKET,
            stage3_max_live_parameters=BUCKET,
            stage3_max_reuse_distance=BUCKET,
            stage3_param_persistence_threshold=PERSIST,
        )
    return zero


def _batches(cfg, rank: int, n: int):
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len)
    return [torch.randint(0, VOCAB, shape, generator=g) for _ in range(n)]


def _run(engine, batches, forward, probe, after_step=None) -> dict:
    """One probed step, then the timed ones; returns tokens/s inputs and the memory record."""
    import torch.distributed as dist

    losses, times = [], []
    for i, ids in enumerate(batches):
        measured = i == 1  # the first step creates the optimizer states
        dist.barrier()
        t0 = time.perf_counter()
        with probe.phase("forward_backward") if measured else _null():
            loss = forward(engine, ids)
            engine.backward(loss)
        with probe.phase("step") if measured else _null():
            engine.step()
            if after_step is not None:
                after_step(engine)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if measured:
            memory = probe.result()  # stops the profiler: later steps run at full speed
    return {"step_s": times[2:], "losses": losses, "memory": memory}


def _next_tokens(ids):
    """Our labels are the targets per position (transformers shifts its own inside)."""
    import torch

    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def _null():
    import contextlib

    return contextlib.nullcontext()


def ours_worker(
    rank: int, world: int, stage: int, steps: int, hf_dir: str | None, shape: str = "tiny"
) -> dict:
    import torch

    from deepsuite.distributed import setup_expert_parallel
    from deepsuite.distributed.engine import build_engine, deepspeed_config
    from deepsuite.distributed.expert_parallel import apply_expert_parallel, sync_and_update_bias
    from deepsuite.models import DeepSeekLM
    from tests.distributed.memory import StepMemory

    torch.set_num_threads(1)
    cfg = _tiny(stage, world, shape)
    groups = setup_expert_parallel(2, cfg.moe.n_routed_experts)
    probe = StepMemory()
    if hf_dir:
        from deepsuite.models.hf import load_hf_model

        cfg_hf, model = load_hf_model(hf_dir, mtp=False)
        cfg.model, cfg.mla, cfg.moe = cfg_hf.model, cfg_hf.mla, cfg_hf.moe
    else:
        torch.manual_seed(cfg.train.seed)
        model = DeepSeekLM(cfg)
    apply_expert_parallel(model, groups, zero_stage=stage)
    ds = deepspeed_config(cfg, 1)
    ds["zero_optimization"] = _zero_section(stage)
    engine = build_engine(cfg, model, ds)
    return _run(
        engine,
        _batches(cfg, rank, steps + 2),
        lambda e, ids: e(ids, labels=_next_tokens(ids)).loss,
        probe,
        lambda e: sync_and_update_bias(e.module, cfg.moe.bias_update_speed),  # as the trainer
    )


def autoep_worker(rank: int, world: int, stage: int, steps: int, hf_dir: str) -> dict:
    import deepspeed
    import torch
    import transformers

    from tests.distributed.memory import StepMemory

    torch.set_num_threads(1)
    cfg = _tiny(stage, world)
    probe = StepMemory()
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    o = cfg.optim
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.train.global_batch_size,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**9,
        "zero_optimization": _zero_section(stage),
        # AutoEP replaces the MoE layers inside initialize, so the optimizer must be built after
        # it (a client optimizer holds the replaced parameters): DeepSpeed's, on torch's AdamW
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                       "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "expert_parallel": {"enabled": True, "autoep_size": 2, "preset_model": "deepseek_v3"},
    }  # fmt: skip
    engine = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds, dist_init_required=False
    )[0]
    out = _run(
        engine,
        _batches(cfg, rank, steps + 2),
        lambda e, ids: e(input_ids=ids, labels=ids).loss,
        probe,
    )
    out["bias_moved"] = any(
        bool(b.abs().sum() > 0)
        for n, b in engine.module.named_buffers()
        if n.endswith("e_score_correction_bias")
    )
    return out


def _read_json(stage: int) -> dict:
    import json

    return json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())


def _make_hf(path: Path) -> None:
    """A random DeepSeek-V3 of configs/tiny.yaml's shape, saved for both sides to load."""
    import torch

    from deepsuite.models import DeepSeekLM
    from deepsuite.models.hf import save_hf_checkpoint

    cfg = _tiny(1, 4)
    torch.manual_seed(0)
    model = DeepSeekLM(cfg)
    save_hf_checkpoint(model, path)


def _summary(rs: list[dict], cfg) -> dict:
    step = statistics.median(max(r["step_s"][i] for r in rs) for i in range(len(rs[0]["step_s"])))
    peak = max(max(r["memory"]["peak_step"], r["memory"]["peak_backward"]) for r in rs)
    loss1 = statistics.fmean(r["losses"][0] for r in rs)
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    return {"tok_s": tokens / step, "peak": peak, "loss1": loss1}


def _plan_peak(cfg, stage: int, world: int) -> float:
    import dataclasses

    from deepsuite.planner import Layout, activation_bytes, model_state_bytes
    from deepsuite.planner.plan import peak_memory, zero_settings_of

    zero = dataclasses.replace(zero_settings_of(cfg, stage), reduce_bucket_size=BUCKET)
    if stage == 3:
        zero = dataclasses.replace(
            zero, prefetch_bucket_size=BUCKET, param_persistence_threshold=PERSIST
        )
    t = cfg.train
    lay = Layout(1, world, 2, stage, t.micro_batch_size, cfg.data.seq_len,
                 t.global_batch_size, "fp32", zero=zero)  # fmt: skip
    return peak_memory(model_state_bytes(cfg, lay), activation_bytes(cfg, lay, VOCAB))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--peer-stages", default="2,3")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--shapes", default="tiny,wide", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "bench" / "zero"))
    a = ap.parse_args(argv)
    from deepsuite.planner import param_breakdown
    from tests.distributed.launch import run_ranks

    W = a.ranks
    stages = [int(s) for s in a.stages.split(",")]
    for shape in a.shapes.split(","):
        cfg = _tiny(1, W, shape)
        pb = param_breakdown(cfg)
        print(
            f"\nZeRO stages at EP 2 x EDP {W // 2} on {W} gloo ranks (OMP 1 each), shape {shape}"
            f" (dim {cfg.model.dim}, {pb.all_dense / 1e6:.2f}M dense + {pb.all_experts / 1e6:.2f}M "
            f"expert parameters), fp32, micro-batch {cfg.train.micro_batch_size} x "
            f"{cfg.data.seq_len} per rank, {a.steps} timed steps, reduction bucket {BUCKET:.0e}"
            + (
                f", ZeRO-3 prefetch/live/reuse {BUCKET:.0e}, persistence {PERSIST:.0e}"
                if 3 in stages
                else ""
            )
        )
        print("| ours | tokens/s | vs first | peak per rank (measured) | vs first | planner |")
        print("|---|---|---|---|---|---|")
        first = None
        for stage in stages:
            rs = run_ranks(ours_worker, W, stage, a.steps, None, shape, init="deepspeed",
                           timeout_s=900)  # fmt: skip
            row = _summary(rs, _tiny(stage, W, shape))
            first = first or row
            print(
                f"| ZeRO {stage} | {row['tok_s']:.0f} | {row['tok_s'] / first['tok_s']:.2f}x "
                f"| {row['peak'] / 1e6:.2f} MB | {row['peak'] / first['peak']:.2f}x "
                f"| {_plan_peak(_tiny(stage, W, shape), stage, W) / 1e6:.2f} MB |",
                flush=True,
            )
    if a.no_peer:
        return 0
    hf_dir = Path(a.out) / "hf_tiny_v3"
    if not (hf_dir / "config.json").is_file():
        _make_hf(hf_dir)
    print(
        "\nThe same Hugging Face DeepSeek-V3 weights and batches: ours (load_hf_model) vs "
        "DeepSpeed AutoEP (preset deepseek_v3), EP 2"
    )
    print("| ZeRO | implementation | tokens/s | vs ours | peak per rank | vs ours | first loss |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for stage in (int(s) for s in a.peer_stages.split(",")):
        cfg = _tiny(stage, W)
        ours = _summary(run_ranks(ours_worker, W, stage, a.steps, str(hf_dir),
                                  init="deepspeed", timeout_s=900), cfg)  # fmt: skip
        peer_rs = run_ranks(autoep_worker, W, stage, a.steps, str(hf_dir), init="deepspeed",
                            timeout_s=900)  # fmt: skip
        peer = _summary(peer_rs, cfg)
        for name, s in (("ours", ours), ("AutoEP", peer)):
            print(
                f"| {stage} | {name} | {s['tok_s']:.0f} | {s['tok_s'] / ours['tok_s']:.2f}x "
                f"| {s['peak'] / 1e6:.2f} MB | {s['peak'] / ours['peak']:.2f}x "
                f"| {s['loss1']:.5f} |",
                flush=True,
            )
        if abs(ours["loss1"] - peer["loss1"]) > 1e-4 * abs(ours["loss1"]):
            notes.append(f"ZeRO {stage}: first losses differ ({ours['loss1']} vs {peer['loss1']})")
        if any(r["bias_moved"] for r in peer_rs):
            notes.append(f"ZeRO {stage}: AutoEP's e_score_correction_bias moved")
    print("\n" + ("\n".join(notes) if notes else "first losses agree; AutoEP's bias stayed 0"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
