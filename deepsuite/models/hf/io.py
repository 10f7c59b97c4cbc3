"""Stream Hugging Face DeepSeek-V2/V3 safetensors into a deepsuite model, and write them back.

Loading reads the index (or the single ``model.safetensors``), checks the names against
:func:`~deepsuite.models.hf.names.hf_slots` (a missing or unexpected name raises
:class:`HFCheckpointError` listing them), then opens one shard at a time and copies each tensor
straight into its parameter (one tensor in memory at a time). On an expert-parallel model (its
``GroupedExperts`` record which global experts they hold) only this rank's experts are read.
FP8 block-quantised weights (``weight_scale_inv`` companions, the DeepSeek-V3 release) are
dequantised on the fly.

Saving writes ``config.json``, sharded ``model-XXXXX-of-YYYYY.safetensors`` and
``model.safetensors.index.json`` with per-expert names, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from deepsuite.config import Config, ModelArgs
from deepsuite.errors import CheckpointError
from deepsuite.layers.moe import GroupedExperts
from deepsuite.models.hf.config import V2, V3, config_to_hf, hf_flavor, hf_to_config
from deepsuite.models.hf.names import Slot, hf_slots, mtp_layers_present

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SCALE = "_scale_inv"  # FP8 companions: <name>.weight_scale_inv
# architecture fields that must agree between a checkpoint's config.json and the target model
_ARCH_FIELDS = {
    "model": ("vocab_size", "dim", "n_layers", "n_dense_layers", "n_heads", "inter_dim"),
    "model_": ("norm_eps", "tie_embeddings"),
    "mla": ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    "mla_": ("rope_theta", "rope_scaling", "rope_factor", "rope_interleave"),
    "moe": ("n_routed_experts", "n_shared_experts", "n_expert_per_token"),
    "moe_": ("expert_intermediate_size", "n_group", "topk_group", "score_func", "route_scale"),
    "moe__": ("norm_topk_prob", "use_expert_bias"),
}


def _layer(name: str) -> int:
    """The decoder layer index of an HF name (-1 for names outside model.layers)."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


class HFCheckpointError(CheckpointError):
    """A checkpoint does not fit the model: the message lists the offending names or fields."""


def _listing(title: str, names: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(names)[:limit])
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{title} ({len(names)}): {shown}{more}"


def read_hf_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise HFCheckpointError(
            f"path: expected a checkpoint directory with config.json, got {path}"
        )
    return json.loads(f.read_text())


def weight_map(path: str | Path) -> dict[str, str]:
    """HF tensor name -> shard file name, from the index or the single safetensors file."""
    path = Path(path)
    if (path / INDEX).is_file():
        return dict(json.loads((path / INDEX).read_text())["weight_map"])
    if (path / SINGLE).is_file():
        with safe_open(str(path / SINGLE), framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE)
    raise HFCheckpointError(f"path: expected {INDEX} or {SINGLE} in {path}")


def dequant_fp8(w: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128)) -> Tensor:
    """float32 weight from FP8 ``w`` [O, I] and per-block ``scale_inv`` [ceil(O/bo), ceil(I/bi)]."""
    bo, bi = block
    s = scale_inv.float().repeat_interleave(bo, 0)[: w.shape[0]]
    return w.float() * s.repeat_interleave(bi, 1)[:, : w.shape[1]]


@dataclass
class LoadReport:
    """What a load did: HF names read, expert names left to other EP ranks, files opened, and
    the MTP copies of shared tensors that differed from deepsuite's shared tensor (kept)."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    shared_mismatch: list[str] = field(default_factory=list)


def _dest(model: nn.Module, slot: Slot) -> tuple[Tensor, Tensor | None]:
    """(base tensor, destination view or None when the expert lives on another EP rank)."""
    path, attr = slot.ds.rsplit(".", 1)
    try:
        base = getattr(model.get_submodule(path), attr)
    except AttributeError as err:
        raise HFCheckpointError(f"{slot.hf}: the model has no {slot.ds} ({err})") from None
    if slot.expert is None:
        return base, base.data
    lo = _grouped_experts(model.get_submodule(path)).first_expert
    rows = base.shape[0]
    return base, (base.data[slot.expert - lo] if lo <= slot.expert < lo + rows else None)


def _grouped_experts(module: nn.Module) -> GroupedExperts:
    """The GroupedExperts a layer's ``experts`` holds (itself, or inside an expert-parallel shard)."""
    return next(m for m in module.modules() if isinstance(m, GroupedExperts))


