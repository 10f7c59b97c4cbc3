"""Expert parallelism: rank detection, EP x EDP groups, all-to-all dispatch, expert sharding (the
convention: ``expert_shard.py``), and the DeepSpeed engine (``engine.py``).

Order on every rank (the train entry point does this)::

    env = init_distributed(backend="auto", timeout_s=600)      # torchrun/deepspeed/accelerate/SLURM
    groups = setup_expert_parallel(ep, cfg.moe.n_routed_experts)  # validates before any collective
    check_same_config(cfg)
    model = DeepSeekLM(cfg)                                   # same seed on every rank
    apply_expert_parallel(model, groups)                      # shard experts, swap dispatcher
    opt = torch.optim.AdamW(moe_param_groups(model, wd), lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    for step ...:
        with guard_collectives("train step", step):
            loss = ...; engine.backward(loss); engine.step()
            sync_and_update_bias(engine.module, gamma)        # once per optimizer step

The expert_parallel names import DeepSpeed and the MoE layer, so they load on first use.
"""

from typing import Any

from deepsuite.config import validate_expert_parallel
from deepsuite.distributed.comm import CollectiveTimeoutError, all_to_all_rows, guard_collectives
from deepsuite.distributed.dispatch import AllToAllDispatcher, CommStats
from deepsuite.distributed.env import DistEnv, detect_env, init_distributed
from deepsuite.distributed.groups import (
    ExpertParallelGroups,
    check_same_config,
    setup_expert_parallel,
)

_LAZY = {
    "ExpertShard",
    "apply_expert_parallel",
    "moe_layers",
    "moe_param_groups",
    "sync_and_update_bias",
    "verify_bias_identical",
}

__all__ = [
    "AllToAllDispatcher",
    "CollectiveTimeoutError",
    "CommStats",
    "DistEnv",
    "ExpertParallelGroups",
    "ExpertShard",
    "all_to_all_rows",
    "apply_expert_parallel",
    "check_same_config",
    "detect_env",
    "guard_collectives",
    "init_distributed",
    "moe_layers",
    "moe_param_groups",
    "setup_expert_parallel",
    "sync_and_update_bias",
    "validate_expert_parallel",
    "verify_bias_identical",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from deepsuite.distributed import expert_parallel

        return getattr(expert_parallel, name)
    raise AttributeError(f"module 'deepsuite.distributed' has no attribute {name!r}")
