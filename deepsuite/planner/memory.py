"""Bytes one rank holds: model states (by ZeRO stage, precision and group sizes), activations, KV
cache.

Model states follow what DeepSpeed 0.19.8 allocates with a torch AdamW passed in (the trainer's
setup), read from its source and held equal to a running engine, at the peak inside the
optimizer step as well as after backward, by tests/test_planner_engine.py. Per rank, H is the
parameters held (dense + local experts), a flat group's partition is its size over its group
(dense: all W ranks; experts: the EDP group), P the sum of the partitions, b the parameter
itemsize (2 bf16, 4 fp32):

=====  =====  =====================  ========  =====================  =========================
stage  prec.  weights                grads     optimizer              the step adds
=====  =====  =====================  ========  =====================  =========================
0      fp32   4H                     4H        8H moments             4 x largest group
0      bf16   2H                     2H        4H master + 8H         4H + 4 x largest group
1, 2   fp32   4H                     4 gbuf    4P master + 8P         8 / 4 x a dense / expert part.
1, 2   bf16   2H                     2 gbuf    4P master + 8P         8 / 6 x a dense / expert part.
3      any    b (P3 + persistent)    b P3      4 P3 master + 8 P3     8 x largest sub-group
=====  =====  =====================  ========  =====================  =========================

- ZeRO 0 bf16 is DeepSpeed's DDP_BFLOAT16 wrapper: an fp32 master per parameter, unpartitioned;
  its step casts every gradient to fp32 (4H) before AdamW.
- ZeRO 1/2 reduce gradients into the rank's partition (ZeRO 2 during backward, ZeRO 1 when it
  ends, so every full gradient is alive at that moment unless overlap_comm is on), in
  a buffer sized as the WHOLE of every parameter that touches the partition ("gbuf",
  ``zero_grad_buffer`` replays DeepSpeed's flattening). The step takes one flat group at a time:
  it flattens the group's gradient partition (b x part), casts it to fp32 (4 x part, a copy in
  bf16 only) and runs AdamW, whose square root of the second moment is one more fp32 partition:
  8 x part at the peak. A dense group's gradients stay in the buffer until the step ends; an
  expert group's are separate tensors, released before AdamW runs (4 x part in fp32, 6 x in
  bf16, where the bf16 flat copy and the fp32 one meet). Seen in the allocator's events.
- ZeRO 3 partitions each parameter over its group (P3 = sum of per-parameter partitions, each
  rounded up), keeps parameters of at most ``param_persistence_threshold`` elements whole as
  well (when the group has more than one rank), an fp32 master copy even in fp32, a flat
  gradient partition and the reduction bucket always; its step releases the persistent
  parameters, flattens one sub-group's gradients to fp32 and runs AdamW on it (8 x the largest
  sub-group), and gathers them again module by module (one module's copy in flight). In forward and backward it all-gathers the parameters of
  the blocks in flight.
- Backward: ZeRO 0 flattens the larger of the dense and expert gradients to all-reduce them;
  ZeRO 1/2 fill a ``reduce_bucket_size`` bucket (two with overlap_comm), ZeRO 1 beside the
  full gradients.
AdamW's temporaries are those of its foreach implementation (the default on GPUs): one tensor the
size of each parameter group at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from deepsuite.config import Config
from deepsuite.planner.layout import Layout
from deepsuite.planner.params import ParamBreakdown


@dataclass(frozen=True)
class ModelStates:
    """Bytes of the model states and DeepSpeed's own buffers on one rank.

    ``total`` (weights + grads + optimizer + held buffers) is what the rank holds when backward
    has finished; ``peak_step`` adds the optimizer step's temporaries; ``peak_backward`` is the
    forward/backward peak for a given activation size.
    """

    weights: int  # parameters between steps (ZeRO 3: partitions + persistent parameters)
    grads: int  # gradients held when backward ends
    optimizer: int  # fp32 master copy (when separate) + Adam moments
    buffers: int = 0  # held all the time (ZeRO 3's reduction bucket)
    step_temp: int = 0  # added at the peak inside the optimizer step
    backward_temp: int = 0  # the reduction bucket / ZeRO 0's flatten, during backward
    backward_grads: int = 0  # ZeRO 1: the full gradients alive when backward ends
    gathered: int = 0  # ZeRO 3: full parameters (and gradients) of the blocks in flight
    grads_held: bool = False  # ZeRO 3: the gradient partition exists all the time

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.buffers

    @property
    def peak_step(self) -> int:
        return self.total + self.step_temp

    def peak_backward(self, activations: int) -> int:
        """Forward/backward: backward starts with every activation and no gradient and ends
        the other way round, so the larger end counts (both, where gradients are held)."""
        base = self.weights + self.optimizer + self.buffers + self.gathered + self.backward_temp
        if self.grads_held:
            return base + self.grads + activations
        return base + max(activations, self.grads + self.backward_grads)


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the model as the engine holds it (tied parameters once)."""

    name: str
    numel: int  # full size (experts: all E experts)
    expert: bool  # a routed-expert stack (sharded over EP when ep > 1)
    no_decay: bool  # in the no-decay optimizer group
    module: str  # the module that owns it (ZeRO 3 gathers per module)