def _check_arch(model_cfg: ModelArgs, ckpt_cfg: ModelArgs) -> None:
    bad = []
    for section, names in _ARCH_FIELDS.items():
        sec = section.rstrip("_")
        for n in names:
            a, b = getattr(getattr(model_cfg, sec), n), getattr(getattr(ckpt_cfg, sec), n)
            if a != b:
                bad.append(f"{sec}.{n}: model {a!r}, checkpoint {b!r}")
    if bad:
        raise HFCheckpointError("config.json does not match the model: " + "; ".join(bad))


def _read(f, root: Path, name: str, names: Mapping[str, str], block: tuple[int, ...]) -> Tensor:
    """One tensor from the open shard ``f``; FP8 weights come back dequantised to float32."""
    t = f.get_tensor(name)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale = name + _SCALE
        if scale not in names:
            raise HFCheckpointError(f"{name}: FP8 weight without its {scale}")
        with safe_open(str(root / names[scale]), framework="pt") as g:
            t = dequant_fp8(t, g.get_tensor(scale), (int(block[0]), int(block[1])))
    return t


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | Path, *, ignore_mtp: bool = False) -> LoadReport:
    """Copy an HF DeepSeek-V2/V3 checkpoint into ``model`` (a DeepSeekLM, possibly EP-sharded).

    ``ignore_mtp`` skips the checkpoint's MTP layers (HF layers >= num_hidden_layers) when the
    model has none.

    Raises HFCheckpointError for an architecture mismatch, missing or unexpected names, or a
    shape mismatch, before or while copying. Returns a :class:`LoadReport`.
    """
    path = Path(path)
    cfg: ModelArgs = model.args  # type: ignore[assignment]
    hf = read_hf_config(path)
    names = weight_map(path)
    _check_arch(cfg, hf_to_config(hf, mtp_depth=cfg.model.mtp_depth))
    slots = hf_slots(cfg, v3=hf["model_type"] == V3)
    expected = {s.hf for s in slots}
    present = {n for n in names if not n.endswith(_SCALE)}
    if ignore_mtp:
        present = {n for n in present if _layer(n) < cfg.model.n_layers}
    optional = {s.hf for s in slots if s.kind == "shared"}
    missing = sorted(expected - present - optional)
    unexpected = sorted(present - expected)
    if missing or unexpected:
        parts = [_listing("missing", missing)] if missing else []
        parts += [_listing("unexpected", unexpected)] if unexpected else []
        raise HFCheckpointError(f"{path}: weight names do not match the model: " + "; ".join(parts))
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    report, covered = LoadReport(), set()
    by_file: dict[str, list[Slot]] = {}
    for s in slots:
        base, dst = _dest(model, s)
        covered.add(id(base if base._base is None else base._base))  # gate/up: fused views
        if s.hf not in present:
            continue
        if dst is None:
            report.skipped.append(s.hf)  # another expert-parallel rank's expert: never read
        else:
            by_file.setdefault(names[s.hf], []).append(s)
    # shared MTP copies are compared with their main tensor, so read them after everything else
    for fname in sorted(by_file, key=lambda n: any(x.kind == "shared" for x in by_file[n])):
        report.files.append(fname)
        with safe_open(str(path / fname), framework="pt") as f:
            for s in by_file[fname]:
                if s.kind != "shared":
                    _copy_slot(model, s, _read(f, path, s.hf, names, block), report)
    for fname in report.files:
        shared = [s for s in by_file[fname] if s.kind == "shared"]
        if shared:
            with safe_open(str(path / fname), framework="pt") as f:
                for s in shared:
                    _copy_slot(model, s, _read(f, path, s.hf, names, block), report)
    left = [n for n, p in model.named_parameters() if id(p) not in covered]
    if left:
        raise HFCheckpointError(_listing("model parameters with no checkpoint name", left))
    if hf["model_type"] == V2:
        for m in model.modules():
            if hasattr(m, "expert_bias") and isinstance(m.expert_bias, Tensor):
                m.expert_bias.zero_()
    if report.shared_mismatch:
        warnings.warn(
            _listing(
                "MTP copies differ from the shared main tensors (main kept)", report.shared_mismatch
            ),
            stacklevel=2,
        )
    return report


def _copy_slot(model: nn.Module, s: Slot, t: Tensor, report: LoadReport) -> None:
    _, dst = _dest(model, s)
    assert dst is not None
    if s.kind == "eh_proj":  # HF [emb | hidden] -> deepsuite [hidden | emb]
        t = torch.cat(t.chunk(2, dim=1)[::-1], dim=1)
    if tuple(t.shape) != tuple(dst.shape):
        raise HFCheckpointError(
            f"{s.hf}: shape {tuple(t.shape)} in the checkpoint, {tuple(dst.shape)} for {s.ds}"
        )
    if s.kind == "shared":
        if not torch.equal(t.to(dst.dtype), dst):
            report.shared_mismatch.append(s.hf)
        return
    dst.copy_(t)
    report.loaded.append(s.hf)


