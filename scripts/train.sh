#!/usr/bin/env bash
# Set up the environment and train the tiny DeepSeek-style MoE on the built-in corpus:
# expert parallelism over 2 local CPU ranks (gloo), DeepSpeed ZeRO-1. Extra arguments are
# config overrides, e.g.  bash scripts/train.sh train.steps=50 logging.wandb=offline
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# deepsuite torchrun is torchrun, with bad input ending in one line per rank (no torchrun traceback)
deepsuite torchrun --standalone --nproc_per_node 2 train/train.py configs/tiny.yaml "$@"
deepsuite summary runs/tiny
deepsuite plot runs/tiny
