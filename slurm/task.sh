#!/usr/bin/env bash
# One srun task: exec the launcher with SIGUSR1 ignored (an ignored signal stays ignored across
# exec, so torchrun's / deepspeed's agent survives SLURM's --signal=USR1 notice while the trainer,
# which installs its own handler, saves and requeues) and {NODE_RANK} replaced by SLURM_NODEID.
trap '' USR1
args=()
for a in "$@"; do
    args+=("${a//\{NODE_RANK\}/${SLURM_NODEID:-0}}")
done
exec "${args[@]}"
