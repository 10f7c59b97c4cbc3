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
    losses). Tensor values (the losses) are summed on ``device`` and never read here; numbers
    the host already holds (the all-to-all's) are summed on the host and sent to the device
    once, by :meth:`all_gather`, so every rank's copy travels in one collective on ``device``
    (which must be the process group's: nccl takes CUDA tensors only).
    """

    def __init__(self, aux_heads: Sequence[str], device: torch.device | str = "cpu") -> None:
        self.names = (
            "lm_loss",
            "rows_received",
            "a2a_bytes",
            "a2a_time_s",
            *(f"aux/{h}" for h in aux_heads),
        )
        self._index = {n: i for i, n in enumerate(self.names)}
        self.device = torch.device(device)
        self._device_F = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self._host_F = [0.0] * len(self.names)

    def add(self, name: str, value: Tensor | float) -> None:
        """A tensor is added on its device (no host read); a number on the host."""
        if isinstance(value, Tensor):
            self._device_F[self._index[name]] += value
        else:
            self._host_F[self._index[name]] += value

    def host(self, name: str) -> float:
        """The host-side sum of ``name`` (the numbers added as numbers)."""
        return self._host_F[self._index[name]]

    @property
    def values_F(self) -> Tensor:
        """[F] every field, on ``device``."""
        host_F = torch.tensor(self._host_F, dtype=torch.float64)
        return self._device_F + host_F.to(self.device)

    def all_gather(self) -> GatheredStepStats:
        """Every rank's statistics (one all-gather on ``device``; every rank must call it)."""
        world = dist.get_world_size()
        out = torch.empty(world * len(self.names), dtype=torch.float64, device=self.device)
        dist.all_gather_into_tensor(out, self.values_F)
        return GatheredStepStats(self.names, out.view(world, len(self.names)))


@dataclass(frozen=True)
class GatheredStepStats:
    """Every rank's :class:`StepStats`, one row per rank, on the device it was gathered on.
    Its results are tensors there: reading them is the caller's choice (once per logging
    interval in the trainer)."""

    names: tuple[str, ...]
    values_WF: Tensor

    def per_rank(self, name: str) -> Tensor:
        """[W] the field on each rank."""
        return self.values_WF[:, self.names.index(name)]

    def sum(self, name: str) -> Tensor:
        return self.per_rank(name).sum()

    def max(self, name: str) -> Tensor:
        return self.per_rank(name).max()
