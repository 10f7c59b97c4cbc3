"""Move a checkpoint between expert-parallel sizes (EP 4 -> 2 -> 1 and back), moments included.

Letters: E global routed experts, L = E / ep local experts, W world size (ranks that saved).

A DeepSpeed checkpoint of an EP run is laid out by its EP x EDP x ZeRO layout: one file per
GLOBAL expert (already EP-independent), the dense module, and the optimizer as per-rank ZeRO
partitions (stage 1/2: flat fp32 groups with per-name slice maps) or per-EP-rank torch state dicts
(stage 0, ``expp_rank_<e>_...``). :func:`read_full_state` undoes that layout into one
:class:`FullState` keyed by the unsharded model's names (experts stacked [E, ...]); DeepSpeed's own
ds_to_universal / load_universal_checkpoint does not cover our MoE layout (ExpertShard groups
partitioned over the expert-data-parallel group), so this reader is written by hand from the
``param_slice_mappings`` DeepSpeed records. :func:`load_full_state` pours it into a live engine
of any layout (through DeepSpeed's ``safe_set_full_*`` for ZeRO 1/2).

Two ways to use it:
  * load-time: :func:`load_any_layout` (what ``Trainer.resume`` calls) loads natively when the
    layout matches, else reads the full state and pours it in;
  * offline: :func:`reshard_checkpoint` / ``deepsuite reshard SRC DST --ep N`` spawns N gloo ranks
    that build the target engine, pour the state in and save a native checkpoint, committed with
    the manifest and an atomic ``latest`` (deepsuite.training.checkpoint).

Adam moments are carried for ZeRO 0, 1 and 2 (fp32 master weights, exp_avg, exp_avg_sq, step),
and the LR schedule position, engine step counters, balancing bias (a dense buffer), data position
and trainer_state are kept. ZeRO 3 is not supported by the MoE engine at all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FullState",
    "load_any_layout",
    "load_full_state",
    "read_full_state",
    "reshard_checkpoint",
    "reshard_main",
    "saved_layout",
]

_EXPERT_RE = re.compile(r"\.experts\.(local\.)?(gate_proj|up_proj|down_proj)$")
_DS_EXPERT_RE = re.compile(
    r"^(.*\.experts)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)$"
)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def full_name(name: str) -> str:
    """The unsharded model's name of a parameter: 'a.experts.local.up_proj' -> 'a.experts.up_proj'."""
    return name.replace(".experts.local.", ".experts.")


