"""One grouped GEMM over rows sorted by expert, usable eagerly and under torch.compile, any dtype.

Letters: N rows (sorted by group), K contraction dim, M output dim, L groups (local experts).

``grouped_mm(x_NK, w_LKM, offs_L)`` computes, for each group l, ``x[rows of l] @ w[l]`` where
``offs_L`` (int32, on x's device) holds the cumulative row ends; nothing is read on the host.
It is ``torch._grouped_mm`` (CUDA's grouped kernel; torch 2.13 also runs it eagerly on the CPU,
float32 and bfloat16). torch's compile-time shape function only admits bfloat16, so other dtypes
go through ``deepsuite::grouped_mm``, a custom op whose kernel is the same eager call, with its
own shape function and backward: ``torch.compile(fullgraph=True)`` sees one opaque op instead of
breaking the graph. Operands whose strides are not 16-byte aligned (tiny test shapes) are not
accepted by ``torch._grouped_mm``; the custom op's kernel then loops over the groups, reading
``offs_L`` on the host (these shapes never reach a GPU in practice).
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor


def _aligned(t: Tensor) -> bool:
    """torch._grouped_mm's layout rule: every stride but the unit one (of dims longer than 1)
    is a multiple of 16 bytes."""
    step = 16 // t.element_size()
    return all(s % step == 0 for s, n in zip(t.stride(), t.shape, strict=True) if s != 1 and n > 1)


def _reference(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """Per-group loop (host read of ``offs``): 2-D x 3-D -> [N, M]; 2-D x 2-D -> [L, K, M]."""
    ranges = list(pairwise([0, *offs.tolist()]))
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for g, (s, e) in enumerate(ranges):
            out[s:e] = a[s:e] @ b[g]
        return out
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in ranges])


@torch.library.custom_op("deepsuite::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if _aligned(a) and _aligned(b):
        return torch._grouped_mm(a, b, offs=offs)
    return _reference(a, b, offs)


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:  # rows x per-group weights
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # per-group a^T b sums


def _setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    a, b, offs = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("deepsuite::grouped_mm: no double backward (2-D x 2-D form)")
    grad = grad.contiguous()
    da = db = None
    if ctx.needs_input_grad[0]:  # dx[rows of l] = dy[rows of l] @ w[l]^T
        da = grouped_mm(grad, b.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:  # dw[l] = x[rows of l]^T @ dy[rows of l]
        if b.transpose(-2, -1).is_contiguous():
            # b is a transposed [L, M, K] weight (nn.Linear layout, as the experts pass it):
            # compute dw^T in that layout, so the weight's gradient needs no transposing copy
            db = grouped_mm(grad.transpose(0, 1), a, offs).transpose(-2, -1)
        else:
            db = grouped_mm(a.transpose(0, 1), grad, offs)
    return da, db, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [N, K] x b [L, K, M] -> [N, M] (rows of group l times b[l]), or a [K, N] x b [N, M]
    -> [L, K, M] (per-group sums over the rows); ``offs`` int32 [L] cumulative row ends."""
    if a.dtype == torch.bfloat16 and _aligned(a) and _aligned(b):
        return torch._grouped_mm(a, b, offs=offs)
    return _grouped_mm_op(a, b, offs)
