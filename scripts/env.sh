# Sourced by scripts/*.sh and slurm/*.sbatch: the checkout's .venv first on PATH, then defaults by
# what the machine computes on (a variable you set always wins):
# - no GPU (this project's CI, a laptop): DeepSpeed on the CPU (DS_ACCELERATOR=cpu), Hugging Face
#   offline (the built-in corpus needs no hub), caches and temp files inside the checkout (.cache);
# - an NVIDIA GPU: DeepSpeed on CUDA (torch.distributed then picks nccl); hub access, TMPDIR and
#   the cache locations stay yours (set DEEPSUITE_CACHE to put HF_HOME, TORCH_EXTENSIONS_DIR and
#   WANDB_DIR under one directory).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"

# "cuda" when this node shows an NVIDIA GPU, else "cpu"; DEEPSUITE_ACCELERATOR=cuda|cpu decides
# instead (a container without nvidia-smi, or a GPU node you want to train on the CPU).
deepsuite_accelerator() {
    if [ -n "${DEEPSUITE_ACCELERATOR:-}" ]; then
        echo "$DEEPSUITE_ACCELERATOR"
    elif [ "${CUDA_VISIBLE_DEVICES-unset}" = "" ] || [ "${CUDA_VISIBLE_DEVICES:-}" = -1 ]; then
        echo cpu # GPUs hidden on purpose
    elif nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        echo cuda
    else
        echo cpu
    fi
}
DEEPSUITE_ACCELERATOR=$(deepsuite_accelerator)
case "$DEEPSUITE_ACCELERATOR" in
cpu | cuda) export DEEPSUITE_ACCELERATOR ;;
*)
    echo "error: DEEPSUITE_ACCELERATOR: expected cuda or cpu, got '$DEEPSUITE_ACCELERATOR'" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac

if [ "$DEEPSUITE_ACCELERATOR" = cuda ]; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
    if [ -n "${DEEPSUITE_CACHE:-}" ]; then
        export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DEEPSUITE_CACHE/torch_extensions}
        export HF_HOME=${HF_HOME:-$DEEPSUITE_CACHE/hf}
        export WANDB_DIR=${WANDB_DIR:-$DEEPSUITE_CACHE/wandb}
        mkdir -p "$TORCH_EXTENSIONS_DIR" "$HF_HOME" "$WANDB_DIR"
    fi
else
    export DEEPSUITE_CACHE=${DEEPSUITE_CACHE:-$ROOT/.cache}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DEEPSUITE_CACHE/torch_extensions}
    export HF_HOME=${HF_HOME:-$DEEPSUITE_CACHE/hf}
    export WANDB_DIR=${WANDB_DIR:-$DEEPSUITE_CACHE/wandb}
    export TMPDIR=${TMPDIR_OVERRIDE:-$DEEPSUITE_CACHE/tmp}
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    mkdir -p "$TORCH_EXTENSIONS_DIR" "$HF_HOME" "$WANDB_DIR" "$TMPDIR"
fi
