"""Autograd-aware all-to-all and collective timeouts.

Letters: S rows sent by this rank, R rows received by this rank, P ranks in the group.

Only the single-tensor collective ``all_to_all_single`` is used: the list form with uneven sizes
hangs on gloo. Written by hand because no library packs several tensors of different dtypes into
one exchange with an autograd backward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
    "CollectiveTimeoutError",
    "all_gather_flat",
    "all_to_all_rows",
    "guard_collectives",
]


def all_gather_flat(
    out_WX: torch.Tensor, inp_X: torch.Tensor, group: ProcessGroup | None = None
) -> None:
    """Gather equal-size tensors into one flat output (all_gather_single where torch has it,
    all_gather_into_tensor on older torch; both are single-tensor, gloo-safe forms)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out_WX, inp_X, group=group)


def _exchange(
    flat_SB: torch.Tensor,
    out_splits: Sequence[int],
    in_splits: Sequence[int],
    group: ProcessGroup | None,
) -> torch.Tensor:
    """One uneven all_to_all_single over rows of a 2-D tensor; returns [sum(out_splits), B]."""
    out_RB = flat_SB.new_empty((int(sum(out_splits)), flat_SB.shape[1]))
    dist.all_to_all_single(
        out_RB, flat_SB.contiguous(), list(out_splits), list(in_splits), group=group
    )
    return out_RB


def _pack(tensors: Sequence[torch.Tensor], n_rows: int) -> torch.Tensor:
    """Rows of several tensors (any dtypes, same leading dim) -> one uint8 [n_rows, bytes]."""
    parts = [
        t.detach().reshape(n_rows, int(torch.Size(t.shape[1:]).numel())).contiguous()
        for t in tensors
    ]
    parts = [t.view(torch.uint8) for t in parts]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _unpack(
    flat_RB: torch.Tensor, like: Sequence[tuple[torch.dtype, tuple[int, ...]]]
) -> list[torch.Tensor]:
    """Inverse of ``_pack`` for R received rows; ``like`` holds (dtype, trailing shape)."""
    out, col = [], 0
    for dtype, tail in like:
        width = int(torch.Size(tail).numel()) * torch.empty((), dtype=dtype).element_size()
        chunk = flat_RB[:, col : col + width].contiguous().view(dtype)
        out.append(chunk.reshape(flat_RB.shape[0], *tail))
        col += width
    return out


class _AllToAllRows(torch.autograd.Function):
    """Send rows of several tensors in ONE all_to_all_single; backward sends grads back."""

    @staticmethod
    def forward(ctx, in_splits, out_splits, group, device, *tensors):  # type: ignore[override]
        ctx.in_splits, ctx.out_splits, ctx.group, ctx.device = in_splits, out_splits, group, device
        ctx.meta = [(t.dtype, tuple(t.shape[1:])) for t in tensors]
        ctx.float_mask = [t.is_floating_point() for t in tensors]
        packed = _pack(tensors, tensors[0].shape[0])
        received = _unpack(_exchange(packed, out_splits, in_splits, group), ctx.meta)
        for r, is_float in zip(received, ctx.float_mask, strict=True):
            if not is_float:
                ctx.mark_non_differentiable(r)
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        n_recv = int(sum(ctx.out_splits))
        float_meta = [m for m, f in zip(ctx.meta, ctx.float_mask, strict=True) if f]
        # Every rank must take part in the backward exchange, so missing grads become zeros.
        float_grads = [
            g if g is not None else torch.zeros((n_recv, *tail), dtype=dt, device=ctx.device)
            for g, (dt, tail), f in zip(grads, ctx.meta, ctx.float_mask, strict=True)
            if f
        ]
        packed = _pack(float_grads, n_recv)
        back = iter(
            _unpack(_exchange(packed, ctx.in_splits, ctx.out_splits, ctx.group), float_meta)
        )
        return (None, None, None, None, *[next(back) if f else None for f in ctx.float_mask])


def all_to_all_rows(
    tensors: Sequence[torch.Tensor],
    in_splits: Sequence[int],
    out_splits: Sequence[int],
    group: ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Exchange rows of several tensors with one uneven ``all_to_all_single``.

    Args:
        tensors: tensors with the same leading dim S (rows to send, grouped by destination rank
            in rank order); any dtypes; floating ones get gradients, integer ones do not.
        in_splits: [P] rows this rank sends to each rank (sum S).
        out_splits: [P] rows this rank receives from each rank (sum R).
        group: process group (None = world).

    Returns:
        The received tensors, each [R, *trailing shape], grouped by source rank. The backward is
        the same exchange with the splits swapped.
    """
    if not tensors:
        raise ValueError("tensors: expected at least one tensor to exchange")
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise ValueError(
            f"tensors: expected the same leading dim, got {[t.shape for t in tensors]}"
        )
    if int(sum(in_splits)) != n:
        raise ValueError(f"in_splits: expected to sum to {n} rows, got {list(in_splits)}")
    ins = tuple(int(s) for s in in_splits)
    outs = tuple(int(s) for s in out_splits)
    return list(_AllToAllRows.apply(ins, outs, group, tensors[0].device, *tensors))


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the process-group timeout."""


_TIMEOUT_MARKERS = ("timed out", "timeout", "deadline")


@contextlib.contextmanager
def guard_collectives(what: str, step: int | None = None) -> Iterator[None]:
    """Turn a process-group timeout inside the block into an error naming rank, step and phase.

    Collectives time out after the process-group timeout given to ``init_distributed``; gloo then
    raises a bare RuntimeError. Wrap each training step (forward, backward, optimizer step and the
    balance update) in this so a stuck peer yields ``CollectiveTimeoutError("rank 3 step 120 ...")``
    on the ranks still waiting instead of an anonymous failure.
    """
    t0 = time.monotonic()
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, CollectiveTimeoutError) or not any(
            m in str(err).lower() for m in _TIMEOUT_MARKERS
        ):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        where = f"step {step}" if step is not None else "outside a step"
        raise CollectiveTimeoutError(
            f"rank {rank}: collective in '{what}' at {where} timed out after "
            f"{time.monotonic() - t0:.1f} s (a peer rank is stuck, crashed or took another code "
            f"path; raise init_distributed(timeout_s=...) if the work is just slow): {err}"
        ) from err
