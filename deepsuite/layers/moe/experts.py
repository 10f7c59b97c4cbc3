"""Routed experts as stacked SwiGLU weights, computed over rows sorted by expert.

Letters: N dispatched rows (sorted by local expert), D model dim, F expert hidden,
L local experts. Each expert e computes ``y = down_e(silu(gate_e x) * up_e x)`` on its
contiguous slice of rows; there is no capacity and no padding (dropless).

Paths (all equal to ``forward_reference``, a per-expert autograd loop, held by tests):
- CPU / other: one autograd Function that loops over the slices with ``torch.mm(out=...)``
  into preallocated buffers (no cat/stack copies, no zero-filled slice gradients).
- CUDA bf16/fp16: ``torch._grouped_mm`` (one kernel per projection, no host sync).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _splits(counts_L: Tensor | Sequence[int], n_experts: int, n_rows: int) -> list[int]:
    splits = counts_L.tolist() if isinstance(counts_L, Tensor) else [int(c) for c in counts_L]
    if len(splits) != n_experts:
        raise ValueError(
            f"counts_L must have {n_experts} entries (one per local expert), got {len(splits)}"
        )
    if sum(splits) != n_rows or min(splits, default=0) < 0:
        raise ValueError(
            f"counts_L must be >= 0 and sum to the {n_rows} rows of x_ND, got {splits}"
        )
    return splits


def _bounds(splits: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, stop) for every expert with at least one row."""
    out, start = [], 0
    for e, c in enumerate(splits):
        if c:
            out.append((e, start, start + c))
        start += c
    return out


def _empty_grad(w_L: Tensor, bounds: list[tuple[int, int, int]]) -> Tensor:
    """Weight-gradient buffer: rows of experts with tokens are overwritten by mm(out=...), so
    only the experts that received no token are zeroed (saves a full-size fill)."""
    grad = torch.empty_like(w_L)
    busy = torch.zeros(w_L.shape[0], dtype=torch.bool)
    busy[[e for e, _, _ in bounds]] = True
    idle = (~busy).nonzero().flatten().tolist()
    if idle:
        grad[idle] = 0
    return grad


