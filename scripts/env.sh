# Sourced by the scripts: keep caches, temp files and run outputs inside the checkout.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DEEPSUITE_CACHE=${DEEPSUITE_CACHE:-$ROOT/.cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DEEPSUITE_CACHE/torch_extensions}
export HF_HOME=${HF_HOME:-$DEEPSUITE_CACHE/hf}
export WANDB_DIR=${WANDB_DIR:-$DEEPSUITE_CACHE/wandb}
export TMPDIR=${TMPDIR_OVERRIDE:-$DEEPSUITE_CACHE/tmp}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export PATH="$ROOT/.venv/bin:$PATH"
mkdir -p "$TORCH_EXTENSIONS_DIR" "$HF_HOME" "$WANDB_DIR" "$TMPDIR"
