"""The fewest nodes on which a config fits, and the layout that does it (``deepsuite plan
--min-nodes``).

For each node count from 1 up, every layout the trainer can run is tried on memory alone (cheap:
no routing is sampled): ZeRO stage 0-3, every expert-parallel size the cluster and the experts
allow, activation checkpointing off and on, the config's micro-batch and its halvings. The
config's global batch is kept when the world divides it and otherwise rounded up to the next
multiple of micro-batch x world (said in the result). At the first node count where some layout
fits, the fitting layouts get a full plan and the fastest (step time, no overlap) is returned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deepsuite.config import Config
from deepsuite.planner.layout import Hardware
from deepsuite.planner.memory import activation_bytes, model_state_bytes
from deepsuite.planner.plan import (
    RESERVE,
    Plan,
    make_plan,
    peak_memory,
    plan_layout,
    resolve_vocab,
    zero_stage_of,
)

__all__ = ["NodeSearch", "min_nodes"]


@dataclass(frozen=True)
class NodeSearch:
    """The result of :func:`min_nodes`: the chosen plan and what was changed to reach it."""

    plan: Plan
    overrides: list[str]  # key=value changes to the config (parallel.*, train.*)
    activation_checkpointing: bool
    layouts_tried: int

    def describe(self) -> str:
        lay = self.plan.layout
        changes = " ".join(self.overrides) or "(none)"
        ckpt = ", activation checkpointing" if self.activation_checkpointing else ""
        return (
            f"fewest nodes: {lay.nodes} x {lay.gpus_per_node} GPUs, EP {lay.ep} x EDP "
            f"{lay.edp}, ZeRO {lay.zero_stage}{ckpt} ({self.layouts_tried} layouts tried); "
            f"config changes: {changes}"
        )


def _variant(cfg: Config, ep: int, stage: int, micro: int, global_batch: int) -> Config:
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, ep=ep, zero_stage=stage),
        train=dataclasses.replace(
            cfg.train, micro_batch_size=micro, global_batch_size=global_batch
        ),
    )


def _layouts(cfg: Config, nodes: int, gpn: int) -> list[tuple[int, int, int, int, bool]]:
    """(ep, stage, micro, global batch, activation checkpointing) candidates on ``nodes``."""
    E, world = cfg.moe.n_routed_experts, nodes * gpn
    eps = [d for d in range(1, min(E, world) + 1) if E % d == 0 and world % d == 0]
    micros, mb = [], cfg.train.micro_batch_size
    while mb >= 1:
        micros.append(mb)
        mb //= 2
    out = []
    for micro in micros:
        step = micro * world
        gb = -(-cfg.train.global_batch_size // step) * step
        for ep in eps:
            for stage in (0, 1, 2, 3):
                for ckpt in (False, True):
                    out.append((ep, stage, micro, gb, ckpt))
    return out


def min_nodes(
    cfg: Config,
    gpus_per_node: int,
    *,
    hardware: Hardware,
    node_limit: int = 0,
    max_nodes: int = 1024,
    vocab_size: int | None = None,
) -> NodeSearch | None:
    """The fewest nodes (up to ``max_nodes``) on which ``cfg`` fits, and its fastest layout
    there; None when nothing fits."""
    V = resolve_vocab(cfg, vocab_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=V))
    budget = hardware.hbm_bytes * (1 - RESERVE)
    tried = 0
    for nodes in range(1, max_nodes + 1):
        fitting = []
        for ep, stage, micro, gb, ckpt in _layouts(cfg, nodes, gpus_per_node):
            c = _variant(cfg, ep, stage, micro, gb)
            try:
                lay = plan_layout(c, nodes, gpus_per_node, ckpt, node_limit)
            except ValueError:  # e.g. an EP group that would straddle nodes unevenly
                continue
            tried += 1
            mem = peak_memory(model_state_bytes(c, lay), activation_bytes(c, lay, V))
            if mem <= budget:
                fitting.append((c, ckpt))
        if fitting:
            plans = [
                (
                    make_plan(
                        c,
                        nodes,
                        gpus_per_node,
                        hardware=hardware,
                        activation_checkpointing=ckpt,
                        node_limit=node_limit,
                    ),
                    c,
                    ckpt,
                )
                for c, ckpt in fitting
            ]
            # fastest; on a tie the layout closest to the config's own, then the smallest
            best, c, ckpt = min(
                plans,
                key=lambda t: (
                    round(t[0].step_time, 6),
                    len(_overrides(cfg, t[1])),
                    t[0].memory_total,
                ),
            )
            return NodeSearch(best, _overrides(cfg, c), ckpt, tried)
    return None


def _overrides(before: Config, after: Config) -> list[str]:
    out = []
    for section, key in (
        ("parallel", "ep"),
        ("train", "micro_batch_size"),
        ("train", "global_batch_size"),
    ):
        a, b = getattr(getattr(before, section), key), getattr(getattr(after, section), key)
        if a != b:
            out.append(f"{section}.{key}={b}")
    stage = after.parallel.zero_stage
    if stage != zero_stage_of(before):
        out.append(f"parallel.zero_stage={stage}")
        if stage == 3 or zero_stage_of(before) == 3:  # stage 3 is set in the YAML and the JSON
            out.append(f"parallel.deepspeed_config=configs/deepspeed/zero{max(stage, 1)}.json")
    return out
