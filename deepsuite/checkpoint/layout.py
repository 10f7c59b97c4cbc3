"""Checkpoints that a kill can never leave half-written as "latest".

Layout under ``<run_dir>/checkpoints``::

    step_00000100/          DeepSpeed's files for every rank (dense, ZeRO shards, one file per expert)
        trainer_state.json  step, tokens seen, data-loader positions, the resolved config
        rng_rank<r>.pt      each rank's RNG states (tensors only: loads with weights_only=True)
        manifest.json       size and sha256 of every file above, written LAST by rank 0
    latest                  the tag of the newest complete checkpoint, replaced atomically

A tag directory without a valid manifest is incomplete (killed mid-save) or corrupt (a file changed
size or content); :func:`find_resumable` skips it, with a warning, and falls back to the previous one.
DeepSpeed does the tensor I/O; its loads read with ``torch.load(weights_only=True)``
(:func:`deepsuite.distributed.engine.make_safe_checkpoint_engine`). Nothing here talks to other
ranks: :mod:`deepsuite.checkpoint.run` orders the ranks around these steps.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from deepsuite.atomic import atomic_write_text
from deepsuite.errors import CheckpointError

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optim_states_file(tag_dir: Path, rank: int) -> Path:
    """Rank ``rank``'s ZeRO optimizer-state file; DeepSpeed prefixes it ``bf16_`` in bf16 runs."""
    name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    for path in (tag_dir / name, tag_dir / f"bf16_{name}"):
        if path.is_file():
            return path
    raise CheckpointError(f"checkpoint {tag_dir}: neither {name} nor bf16_{name} found")


def write_manifest(tag_dir: Path) -> None:
    """Record every file of a finished checkpoint; call on one rank after all ranks have written."""
    files = {
        str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(tag_dir: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, meta in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {meta['size']} (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def list_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags present on disk, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def find_resumable(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint tag, preferring the one ``latest`` names; warns on skips."""
    latest_file = ckpt_dir / "latest"
    candidates = list(reversed(list_tags(ckpt_dir)))
    if latest_file.is_file():
        named = latest_file.read_text().strip()
        if named in candidates:  # never resume from something newer than the committed latest
            candidates = candidates[candidates.index(named) :]
    for tag in candidates:
        reason = verify_checkpoint(ckpt_dir / tag)
        if reason is None:
            return tag
        warnings.warn(f"checkpoint {ckpt_dir / tag} skipped: {reason}", stacklevel=2)
    return None


def commit_latest(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """Point ``latest`` at ``tag`` and delete all but the newest ``keep_last`` complete tags."""
    write_manifest(ckpt_dir / tag)
    atomic_write_text(ckpt_dir / "latest", tag + "\n")
    tags = list_tags(ckpt_dir)
    for old in tags[: max(0, tags.index(tag) + 1 - keep_last)]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain lists (safe for ``weights_only`` loading)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")


def load_rank_state(tag_dir: Path, rank: int) -> None:
    path = tag_dir / f"rng_rank{rank}.pt"
    if path.is_file():  # a checkpoint saved by another world size has no file for new ranks
        set_rng_state(torch.load(path, weights_only=True))


def write_trainer_state(tag_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_text(tag_dir / TRAINER_STATE, json.dumps(state, indent=1))


def read_trainer_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / TRAINER_STATE).read_text())
