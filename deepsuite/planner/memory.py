"""Bytes one rank holds: model states (by ZeRO stage and group sizes), activations, KV cache.

Model states follow what DeepSpeed's engine actually allocates with a torch AdamW passed in (the
trainer's setup), read from its source and held equal to a running engine by
tests/test_planner_engine.py:
- fp32, ZeRO 0: parameters, full gradients, two Adam moments, all unpartitioned.
- fp32, ZeRO 1 and 2: full parameters; DeepSpeed 0.19 reduces gradients into the rank's
  partition during the backward for stage 1 as for stage 2; an fp32 master copy of the
  partition and the two moments are partition-sized. The gradient buffer is not: DeepSpeed sizes
  it as the WHOLE of every parameter that touches the partition (``grads_in_partition``), so a
  rank whose partition cuts through the embedding holds the embedding's full gradient size.
  ``zero_grad_buffer`` replays DeepSpeed's flattening (param groups, alignment, partitions).
- bf16, ZeRO 0 (DeepSpeed's BF16_Optimizer): bf16 parameters, an fp32 gradient accumulator of
  full size, and the fp32 master + moments partitioned over the data-parallel group.
- bf16, ZeRO 1 and 2: bf16 parameters, the bf16 gradient partition plus its fp32 copy made for the
  step, fp32 master + moments of the partition.
A rank's partition is dense / W + local experts / EDP (expert states are partitioned over the
ranks holding the same experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from deepsuite.config import Config
from deepsuite.planner.layout import Layout
from deepsuite.planner.params import ParamBreakdown


@dataclass(frozen=True)
class ModelStates:
    """Bytes of the model states on one rank."""

    weights: int
    grads: int
    optimizer: int  # fp32 master copy (when separate) + Adam moments

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def params_on_rank(pb: ParamBreakdown, lay: Layout) -> tuple[int, int]:
    """(parameters held, parameters in the rank's ZeRO partition)."""
    local_experts = pb.all_experts // lay.ep
    held = pb.all_dense + local_experts
    part = pb.all_dense / lay.world + local_experts / lay.edp
    return held, round(part)


def zero_param_groups(cfg: Config, ep: int) -> list[tuple[bool, list[int]]]:
    """The flat groups DeepSpeed builds from the trainer's optimizer groups, in order:
    (is_expert, sizes of its parameters on one rank). Mirrors ``moe_param_groups``: decay /
    no-decay dense groups, then the expert groups (chunked at DeepSpeed's max_group_size); at
    ep 1 experts are ordinary dense parameters. Built from the model on the meta device."""
    import torch

    from deepsuite.models import DeepSeekLM

    with torch.device("meta"):
        model = DeepSeekLM(cfg)
    groups: dict[tuple[bool, bool], list[int]] = {}
    for name, p in model.named_parameters():
        expert = ep > 1 and ".experts." in name
        plain = p.ndim < 2 or "norm" in name or name.endswith(".bias")
        groups.setdefault((expert, plain), []).append(p.numel() // (ep if expert else 1))
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
        align = 2 * dp
        part = -(-sum(sizes) // align) * align // dp
        start = 0
        for n in sizes:
            first, last = start // part, (start + n - 1) // part
            acc[first : last + 1] += n
            start += n
    ranks = np.arange(lay.world)
    return (per_dense[ranks] + per_expert[ranks // lay.ep]).tolist()


def model_state_bytes(
    pb: ParamBreakdown, lay: Layout, grad_buffer_elems: int | None = None
) -> ModelStates:
    """Weights, gradients and optimizer states one rank holds (module docstring).

    ``grad_buffer_elems``: the rank's ZeRO-1/2 gradient buffer from ``zero_grad_buffer``;
    without it the partition size is used (DeepSpeed's buffer is at least that).
    """
    held, part = params_on_rank(pb, lay)
    gbuf = part if grad_buffer_elems is None else grad_buffer_elems
    moments = 8 * part
    if lay.precision == "fp32":
        if lay.zero_stage == 0:
            return ModelStates(4 * held, 4 * held, 8 * held)
        return ModelStates(4 * held, 4 * gbuf, 4 * part + moments)
    if lay.zero_stage == 0:
        return ModelStates(2 * held, 4 * held, 4 * part + moments)
    return ModelStates(2 * held, 2 * gbuf + 4 * part, 4 * part + moments)


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