def param_table(cfg: Config) -> tuple[ParamInfo, ...]:
    """The parameters of ``cfg``'s model, in module order, from the meta device; cached by the
    model, mla and moe sections, so a search over layouts builds the model once."""
    import torch

    from deepsuite.models import DeepSeekLM

    full = cfg.to_dict()
    key = json.dumps({k: full[k] for k in ("model", "mla", "moe")}, sort_keys=True)
    if key not in _TABLES:
        with torch.device("meta"):
            model = DeepSeekLM(cfg)
        _TABLES[key] = tuple(
            ParamInfo(
                name,
                p.numel(),
                ".experts." in name,
                p.ndim < 2 or "norm" in name or name.endswith(".bias"),
                name.rsplit(".", 1)[0],
            )
            for name, p in model.named_parameters()
        )
    return _TABLES[key]


_TABLES: dict[str, tuple[ParamInfo, ...]] = {}


def zero_param_groups(cfg: Config, ep: int) -> list[tuple[bool, list[int]]]:
    """The flat groups DeepSpeed builds from the trainer's optimizer groups, in order:
    (is_expert, sizes of its parameters on one rank). Mirrors ``moe_param_groups``: decay /
    no-decay dense groups, then the expert groups (chunked at DeepSpeed's max_group_size); at
    ep 1 experts are ordinary dense parameters."""
    groups: dict[tuple[bool, bool], list[int]] = {}
    for p in param_table(cfg):
        expert = ep > 1 and p.expert
        groups.setdefault((expert, p.no_decay), []).append(p.numel // (ep if expert else 1))
    out = []
    for key in ((False, False), (False, True), (True, False), (True, True)):
        sizes = groups.get(key, [])
        chunk: list[int] = []
        for n in sizes:
            if key[0] and chunk and sum(chunk) + n > _DS_MAX_GROUP_SIZE:
                out.append((True, chunk))
                chunk = []
            chunk.append(n)
        if chunk:
            out.append((key[0], chunk))
    return out


_DS_MAX_GROUP_SIZE = 178956971  # split_params_into_different_moe_groups_for_optimizer's default


def _partition(sizes: list[int], dp: int) -> int:
    """A ZeRO 1/2 flat group's partition: padded to a multiple of 2 x dp, cut into dp."""
    align = 2 * dp
    return -(-sum(sizes) // align) * align // dp


def zero_grad_buffer(groups: list[tuple[bool, list[int]]], lay: Layout) -> list[int]:
    """Elements of DeepSpeed's ZeRO-1/2 gradient buffer on every rank [W]: per flat group
    (padded to a multiple of 2 x its data-parallel size and cut into equal partitions), the
    full size of every parameter that overlaps the rank's partition. Dense groups are
    partitioned over all W ranks (partition id = rank), expert groups over the EDP group
    (partition id = rank // ep)."""
    import numpy as np

    per_dense, per_expert = np.zeros(lay.world, np.int64), np.zeros(lay.edp, np.int64)
    for expert, sizes in groups:
        dp = lay.edp if expert else lay.world
        acc = per_expert if expert else per_dense
        part = _partition(sizes, dp)
        start = 0
        for n in sizes:
            first, last = start // part, (start + n - 1) // part
            acc[first : last + 1] += n
            start += n
    ranks = np.arange(lay.world)
    return (per_dense[ranks] + per_expert[ranks // lay.ep]).tolist()


def params_on_rank(pb: ParamBreakdown, lay: Layout) -> tuple[int, int]:
    """(parameters held, parameters in the rank's ZeRO partition)."""
    local_experts = pb.all_experts // lay.ep
    held = pb.all_dense + local_experts
    part = pb.all_dense / lay.world + local_experts / lay.edp
    return held, round(part)


def zero3_partition(cfg: Config, lay: Layout) -> dict[str, int]:
    """ZeRO 3 on one rank, in elements: ``partition`` (sum of per-parameter partitions),
    ``persistent`` (parameters kept whole), ``sub_group`` (the largest optimizer sub-group),
    ``module`` (the most parameters one module gathers), ``persistent_module`` (the same for
    persistent ones) and ``held`` (parameters at full size)."""
    z = lay.zero
    persist_total = part_total = held = 0
    biggest_module: dict[str, int] = {}
    persist_module: dict[str, int] = {}
    sub_groups: list[int] = []
    by_group: dict[tuple[bool, bool], list[int]] = {}
    for p in param_table(cfg):
        expert = lay.ep > 1 and p.expert
        local = p.numel // (lay.ep if expert else 1)
        group = lay.edp if expert else lay.world
        part = -(-local // group)
        held += local
        part_total += part
        if (
            local <= z.param_persistence_threshold
            and persist_total + local <= z.model_persistence_threshold
            and group > 1  # over one rank the whole parameter is its partition
        ):
            persist_total += local
            persist_module[p.module] = persist_module.get(p.module, 0) + local
        biggest_module[p.module] = biggest_module.get(p.module, 0) + local
        by_group.setdefault((expert, p.no_decay), []).append(part)
    for parts in by_group.values():  # stage3._create_fp16_sub_groups, per optimizer group
        acc = 0
        for i, n in enumerate(parts):
            acc += n
            if acc >= z.sub_group_size or i == len(parts) - 1:
                sub_groups.append(acc)
                acc = 0
    return {
        "partition": part_total,
        "persistent": persist_total,
        "sub_group": max(sub_groups),
        "module": max(biggest_module.values()),
        "persistent_module": max(persist_module.values(), default=0),
        "held": held,
    }


def model_state_bytes(cfg: Config, lay: Layout, rank: int | None = None) -> ModelStates:
    """Weights, gradients, optimizer states and DeepSpeed's buffers on one rank (module
    docstring); ``rank`` None: the rank with the largest ZeRO-1/2 gradient buffer."""
    b, z = lay.param_bytes, lay.zero
    groups = zero_param_groups(cfg, lay.ep)
    held = sum(n for _, sizes in groups for n in sizes)
    dense = sum(n for expert, sizes in groups if not expert for n in sizes)
    biggest_group = max(sum(sizes) for _, sizes in groups)
    if lay.zero_stage == 0:
        flatten = b * min(z.allreduce_bucket_size, max(dense, held - dense))
        if lay.precision == "fp32":
            return ModelStates(
                4 * held, 4 * held, 8 * held, step_temp=4 * biggest_group, backward_temp=flatten
            )
        return ModelStates(
            2 * held,
            2 * held,
            12 * held,
            step_temp=4 * held + 4 * biggest_group,
            backward_temp=flatten,
        )
    if lay.zero_stage in (1, 2):
        parts = [_partition(sizes, lay.edp if e else lay.world) for e, sizes in groups]
        gbufs = zero_grad_buffer(groups, lay)
        gbuf = max(gbufs) if rank is None else gbufs[rank]
        bucket = b * z.reduce_bucket_size * (2 if z.overlap_comm else 1)
        # ZeRO 1 without overlap_comm reduces only when backward ends: every full gradient is
        # alive then (stage_1_and_2's reduce hook runs for partition_gradients or overlap_comm)
        full_grads = b * held if lay.zero_stage == 1 and not z.overlap_comm else 0
        return ModelStates(
            b * held,
            b * gbuf,
            12 * sum(parts),
            step_temp=max(
                part * (8 if not expert else 6 if b == 2 else 4)
                for part, (expert, _) in zip(parts, groups, strict=True)
            ),
            backward_temp=bucket if z.contiguous_gradients else 0,
            backward_grads=full_grads,
        )
    z3 = zero3_partition(cfg, lay)
    part = z3["partition"]
    # in flight during forward/backward: the parameters DeepSpeed keeps gathered (at most
    # prefetch + the block running, bounded by the model) and the block's full gradients
    gathered = b * (min(z3["held"], z3["module"] + z.prefetch_bucket_size) + z3["module"])
    return ModelStates(
        b * (part + z3["persistent"]),
        b * part,
        12 * part,
        buffers=b * z.reduce_bucket_size,
        # the step releases the persistent parameters first and gathers them again last, one
        # module at a time (its gathered copy in flight beside them)
        step_temp=max(8 * z3["sub_group"] - b * z3["persistent"], b * z3["persistent_module"]),
        gathered=gathered,
        grads_held=True,
    )


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes saved for the backward of one micro-batch (an estimate: see ``activation_bytes``)."""

    per_attention_layer: int
    per_dense_ffn_layer: int
    per_moe_layer: int
    output: int  # final norm, logits (and their fp32 copy for the loss)
    total: int


def activation_bytes(cfg: Config, lay: Layout, vocab_size: int) -> ActivationEstimate:
    """Tensors autograd keeps per micro-batch of T = micro_batch x seq_len tokens.

    Counted per block from the model's code: norm inputs and outputs, every projection's input,
    q / k / v and the attention output (flash-style attention: no S x S matrix), the router's
    fp32 logits and scores, per routed slot the gate and up pre-activations (the experts fuse
    the dispatch gather and the weighted combine and recompute silu(g) u, so neither the
    repeated token rows nor the per-slot outputs are kept), the input and four F-wide tensors
    for the shared and dense SwiGLUs, and the fp32 logits for the loss. Routing is taken as
    balanced (T K rows per layer per rank in expectation). With activation checkpointing a
    block keeps only its input, plus one block's full set during its recompute. Small tensors
    (indices, per-token weights) are left out; expect this within about 20%.
    """
    m, a, e = cfg.model, cfg.mla, cfg.moe
    T, D, H, b = lay.micro_batch * lay.seq_len, m.dim, m.n_heads, lay.param_bytes
    qk, v, c, r = (
        a.qk_nope_head_dim + a.qk_rope_head_dim,
        a.v_head_dim,
        a.kv_lora_rank,
        a.qk_rope_head_dim,
    )
    q_in = a.q_lora_rank * 2 if a.q_lora_rank else 0  # low-rank q: its output and its norm
    attn = (
        T
        * b
        * (
            3 * D  # block input, norm output (shared by q and kv_a), residual
            + q_in
            + H * qk  # q
            + (c + r)
            + c  # kv_a output, kv norm output
            + H * (a.qk_nope_head_dim + v)  # kv_b output
            + H * qk
            + H * v  # k with rope, v
            + 2 * H * v  # attention output (saved by SDPA and as o_proj input)
        )
        + T * H * 4
    )  # softmax log-sum-exp, fp32
    swiglu = lambda rows, f: rows * b * (D + 4 * f)  # noqa: E731  input, gate, up, silu, product
    dense = T * b * 2 * D + swiglu(T, m.inter_dim)
    K = e.n_expert_per_token
    moe = (
        T * b * 2 * D
        + T * 4 * 2 * e.n_routed_experts  # router logits and scores, fp32
        + T * K * b * 2 * e.expert_intermediate_size  # routed: gate and up pre-activations
        + (swiglu(T, e.n_shared_experts * e.expert_intermediate_size) if e.n_shared_experts else 0)
    )
    out = T * b * 2 * D + T * vocab_size * (b + 4)
    n_moe = m.n_layers - m.n_dense_layers
    blocks = [attn + dense] * m.n_dense_layers + [attn + moe] * n_moe
    if m.mtp_depth:
        blocks += [attn + (moe if n_moe else dense) + T * b * 3 * D] * m.mtp_depth
        out *= 1 + m.mtp_depth
    if lay.activation_checkpointing:
        total = len(blocks) * T * b * D + max(blocks) + out
    else:
        total = sum(blocks) + out
    return ActivationEstimate(attn, dense, moe, out, total)


def kv_cache_bytes(cfg: Config, tokens: int, itemsize: int = 2) -> tuple[int, int]:
    """(MLA latent cache, plain multi-head K+V cache) for ``tokens`` cached tokens, all layers.

    MLA caches c_KV + k_rope = kv_lora_rank + qk_rope_head_dim values per token per layer; plain
    multi-head attention caches K and V of every head, n_heads x (qk_nope + v) values
    (docs/formulas.md: 576 against 32768 for the V3 shape).
    """
    a, m = cfg.mla, cfg.model
    layers = m.n_layers
    mla = tokens * layers * (a.kv_lora_rank + a.qk_rope_head_dim) * itemsize
    mha = tokens * layers * m.n_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return mla, mha * itemsize
