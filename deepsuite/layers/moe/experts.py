"""Routed experts as stacked SwiGLU weights, computed over rows sorted by expert.

Letters: N dispatched rows (sorted by local expert), D model dim, F expert hidden,
L local experts. Each expert e computes ``y = down_e(silu(gate_e x) * up_e x)`` on its
contiguous slice of rows; there is no capacity and no padding (dropless).

Gate and up are one parameter, ``gate_up_proj`` [L, 2F, D] (expert e's gate rows [:F] then its up
rows [F:]), so each expert's two input projections are one GEMM forward and one per operand
backward, and the device path runs two grouped GEMMs instead of three. Outside the module the
names stay those of the seed and of Hugging Face: ``state_dict`` writes ``gate_proj`` and
``up_proj`` [L, F, D], ``load_state_dict`` takes them (or the fused tensor) back, and
``gate_proj`` / ``up_proj`` are views of the fused parameter; ``gate_up.py`` holds that mapping
for the module and for code that keys state by parameter (optimizer state, ZeRO partitions).

Paths (all equal to ``forward_reference``, a per-expert autograd loop, held by tests):
- CPU eager (the loop path): one autograd Function that loops over the slices with
  ``torch.mm(out=...)`` into preallocated buffers (no cat/stack copies, no zero-filled slice
  gradients), with the dispatcher's gather and the gate-weighted combine fused in
  (``ExpertRows``) and slice-sized scratch for the temporaries. Its slices are sized on the host:
  it reads ``counts_L`` once per call, by design.
- The device path: two grouped GEMMs (``grouped_mm``: ``torch._grouped_mm``) over rows
  gathered by the dispatcher's index, offsets from the device counts: no host read, static
  shapes when N is static, compile-clean. Taken on CUDA in bf16/fp16 and whenever the layer is
  being compiled (the loop path's host-sized slices would break the graph); ``use_grouped_mm``
  forces either (both run on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import ExpertRows
from .gate_up import FUSED_WEIGHT, fuse_state_dict_hook, split_state_dict_hook
from .grouped_mm import grouped_mm


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
    busy = {e for e, _, _ in bounds}
    for e in range(w_L.shape[0]):
        if e not in busy:
            grad[e] = 0
    return grad


class _LoopSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU over contiguous slices, with a hand-written backward.

    Plain: rows x_MD (index_N None) -> per-row outputs y [N, D]. Fused (index_N given): rows
    x_MD[index_N] -> z_MD [M, D], per source row the sum of weight_N[n] * y_n over its rows; the
    gather and the weighted scatter happen slice by slice, so neither the N x D copy of the rows
    nor the per-row outputs exist in full, forward or backward. Everything except the saved gate
    and up pre-activations is computed one expert slice at a time in scratch buffers sized for
    the largest slice: the backward holds [g | u], the incoming gradient, dx and the weight
    gradients, and the slice stays in cache between its elementwise ops and its GEMMs.

    Gate and up are one GEMM each way: forward [g | u] = x W_gu^T, backward dx = [dg | du] W_gu
    and dW_gu = [dg | du]^T x, with [g | u] and [dg | du] kept side by side in [rows, 2F].

    With dz the gradient of z, per row n of source m: dy_n = w_n dz_m, and since y_n = a_n W_d^T,
    dw_n = <dz_m, y_n> = <dz_m W_d, a_n> (no need to keep y). silu'(g) = s (1 + g (1 - s)),
    s = sigmoid(g).
    """

    @staticmethod
    def forward(ctx, x_MD, index_N, weight_N, gate_up_L2FD, down_LDF, splits):  # type: ignore[override]
        bounds = _bounds(splits)
        N, D = sum(splits), x_MD.shape[1]
        Fh = down_LDF.shape[2]
        fused = index_N is not None
        gu_N2F = x_MD.new_empty(N, 2 * Fh)
        out = x_MD.new_zeros(x_MD.shape[0], D) if fused else x_MD.new_empty(N, D)
        rows = max((t - s for _, s, t in bounds), default=0)
        a_buf = x_MD.new_empty(rows, Fh)
        x_buf = x_MD.new_empty(rows, D) if fused else None
        y_buf = x_MD.new_empty(rows, D) if fused else None
        for e, s, t in bounds:
            x = _rows(x_MD, index_N, s, t, x_buf)
            gu = torch.mm(x, gate_up_L2FD[e].t(), out=gu_N2F[s:t])
            a = torch.ops.aten.silu.out(gu[:, :Fh], out=a_buf[: t - s]).mul_(gu[:, Fh:])
            if not fused:
                torch.mm(a, down_LDF[e].t(), out=out[s:t])
                continue
            y = torch.mm(a, down_LDF[e].t(), out=y_buf[: t - s])
            if weight_N is not None:
                y.mul_(weight_N[s:t, None])
            out.index_add_(0, index_N[s:t], y)
        ctx.bounds, ctx.rows = bounds, rows
        # a = silu(g) u is recomputed per slice in backward: one elementwise pass buys N x F
        ctx.save_for_backward(x_MD, index_N, weight_N, gate_up_L2FD, down_LDF, gu_N2F)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):  # type: ignore[override]
        x_MD, index_N, w_N, gate_up_L2FD, down_LDF, gu_N2F = ctx.saved_tensors
        bounds, rows = ctx.bounds, ctx.rows
        need_x, _, need_w, need_gu, need_d = ctx.needs_input_grad[:5]
        need_w = need_w and w_N is not None
        d_out = d_out.contiguous()  # dy [N, D] (plain) or dz [M, D] (fused)
        fused = index_N is not None
        Fh, D = down_LDF.shape[2], x_MD.shape[1]
        dx = None
        if need_x:  # fused: each row's gradient is added into its source row
            dx = torch.zeros_like(x_MD) if fused else torch.empty_like(x_MD)
        dw = torch.empty_like(w_N) if need_w else None
        d_gate_up = _empty_grad(gate_up_L2FD, bounds) if need_gu else None
        d_down = _empty_grad(down_LDF, bounds) if need_d else None
        a_buf, da_buf = (gu_N2F.new_empty(rows, Fh) for _ in range(2))
        dgu_buf = gu_N2F.new_empty(rows, 2 * Fh)  # [dg | du]
        p_buf = gu_N2F.new_empty(rows, Fh) if need_w else None
        dy_buf = x_MD.new_empty(rows, D) if fused else None
        x_buf = x_MD.new_empty(rows, D) if fused and need_gu else None
        dx_buf = x_MD.new_empty(rows, D) if fused and need_x else None
        for e, s, t in bounds:
            n, gu = t - s, gu_N2F[s:t]
            g, u = gu[:, :Fh], gu[:, Fh:]
            dgu = dgu_buf[:n]
            dg, du = dgu[:, :Fh], dgu[:, Fh:]
            # dy = w dz[source row] (fused) or the incoming rows (plain)
            dy = _rows(d_out, index_N, s, t, dy_buf) if fused else d_out[s:t]
            sg = torch.ops.aten.silu.out(g, out=du)  # silu(g), in du's place until du is due
            a = torch.mul(sg, u, out=a_buf[:n])
            da = torch.mm(dy, down_LDF[e], out=da_buf[:n])  # before the weight: dz W_d
            if need_w:  # row-wise <dz W_d, a>
                torch.sum(torch.mul(da, a, out=p_buf[:n]), dim=1, out=dw[s:t])
            if w_N is not None:
                w = w_N[s:t, None]
                dy.mul_(w)  # a scratch gather when fused: the incoming gradient is untouched
                da.mul_(w)
            if need_d:
                torch.mm(dy.t(), a, out=d_down[e])
            du.mul_(da)  # silu(g) * da
            # dg = (da * u) * silu'(g): aten's fused silu_backward (the kernel autograd uses)
            torch.ops.aten.silu_backward.grad_input(da.mul_(u), g, grad_input=dg)
            if need_x:
                dx_e = dx[s:t] if not fused else dx_buf[:n]
                torch.mm(dgu, gate_up_L2FD[e], out=dx_e)
                if fused:
                    dx.index_add_(0, index_N[s:t], dx_e)
            if need_gu:
                x = _rows(x_MD, index_N, s, t, x_buf)
                torch.mm(dgu.t(), x, out=d_gate_up[e])
        if need_x and not bounds:
            dx.zero_()
        if need_w and not bounds:
            dw.zero_()
        return dx, None, dw, d_gate_up, d_down, None


