"""The experts' gate and up weights under two names: one parameter inside the module, the seed's
and Hugging Face's two tensors everywhere outside it.

``GroupedExperts`` holds ``gate_up_proj`` [L, 2F, D] (each expert's gate rows, then its up rows);
state dicts, checkpoint files, exports and the Hugging Face mapping hold ``gate_proj`` and
``up_proj`` [L, F, D] (stacked [E, ...] once unsharded). This file is the one place the two
meet: the module's state-dict hooks, and :func:`split_gate_up` / :func:`fuse_gate_up` /
:func:`unfused_names` for code that keys state by parameter (ZeRO optimizer partitions, loading
into live parameters).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor, nn

__all__ = [
    "FUSED_WEIGHT",
    "SPLIT_WEIGHTS",
    "fuse_gate_up",
    "fuse_state_dict_hook",
    "split_gate_up",
    "split_state_dict_hook",
    "unfused_names",
]

FUSED_WEIGHT = "gate_up_proj"
SPLIT_WEIGHTS = ("gate_proj", "up_proj")


def unfused_names(name: str) -> list[str]:
    """A parameter name -> its state-dict names: '<p>gate_up_proj' -> ['<p>gate_proj',
    '<p>up_proj'], anything else -> [name]."""
    if not _is_fused_key(name):
        return [name]
    stem = name[: -len(FUSED_WEIGHT)]
    return [stem + w for w in SPLIT_WEIGHTS]


def _split_one(state: MutableMapping[str, Tensor], key: str) -> None:
    """'<p>gate_up_proj' -> '<p>gate_proj', '<p>up_proj' (then '<p>down_proj' again, for the
    seed's order). The halves are views, so a state dict costs no memory at checkpoint time (and
    ``torch.save`` writes their one storage once); writers that need contiguous tensors
    (safetensors) make them. A ZeRO-3 placeholder (not [.., 2F, D]) stands for both halves."""
    p = key[: -len(FUSED_WEIGHT)]
    t = state.pop(key)
    halves = (t, t) if t.dim() < 3 else t.chunk(2, dim=-2)
    for name, h in zip(unfused_names(key), halves, strict=True):
        state[name] = h
    if p + "down_proj" in state:
        state[p + "down_proj"] = state.pop(p + "down_proj")


def _fuse_one(state: MutableMapping[str, Tensor], prefix: str) -> None:
    g, u = state.pop(prefix + "gate_proj"), state.pop(prefix + "up_proj")
    state[prefix + FUSED_WEIGHT] = torch.cat([g, u], dim=-2) if g.dim() >= 3 else torch.cat([g, u])


def _is_fused_key(key: str) -> bool:
    return key == FUSED_WEIGHT or key.endswith("." + FUSED_WEIGHT)


def split_gate_up(state: MutableMapping[str, Tensor]) -> MutableMapping[str, Tensor]:
    """In place, for every ``...gate_up_proj`` [.., 2F, D]: the seed's and Hugging Face's
    ``...gate_proj`` and ``...up_proj`` [.., F, D] instead (stacked [E, ...] or local [L, ...]
    alike). Returns ``state``. Inverse of :func:`fuse_gate_up`."""
    for key in [k for k in state if _is_fused_key(k)]:
        _split_one(state, key)
    return state


def fuse_gate_up(state: MutableMapping[str, Tensor]) -> MutableMapping[str, Tensor]:
    """In place, for every ``...gate_proj`` with its ``...up_proj`` beside it (the stacked
    expert names; a dense MLP's end in ``.weight``): one ``...gate_up_proj`` (gate rows first).
    Returns ``state``. Inverse of :func:`split_gate_up`."""
    for key in [k for k in state if k == "gate_proj" or k.endswith(".gate_proj")]:
        prefix = key[: -len("gate_proj")]
        if prefix + "up_proj" in state:
            _fuse_one(state, prefix)
    return state


def split_state_dict_hook(module: nn.Module, state: dict, prefix: str, _meta: object) -> None:
    if prefix + FUSED_WEIGHT in state:
        _split_one(state, prefix + FUSED_WEIGHT)


def fuse_state_dict_hook(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    if prefix + "gate_proj" in state and prefix + "up_proj" in state:
        _fuse_one(state, prefix)
