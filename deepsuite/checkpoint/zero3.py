"""ZeRO-3 partitions <-> whole tensors: read a ZeRO-3 checkpoint offline, write a rank's partitions.

Letters: P ranks in a parameter's partition group, k a rank's place in it, c = ceil(numel / P).

DeepSpeed 0.19 (pinned < 0.20) stage 3 partitions every parameter on its own: flattened and
zero-padded to P * c elements, rank k of the partition group holds elements [k*c, (k+1)*c)
(``runtime/zero/partition_parameters.py`` ``Init._partition_param``; the arithmetic of
``utils/zero_to_fp32.py`` ``zero3_partitioned_param_info``, which assumes P = world). A rank's
fp32 master partition of sub group i (``fp32_flat_groups[i]`` in its optim-states file) is its
chunks of the sub group's parameters, in the order of ``param_shapes[i]`` in its model-states
file; Adam's ``exp_avg`` / ``exp_avg_sq`` for the sub group are flat tensors of the same layout
(state index i: ``_rigid_state_dict`` appends the flat groups to their param groups in order).
The dense model's partition group is the world; an expert parameter's is its EP rank's
expert-data-parallel group, which stage 3 records per sub group (``ds_zero_partition_groups``:
``partition_ranks``) when the ``autoep_expert`` placement family is present.

:func:`read_zero3` undoes this per partition group (zero_to_fp32 refuses checkpoints with expert
placement); :func:`partition_chunk` is the same arithmetic forwards, used by
:mod:`deepsuite.checkpoint.load` to write each rank's own chunk into a live ZeRO-3 engine.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from deepsuite.checkpoint.layout import optim_states_file
from deepsuite.distributed.engine import safe_torch_load
from deepsuite.distributed.expert_shard import full_name, is_expert_name, stack_expert_slices
from deepsuite.errors import CheckpointError
from deepsuite.layers.moe import split_gate_up

__all__ = ["chunk_numel", "partition_chunk", "read_zero3", "unpartition"]


def chunk_numel(numel: int, parts: int) -> int:
    """Elements each of ``parts`` ranks holds of a ``numel``-element parameter (ceil division)."""
    return -(-numel // parts)


def partition_chunk(full: Tensor, parts: int, index: int) -> Tensor:
    """Rank ``index`` of ``parts``'s chunk of ``full`` (flattened; zero past its end)."""
    flat = full.reshape(-1)
    c = chunk_numel(flat.numel(), parts)
    lo = min(index * c, flat.numel())
    hi = min(lo + c, flat.numel())
    out = flat.new_zeros(c)
    out[: hi - lo] = flat[lo:hi]
    return out


def unpartition(chunks: list[Tensor], shape: torch.Size) -> Tensor:
    """The whole tensor from its P chunks in partition order (padding dropped)."""
    return torch.cat(chunks).narrow(0, 0, shape.numel()).view(shape).clone()


def _rank_files(tag_dir: Path, r: int) -> tuple[dict, dict]:
    model = safe_torch_load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    optim = safe_torch_load(optim_states_file(tag_dir, r))
    return model, optim["optimizer_state_dict"]


