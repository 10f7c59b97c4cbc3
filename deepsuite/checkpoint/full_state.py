"""Read a saved checkpoint tag into one unsharded state, whatever EP x world x ZeRO layout wrote it.

Letters: E global routed experts, L = E / ep local experts, W world size (ranks that saved).

A DeepSpeed checkpoint of an EP run is laid out by its EP x EDP x ZeRO layout: one file per
GLOBAL expert (already EP-independent), the dense module, and the optimizer as per-rank ZeRO
partitions (stage 1/2: flat fp32 groups with per-name slice maps) or per-EP-rank torch state dicts
(stage 0, ``expp_rank_<e>_...``). :func:`read_full_state` undoes that layout into one
:class:`FullState` keyed by the unsharded model's names (experts stacked [E, ...]), single
process, on the CPU. DeepSpeed's own ds_to_universal / load_universal_checkpoint does not cover
our MoE layout (ExpertShard groups partitioned over the expert-data-parallel group), so this
reader is written by hand from the ``param_slice_mappings`` DeepSpeed records (0.19, pinned <
0.20: ``single_partition_of_fp32_groups``, ``base_optimizer_state``, ``param_shapes``).

ZeRO 3 keeps every parameter only in per-rank partitions (dense ones over the world, experts over
their expert-data-parallel group): :mod:`deepsuite.checkpoint.zero3` reassembles them.

Adam moments are carried for every stage (fp32 master weights, exp_avg, exp_avg_sq, step), with
the LR schedule position and the engine's step counters; the balancing bias is a persistent
buffer of the module.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from deepsuite.checkpoint.layout import optim_states_file
from deepsuite.checkpoint.zero3 import read_zero3
from deepsuite.config import Config, config_from_dict
from deepsuite.distributed.engine import safe_torch_load
from deepsuite.distributed.expert_parallel import moe_param_groups
from deepsuite.distributed.expert_shard import (
    full_name,
    is_expert_name,
    shard_experts,
    split_deepspeed_key,
    stack_expert_slices,
)
from deepsuite.errors import CheckpointError
from deepsuite.layers.moe import DeepSeekMoE, split_gate_up, unfused_names
from deepsuite.models import DeepSeekLM

__all__ = [
    "MOMENTS",
    "FullState",
    "dense_states_file",
    "read_full_state",
    "saved_layout",
    "saved_parameters",
]

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    """A checkpoint with its parallel layout undone (CPU tensors, fp32 where training was fp32).

    module: every persistent tensor of the unsharded model by its state-dict name (experts
        stacked [E, F, D] / [E, D, F] under the seed's names gate_proj, up_proj, down_proj, as
        every file holds them; the balancing bias ``*.router.expert_bias`` among them).
    fp32: fp32 master weights by name when the optimizer kept a separate copy (ZeRO 1/2).
    moments: {"exp_avg": {name: tensor}, "exp_avg_sq": {...}} shaped like ``module`` entries.
    adam_step: Adam's step count (0 = moments absent: re-initialised with a warning on load).
    lr_last_epoch: the LR scheduler's position; counters: DeepSpeed's global_steps / samples.
    """

    module: dict[str, Tensor]
    fp32: dict[str, Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    adam_step: int = 0
    lr_last_epoch: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    layout: dict[str, int] = field(default_factory=dict)


def dense_states_file(tag_dir: Path) -> Path:
    """The file holding the engine's ds_config, LR schedule and counters: ZeRO 0-2's one dense
    file, or ZeRO 3's rank-0 module file (stage 3 writes one per rank)."""
    dense_file = Path(tag_dir) / "mp_rank_00_model_states.pt"
    if not dense_file.is_file():
        dense_file = Path(tag_dir) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return dense_file


