#!/usr/bin/env bash
# One srun task of the sbatch scripts: runs its arguments (torchrun, the deepspeed launcher or the
# trainer) with {NODE_RANK} replaced by SLURM_NODEID and {HOSTFILE} by a hostfile of the allocation
# written to this node's job directory, and stays their parent, so that
# - the launcher runs with SIGUSR1 ignored (an ignored signal stays ignored across exec): SLURM's
#   --signal=USR1 notice reaches every process of the step, and torchrun's / deepspeed's agent
#   would die of it; the trainer installs its own handler;
# - a SIGUSR1 reaching this task creates $DEEPSUITE_NOTICE, which the trainer reads as the same
#   notice: one sent before the trainer's processes existed or listened is not lost;
# - SIGTERM does not end this task before the launcher: SLURM ends the step, killing whatever is
#   left, once the task exits, and the trainer is saving a checkpoint on SIGTERM.
# Expects DEEPSUITE_JOB_TMP, DEEPSUITE_NOTICE and GPUS_PER_NODE from slurm/common.sh.
set -u
made_tmp=0
if [ ! -d "$DEEPSUITE_JOB_TMP" ]; then # another node's temp dir: this task makes and removes it
    mkdir -p "$DEEPSUITE_JOB_TMP"
    made_tmp=1
fi
args=()
for a in "$@"; do
    if [[ $a == *"{HOSTFILE}"* ]]; then # one name per node: the temp dir may be shared
        hostfile=$DEEPSUITE_JOB_TMP/hostfile.${SLURM_NODEID:-0}
        scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$GPUS_PER_NODE/" >"$hostfile"
        a=${a//\{HOSTFILE\}/$hostfile}
    fi
    args+=("${a//\{NODE_RANK\}/${SLURM_NODEID:-0}}")
done
trap '' USR1
"${args[@]}" &
child=$!
trap ': >"$DEEPSUITE_NOTICE"' USR1
trap ':' TERM
while :; do # wait returns early when a trapped signal arrives; the child is still running then
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
done
if [ "$made_tmp" = 1 ]; then
    rm -rf "$DEEPSUITE_JOB_TMP"
fi
exit "$rc"
