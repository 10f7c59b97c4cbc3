"""Expert-parallel x expert-data-parallel process groups, built by DeepSpeed so its engine finds them.

World W = EP x EDP. EP groups are consecutive ranks ([0, 1], [2, 3] for W=4, ep=2); the
expert-data-parallel groups that hold the same experts are strided ([0, 2], [1, 3]). DeepSpeed's
``_create_expert_and_data_parallel(ep)`` builds exactly this and registers it as ``ep_size_<ep>``;
the engine reduces expert gradients over the EDP group under that name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from deepsuite.config import validate_expert_parallel
from deepsuite.distributed.comm import all_gather_flat

__all__ = [
    "ExpertParallelGroups",
    "check_same_config",
    "config_digest",
    "setup_expert_parallel",
]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """Handles and coordinates of this rank in the EP x EDP layout."""

    ep_size: int
    edp_size: int
    ep_rank: int
    edp_rank: int
    group_name: str  # "ep_size_<ep>", the name DeepSpeed registers and expert params carry
    ep_group: ProcessGroup
    edp_group: ProcessGroup


def setup_expert_parallel(ep: int, n_routed_experts: int) -> ExpertParallelGroups:
    """Validate, then create (or reuse) DeepSpeed's ``ep_size_<ep>`` groups on every rank.

    Call after ``init_distributed`` on every rank, in the same order, before building the engine.
    """
    if not dist.is_initialized():
        raise RuntimeError("setup_expert_parallel: call init_distributed() first")
    world = dist.get_world_size()
    validate_expert_parallel(n_routed_experts, world, ep)
    from deepspeed.utils import groups

    from deepsuite.distributed.expert_shard import group_name

    name = group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return ExpertParallelGroups(
        ep_size=ep,
        edp_size=world // ep,
        ep_rank=groups._get_expert_parallel_rank(name),
        edp_rank=groups._get_expert_data_parallel_rank(name),
        group_name=name,
        ep_group=groups._get_expert_parallel_group(name),
        edp_group=groups._get_expert_data_parallel_group(name),
    )


def config_digest(config: Any) -> bytes:
    """SHA-256 of a canonical JSON form of a config (dataclass, mapping, or JSON-able value)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).digest()


def check_same_config(config: Any, group: ProcessGroup | None = None) -> None:
    """All-gather the config's digest; raise the same ValueError on EVERY rank if any differs."""
    digest = torch.frombuffer(bytearray(config_digest(config)), dtype=torch.uint8).to(torch.int64)
    world = dist.get_world_size(group)
    gathered = torch.empty(world * digest.numel(), dtype=torch.int64)
    all_gather_flat(gathered, digest, group=group)
    rows = gathered.view(world, -1)
    differ = [r for r in range(world) if not torch.equal(rows[r], rows[0])]
    if differ:
        raise ValueError(
            f"config: ranks {differ} resolved a different config from rank 0 (seen on rank "
            f"{dist.get_rank()}); launch every rank with the same YAML and overrides"
        )