def saved_layout(tag_dir: Path) -> dict[str, int]:
    """{'world': W, 'ep': ep, 'zero': stage} of a saved checkpoint (from trainer_state.json)."""
    tag_dir = Path(tag_dir)
    state_file = tag_dir / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(
            f"checkpoint: {state_file} not found (not a deepsuite checkpoint tag)"
        )
    state = json.loads(state_file.read_text())
    dense = safe_torch_load(dense_states_file(tag_dir))
    zero = int(dense.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return {
        "world": int(state["world_size"]),
        "ep": int(state["config"]["parallel"]["ep"]),
        "zero": zero,
    }


def saved_parameters(tag_dir: Path) -> set[str] | list[int] | None:
    """What a checkpoint's optimizer state was laid out by: under ZeRO 1-3 the parameter names
    of its flat partitions (DeepSpeed's ``param_shapes``), under ZeRO 0 the sizes of its torch
    optimizer's groups (that state is by index); None when it saved no optimizer."""
    tag_dir = Path(tag_dir)
    dense = safe_torch_load(dense_states_file(tag_dir))
    if dense.get("param_shapes"):
        return {n for g in dense["param_shapes"] for n in g}
    osd = dense.get("optimizer")
    expp = tag_dir / "expp_rank_0_mp_rank_00_optim_states.pt"
    if expp.is_file():  # ZeRO 0 under expert parallelism: one file per EP rank
        osd = safe_torch_load(expp)["optimizer"]
    return None if osd is None else [len(g["params"]) for g in osd["param_groups"]]


def _cat_fragments(pieces: list[tuple[int, Tensor]]) -> Tensor:
    return torch.cat([t.flatten() for _, t in sorted(pieces, key=lambda p: p[0])])


def _read_zero12(tag_dir: Path, dense: dict, world: int, ep: int, st: FullState) -> None:
    """ZeRO 1/2: reassemble each parameter from its fragments in every rank's flat partition."""
    shapes = {n: s for g in dense["param_shapes"] for n, s in g.items()}
    frags: dict[str, dict[str, dict[int, list]]] = defaultdict(lambda: defaultdict(dict))
    steps = set()
    for r in range(world):
        sd = safe_torch_load(optim_states_file(tag_dir, r))
        osd = sd["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            moe = bool(base["param_groups"][i].get("moe", False))
            # expert groups are partitioned over the expert-data-parallel group {e, e+ep, ...}
            slot, order = (r % ep, r // ep) if moe else (-1, r)
            flat = {"fp32": osd["single_partition_of_fp32_groups"][i]}
            gstate = base["state"].get(i, {})
            for key in MOMENTS:
                if key in gstate:
                    flat[key] = gstate[key]
            if "step" in gstate:
                steps.add(int(gstate["step"]))
            for name, addr in mapping.items():
                for key, t in flat.items():
                    piece = t.narrow(0, addr.start, addr.numel)
                    frags[key][name].setdefault(slot, []).append((order, piece))
    for key, by_name in frags.items():
        out = st.fp32 if key == "fp32" else st.moments.setdefault(key, {})
        for name, by_slot in by_name.items():
            if -1 in by_slot:
                out[full_name(name)] = _cat_fragments(by_slot[-1]).view(shapes[name])
            else:
                per_ep = {e: _cat_fragments(p).view(shapes[name]) for e, p in by_slot.items()}
                out[full_name(name)] = stack_expert_slices(per_ep, ep)
    if len(steps) > 1:
        raise CheckpointError(
            f"checkpoint {tag_dir}: ranks saved different Adam steps {sorted(steps)}"
        )
    st.adam_step = steps.pop() if steps else 0


def _group_names(cfg: Config, ep: int) -> list[list[str]]:
    """Unsharded parameter names of each optimizer group as the training run built them (a meta
    model sharded like EP rank 0, so expert parameters fall into their own groups)."""
    with torch.device("meta"):
        model = DeepSeekLM(cfg)
    if ep > 1:
        for moe in (m for m in model.modules() if isinstance(m, DeepSeekMoE)):
            moe.experts = shard_experts(moe.experts, ep, 0)
    names = {id(p): full_name(n) for n, p in model.named_parameters()}
    return [
        [names[id(p)] for p in g["params"]] for g in moe_param_groups(model, cfg.optim.weight_decay)
    ]


def _read_zero0(tag_dir: Path, dense: dict, cfg: Config, ep: int, st: FullState) -> None:
    """ZeRO 0: torch optimizer state dicts (indices in group order), one per EP rank."""
    groups = _group_names(cfg, ep)
    files = [tag_dir / f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(ep)]
    sds = [safe_torch_load(f)["optimizer"] for f in files] if ep > 1 else [dense["optimizer"]]
    per: dict[str, dict[str, dict[int, Tensor]]] = defaultdict(lambda: defaultdict(dict))
    steps = set()
    for e, osd in enumerate(sds):
        if osd is None:
            return
        for gi, g in enumerate(osd["param_groups"]):
            names = groups[gi]
            if len(g["params"]) != len(names):
                # written before the experts' gate and up became one parameter: the same order
                # with each gate_up_proj as gate_proj, up_proj
                names = [h for n in names for h in unfused_names(n)]
            if len(g["params"]) != len(names):
                raise CheckpointError(
                    f"checkpoint {tag_dir}: optimizer group {gi} has {len(g['params'])} params, "
                    f"the model built from its config has {len(groups[gi])}"
                )
            for idx, name in zip(g["params"], names, strict=True):
                s = osd["state"].get(idx, {})
                if "step" in s:
                    steps.add(int(s["step"]))
                for key in MOMENTS:
                    if key in s:
                        per[key][name][e] = s[key]
    for key, by_name in per.items():
        out = st.moments.setdefault(key, {})
        for name, by_ep in by_name.items():
            if ep > 1 and is_expert_name(name):
                out[name] = stack_expert_slices(by_ep, ep)
            else:
                out[name] = by_ep[0]
    if len(steps) > 1:
        raise CheckpointError(
            f"checkpoint {tag_dir}: parameters saved different Adam steps {steps}"
        )
    st.adam_step = steps.pop() if steps else 0


def _read_module(tag_dir: Path, dense: dict) -> dict[str, Tensor]:
    """ZeRO 0-2: the dense module file and one file per global expert, stacked [E, ...]."""
    module = {full_name(k): v for k, v in dense["module"].items()}
    experts: dict[str, dict[int, Tensor]] = defaultdict(dict)
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for key, t in safe_torch_load(f).items():
            parsed = split_deepspeed_key(key)
            if parsed is None:
                raise CheckpointError(f"{f}: unexpected key {key!r} in an expert file")
            experts[parsed[0]][parsed[1]] = t
    for name, by_id in experts.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise CheckpointError(f"checkpoint {tag_dir}: {name} misses experts ({sorted(by_id)})")
        module[name] = torch.stack([by_id[e] for e in range(len(by_id))])
    return module


def read_full_state(tag_dir: str | Path, *, optimizer: bool = True) -> FullState:
    """Undo the EP x EDP x ZeRO layout of one checkpoint tag directory (single process, CPU).
    ``optimizer=False`` reads the weights only (ZeRO 0-2; ZeRO 3 keeps them with the masters).

    Raises ValueError naming the file or tensor when the checkpoint is not one this code wrote.
    """
    tag_dir = Path(tag_dir)
    layout = saved_layout(tag_dir)
    world, ep = layout["world"], layout["ep"]
    dense = safe_torch_load(dense_states_file(tag_dir))
    if layout["zero"] == 3:
        module, fp32, moments, step = read_zero3(tag_dir, world, ep)
        st = FullState(module, fp32, moments, step, layout=layout)
    else:
        st = FullState(module=_read_module(tag_dir, dense), layout=layout)
        if optimizer and layout["zero"] in (1, 2):
            _read_zero12(tag_dir, dense, world, ep, st)
        elif optimizer:
            # ZeRO 0 names its optimizer state by index: the run's config says in what order
            cfg = config_from_dict(
                json.loads((tag_dir / "trainer_state.json").read_text())["config"]
            )
            _read_zero0(tag_dir, dense, cfg, ep, st)
    # optimizer state is keyed by parameter: the fused experts' gate_up_proj -> the names the
    # module state (and every checkpoint file) uses
    split_gate_up(st.fp32)
    for by_name in st.moments.values():
        split_gate_up(by_name)
    st.lr_last_epoch = int(dense["lr_scheduler"]["last_epoch"]) if dense.get("lr_scheduler") else 0
    st.counters = {
        k: int(dense.get(k) or 0) for k in ("global_steps", "global_samples", "skipped_steps")
    }
    return st
