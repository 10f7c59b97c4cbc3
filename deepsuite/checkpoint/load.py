"""Pour a full (unsharded) state into a live engine of any layout, and decide at load time.

:func:`load_any_layout` is what a resuming run calls: the native DeepSpeed load when the saved
EP x world x ZeRO layout is the live one, else :func:`~deepsuite.checkpoint.full_state.read_full_state`
on every rank (no collective) and :func:`load_full_state`, which writes each rank's slice of the
weights, fp32 master weights and Adam moments (any ZeRO stage), the LR schedule position and the
engine's counters.

Private DeepSpeed API relied on (0.19, pinned < 0.20): a parameter's ``_hp_mapping`` (its
fragment in the ZeRO 1/2 flat partition), ``engine.optimizer.optimizer`` (the wrapped torch
optimizer) and the engine's ``global_steps`` / ``global_samples`` / ``skipped_steps``. ZeRO 3: a
parameter's ``ds_tensor`` (this rank's low-precision partition), ``ds_process_group`` (its
partition group), ``ds_status`` / ``ds_numel`` / ``ds_shape``, and the optimizer's
``fp32_partitioned_groups_flat`` (the fp32 partitions Adam's state is keyed by).
``safe_set_full_fp32_param`` is not used there: stage 3's ``set_full_hp_param`` slices the
unpadded value, which fails on the last rank of a parameter whose size the group does not
divide; the local setters take this rank's padded chunk
(:func:`~deepsuite.checkpoint.zero3.partition_chunk`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from deepsuite.checkpoint.full_state import (
    MOMENTS,
    FullState,
    read_full_state,
    saved_layout,
    saved_parameters,
)
from deepsuite.checkpoint.zero3 import partition_chunk
from deepsuite.distributed.expert_shard import expert_slices, full_name, model_ep_size
from deepsuite.errors import CheckpointError
from deepsuite.layers.moe import fuse_gate_up

__all__ = ["load_any_layout", "load_full_state"]


def _local(full: Tensor, name: str, slices: dict[str, range]) -> Tensor:
    """This rank's rows of an expert tensor (all of any other tensor)."""
    held = slices.get(name)
    return full if held is None else full[held.start : held.stop]


def _set_zero_moment(opt: Any, p: torch.nn.Parameter, key: str, value: Tensor) -> None:
    """Write this rank's fragment of ``value`` (p's full shape) into the ZeRO 1/2 flat state.

    DeepSpeed's ``safe_set_full_optimizer_state`` needs the state linked at engine build, which
    happens only after a first step; the fragment addresses it would use are the same.
    """
    m = getattr(p, "_hp_mapping", None)
    if m is None:  # no fragment of p in this rank's partition
        return
    flat = opt.optimizer.param_groups[m.param_group_index]["params"][0]
    src = value.flatten().narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel)
    dst = opt.optimizer.state[flat][key]
    dst.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel).copy_(src)


