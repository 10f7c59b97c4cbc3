"""One optimizer step's statistics on one rank, by name, and every rank's in a single all-gather.

Letters: W ranks, F fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GatheredStepStats", "StepStats"]


class StepStats:
    """This rank's sums over the micro-batches of one optimizer step.

    Fields: ``lm_loss`` (the language-model losses), ``rows_received`` (expert rows this rank
    computed, every MoE layer), ``a2a_bytes`` (bytes it put on the all-to-all wire),
    ``a2a_time_s`` (seconds inside all-to-alls), and ``aux/<head>`` per auxiliary head (its
    losses). Kept as one float64 vector so every rank's copy travels in one collective.
    """

    def __init__(self, aux_heads: Sequence[str]) -> None:
        self.names = (
            "lm_loss",
            "rows_received",
            "a2a_bytes",
            "a2a_time_s",
            *(f"aux/{h}" for h in aux_heads),
        )
        self._index = {n: i for i, n in enumerate(self.names)}
        self.values_F = torch.zeros(len(self.names), dtype=torch.float64)

    def add(self, name: str, value: Tensor | float) -> None:
        self.values_F[self._index[name]] += value

    def __getitem__(self, name: str) -> float:
        return float(self.values_F[self._index[name]])

    def all_gather(self) -> GatheredStepStats:
        """Every rank's statistics (one all-gather; every rank must call it)."""
        world = dist.get_world_size()
        out = torch.empty(world * len(self.names), dtype=torch.float64)
        dist.all_gather_into_tensor(out, self.values_F)
        return GatheredStepStats(self.names, out.view(world, len(self.names)))


@dataclass(frozen=True)
class GatheredStepStats:
    """Every rank's :class:`StepStats`, one row per rank."""

    names: tuple[str, ...]
    values_WF: Tensor

    def per_rank(self, name: str) -> Tensor:
        """[W] the field on each rank."""
        return self.values_WF[:, self.names.index(name)]

    def sum(self, name: str) -> float:
        return float(self.per_rank(name).sum())

    def max(self, name: str) -> float:
        return float(self.per_rank(name).max())
