# Sourced by the sbatch scripts in slurm/ from the checkout's root, right after their #SBATCH lines:
#   source slurm/common.sh "$@"          (TASKS_PER_NODE set first for one task per rank)
# Sets up the job's log, environment, config and overrides, the head node's address and a port,
# GPUs and CPUs per node, and defines run_step, which runs the job step and then requeues the job
# when the trainer stopped on a preemption notice. slurm/README.md says what each setting does.
set -euo pipefail
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: not a SLURM job: submit with sbatch slurm/<script>.sbatch CONFIG [key=value ...]" >&2
    exit 2
fi
ROOT=$PWD
RESTART=${SLURM_RESTART_COUNT:-0}
# A notice to the batch shell (`--signal=B:USR1@<s>`, `scancel --batch/--full --signal=USR1`)
# must not kill it: it becomes the notice file the trainer reads (node-local, like the one
# slurm/task.sh writes; this node always runs ranks). Remembered until that file can be made.
NOTICED=0
trap 'NOTICED=1' USR1

# ---- the log ------------------------------------------------------------------------------------
# SLURM resolves a relative --output against the submit directory before the script runs, so the
# scripts ask for /dev/null and open the log here; an explicit `sbatch -o FILE` is kept as it is.
LOG_DIR=${DEEPSUITE_LOG_DIR:-$ROOT/slurm/logs}
LOG_NAME=$SLURM_JOB_NAME-$SLURM_JOB_ID
if [ "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p')" = /dev/null ]; then
    mkdir -p "$LOG_DIR"
    exec >>"$LOG_DIR/$LOG_NAME.out" 2>&1
fi
NODE_LOG=$LOG_DIR/$LOG_NAME.node%n.out # each node's ranks (srun's %n: the node's index in the job)

source scripts/env.sh # .venv first on PATH; CPU-only defaults where there is no GPU
PYTHON=${PYTHON:-python}
if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/<script>.sbatch CONFIG [key.sub=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
OVERRIDES=("$@")

# ---- rendezvous ---------------------------------------------------------------------------------
# at the first node of the allocation, at the address SLURM itself reaches it by
# (NodeAddr: the node name on most clusters, an IP where names do not resolve)
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NODE_ADDR=$(scontrol show node "$HEAD_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export MASTER_ADDR=${MASTER_ADDR:-${NODE_ADDR:-$HEAD_NODE}}
# a fresh port per job and per requeue (the previous run's port may linger in TIME_WAIT)
export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 7 + RESTART) % 20000))}

# ---- GPUs and CPUs ------------------------------------------------------------------------------
if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif [ "$DEEPSUITE_ACCELERATOR" = cuda ] ||
        scontrol show node "${SLURMD_NODENAME:-$HEAD_NODE}" | grep -q 'Gres=[^ ]*gpu'; then
        # never guess: one rank on an 8-GPU node trains 8x slower, and nothing would say so
        echo "error: GPUS_PER_NODE: this node has GPUs but the job was given none (no" \
            "SLURM_GPUS_ON_NODE): submit with --gpus-per-node=N, or set GPUS_PER_NODE=N" >&2
        exit 2
    else
        GPUS_PER_NODE=1 # CPU nodes: one rank per node
    fi
fi
export GPUS_PER_NODE
TASKS_PER_NODE=${TASKS_PER_NODE:-1}
RANKS_PER_NODE=$((TASKS_PER_NODE > 1 ? TASKS_PER_NODE : GPUS_PER_NODE))
CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
CPUS_PER_TASK=$((CPUS_ON_NODE / TASKS_PER_NODE > 0 ? CPUS_ON_NODE / TASKS_PER_NODE : 1))
# srun does not set it, and N ranks per node each using every core oversubscribe the node
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS_ON_NODE / RANKS_PER_NODE > 0 ? CPUS_ON_NODE / RANKS_PER_NODE : 1))}

# ---- what GPU jobs usually need (each a default: a value already set wins) ----------------------
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} # a dead peer: error, no hang
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1} # a crash in C code prints the Python stack
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the interface between nodes) are left to the user

# ---- this run's files on each node: the notice, the trainer's outcome, the deepspeed hostfile ---
export DEEPSUITE_JOB_TMP=${TMPDIR:-/tmp}/deepsuite-$SLURM_JOB_ID.$RESTART
export DEEPSUITE_NOTICE=$DEEPSUITE_JOB_TMP/notice
export DEEPSUITE_OUTCOME=$DEEPSUITE_JOB_TMP/outcome
mkdir -p "$DEEPSUITE_JOB_TMP"
trap 'rm -rf "$DEEPSUITE_JOB_TMP"' EXIT
trap ': >"$DEEPSUITE_NOTICE"' USR1
if [ "$NOTICED" = 1 ]; then
    : >"$DEEPSUITE_NOTICE"
fi

# ---- the job step -------------------------------------------------------------------------------
STEP=(srun --kill-on-bad-exit=1 --job-name="train:$(basename "$CONFIG" .yaml)"
    --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
    --output="$NODE_LOG" --open-mode=append)
if [ -n "${CONTAINER_IMAGE:-}" ]; then # pyxis: the checkout mounted at the same path
    STEP+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$ROOT"
        --container-mounts="$ROOT:$ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi
STEP+=(bash "$ROOT/slurm/task.sh")

# run_step LAUNCHER ARGS...: the job step, with this shell listening meanwhile (a foreground srun
# would hold back its USR1 trap until the step ended); then the job's exit status or its requeue.
run_step() {
    "${STEP[@]}" "$@" &
    local step=$! rc
    while :; do
        wait "$step" && rc=0 || rc=$?
        kill -0 "$step" 2>/dev/null || break
    done
    finish "$rc"
}

# finish RC: exit with the step's failure; else requeue if the trainer stopped on a notice (its
# outcome file, written by this node's first rank, says so); else exit 0 (finished).
finish() {
    local rc=$1 what step sig why
    local job="[deepsuite] job $SLURM_JOB_ID (restart $RESTART):"
    if [ "$rc" -ne 0 ]; then
        echo "$job the training step failed (exit $rc); see ${NODE_LOG//%n/<i>}"
        exit "$rc"
    fi
    if [ ! -f "$DEEPSUITE_OUTCOME" ]; then
        echo "$job finished"
        exit 0
    fi
    read -r what step sig <"$DEEPSUITE_OUTCOME"
    if [ "$sig" != SIGUSR1 ]; then
        why="$sig asks to stop, not to requeue"
    elif [ "${DEEPSUITE_REQUEUE:-1}" = 0 ]; then
        why="DEEPSUITE_REQUEUE=0"
    else
        trap '' TERM # the requeue terminates this script: it ends on its own terms instead
        if why=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
            echo "$job $what at step $step ($sig), state saved; requeued: restart" \
                "$((RESTART + 1)) resumes from it"
            exit 0
        fi
        why="scontrol requeue: $why"
    fi
    echo "$job $what at step $step ($sig), state saved; not requeued ($why):" \
        "submit the same command again to resume"
    exit 75 # EX_TEMPFAIL, as the trainer's own exit when it stops early (preemption.NOT_FINISHED)
}

echo "[deepsuite] job $SLURM_JOB_ID restart $RESTART: $SLURM_JOB_NUM_NODES node(s)" \
    "($SLURM_JOB_NODELIST), $RANKS_PER_NODE rank(s)/node ($DEEPSUITE_ACCELERATOR)," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG ${OVERRIDES[*]:-}; ranks log to" \
    "${NODE_LOG//%n/<i>}"