@dataclass
class FullState:
    """A checkpoint with its parallel layout undone (CPU tensors, fp32 where training was fp32).

    module: every persistent tensor of the unsharded model by name (experts stacked [E, F, D] /
        [E, D, F]; the balancing bias ``*.router.expert_bias`` among them).
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


def _load(path: Path) -> Any:
    from deepsuite.training.checkpoint import deepspeed_safe_globals

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def saved_layout(tag_dir: Path) -> dict[str, int]:
    """{'world': W, 'ep': ep, 'zero': stage} of a saved checkpoint (from trainer_state.json)."""
    tag_dir = Path(tag_dir)
    state_file = tag_dir / "trainer_state.json"
    if not state_file.is_file():
        raise ValueError(f"checkpoint: {state_file} not found (not a deepsuite checkpoint tag)")
    state = json.loads(state_file.read_text())
    dense = _load(tag_dir / "mp_rank_00_model_states.pt")
    zero = int(dense.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return {
        "world": int(state["world_size"]),
        "ep": int(state["config"]["parallel"]["ep"]),
        "zero": zero,
    }


def _cat_fragments(pieces: list[tuple[int, Tensor]]) -> Tensor:
    return torch.cat([t.flatten() for _, t in sorted(pieces, key=lambda p: p[0])])


def _stack_experts(per_ep: dict[int, Tensor], shape: torch.Size, ep: int) -> Tensor:
    """Local [L, ...] slices of EP ranks 0..ep-1 -> global [E, ...]."""
    return torch.cat([per_ep[e].view(shape) for e in range(ep)], dim=0)


def _read_zero12(tag_dir: Path, dense: dict, world: int, ep: int, st: FullState) -> None:
    """ZeRO 1/2: reassemble each parameter from its fragments in every rank's flat partition."""
    shapes = {n: s for g in dense["param_shapes"] for n, s in g.items()}
    frags: dict[str, dict[str, dict[int, list]]] = defaultdict(lambda: defaultdict(dict))
    steps = set()
    for r in range(world):
        sd = _load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        osd = sd["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            moe = bool(base["param_groups"][i].get("moe", False))
            # expert groups are partitioned over the expert-data-parallel group {e, e+ep, ...}
            slot, order = (r % ep, r // ep) if moe else (-1, r)
            flat = {"fp32": osd["single_partition_of_fp32_groups"][i]}
            gstate = base["state"].get(i, {})
            for key in _MOMENTS:
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
                per_ep = {e: _cat_fragments(p) for e, p in by_slot.items()}
                out[full_name(name)] = _stack_experts(per_ep, shapes[name], ep)
    if len(steps) > 1:
        raise ValueError(f"checkpoint {tag_dir}: ranks saved different Adam steps {sorted(steps)}")
    st.adam_step = steps.pop() if steps else 0


def _group_names(cfg: Any, ep: int) -> list[list[str]]:
    """Parameter names of each optimizer group as the training run built them (meta model)."""
    from deepsuite.distributed.expert_parallel import moe_param_groups
    from deepsuite.models import DeepSeekLM

    with torch.device("meta"):
        model = DeepSeekLM(cfg)
    names = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
        if ep > 1 and _EXPERT_RE.search(name):
            p.allreduce = False
            p.group_name = f"ep_size_{ep}"
    return [
        [names[id(p)] for p in g["params"]] for g in moe_param_groups(model, cfg.optim.weight_decay)
    ]


def _read_zero0(tag_dir: Path, dense: dict, cfg: Any, ep: int, st: FullState) -> None:
    """ZeRO 0: torch optimizer state dicts (indices in group order), one per EP rank."""
    groups = _group_names(cfg, ep)
    files = [tag_dir / f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(ep)]
    sds = [_load(f)["optimizer"] for f in files] if ep > 1 else [dense["optimizer"]]
    per: dict[str, dict[str, dict[int, Tensor]]] = defaultdict(lambda: defaultdict(dict))
    steps = set()
    for e, osd in enumerate(sds):
        if osd is None:
            return
        for gi, g in enumerate(osd["param_groups"]):
            if len(g["params"]) != len(groups[gi]):
                raise ValueError(
                    f"checkpoint {tag_dir}: optimizer group {gi} has {len(g['params'])} params, "
                    f"the model built from its config has {len(groups[gi])}"
                )
            for idx, name in zip(g["params"], groups[gi], strict=True):
                s = osd["state"].get(idx, {})
                if "step" in s:
                    steps.add(int(s["step"]))
                for key in _MOMENTS:
                    if key in s:
                        per[key][name][e] = s[key]
    for key, by_name in per.items():
        out = st.moments.setdefault(key, {})
        for name, by_ep in by_name.items():
            if ep > 1 and _EXPERT_RE.search(name):
                out[name] = _stack_experts(by_ep, by_ep[0].shape, ep)
            else:
                out[name] = by_ep[0]
    if len(steps) > 1:
        raise ValueError(f"checkpoint {tag_dir}: parameters saved different Adam steps {steps}")
    st.adam_step = steps.pop() if steps else 0


def read_full_state(tag_dir: str | Path) -> FullState:
    """Undo the EP x EDP x ZeRO layout of one checkpoint tag directory (single process, CPU).

    Raises ValueError naming the file or tensor when the checkpoint is not one this code wrote.
    """
    from deepsuite.config import config_from_dict

    tag_dir = Path(tag_dir)
    layout = saved_layout(tag_dir)
    world, ep = layout["world"], layout["ep"]
    cfg = config_from_dict(json.loads((tag_dir / "trainer_state.json").read_text())["config"])
    dense = _load(tag_dir / "mp_rank_00_model_states.pt")
    module = {full_name(k): v for k, v in dense["module"].items()}
    experts: dict[str, dict[int, Tensor]] = defaultdict(dict)
    for f in sorted(tag_dir.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        for key, t in _load(f).items():
            m = _DS_EXPERT_RE.match(key)
            if m is None:
                raise ValueError(f"{f}: unexpected key {key!r} in an expert file")
            experts[f"{m.group(1)}.{m.group(3)}"][int(m.group(2))] = t
    for name, by_id in experts.items():
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"checkpoint {tag_dir}: {name} misses experts ({sorted(by_id)})")
        module[name] = torch.stack([by_id[e] for e in range(len(by_id))])
    st = FullState(module=module, layout=layout)
    if layout["zero"] in (1, 2):
        _read_zero12(tag_dir, dense, world, ep, st)
    else:
        _read_zero0(tag_dir, dense, cfg, ep, st)
    st.lr_last_epoch = int(dense["lr_scheduler"]["last_epoch"]) if dense.get("lr_scheduler") else 0
    st.counters = {
        k: int(dense.get(k) or 0) for k in ("global_steps", "global_samples", "skipped_steps")
    }
    return st


def _expert_slices(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Sharded expert parameter name -> (first global expert, L) on this rank."""
    from deepsuite.distributed.expert_parallel import ExpertShard

    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, ExpertShard):
            L = mod.num_local_experts
            for w in ("gate_proj", "up_proj", "down_proj"):
                out[f"{mname}.local.{w}"] = (mod.ep_rank * L, L)
    return out


def _local(full: Tensor, name: str, slices: dict[str, tuple[int, int]]) -> Tensor:
    if name in slices:
        lo, n = slices[name]
        return full[lo : lo + n]
    return full


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


@torch.no_grad()
def load_full_state(engine: Any, model: torch.nn.Module, state: FullState) -> None:
    """Pour ``state`` into a live engine of any EP x ZeRO (0/1/2) layout, on every rank.

    Weights, fp32 masters, Adam moments and step, the LR schedule position and the engine's
    counters. Without moments in ``state`` they are left freshly initialised and a warning says so.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    slices = _expert_slices(model)
    own = dict(model.state_dict(keep_vars=True))
    params = dict(model.named_parameters())
    for name, t in list(own.items()):
        if name in params or name not in state.module:
            continue
        t.copy_(state.module[name])  # persistent buffers: the balancing bias
    missing = [n for n in params if full_name(n) not in state.module]
    if missing:
        raise ValueError(f"checkpoint: no tensor for parameters {missing[:4]} (config mismatch?)")
    zero = engine.zero_optimization_stage()
    opt = engine.optimizer
    have_moments = state.adam_step > 0 and all(state.moments.get(k) for k in _MOMENTS)
    if zero in (1, 2) and have_moments:
        # the base optimizer's state is created lazily at its first step: create it now
        inner = opt.optimizer
        for g in inner.param_groups:
            for flat in g["params"]:
                st = inner.state[flat]
                st["step"] = torch.tensor(float(state.adam_step))
                for key in _MOMENTS:
                    st.setdefault(key, torch.zeros_like(flat))
    for name, p in params.items():
        fname = full_name(name)
        value = _local(state.module[fname], name, slices)
        if value.shape != p.shape:
            raise ValueError(
                f"checkpoint: {fname} has shape {tuple(value.shape)}, model {tuple(p.shape)}"
            )
        p.copy_(value)
        if zero in (1, 2):
            safe_set_full_fp32_param(
                p, _local(state.fp32.get(fname, state.module[fname]), name, slices)
            )
            if have_moments:
                for key in _MOMENTS:
                    _set_zero_moment(opt, p, key, _local(state.moments[key][fname], name, slices))
        elif have_moments:
            s = opt.state[p]
            s["step"] = torch.tensor(float(state.adam_step))
            for key in _MOMENTS:
                s[key] = _local(state.moments[key][fname], name, slices).clone().to(p.dtype)
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


def load_any_layout(engine: Any, model: torch.nn.Module, ckpt_dir: str | Path, tag: str) -> bool:
    """Load ``<ckpt_dir>/<tag>`` into the live engine whatever EP / world / ZeRO stage saved it.

    The native DeepSpeed load when the layout matches; otherwise (every rank, no collective)
    :func:`read_full_state` + :func:`load_full_state`. Returns True when it resharded.
    """
    import torch.distributed as dist

    tag_dir = Path(ckpt_dir) / tag
    saved = saved_layout(tag_dir)
    here = {
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "ep": _model_ep(model),
        "zero": int(engine.zero_optimization_stage()),
    }
    if saved == here:
        engine.load_checkpoint(str(ckpt_dir), tag=tag)
        return False
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        print(f"resharding {tag_dir}: saved at {saved}, loading at {here}", flush=True)
    load_full_state(engine, model, read_full_state(tag_dir))
    return True


def _model_ep(model: torch.nn.Module) -> int:
    from deepsuite.distributed.expert_parallel import ExpertShard

    eps = {m.ep_size for m in model.modules() if isinstance(m, ExpertShard)}
    return eps.pop() if eps else 1


# ---- offline converter -----------------------------------------------------------------------
def _state_to_dict(st: FullState) -> dict[str, Any]:
    return {k: getattr(st, k) for k in FullState.__dataclass_fields__}


def _convert_rank(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    """One target rank: build the target engine, pour the full state in, save natively."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from deepsuite.config import config_from_dict
    from deepsuite.distributed.env import init_distributed
    from deepsuite.distributed.expert_parallel import apply_expert_parallel
    from deepsuite.distributed.groups import setup_expert_parallel
    from deepsuite.models import DeepSeekLM
    from deepsuite.training import checkpoint as ckpt
    from deepsuite.training.engine import build_engine

    init_distributed("gloo")
    try:
        cfg = config_from_dict(job["config"])
        torch.manual_seed(cfg.train.seed)
        model = DeepSeekLM(cfg)
        if cfg.parallel.ep > 1:
            groups = setup_expert_parallel(cfg.parallel.ep, cfg.moe.n_routed_experts)
            apply_expert_parallel(model, groups, check_replicated=False)
        engine = build_engine(cfg, model, job["ds_config"])
        raw = torch.load(job["state_file"], map_location="cpu", weights_only=True)
        load_full_state(engine, model, FullState(**raw))
        dst, tag = Path(job["dst"]), job["tag"]
        engine.save_checkpoint(str(dst), tag=tag, save_latest=False)
        src_rng = Path(job["src_tag_dir"]) / f"rng_rank{rank}.pt"
        if src_rng.is_file():  # ranks that did not exist before start from their seed
            shutil.copyfile(src_rng, dst / tag / src_rng.name)
        dist.barrier()
        if rank == 0:
            ckpt.write_trainer_state(dst / tag, job["trainer_state"])
            ckpt.commit_latest(dst, tag, keep_last=10**6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def reshard_checkpoint(
    src: str | Path,
    dst: str | Path,
    ep: int,
    world: int | None = None,
    tag: str | None = None,
    zero_stage: int | None = None,
) -> Path:
    """Convert a checkpoint to EP ``ep`` on ``world`` ranks (default ``ep``); returns the tag dir.

    Args:
        src: a checkpoints directory (its newest complete tag, or ``tag``) or a tag directory.
        dst: the checkpoints directory to write (``train.resume=<dst>`` resumes from it).
        ep: target expert-parallel size (divides moe.n_routed_experts and ``world``).
        world: target world size; the global batch must split over it (train.micro_batch_size
            is lowered when needed, keeping the global batch).
        zero_stage: target ZeRO stage (0, 1, 2); default the source's.
    """
    import socket

    import torch.multiprocessing as mp

    from deepsuite.config import config_from_dict, validate_expert_parallel
    from deepsuite.training import checkpoint as ckpt

    src, dst = Path(src), Path(dst)
    if not (src / "trainer_state.json").is_file():
        tag = tag or ckpt.find_resumable(src)
        if tag is None:
            raise ValueError(f"src: no complete checkpoint under {src}")
        src = src / tag
    reason = ckpt.verify_checkpoint(src)
    if reason is not None:
        raise ValueError(f"src: {src} is not a complete checkpoint: {reason}")
    world = ep if world is None else world
    trainer_state = ckpt.read_trainer_state(src)
    cfg = config_from_dict(trainer_state["config"])
    validate_expert_parallel(cfg.moe.n_routed_experts, world, ep)
    if zero_stage not in (None, 0, 1, 2):
        raise ValueError(f"zero_stage: expected 0, 1 or 2, got {zero_stage!r}")
    if dst.resolve() == src.parent.resolve():
        raise ValueError("dst: must differ from the source's checkpoints directory")
    cfg.parallel.ep = ep
    cfg.parallel.limit_groups_to = "experts"  # placement is the trainer's check, routing is kept
    tr = cfg.train
    while tr.global_batch_size % (tr.micro_batch_size * world) and tr.micro_batch_size > 1:
        tr.micro_batch_size -= 1
    cfg.check_world(world)
    dense = _load(src / "mp_rank_00_model_states.pt")
    ds = dict(dense["ds_config"])
    ds["train_micro_batch_size_per_gpu"] = tr.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accumulation_steps(world)
    ds["train_batch_size"] = tr.global_batch_size
    if zero_stage is not None:
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": zero_stage}
        cfg.parallel.zero_stage = zero_stage
    state = read_full_state(src)
    tag_name = src.name
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / tag_name).exists():
        shutil.rmtree(dst / tag_name)
    state_file = dst / f".reshard_{tag_name}.pt"
    torch.save(_state_to_dict(state), state_file)
    trainer_state = {**trainer_state, "world_size": world, "config": cfg.to_dict()}
    job = {
        "config": cfg.to_dict(),
        "ds_config": ds,
        "state_file": str(state_file),
        "dst": str(dst),
        "tag": tag_name,
        "src_tag_dir": str(src),
        "trainer_state": trainer_state,
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(
            _convert_rank, args=(world, port, job), nprocs=world, start_method="spawn"
        )
    finally:
        state_file.unlink(missing_ok=True)
    return dst / tag_name


def reshard_main(argv: list[str] | None = None) -> int:
    """``deepsuite reshard SRC DST --ep N [--world W] [--tag T] [--zero-stage S]``."""
    p = argparse.ArgumentParser(
        prog="deepsuite reshard",
        description="Convert a training checkpoint to another expert-parallel size (Adam moments, "
        "LR schedule, balancing bias, data position kept); resume with train.resume=DST.",
    )
    p.add_argument("src", help="checkpoints directory (newest complete tag) or one tag directory")
    p.add_argument("dst", help="checkpoints directory to write")
    p.add_argument("--ep", type=int, required=True, help="target expert-parallel size")
    p.add_argument("--world", type=int, default=None, help="target world size (default: --ep)")
    p.add_argument("--tag", default=None, help="tag under SRC (default: the newest complete one)")
    p.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2))
    a = p.parse_args(argv)
    out = reshard_checkpoint(a.src, a.dst, a.ep, a.world, a.tag, a.zero_stage)
    print(f"wrote {out} (ep={a.ep}, world={a.world or a.ep}); resume with train.resume={a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(reshard_main())