def read_zero3(
    tag_dir: Path, world: int, ep: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, dict[str, Tensor]], int]:
    """(module, fp32 masters, optimizer state by key (Adam's exp_avg, exp_avg_sq), Adam step) of
    a ZeRO-3 checkpoint saved by ``world`` ranks at EP ``ep``, keyed by the unsharded model's
    names (experts stacked [E, ...]); bit-exact.

    Raises CheckpointError naming the file when the partitions do not add up.
    """
    # pieces[key][name][partition ranks][place k] = chunk
    pieces: dict[str, dict[str, dict[tuple[int, ...], dict[int, Tensor]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    shapes: dict[str, torch.Size] = {}
    steps: set[int] = set()
    for r in range(world):
        model_sd, osd = _rank_files(tag_dir, r)
        where = f"checkpoint {tag_dir}, rank {r}"
        if model_sd.get("frozen_param_shapes"):
            raise CheckpointError(f"{where}: frozen parameters are not supported")
        flats, groups = osd["fp32_flat_groups"], model_sd["param_shapes"]
        meta = osd.get("ds_zero_partition_groups")
        base = osd["optimizer_state_dict"]
        state_ids = [i for g in base["param_groups"] for i in g["params"]]
        if not len(flats) == len(groups) == len(state_ids):
            raise CheckpointError(
                f"{where}: {len(flats)} fp32 partitions, {len(groups)} parameter groups, "
                f"{len(state_ids)} optimizer states"
            )
        # sub group i is optimizer state i: stage 3 appends the sub groups' flat partitions to
        # their param groups in order (sub groups never interleave param groups; the sizes are
        # checked below, so a different order fails loudly)
        for i, (names, flat) in enumerate(zip(groups, flats, strict=True)):
            ranks = tuple(meta[i]["partition_ranks"]) if meta else tuple(range(world))
            gstate = base["state"].get(state_ids[i], {})
            # Adam's per-element state (exp_avg, exp_avg_sq) beside the masters; 'step' is a count
            tensors = {"fp32": flat, **{k: t for k, t in gstate.items() if k != "step"}}
            if any(t.numel() != flat.numel() for t in tensors.values()):
                raise CheckpointError(
                    f"{where}: optimizer state {i} does not match its fp32 partition"
                )
            if "step" in gstate:
                steps.add(int(gstate["step"]))
            offset = 0
            for name, shape in names.items():
                c = chunk_numel(shape.numel(), len(ranks))
                for key, t in tensors.items():
                    pieces[key][name][ranks][ranks.index(r)] = t.narrow(0, offset, c)
                shapes[name] = torch.Size(shape)
                offset += c
            if offset != flat.numel():
                raise CheckpointError(
                    f"{where}: partition {i} holds {flat.numel()}, expected {offset}"
                )
    out: dict[str, dict[str, Tensor]] = {}
    for key, by_name in pieces.items():
        out[key] = {}
        for name, by_group in by_name.items():
            whole = {}
            for ranks, by_place in by_group.items():
                if sorted(by_place) != list(range(len(ranks))):
                    raise CheckpointError(
                        f"checkpoint {tag_dir}: {name} misses partitions of {ranks}"
                    )
                whole[ranks] = unpartition([by_place[k] for k in range(len(ranks))], shapes[name])
            out[key][full_name(name)] = _join_groups(tag_dir, name, whole, ep, world)
    if len(steps) > 1:
        raise CheckpointError(
            f"checkpoint {tag_dir}: ranks saved different Adam steps {sorted(steps)}"
        )
    for by_name in out.values():  # partitions are by parameter: gate_up_proj -> gate/up_proj
        split_gate_up(by_name)
    fp32 = out.pop("fp32")
    return _module(tag_dir, fp32), fp32, out, steps.pop() if steps else 0


def _join_groups(
    tag_dir: Path, name: str, whole: dict[tuple[int, ...], Tensor], ep: int, world: int
) -> Tensor:
    """A dense parameter: its one copy (partitioned over the world). An expert parameter: the
    local experts of each EP rank e (partitioned over ranks {e, e + ep, ...}), stacked."""
    if not is_expert_name(name) or ep == 1:
        if list(whole) != [tuple(range(world))]:
            raise CheckpointError(f"checkpoint {tag_dir}: {name} is partitioned over {list(whole)}")
        return next(iter(whole.values()))
    per_ep = {}
    for ranks, t in whole.items():
        if ranks != tuple(range(ranks[0], world, ep)):
            raise CheckpointError(f"checkpoint {tag_dir}: {name} partitioned over ranks {ranks}")
        per_ep[ranks[0]] = t
    if sorted(per_ep) != list(range(ep)):
        raise CheckpointError(f"checkpoint {tag_dir}: {name} misses EP ranks ({sorted(per_ep)})")
    return stack_expert_slices(per_ep, ep)


def _module(tag_dir: Path, fp32: dict[str, Tensor]) -> dict[str, Tensor]:
    """The module state: buffers as saved (rank 0), parameters from their fp32 masters in the
    dtype the module holds (stage 3 copies the masters into the low-precision partitions after
    each step, so the cast is exact), tied names from the tensor they share."""
    model_sd = safe_torch_load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    buffers = set(model_sd.get("buffer_names", []))
    shared = dict(model_sd.get("shared_params", {}))
    module = {}
    for key, t in model_sd["module"].items():
        name = full_name(key)
        if key in buffers:
            module[name] = t
        elif name in fp32:
            module[name] = fp32[name].to(t.dtype)
        elif key not in shared:
            raise CheckpointError(f"checkpoint {tag_dir}: no fp32 partitions for parameter {key}")
    for key, src in shared.items():
        if full_name(src) not in module:
            raise CheckpointError(f"checkpoint {tag_dir}: {key} is tied to {src}, which is missing")
        module[full_name(key)] = module[full_name(src)]
    return module