class _LoopSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU over contiguous slices, with a hand-written backward.

    silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
    """

    @staticmethod
    def forward(ctx, x_ND, gate_LFD, up_LFD, down_LDF, splits):  # type: ignore[override]
        bounds = _bounds(splits)
        N, D = x_ND.shape
        Fh = gate_LFD.shape[1]
        g_NF = x_ND.new_empty(N, Fh)
        u_NF = x_ND.new_empty(N, Fh)
        for e, s, t in bounds:
            torch.mm(x_ND[s:t], gate_LFD[e].t(), out=g_NF[s:t])
            torch.mm(x_ND[s:t], up_LFD[e].t(), out=u_NF[s:t])
        a_NF = F.silu(g_NF).mul_(u_NF)
        y_ND = x_ND.new_empty(N, D)
        for e, s, t in bounds:
            torch.mm(a_NF[s:t], down_LDF[e].t(), out=y_ND[s:t])
        ctx.bounds = bounds
        # a = silu(g) u is recomputed in backward: one elementwise pass buys N x F of memory
        ctx.save_for_backward(x_ND, gate_LFD, up_LFD, down_LDF, g_NF, u_NF)
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):  # type: ignore[override]
        x_ND, gate_LFD, up_LFD, down_LDF, g_NF, u_NF = ctx.saved_tensors
        bounds = ctx.bounds
        need_x, need_g, need_u, need_d = ctx.needs_input_grad[:4]
        dy_ND = dy_ND.contiguous()
        d_down = _empty_grad(down_LDF, bounds) if need_d else None
        s_NF = F.silu(g_NF)
        if need_d:
            a_NF = s_NF * u_NF
            for e, s, t in bounds:
                torch.mm(dy_ND[s:t].t(), a_NF[s:t], out=d_down[e])
            del a_NF
        da_NF = torch.empty_like(g_NF)
        for e, s, t in bounds:
            torch.mm(dy_ND[s:t], down_LDF[e], out=da_NF[s:t])
        du_NF = s_NF.mul_(da_NF)  # silu(g) * da, in silu(g)'s buffer
        # dg = (da * u) * silu'(g): aten's fused silu_backward (the kernel autograd uses), written
        # over da (elementwise, same positions)
        dg_NF = torch.ops.aten.silu_backward.grad_input(da_NF.mul_(u_NF), g_NF, grad_input=da_NF)
        dx = torch.empty_like(x_ND) if need_x else None
        d_gate = _empty_grad(gate_LFD, bounds) if need_g else None
        d_up = _empty_grad(up_LFD, bounds) if need_u else None
        for e, s, t in bounds:
            if need_x:
                torch.mm(dg_NF[s:t], gate_LFD[e], out=dx[s:t])
                dx[s:t].addmm_(du_NF[s:t], up_LFD[e])
            if need_g:
                torch.mm(dg_NF[s:t].t(), x_ND[s:t], out=d_gate[e])
            if need_u:
                torch.mm(du_NF[s:t].t(), x_ND[s:t], out=d_up[e])
        if need_x and not bounds:
            dx.zero_()
        return dx, d_gate, d_up, d_down, None


def _grouped_swiglu(
    x_ND: Tensor, gate_LFD: Tensor, up_LFD: Tensor, down_LDF: Tensor, counts_L: Tensor
) -> Tensor:
    """CUDA path: three ``torch._grouped_mm`` calls; offs are cumulative row ends (int32)."""
    offs = torch.cumsum(counts_L.to(device=x_ND.device), 0).to(torch.int32)
    g = torch._grouped_mm(x_ND, gate_LFD.transpose(-2, -1), offs=offs)
    u = torch._grouped_mm(x_ND, up_LFD.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(F.silu(g) * u, down_LDF.transpose(-2, -1), offs=offs)


class GroupedExperts(nn.Module):
    """L SwiGLU experts stored as stacked weights.

    Args:
        n_experts: L, the experts this module holds (all E on one device).
        d_model: D.
        d_hidden: F, hidden width of each expert.

    Attributes: gate_proj [L, F, D], up_proj [L, F, D], down_proj [L, D, F] (nn.Linear layout).
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        for name, value in (("n_experts", n_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.use_grouped_mm: bool | None = None  # None: auto (CUDA with bf16/fp16 only)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same distribution as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per expert."""
        for w, fan_in in (
            (self.gate_proj, self.d_model),
            (self.up_proj, self.d_model),
            (self.down_proj, self.d_hidden),
        ):
            nn.init.uniform_(w, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def slice_experts(self, start: int, stop: int) -> GroupedExperts:
        """A new module holding copies of experts [start, stop) (no shared storage)."""
        if not 0 <= start < stop <= self.n_experts:
            raise ValueError(
                f"need 0 <= start < stop <= {self.n_experts}, got start={start}, stop={stop}"
            )
        dev = self.gate_proj.device
        with torch.device("meta"):
            new = GroupedExperts(stop - start, self.d_model, self.d_hidden)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(self, name).detach()[start:stop].clone()
            setattr(
                new, name, nn.Parameter(w.to(dev), requires_grad=getattr(self, name).requires_grad)
            )
        new.use_grouped_mm = self.use_grouped_mm
        return new

    def _check(self, x_ND: Tensor) -> None:
        if not isinstance(x_ND, Tensor) or x_ND.dim() != 2 or x_ND.shape[1] != self.d_model:
            shape = tuple(x_ND.shape) if isinstance(x_ND, Tensor) else type(x_ND).__name__
            raise ValueError(f"x_ND must be [N, {self.d_model}], got {shape}")

    def forward(self, x_ND: Tensor, counts_L: Tensor | Sequence[int]) -> Tensor:
        """x_ND [N, D] rows sorted by local expert; counts_L [L] int64 (tensor or list) -> [N, D]."""
        self._check(x_ND)
        if torch.is_autocast_enabled(x_ND.device.type):  # the Function's mm(out=) bypasses autocast
            x_ND = x_ND.to(torch.get_autocast_dtype(x_ND.device.type))
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = (
                x_ND.is_cuda
                and x_ND.dtype in (torch.bfloat16, torch.float16)
                and hasattr(torch, "_grouped_mm")
            )
        # under autocast x is already in the autocast dtype: the weights follow it (fp32 master
        # weights with bf16 compute), on both paths
        w = [p.to(x_ND.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj)]
        if grouped:
            if not isinstance(counts_L, Tensor):
                counts_L = torch.tensor(list(counts_L), dtype=torch.int64)
            if counts_L.numel() != self.n_experts:
                raise ValueError(
                    f"counts_L must have {self.n_experts} entries, got {counts_L.numel()}"
                )
            return _grouped_swiglu(x_ND, *w, counts_L)
        splits = _splits(counts_L, self.n_experts, x_ND.shape[0])
        return _LoopSwiGLU.apply(x_ND.contiguous(), *w, splits)

    def forward_reference(self, x_ND: Tensor, counts_L: Tensor | Sequence[int]) -> Tensor:
        """Obviously-correct per-expert autograd loop (the oracle for ``forward``)."""
        self._check(x_ND)
        splits = _splits(counts_L, self.n_experts, x_ND.shape[0])
        outs = []
        for e, x in enumerate(torch.split(x_ND, splits)):
            h = F.silu(x @ self.gate_proj[e].T) * (x @ self.up_proj[e].T)
            outs.append(h @ self.down_proj[e].T)
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}"
