# Sourced by the sbatch scripts in slurm/ (after the #SBATCH lines): repo root, python, config and
# overrides, the head node's address and a port, per-job logs. Usage inside a script:
#   source "${DEEPSUITE_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh" "$@"
set -euo pipefail
ROOT=${DEEPSUITE_ROOT:-$SLURM_SUBMIT_DIR}   # the batch script runs from a spool copy: no $0 dir
cd "$ROOT"
source scripts/env.sh                       # caches in .cache, .venv/bin first on PATH
PYTHON=${PYTHON:-python}
if [ $# -lt 1 ]; then
    echo "usage: sbatch slurm/<script>.sbatch CONFIG [key.sub=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
OVERRIDES=("$@")
# rendezvous at the first node of the allocation, at the address SLURM itself reaches it by
# (NodeAddr: the node name on most clusters, an IP where names do not resolve)
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NODE_ADDR=$(scontrol show node "$HEAD_NODE" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export MASTER_ADDR=${MASTER_ADDR:-${NODE_ADDR:-$HEAD_NODE}}
# a fresh port per job and per requeue (the previous run's port may linger in TIME_WAIT)
export MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0}) % 20000))}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# srun does not set it, and N ranks per node each using every core oversubscribe the node
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))}
# srun'd tasks ignore SIGUSR1 until the trainer installs its handler (launchers die on it by
# default); slurm/task.sh also puts this task's node rank where {NODE_RANK} appears
TASK=(bash "$ROOT/slurm/task.sh")
echo "[deepsuite] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s)" \
     "(${SLURM_JOB_NODELIST}), ${GPUS_PER_NODE} rank(s)/node, rendezvous ${MASTER_ADDR}:${MASTER_PORT}," \
     "config ${CONFIG} ${OVERRIDES[*]:-}"