def _rows(x_MD: Tensor, index_N: Tensor | None, s: int, t: int, buf: Tensor | None) -> Tensor:
    """Rows s:t of the expert input: x_MD[index_N[s:t]] gathered into buf, or x_MD[s:t]."""
    if index_N is None:
        return x_MD[s:t]
    return torch.index_select(x_MD, 0, index_N[s:t], out=buf[: t - s])


def _grouped_swiglu(
    x_ND: Tensor, gate_up_L2FD: Tensor, down_LDF: Tensor, counts_L: Tensor
) -> Tensor:
    """The device path: two grouped GEMMs; offs are cumulative row ends (int32)."""
    offs = torch.cumsum(counts_L.to(device=x_ND.device), 0).to(torch.int32)
    g, u = grouped_mm(x_ND, gate_up_L2FD.transpose(-2, -1), offs).chunk(2, dim=-1)
    return grouped_mm(F.silu(g) * u, down_LDF.transpose(-2, -1), offs)


class GroupedExperts(nn.Module):
    """L SwiGLU experts stored as stacked weights.

    Args:
        n_experts: L, the experts this module holds (all E on one device).
        d_model: D.
        d_hidden: F, hidden width of each expert.

    Parameters: gate_up_proj [L, 2F, D] (each expert's gate rows, then its up rows) and
    down_proj [L, D, F] (nn.Linear layout). ``gate_proj`` / ``up_proj`` [L, F, D] are views of
    the fused parameter, and the names its state dict uses (the module docstring).
    ``first_expert`` and ``n_global_experts`` record which experts of the layer these are:
    global experts [first_expert, first_expert + L) of n_global_experts (0 and L when the module
    holds them all; :meth:`slice_experts` and expert parallelism set them for a slice).
    """

    def __init__(self, n_experts: int, d_model: int, d_hidden: int) -> None:
        super().__init__()
        for name, value in (("n_experts", n_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.first_expert, self.n_global_experts = 0, n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        # None: auto (CUDA with bf16/fp16, or while being compiled); True/False force a path
        self.use_grouped_mm: bool | None = None
        self.register_state_dict_post_hook(split_state_dict_hook)
        self.register_load_state_dict_pre_hook(fuse_state_dict_hook)
        self.reset_parameters()

    @property
    def gate_proj(self) -> Tensor:
        """[L, F, D]: the gate rows of ``gate_up_proj`` (a view: writes reach the parameter)."""
        return self.gate_up_proj[:, : self.d_hidden]

    @property
    def up_proj(self) -> Tensor:
        """[L, F, D]: the up rows of ``gate_up_proj`` (a view: writes reach the parameter)."""
        return self.gate_up_proj[:, self.d_hidden :]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Same distribution as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per expert, drawn
        gate, up, down in turn (the values three separate [L, F, D] / [L, D, F] tensors get)."""
        for w, fan_in in (
            (self.gate_proj, self.d_model),
            (self.up_proj, self.d_model),
            (self.down_proj, self.d_hidden),
        ):
            bound = 1.0 / math.sqrt(fan_in)
            w.copy_(torch.empty(w.shape, dtype=w.dtype, device=w.device).uniform_(-bound, bound))

    def slice_experts(self, start: int, stop: int) -> GroupedExperts:
        """A new module holding copies of experts [start, stop) (no shared storage); it records
        that they are global experts [first_expert + start, first_expert + stop)."""
        if not 0 <= start < stop <= self.n_experts:
            raise ValueError(
                f"need 0 <= start < stop <= {self.n_experts}, got start={start}, stop={stop}"
            )
        dev = self.gate_up_proj.device
        with torch.device("meta"):
            new = GroupedExperts(stop - start, self.d_model, self.d_hidden)
        for name in (FUSED_WEIGHT, "down_proj"):
            w = getattr(self, name).detach()[start:stop].clone()
            setattr(
                new, name, nn.Parameter(w.to(dev), requires_grad=getattr(self, name).requires_grad)
            )
        new.use_grouped_mm = self.use_grouped_mm
        new.first_expert = self.first_expert + start
        new.n_global_experts = self.n_global_experts
        return new

    def _check(self, x: Tensor | ExpertRows) -> int:
        """Validate the input rows; -> N, their number."""
        src = x.source if isinstance(x, ExpertRows) else x
        if not isinstance(src, Tensor) or src.dim() != 2 or src.shape[1] != self.d_model:
            shape = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
            raise ValueError(f"x must be [rows, {self.d_model}], got {shape}")
        if not isinstance(x, ExpertRows):
            return x.shape[0]
        idx = x.index_N
        if (
            not isinstance(idx, Tensor)
            or idx.dim() != 1
            or idx.dtype != torch.int64
            or idx.device != src.device
        ):
            what = (
                f"{idx.dtype} {tuple(idx.shape)} on {idx.device}"
                if isinstance(idx, Tensor)
                else type(idx).__name__
            )
            raise ValueError(f"index_N must be a 1-D int64 tensor on {src.device}, got {what}")
        w = x.weight_N
        if w is not None and (not isinstance(w, Tensor) or tuple(w.shape) != (idx.shape[0],)):
            what = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(
                f"weight_N must be a [{idx.shape[0]}] tensor (one per row), got {what}"
            )
        return idx.shape[0]

    def forward(self, x: Tensor | ExpertRows, counts_L: Tensor | Sequence[int]) -> Tensor:
        """Experts over rows sorted by local expert; counts_L [L] int64 (tensor or list) rows
        per expert.

        ``x`` [N, D] (the rows themselves) -> per-row outputs [N, D]. ``x`` as dispatchers give
        it, ``ExpertRows`` (rows source[index_N] of a source [M, D], with gate weights) -> per
        source row the weighted sum of its rows' outputs [M, D] (``ExpertRows.scatter``). The
        loop path fuses that gather and scatter, so the N x D rows and outputs are never built
        nor kept for backward; the grouped_mm path gathers, computes and scatters.
        """
        n_rows = self._check(x)
        rows = x if isinstance(x, ExpertRows) else None
        src = rows.source if rows is not None else x
        if torch.is_autocast_enabled(src.device.type):  # the Function's mm(out=) bypasses autocast
            src = src.to(torch.get_autocast_dtype(src.device.type))
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = torch.compiler.is_compiling() or (
                src.is_cuda and src.dtype in (torch.bfloat16, torch.float16)
            )
        # under autocast x is already in the autocast dtype: the weights follow it (fp32 master
        # weights with bf16 compute), on both paths
        w = [p.to(src.dtype) for p in (self.gate_up_proj, self.down_proj)]
        if grouped:
            if not isinstance(counts_L, Tensor):
                # host-side counts are checked like the loop path's; device counts are not (a
                # check would cost the host read this path exists to avoid)
                counts_L = torch.tensor(_splits(counts_L, self.n_experts, n_rows))
            if counts_L.numel() != self.n_experts:
                raise ValueError(
                    f"counts_L must have {self.n_experts} entries, got {counts_L.numel()}"
                )
            if rows is None:
                return _grouped_swiglu(src, *w, counts_L)
            rows = rows._replace(source=src)
            return rows.scatter(_grouped_swiglu(rows.gather(), *w, counts_L))
        splits = _splits(counts_L, self.n_experts, n_rows)
        if rows is None:
            return _LoopSwiGLU.apply(src.contiguous(), None, None, *w, splits)
        weight = None if rows.weight_N is None else rows.weight_N.to(src.dtype)
        return _LoopSwiGLU.apply(src.contiguous(), rows.index_N, weight, *w, splits)

    def forward_reference(self, x: Tensor | ExpertRows, counts_L: Tensor | Sequence[int]) -> Tensor:
        """Obviously-correct per-expert autograd loop (the oracle for ``forward``)."""
        n_rows = self._check(x)
        splits = _splits(counts_L, self.n_experts, n_rows)
        x_ND = x.source[x.index_N] if isinstance(x, ExpertRows) else x
        outs = []
        for e, xe in enumerate(torch.split(x_ND, splits)):
            h = F.silu(xe @ self.gate_proj[e].T) * (xe @ self.up_proj[e].T)
            outs.append(h @ self.down_proj[e].T)
        y_ND = torch.cat(outs, dim=0)
        if not isinstance(x, ExpertRows):
            return y_ND
        if x.weight_N is not None:
            y_ND = y_ND * x.weight_N.to(y_ND.dtype)[:, None]
        z = torch.zeros(x.source.shape[0], y_ND.shape[1], dtype=y_ND.dtype, device=y_ND.device)
        return z.index_add(0, x.index_N, y_ND)

    def extra_repr(self) -> str:
        held = ""
        if self.n_experts != self.n_global_experts:
            held = f", experts [{self.first_expert}, {self.first_expert + self.n_experts}) of {self.n_global_experts}"
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}{held}"
