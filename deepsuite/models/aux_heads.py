"""Auxiliary heads: any stack of ``deepsuite.layers`` (or ``torch.nn``) modules attached to the
hidden states of a chosen block, with its own target, loss and weight (config: ``model.aux_heads``).

Letters: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deepsuite.layers as layers
from deepsuite.config import AuxHeadConfig, ConfigError

IGNORE_INDEX = -100


def _resolve_class(name: str, where: str) -> type[nn.Module]:
    for namespace in (layers, nn):
        cls = getattr(namespace, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise ConfigError(
        f"{where}.type: expected a module class of deepsuite.layers or torch.nn, got {name!r}"
    )


def _substitute(value: Any, dim: int, vocab: int) -> Any:
    if value == "@dim":
        return dim
    if value == "@vocab":
        return vocab
    if isinstance(value, list):
        return [_substitute(v, dim, vocab) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, dim, vocab) for k, v in value.items()}
    return value


def build_aux_head(cfg: AuxHeadConfig, dim: int, vocab: int) -> nn.Sequential:
    """The configured module stack; errors name ``model.aux_heads[<name>].modules[i]``."""
    mods = []
    for i, spec in enumerate(cfg.modules):
        where = f"model.aux_heads[{cfg.name}].modules[{i}]"
        cls = _resolve_class(spec["type"], where)
        args = _substitute(dict(spec.get("args") or {}), dim, vocab)
        try:
            mods.append(cls(**args))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {spec['type']}(**{args}) failed: {err}") from err
    return nn.Sequential(*mods)


def token_targets(input_ids: Tensor, labels: Tensor, offset: int) -> Tensor:
    """(B, S) ids of the token at ``position + offset``; IGNORE_INDEX where that is outside."""
    tokens = torch.cat([input_ids, labels[:, -1:]], dim=1)  # token t at column t, t = 0..S
    S = input_ids.shape[1]
    target = torch.full_like(input_ids, IGNORE_INDEX)
    lo, hi = max(0, -offset), min(S, S + 1 - offset)  # positions t with 0 <= t + offset <= S
    if lo < hi:
        target[:, lo:hi] = tokens[:, lo + offset : hi + offset]
    return target


def aux_head_loss(
    head: nn.Module, cfg: AuxHeadConfig, h_BSD: Tensor, input_ids: Tensor, labels: Tensor
) -> Tensor:
    logits = head(h_BSD)
    target = token_targets(input_ids, labels, cfg.offset)
    if logits.shape[:2] != target.shape or logits.dim() != 3:
        raise ConfigError(
            f"model.aux_heads[{cfg.name}]: expected the head to map (B, S, D) to (B, S, V) logits, "
            f"got {tuple(logits.shape)}"
        )
    return F.cross_entropy(
        logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX
    )
