"""Expert parallelism: rank detection, EP x EDP groups, all-to-all dispatch, expert sharding."""

from deepsuite.distributed.comm import CollectiveTimeoutError, all_to_all_rows, guard_collectives
from deepsuite.distributed.dispatch import AllToAllDispatcher, CommStats
from deepsuite.distributed.env import DistEnv, detect_env, init_distributed
from deepsuite.distributed.groups import (
    ExpertParallelGroups,
    check_same_config,
    setup_expert_parallel,
    validate_expert_parallel,
)

__all__ = [
    "AllToAllDispatcher",
    "CollectiveTimeoutError",
    "CommStats",
    "DistEnv",
    "ExpertParallelGroups",
    "all_to_all_rows",
    "check_same_config",
    "detect_env",
    "guard_collectives",
    "init_distributed",
    "setup_expert_parallel",
    "validate_expert_parallel",
]
