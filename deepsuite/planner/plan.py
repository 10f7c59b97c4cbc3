"""A capacity plan: per-GPU parameters, memory, FLOPs, communication and step time, and whether it
fits (with what to change when it does not).

    plan = make_plan(load_config("configs/tiny.yaml"), nodes=1, gpus_per_node=2)
    print(format_plan(plan))

Step time is a model, not a measurement: compute at ``mfu`` x peak, the all-to-alls at NVLink / IB
bandwidth, gradient reduction by ring collectives, summed with no overlap (an upper bound; the
overlapped lower bound is printed beside it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from deepsuite.config import Config, expert_parallel_sizes
from deepsuite.distributed.deepspeed_json import (
    read_deepspeed_json,
    resolve_deepspeed_json,
    resolved_zero_stage,
)
from deepsuite.planner.comm import A2ATraffic, ReduceTraffic, balanced_a2a, reduce_traffic
from deepsuite.planner.layout import HARDWARE, Hardware, Layout, ZeroSettings, validate_layout
from deepsuite.planner.memory import (
    ActivationEstimate,
    ModelStates,
    activation_bytes,
    kv_cache_bytes,
    model_state_bytes,
    params_on_rank,
)
from deepsuite.planner.params import ParamBreakdown, param_breakdown

SHIPPED_JSON = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
# fraction of HBM kept free for the allocator's fragmentation, comm buffers and the CUDA context
RESERVE = 0.1


@dataclass(frozen=True)
class Plan:
    cfg: Config
    layout: Layout
    hardware: Hardware
    params: ParamBreakdown
    vocab_size: int
    params_held: int  # parameters on one rank (dense + local experts)
    states: ModelStates
    activations: ActivationEstimate
    kv_cache: tuple[int, int]  # (MLA, plain MHA) bytes for one micro-batch of seq_len, bf16
    flops_per_token: float  # forward + backward (+ recompute), whole model
    flops_per_step_gpu: float
    a2a: list[A2ATraffic]  # config's routing
    a2a_node_limited: list[A2ATraffic] | None  # with node-limited routing M
    reduce: ReduceTraffic
    time_compute: float
    time_a2a: float
    time_reduce: float

    @property
    def memory_total(self) -> int:
        return peak_memory(self.states, self.activations)

    @property
    def memory_budget(self) -> float:
        return self.hardware.hbm_bytes * (1 - RESERVE)

    @property
    def fits(self) -> bool:
        return self.memory_total <= self.memory_budget

    @property
    def step_time(self) -> float:
        return self.time_compute + self.time_a2a + self.time_reduce


def peak_memory(states: ModelStates, acts: ActivationEstimate) -> int:
    """The higher of a rank's two peaks: inside the optimizer step, and in forward/backward
    (activations, the reduction bucket, ZeRO 3's gathered parameters)."""
    return max(states.peak_step, states.peak_backward(acts.total))


def resolve_vocab(cfg: Config, vocab_size: int | None = None) -> int:
    """model.vocab_size, or the tokenizer's size when it is 0 (byte: 257, bpe: bpe_vocab_size)."""
    if vocab_size:
        return vocab_size
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "byte":
        return 257
    if cfg.data.tokenizer == "bpe":
        return cfg.data.bpe_vocab_size
    raise ValueError(
        f"vocab_size: model.vocab_size is 0 and tokenizer {cfg.data.tokenizer!r} has no known "
        "size; pass --vocab-size"
    )


def zero_stage_of(cfg: Config) -> int:
    """parallel.zero_stage, or the stage in parallel.deepspeed_config when it is -1 (1 when
    the file is absent: the plan is often made away from the checkout that will train)."""
    path = resolve_deepspeed_json(cfg.parallel.deepspeed_config)
    if cfg.parallel.zero_stage < 0 and not path.is_file():
        return 1
    return resolved_zero_stage(cfg)


def zero_settings_of(cfg: Config, stage: int) -> ZeroSettings:
    """The buffer sizes of the DeepSpeed JSON that would run ``stage``: the config's own when
    it is for that stage, else configs/deepspeed/zero<stage>.json, else DeepSpeed's defaults."""
    own = resolve_deepspeed_json(cfg.parallel.deepspeed_config)
    for path in (own, SHIPPED_JSON / f"zero{stage}.json"):
        if path.is_file():
            ds = read_deepspeed_json(path)
            if int(ds.get("zero_optimization", {}).get("stage", 0)) == stage:
                return ZeroSettings.from_json(ds)
    return ZeroSettings.from_json({"zero_optimization": {"stage": stage}})


def forward_flops_per_token(cfg: Config, pb: ParamBreakdown, seq_len: int) -> float:
    """2 FLOPs per activated weight in a matmul (no embedding lookup, no norms) plus causal
    attention: QK^T and PV over (seq_len + 1) / 2 keys on average, per head."""
    m, a, e = cfg.model, cfg.mla, cfg.moe
    per_expert = 3 * m.dim * e.expert_intermediate_size
    matmul = pb.activated - pb.embed - pb.norms
    layers = m.n_layers
    if m.mtp_depth:
        mtp_routed = e.n_expert_per_token * per_expert if pb.mtp_experts else 0
        matmul += pb.mtp_dense + m.mtp_depth * mtp_routed + m.mtp_depth * m.vocab_size * m.dim
        layers += m.mtp_depth
    ctx = (seq_len + 1) / 2
    attn = 2 * m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * ctx
    return 2.0 * matmul + layers * attn


def plan_layout(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    activation_checkpointing: bool = False,
    node_limit: int = 0,
) -> Layout:
    """The validated layout of ``cfg`` (its parallel.ep, ZeRO stage and JSON, batch, precision)
    on ``nodes`` x ``gpus_per_node`` GPUs."""
    stage = zero_stage_of(cfg)
    lay = Layout(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        ep=cfg.parallel.ep,
        zero_stage=stage,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.data.seq_len,
        global_batch=cfg.train.global_batch_size,
        precision=cfg.train.precision,
        activation_checkpointing=activation_checkpointing,
        node_limit=node_limit,
        zero=zero_settings_of(cfg, stage),
    )
    validate_layout(cfg, lay)
    return lay


def make_plan(
    cfg: Config,
    nodes: int,
    gpus_per_node: int,
    *,
    hardware: Hardware | str = "h100",
    activation_checkpointing: bool | None = None,
    node_limit: int = 0,
    vocab_size: int | None = None,
) -> Plan:
    """Plan ``cfg`` (its parallel.ep, zero stage, micro/global batch, seq_len, precision and,
    unless given, train.activation_checkpointing) on ``nodes`` x ``gpus_per_node`` GPUs.
    Raises ValueError naming the setting for impossible input."""
    if activation_checkpointing is None:
        activation_checkpointing = cfg.train.activation_checkpointing == "full"
    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    if isinstance(hardware, str) and hardware not in HARDWARE:
        raise ValueError(f"hardware: expected one of {sorted(HARDWARE)}, got {hardware!r}")
    lay = plan_layout(cfg, nodes, gpus_per_node, activation_checkpointing, node_limit)
    V = resolve_vocab(cfg, vocab_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=V))
    pb = param_breakdown(cfg)
    held, _ = params_on_rank(pb, lay)
    states = model_state_bytes(cfg, lay)  # the worst rank
    acts = activation_bytes(cfg, lay, V)
    kv = kv_cache_bytes(cfg, lay.micro_batch * lay.seq_len)
    passes = 4.0 if activation_checkpointing else 3.0  # fwd + 2x fwd for bwd (+ recompute)
    fpt = passes * forward_flops_per_token(cfg, pb, lay.seq_len)
    tokens_gpu = lay.micro_batch * lay.seq_len * lay.grad_accum
    flops_gpu = fpt * tokens_gpu
    a2a = balanced_a2a(cfg, lay, node_limit=0)
    a2a_nl = balanced_a2a(cfg, lay) if node_limit else None
    chosen = (a2a_nl or a2a)[1]  # deepsuite's dispatcher: rank dedup
    t_a2a = chosen.intra_bytes / hw.nvlink_bw + chosen.inter_bytes / hw.ib_bw
    red = reduce_traffic(pb.all_dense, pb.all_experts // lay.ep, lay)
    t_red = red.dense_bytes / (hw.ib_bw if red.dense_inter else hw.nvlink_bw)
    t_red += red.expert_bytes / (hw.ib_bw if red.expert_inter else hw.nvlink_bw)
    return Plan(
        cfg, lay, hw, pb, V, held, states, acts, kv, fpt, flops_gpu, a2a, a2a_nl, red,
        flops_gpu / (hw.flops * hw.mfu), t_a2a, t_red,
    )  # fmt: skip


def suggestions(plan: Plan, limit: int = 3) -> list[str]:
    """Single-setting changes that make a plan that does not fit fit, best first."""
    cfg, lay = plan.cfg, plan.layout
    E = cfg.moe.n_routed_experts
    tries: list[tuple[str, dict]] = []
    for stage in range(lay.zero_stage + 1, 4):
        label = f"parallel.zero_stage={stage}"
        if stage == 3:
            label += " parallel.deepspeed_config=configs/deepspeed/zero3.json"
        tries.append((label, {"zero_stage": stage}))
    if not lay.activation_checkpointing:
        tries.append(("activation checkpointing (--activation-checkpointing)", {"ckpt": True}))
    for ep in expert_parallel_sizes(E, lay.world):
        if ep > lay.ep:
            tries.append((f"parallel.ep={ep}", {"ep": ep}))
    mb = lay.micro_batch // 2
    while mb >= 1:
        tries.append((f"train.micro_batch_size={mb}", {"micro_batch": mb}))
        mb //= 2
    out = []
    for label, change in tries:
        c = dataclasses.replace(
            cfg,
            parallel=dataclasses.replace(
                cfg.parallel,
                ep=change.get("ep", lay.ep),
                zero_stage=change.get("zero_stage", lay.zero_stage),
            ),
            train=dataclasses.replace(
                cfg.train, micro_batch_size=change.get("micro_batch", lay.micro_batch)
            ),
        )
        try:
            p = make_plan(
                c, lay.nodes, lay.gpus_per_node, hardware=plan.hardware,
                activation_checkpointing=change.get("ckpt", lay.activation_checkpointing),
                node_limit=lay.node_limit, vocab_size=plan.vocab_size,
            )  # fmt: skip
        except ValueError:
            continue
        if p.fits:
            out.append(f"{label}: {p.memory_total / 1e9:.1f} GB per GPU")
            if len(out) == limit:
                break
    return out
