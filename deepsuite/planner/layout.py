"""The cluster layout and hardware a plan is made for, validated before any arithmetic.

Ranks are laid out as the trainer does: world W = nodes x gpus_per_node; expert-parallel (EP)
groups are consecutive ranks, the expert-data-parallel (EDP) groups that hold the same experts
are strided (W = EP x EDP); dense parameters are data parallel over all W ranks.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from deepsuite.config import Config, validate_expert_parallel


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value}")
    return float(value)


@dataclass(frozen=True)
class Hardware:
    """One GPU's stated rates. Bandwidths are per GPU and per direction, in bytes/s."""

    name: str
    hbm_bytes: float  # usable device memory
    flops: float  # dense bf16 tensor-core peak, FLOP/s
    mfu: float  # fraction of ``flops`` the step's matmuls reach (an assumption, not measured)
    nvlink_bw: float  # within a node
    ib_bw: float  # across nodes (one NIC per GPU)

    def __post_init__(self) -> None:
        for f in ("hbm_bytes", "flops", "mfu", "nvlink_bw", "ib_bw"):
            _positive_float(f"hardware.{f}", getattr(self, f))
        if self.mfu > 1:
            raise ValueError(f"hardware.mfu: expected a fraction in (0, 1], got {self.mfu}")

    def replace(self, **changes: float | None) -> Hardware:
        """A copy with the given fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


GiB = 1024**3
# Public datasheet figures: H100 SXM 989 TFLOP/s dense bf16, 80 GB HBM3, NVLink 4 900 GB/s
# bidirectional; H800 is the export variant with NVLink cut to 400 GB/s bidirectional
# (DeepSeek-V3 report: 160 GB/s achievable) and the same compute; InfiniBand NDR 400 Gb/s
# = 50 GB/s per GPU. mfu 0.4 is a typical achieved fraction for large MoE training.
HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM + NVLink4 + IB NDR", 80e9, 989e12, 0.4, 450e9, 50e9),
    "h800": Hardware("H800 + NVLink (400 GB/s) + IB NDR", 80e9, 989e12, 0.4, 200e9, 50e9),
}


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed JSON settings that size a rank's buffers (defaults: DeepSpeed 0.19.8's).

    Elements, not bytes. ``reduce_bucket_size``: the gradient-reduction bucket (ZeRO 1/2 during
    backward with contiguous gradients, twice with overlap_comm; ZeRO 3 always).
    ``allreduce_bucket_size``: ZeRO 0's flatten for the all-reduce (the engine's default).
    ZeRO 3: parameters of at most ``param_persistence_threshold`` elements stay whole on every
    rank (until ``model_persistence_threshold`` in all); ``prefetch_bucket_size`` parameters are
    fetched ahead; the optimizer steps ``sub_group_size`` elements of the partition at a time.
    """

    reduce_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    allreduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = sys.maxsize
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_json(cls, ds: dict[str, Any]) -> ZeroSettings:
        """From a DeepSpeed config dict (its ``zero_optimization`` section; stage-3 keys are
        read with or without their ``stage3_`` prefix)."""
        zero = ds.get("zero_optimization", {}) or {}
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            for key in (f.name, f"stage3_{f.name}"):
                if key in zero:
                    kw[f.name] = type(f.default)(zero[key])
        if "overlap_comm" not in kw and zero.get("stage", 0) == 3:
            kw["overlap_comm"] = True  # DeepSpeed's default for stage 3 only
        return cls(**kw)


@dataclass(frozen=True)
class Layout:
    """Parallel and batch settings of one plan (all sizes are counts, not bytes)."""

    nodes: int
    gpus_per_node: int
    ep: int
    zero_stage: int
    micro_batch: int  # sequences per rank per micro-step
    seq_len: int
    global_batch: int  # sequences per optimizer step over all ranks
    precision: str  # "fp32" or "bf16"
    activation_checkpointing: bool = False
    node_limit: int = 0  # M: experts of at most M nodes per token (0 = off)
    zero: ZeroSettings = field(default_factory=ZeroSettings)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def edp(self) -> int:
        return self.world // self.ep

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans (EP groups are consecutive ranks)."""
        return max(1, -(-self.ep // self.gpus_per_node))

    @property
    def param_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def validate_layout(cfg: Config, lay: Layout) -> None:
    """Raise ValueError/TypeError naming the setting and what to change."""
    for name in ("nodes", "gpus_per_node", "ep", "micro_batch", "seq_len", "global_batch"):
        _positive_int(name, getattr(lay, name))
    if lay.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {lay.zero_stage}")
    if lay.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected 'fp32' or 'bf16', got {lay.precision!r}")
    E = cfg.moe.n_routed_experts
    validate_expert_parallel(E, None, lay.ep)
    try:
        validate_expert_parallel(E, lay.world, lay.ep)
    except ValueError as err:  # only the world can be wrong here: say where it comes from
        raise ValueError(
            f"{err} (world = {lay.nodes} nodes x {lay.gpus_per_node} GPUs; --nodes and "
            f"--gpus-per-node set it)"
        ) from None
    if lay.ep > lay.gpus_per_node and lay.ep % lay.gpus_per_node:
        raise ValueError(
            f"parallel.ep={lay.ep}: an EP group wider than a node must span whole nodes "
            f"(a multiple of --gpus-per-node {lay.gpus_per_node})"
        )
    if lay.ep < lay.gpus_per_node and lay.gpus_per_node % lay.ep:
        raise ValueError(
            f"parallel.ep={lay.ep}: an EP group inside a node must divide --gpus-per-node "
            f"{lay.gpus_per_node}"
        )
    per_step = lay.micro_batch * lay.world
    if lay.global_batch % per_step:
        raise ValueError(
            f"train.global_batch_size={lay.global_batch}: expected a multiple of "
            f"micro_batch_size x world ({lay.micro_batch} x {lay.world} = {per_step})"
        )
    if lay.seq_len > cfg.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={lay.seq_len}: expected at most model.max_seq_len "
            f"({cfg.model.max_seq_len})"
        )
    if lay.node_limit < 0 or isinstance(lay.node_limit, bool):
        raise ValueError(f"node_limit: expected 0 (off) or a positive M, got {lay.node_limit}")
    if lay.node_limit:
        per_node = E // lay.ep_nodes
        if lay.node_limit * per_node < cfg.moe.n_expert_per_token:
            raise ValueError(
                f"node_limit={lay.node_limit}: {lay.node_limit} node(s) hold "
                f"{lay.node_limit * per_node} experts, fewer than moe.n_expert_per_token="
                f"{cfg.moe.n_expert_per_token}"
            )
