"""Start from a trained model: what a path holds, its architecture, its tokenizer, its weights.

A path (``train.init_from``, ``deepsuite eval PATH``, ``deepsuite generate PATH``) may be:

* a Hugging Face DeepSeek-V2/V3 directory: ``config.json`` + ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (kind ``hf``);
* a deepsuite export: ``model.safetensors`` with ``config.yaml`` beside it or one level up
  (``RUN_DIR/final/``, ``deepsuite convert to-deepsuite`` output), given as the file, its folder
  or the run directory above ``final/`` (kind ``export``);
* a deepsuite run's checkpoints: a run directory without ``final/``, its ``checkpoints/`` or one
  tag directory; the newest complete tag is used (kind ``checkpoint``).

:func:`load_pretrained_weights` copies the weights into a :class:`~deepsuite.models.DeepSeekLM`
that may already be expert-parallel: every rank reads only the routed experts it holds (HF: the
per-expert tensors; export: row slices of the stacked tensors through safetensors' ``get_slice``).
A checkpoint tag is read whole by :func:`~deepsuite.checkpoint.full_state.read_full_state` (its
ZeRO layout needs every rank's file); export the run for large models. The balancing bias comes
with the weights (``e_score_correction_bias`` in V3 checkpoints; zero for V2). Weights are
loaded into whole (unpartitioned) parameters before the DeepSpeed engine is built.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from deepsuite.checkpoint import layout
from deepsuite.config import Config, ConfigError, config_from_dict, load_config
from deepsuite.distributed.expert_shard import expert_slices, full_name
from deepsuite.errors import CheckpointError
from deepsuite.layers.moe import split_gate_up
from deepsuite.models import DeepSeekLM
from deepsuite.models.hf import HFCheckpointError, hf_to_config, load_hf_weights, read_hf_config
from deepsuite.models.hf.io import INDEX, SINGLE, weight_map
from deepsuite.models.hf.names import mtp_layers_present

__all__ = [
    "ARCH_FIELDS",
    "PretrainedError",
    "PretrainedSource",
    "apply_pretrained_architecture",
    "find_pretrained",
    "load_pretrained",
    "load_pretrained_weights",
]

# the fields that define the network a checkpoint holds: taken from the checkpoint, and a config
# value that differs from both its default and the checkpoint's is an error
ARCH_FIELDS: dict[str, tuple[str, ...]] = {
    "model": (
        "vocab_size", "dim", "n_layers", "n_dense_layers", "n_heads", "inter_dim", "norm_eps",
        "tie_embeddings",
    ),
    "mla": (
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "rope_theta", "rope_scaling", "rope_factor", "original_max_seq_len", "beta_fast",
        "beta_slow", "mscale", "mscale_all_dim", "rope_interleave",
    ),
    "moe": (
        "n_routed_experts", "n_shared_experts", "n_expert_per_token", "expert_intermediate_size",
        "n_group", "topk_group", "score_func", "route_scale", "norm_topk_prob", "use_expert_bias",
    ),
}  # fmt: skip
# taken from the checkpoint when the config leaves them at their default, free otherwise
FILL_ONLY = {"model": ("max_seq_len", "init_std")}
TOKENIZER_FILE = "tokenizer.json"


class PretrainedError(CheckpointError):
    """A pretrained path is unusable or does not fit; the message names the path or key."""


@dataclass
class PretrainedSource:
    """What :func:`find_pretrained` found at a path.

    kind: "hf" | "export" | "checkpoint"; args: its architecture as a Config (model, mla, moe
    are the checkpoint's; other sections default or the saving run's); weights: the HF
    directory, the export file or the checkpoint tag directory; tokenizer: "byte", a
    tokenizer.json path, or None when nothing says which tokenizer the weights were trained with;
    mtp_depth: MTP modules with weights in the checkpoint.
    """

    path: Path
    kind: str
    args: Config
    weights: Path
    tokenizer: str | None
    mtp_depth: int = 0


def _tokenizer_in(*dirs: Path) -> str | None:
    return next((str(d / TOKENIZER_FILE) for d in dirs if (d / TOKENIZER_FILE).is_file()), None)


def _run_tokenizer(cfg: Config, *dirs: Path) -> str | None:
    """A deepsuite run's tokenizer: the tokenizer.json it saved, else 'byte' when it used that
    (the config says so and the vocabulary is the byte tokenizer's: a converted checkpoint's
    config.yaml says 'byte' by default whatever its weights were trained with)."""
    found = _tokenizer_in(*dirs)
    if found is None and cfg.data.tokenizer == "byte" and cfg.model.vocab_size == 257:
        return "byte"
    return found


def _export(weights: Path, given: Path) -> PretrainedSource:
    for cfg_file in (weights.parent / "config.yaml", weights.parent.parent / "config.yaml"):
        if cfg_file.is_file():
            cfg = load_config(cfg_file)
            tok = _run_tokenizer(cfg, weights.parent, cfg_file.parent)
            with safe_open(str(weights), framework="pt") as f:
                depth = len({k.split(".")[1] for k in f.keys() if k.startswith("mtp.")})  # noqa: SIM118
            return PretrainedSource(given, "export", cfg, weights, tok, depth)
    raise PretrainedError(f"{given}: {weights} has no config.yaml beside it or one level up")


def _checkpoint(tag_dir: Path, given: Path) -> PretrainedSource:
    reason = layout.verify_checkpoint(tag_dir)
    if reason is not None:
        raise PretrainedError(f"{given}: checkpoint {tag_dir} is not complete: {reason}")
    cfg = config_from_dict(layout.read_trainer_state(tag_dir)["config"])
    tok = _run_tokenizer(cfg, tag_dir.parent.parent)
    return PretrainedSource(given, "checkpoint", cfg, tag_dir, tok, cfg.model.mtp_depth)


def find_pretrained(path: str | Path) -> PretrainedSource:
    """Classify ``path`` (see the module docstring); reads configs only, never weights.

    Raises :class:`PretrainedError` naming the path and what was looked for.
    """
    p = Path(path)
    if not p.exists():
        raise PretrainedError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise PretrainedError(f"{p}: expected a directory or a model.safetensors file")
        return _export(p, p)
    if (p / "config.json").is_file():
        hf = read_hf_config(p)
        if not ((p / INDEX).is_file() or (p / SINGLE).is_file()):
            raise PretrainedError(f"{p}: config.json without {SINGLE} or {INDEX}")
        depth = mtp_layers_present(set(weight_map(p)), int(hf.get("num_hidden_layers") or 0))
        try:
            cfg = hf_to_config(hf, mtp_depth=0, name=p.name or "hf")
        except ConfigError as err:
            raise PretrainedError(f"{p}: {err}") from None
        return PretrainedSource(p, "hf", cfg, p, _tokenizer_in(p), depth)
    for weights in (p / SINGLE, p / "final" / SINGLE):
        if weights.is_file():
            return _export(weights, p)
    if (p / layout.TRAINER_STATE).is_file():
        return _checkpoint(p, p)
    for ckpt_dir in (p / "checkpoints", p):
        if layout.list_tags(ckpt_dir):
            tag = layout.find_resumable(ckpt_dir)
            if tag is None:
                raise PretrainedError(f"{p}: no complete checkpoint under {ckpt_dir}")
            return _checkpoint(ckpt_dir / tag, p)
    raise PretrainedError(
        f"{p}: expected a Hugging Face checkpoint (config.json + safetensors), a deepsuite export "
        f"(model.safetensors + config.yaml, or final/ of a run) or a run's checkpoints/"
    )


def apply_pretrained_architecture(cfg: Config, src: PretrainedSource, key: str) -> Config:
    """``cfg`` with its architecture taken from the checkpoint (``key`` names the config key
    that pointed at it, for messages).

    Every field of :data:`ARCH_FIELDS` left at its default takes the checkpoint's value; one
    set to anything else must equal it, or :class:`PretrainedError` lists each such key with
    both values. ``model.max_seq_len`` and ``model.init_std`` are filled when left at their
    default and free otherwise. ``model.mtp_depth`` stays the config's (0 skips the
    checkpoint's MTP layers). The result is validated as a whole.
    """
    tree, bad = cfg.to_dict(), []
    for section in ARCH_FIELDS:
        section_cls = type(getattr(cfg, section))
        defaults = {f.name: f.default for f in dataclasses.fields(section_cls)}
        for name in ARCH_FIELDS[section] + FILL_ONLY.get(section, ()):
            mine, theirs = tree[section][name], getattr(getattr(src.args, section), name)
            if mine == theirs:
                continue
            if mine == defaults[name]:
                tree[section][name] = theirs
            elif name in ARCH_FIELDS.get(section, ()):
                bad.append(f"{section}.{name}: config {mine!r}, checkpoint {theirs!r}")
    if bad:
        raise PretrainedError(
            f"{key}={src.path}: the config's architecture differs from the checkpoint's: "
            + "; ".join(bad)
            + " (leave these keys out of the config to take the checkpoint's values)"
        )
    if tree["model"]["mtp_depth"] > src.mtp_depth:
        raise PretrainedError(
            f"model.mtp_depth={tree['model']['mtp_depth']}: {src.path} holds weights for "
            f"{src.mtp_depth} MTP modules"
        )
    if tree["data"]["seq_len"] > tree["model"]["max_seq_len"]:
        tree["data"]["seq_len"] = tree["model"]["max_seq_len"]
    try:
        return config_from_dict(tree)
    except ConfigError as err:
        raise PretrainedError(f"{key}={src.path}: {err}") from None


def _copy_into(param: Tensor, value: Tensor, name: str) -> None:
    """Write one loaded tensor into its (local) parameter or buffer."""
    if tuple(value.shape) != tuple(param.shape):
        raise PretrainedError(
            f"{name}: shape {tuple(value.shape)} in the checkpoint, {tuple(param.shape)} in the model"
        )
    with torch.no_grad():
        param.copy_(value)


def _targets(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by their (possibly sharded) state-dict names: the fused
    experts' gate_up_proj as live views named gate_proj and up_proj, as the stores name them."""
    persistent = set(model.state_dict(keep_vars=True))
    out: dict[str, Tensor] = dict(split_gate_up(dict(model.named_parameters())))
    out.update({n: b for n, b in model.named_buffers() if n in persistent})
    return out