def load_hf_model(
    path: str | Path,
    *,
    mtp: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Config, nn.Module]:
    """(Config, DeepSeekLM) from an HF checkpoint directory; built on meta, no random init.

    ``mtp``: build and load the MTP modules when the checkpoint has their weights.
    """
    from deepsuite.models.deepseek import DeepSeekLM

    hf = read_hf_config(path)
    depth = mtp_layers_present(set(weight_map(path)), int(hf["num_hidden_layers"])) if mtp else 0
    cfg = hf_to_config(hf, mtp_depth=depth, name=Path(path).name or "hf")
    with torch.device("meta"):
        model = DeepSeekLM(cfg)
    model.allocate(device)
    load_hf_weights(model, path, ignore_mtp=not mtp)
    return cfg, model.to(dtype)


class _LazySafetensors(Mapping[str, Tensor]):
    """A read-only name -> tensor mapping over one safetensors file, reading on access."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str) -> Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def lazy_safetensors(path: str | Path) -> Mapping[str, Tensor]:
    """A deepsuite consolidated export (``final/model.safetensors``) as a lazy state dict."""
    return _LazySafetensors(path)


def _hf_tensor(state: Mapping[str, Tensor], s: Slot, dtype: torch.dtype | None) -> Tensor:
    t = state[s.ds]
    if s.expert is not None:
        t = t[s.expert]
    if s.kind == "eh_proj":  # deepsuite [hidden | emb] -> HF [emb | hidden]
        t = torch.cat(t.chunk(2, dim=1)[::-1], dim=1)
    if dtype is not None and t.is_floating_point() and not s.ds.endswith("expert_bias"):
        t = t.to(dtype)
    return t.detach().contiguous().clone()  # own storage: safetensors refuses shared tensors


def save_hf_state(
    state: Mapping[str, Tensor],
    cfg: ModelArgs,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an unsharded deepsuite state dict (DeepSeekLM keys, stacked experts) in HF format.

    V3 (sigmoid + bias) or V2 (softmax, no bias) is chosen by :func:`hf_flavor`; a V2 model
    whose balancing bias is not zero is refused. ``dtype`` casts floating tensors (the balancing
    bias stays float32, as transformers keeps it). Shards hold at most ``max_shard_bytes`` (a
    single larger tensor gets its own shard). Returns ``out_dir``.
    """
    flavor = hf_flavor(cfg)
    slots = hf_slots(cfg, v3=flavor == V3)
    missing = sorted({s.ds for s in slots} - set(state))
    if missing:
        raise HFCheckpointError(_listing("state dict lacks", missing))
    if flavor == V2:
        for key in (k for k in state if k.endswith("router.expert_bias")):
            if bool(state[key].abs().sum() > 0):
                raise HFCheckpointError(f"{key}: DeepSeek-V2 has no balancing bias; it must be 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # plan shards from sizes alone, then materialise one shard at a time
    plans: list[list[Slot]] = [[]]
    size = total = 0
    for s in slots:
        t = state[s.ds]
        numel = t[0].numel() if s.expert is not None else t.numel()
        item = (
            torch.empty((), dtype=dtype or t.dtype).element_size()
            if t.is_floating_point()
            else t.element_size()
        )
        nbytes = numel * (4 if s.ds.endswith("expert_bias") else item)
        if plans[-1] and size + nbytes > max_shard_bytes:
            plans.append([])
            size = 0
        plans[-1].append(s)
        size += nbytes
        total += nbytes
    n = len(plans)
    wmap: dict[str, str] = {}
    for i, plan in enumerate(plans):
        fname = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {s.hf: _hf_tensor(state, s, dtype) for s in plan}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        wmap.update(dict.fromkeys(tensors, fname))
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": wmap}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    first = next(iter(state.values()))
    dname = str(dtype or first.dtype).removeprefix("torch.")
    hf_cfg = config_to_hf(cfg, dtype=dname)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    return out


@torch.no_grad()
def save_hf_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path | None:
    """Save a DeepSeekLM in HF format. On an expert-parallel model every rank must call this
    (the experts are all-gathered) and rank 0 writes; returns the directory on the writer."""
    cfg: ModelArgs = model.args  # type: ignore[assignment]
    sharded = any(
        isinstance(m, GroupedExperts) and m.n_experts < m.n_global_experts for m in model.modules()
    )
    if sharded:
        import torch.distributed as dist

        from deepsuite.distributed.expert_parallel import full_state_dict

        state = full_state_dict(model)
        if dist.get_rank() != 0:
            return None
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
    return save_hf_state(state, cfg, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