def _set_zero3(p: Any, value: Tensor, fp32: Tensor, moments: dict[str, Tensor]) -> None:
    """This rank's chunks of a ZeRO-3 parameter: low-precision partition (and the whole tensor
    where stage 3 keeps it gathered: persistent small parameters), fp32 master, Adam moments."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    group = getattr(p, "ds_process_group", None)
    parts, k = dist.get_world_size(group), dist.get_rank(group)
    p.ds_tensor.copy_(partition_chunk(value, parts, k).to(p.ds_tensor.dtype))
    if p.ds_status == ZeroParamStatus.AVAILABLE and p.numel() == p.ds_numel:
        p.data.copy_(value.view(p.shape).to(p.dtype))
    safe_set_local_fp32_param(p, partition_chunk(fp32, parts, k))
    for key, t in moments.items():
        safe_set_local_optimizer_state(p, partition_chunk(t, parts, k), key)


@torch.no_grad()
def load_full_state(engine: Any, model: torch.nn.Module, state: FullState) -> None:
    """Pour ``state`` into a live engine of any EP x ZeRO layout, on every rank (no collective).

    Weights, fp32 masters, Adam moments and step, the LR schedule position and the engine's
    counters. Without moments in ``state`` they are left freshly initialised and a warning says so.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    # the state holds the checkpoint files' names (the experts' gate_proj, up_proj); the live
    # parameters are keyed by their own (gate_up_proj): fuse shallow copies, the caller's stay
    module = fuse_gate_up(dict(state.module))
    fp32 = fuse_gate_up(dict(state.fp32))
    moments = {k: fuse_gate_up(dict(v)) for k, v in state.moments.items()}
    slices = expert_slices(model)
    params = dict(model.named_parameters())
    for name, b in model.named_buffers():
        if name in module:  # persistent buffers: the balancing bias
            b.copy_(module[name])
    missing = [n for n in params if full_name(n) not in module]
    if missing:
        raise CheckpointError(
            f"checkpoint: no tensor for parameters {missing[:4]} (config mismatch?)"
        )
    zero = engine.zero_optimization_stage()
    opt = engine.optimizer
    have_moments = state.adam_step > 0 and all(moments.get(k) for k in MOMENTS)
    if zero in (1, 2, 3) and have_moments:
        # the base optimizer's state is created lazily at its first step: create it now (under
        # ZeRO 3 the flat partitions join the param groups only inside the step)
        inner = opt.optimizer
        flats = (
            opt.fp32_partitioned_groups_flat
            if zero == 3
            else [f for g in inner.param_groups for f in g["params"]]
        )
        for flat in flats:
            st = inner.state[flat]
            st["step"] = torch.tensor(float(state.adam_step))
            for key in MOMENTS:
                st.setdefault(key, torch.zeros_like(flat))
    for name, p in params.items():
        fname = full_name(name)
        value = _local(module[fname], name, slices)
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO 3 keeps a placeholder in p
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"checkpoint: {fname} has shape {tuple(value.shape)}, model {shape}"
            )
        if zero == 3:
            master = _local(fp32.get(fname, module[fname]), name, slices)
            adam = {k: _local(moments[k][fname], name, slices) for k in MOMENTS if have_moments}
            _set_zero3(p, value, master, adam)
            continue
        p.copy_(value)
        if zero in (1, 2):
            safe_set_full_fp32_param(p, _local(fp32.get(fname, module[fname]), name, slices))
            if have_moments:
                for key in MOMENTS:
                    _set_zero_moment(opt, p, key, _local(moments[key][fname], name, slices))
        elif have_moments:
            s = opt.state[p]
            s["step"] = torch.tensor(float(state.adam_step))
            for key in MOMENTS:
                s[key] = _local(moments[key][fname], name, slices).clone().to(p.dtype)
    if not have_moments:
        warnings.warn(
            "reshard: the checkpoint holds no Adam moments for this layout; they restart from "
            "zero (expect a few steps of different updates)",
            stacklevel=2,
        )
    sched = engine.lr_scheduler
    if sched is not None:
        sched.last_epoch = state.lr_last_epoch - 1
        sched.step()  # sets every group's lr for the saved position
        sched._step_count = state.lr_last_epoch + 1
    engine.global_steps = state.counters.get("global_steps", 0)
    engine.global_samples = state.counters.get("global_samples", 0)
    engine.skipped_steps = state.counters.get("skipped_steps", 0)


def _same_parameters(saved: set[str] | list[int] | None, model: Any, engine: Any) -> bool:
    """Whether the saved optimizer state is laid out by this model's parameters. DeepSpeed
    restores it by position, not by name, so a checkpoint written with other parameters (before
    the experts' gate and up became one) must be read by name instead."""
    if isinstance(saved, set):
        return saved == {n for n, _ in model.named_parameters()}
    return saved is None or saved == [len(g["params"]) for g in engine.optimizer.param_groups]


def load_any_layout(engine: Any, model: torch.nn.Module, ckpt_dir: str | Path, tag: str) -> bool:
    """Load ``<ckpt_dir>/<tag>`` into the live engine whatever EP / world / ZeRO stage saved it.

    The native DeepSpeed load when the layout matches; otherwise (every rank, no collective)
    :func:`read_full_state` + :func:`load_full_state`. Returns True when it resharded.
    """
    tag_dir = Path(ckpt_dir) / tag
    saved = saved_layout(tag_dir)
    here = {
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "ep": model_ep_size(model),
        "zero": int(engine.zero_optimization_stage()),
    }
    if saved == here and _same_parameters(saved_parameters(tag_dir), model, engine):
        engine.load_checkpoint(str(ckpt_dir), tag=tag)  # strict
        return False
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        why = f"saved at {saved}, loading at {here}" if saved != here else "other parameter names"
        print(f"resharding {tag_dir}: {why}", flush=True)
    load_full_state(engine, model, read_full_state(tag_dir))
    return True
