"""Checks of ``train.resume`` that need no collective: run on every rank before the group starts.

The checkpoint must exist and fit the run: a missing directory, one without a finished save, or a
checkpoint of another model shape or data order fails here with the key to change, instead of
after the process group, the data preparation and the engine are built. Cheap: it reads
``latest``, the tag names and one ``trainer_state.json`` (the SHA-256 check of every file stays
with rank 0 at resume time, :func:`deepsuite.checkpoint.layout.find_resumable`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepsuite.checkpoint import layout
from deepsuite.config import Config
from deepsuite.errors import CheckpointError

__all__ = ["check_resume", "newest_finished_tag"]

# what a checkpoint fixes: tensor shapes (model, attention, expert sizes) and the data order the
# saved position counts in; other settings (lr, steps, logging, ep, ZeRO) may change on resume
_SHAPE_KEYS = {
    "model": None,  # every key of the section
    "mla": None,
    "moe": ("n_routed_experts", "n_shared_experts", "expert_intermediate_size"),
    "data": (
        "source", "text_field", "document_separator", "tokenizer", "bpe_vocab_size", "seq_len",
        "max_documents", "val_fraction", "seed", "streaming",
    ),
}  # fmt: skip


def newest_finished_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names, else the newest tag whose manifest was written (the last step
    of a save); None when there is none. Files are not hashed here."""
    latest = ckpt_dir / "latest"
    tags = layout.list_tags(ckpt_dir)
    if latest.is_file() and latest.read_text().strip() in tags:
        return latest.read_text().strip()
    finished = [t for t in tags if (ckpt_dir / t / layout.MANIFEST).is_file()]
    return finished[-1] if finished else None


def _differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    now = cfg.to_dict()
    out = []
    for section, keys in _SHAPE_KEYS.items():
        there, here = saved.get(section, {}), now[section]
        for key in keys or sorted(here):
            if key not in there:
                continue  # saved before the key existed: its default then is assumed
            if section == "model" and key == "vocab_size" and here[key] == 0:
                continue  # 0 = the tokenizer's, which the saved run resolved
            if section == "data" and key == "tokenizer" and _own_copy(here[key], cfg):
                continue  # the copy this run saved of the tokenizer it started with
            if there[key] != here[key]:
                out.append(f"{section}.{key}: {there[key]!r} there, {here[key]!r} here")
    return out


def _own_copy(tokenizer: str, cfg: Config) -> bool:
    """``tokenizer`` is RUN_DIR/tokenizer.json, which the trainer writes at the start of a run
    from the tokenizer it trains with: a run that began from ``train.init_from`` resumes with it
    when the source (and the path its checkpoint names) is gone."""
    own = Path(cfg.train.run_dir) / "tokenizer.json"
    return tokenizer not in ("byte", "bpe") and Path(tokenizer).resolve() == own.resolve()


def check_resume(cfg: Config) -> None:
    """``train.resume`` (or, with "auto", ``train.run_dir``'s checkpoints) can be resumed by
    this config. Raises :class:`~deepsuite.errors.CheckpointError` naming the key to change."""
    resume = cfg.train.resume
    if resume == "never":
        return
    auto = resume == "auto"
    ckpt_dir = Path(cfg.train.run_dir) / "checkpoints" if auto else Path(resume)
    if not auto:
        if not ckpt_dir.is_dir():
            what = "is a file" if ckpt_dir.exists() else "does not exist"
            raise CheckpointError(
                f"train.resume: {ckpt_dir} {what}; expected a checkpoints directory "
                "(RUN_DIR/checkpoints), 'auto' (this run's own) or 'never'"
            )
        if (ckpt_dir / layout.TRAINER_STATE).is_file():
            raise CheckpointError(
                f"train.resume: {ckpt_dir} is one checkpoint tag; pass the checkpoints directory "
                f"holding it ({ckpt_dir.parent})"
            )
    tag = newest_finished_tag(ckpt_dir)
    if tag is None:
        if auto:
            return  # a fresh run
        tags = layout.list_tags(ckpt_dir)
        found = f"tags {tags} without a finished save" if tags else "no step_N checkpoint tags"
        raise CheckpointError(f"train.resume: no complete checkpoint under {ckpt_dir} ({found})")
    state_file = ckpt_dir / tag / layout.TRAINER_STATE
    try:
        saved = json.loads(state_file.read_text())["config"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"train.resume: cannot read {state_file} ({err})") from None
    diff = _differences(saved, cfg)
    if diff:
        key = "train.run_dir" if auto else "train.resume"
        raise CheckpointError(
            f"{key}: the checkpoint {ckpt_dir / tag} was saved by another model or data "
            f"order ({'; '.join(diff)}); resume with those settings, or start afresh with a new "
            "train.run_dir (or train.resume=never)"
        )