def _load_stacked(
    model: nn.Module, keys: set[str], read: Callable[[str, range | None], Tensor], where: str
) -> None:
    """Copy from a store with the unsharded model's keys (stacked experts); ``read(key, rows)``
    returns the whole tensor (rows None) or those expert rows only."""
    slices = expert_slices(model)
    targets = _targets(model)
    wanted = {full_name(n): n for n in targets}
    missing = sorted(set(wanted) - keys)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise PretrainedError(f"{where}: missing tensors ({len(missing)}): {shown}")
    extra = sorted(k for k in keys - set(wanted) if not k.startswith(("mtp.", "aux_heads.")))
    if extra and extra != ["head.weight"]:  # a tied model's export may carry the head copy
        raise PretrainedError(f"{where}: tensors the model does not have: {', '.join(extra[:8])}")
    for key, name in wanted.items():
        rows = slices.get(name)
        _copy_into(targets[name], read(key, rows), key)


def load_pretrained_weights(model: DeepSeekLM, src: PretrainedSource) -> None:
    """Copy ``src``'s weights into ``model`` (its parameters allocated; possibly sharded by
    expert parallelism), each rank reading only its own routed experts where the format allows.

    Raises :class:`PretrainedError` (or HFCheckpointError, also a ValueError) naming the missing,
    unexpected or mis-shaped tensor.
    """
    if src.kind == "hf":
        load_hf_weights(model, src.weights, ignore_mtp=model.args.model.mtp_depth == 0)
        return
    if src.kind == "export":
        with safe_open(str(src.weights), framework="pt") as f:

            def read(key: str, rows: range | None) -> Tensor:
                if rows is None:
                    return f.get_tensor(key)
                return f.get_slice(key)[rows.start : rows.stop]

            _load_stacked(model, set(f.keys()), read, str(src.weights))
        return
    from deepsuite.checkpoint.full_state import read_full_state

    module = read_full_state(src.weights, optimizer=False).module

    def read_full(key: str, rows: range | None) -> Tensor:
        t = module[key]
        return t if rows is None else t[rows.start : rows.stop]

    _load_stacked(model, set(module), read_full, str(src.weights))


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[PretrainedSource, DeepSeekLM]:
    """(source, DeepSeekLM in eval mode) for one process: built on the meta device, allocated
    and loaded without a random initialisation."""
    src = find_pretrained(path)
    with torch.device("meta"):
        model = DeepSeekLM(src.args)
    model.allocate(device)
    try:
        load_pretrained_weights(model, src)
    except HFCheckpointError as err:
        raise PretrainedError(str(err)) from None
    return src, model.to(dtype).eval()


def describe(src: PretrainedSource) -> str:
    """One line for logs: kind, path, size."""
    m = src.args.model
    return json.dumps(
        {"kind": src.kind, "path": str(src.path), "layers": m.n_layers, "dim": m.dim,
         "experts": src.args.moe.n_routed_experts, "vocab": m.vocab_size}
    )  # fmt: skip
