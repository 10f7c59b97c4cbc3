#!/usr/bin/env bash
# One prepared GPU run (the `run` device tool, or any one-GPU CUDA machine with torch):
#   MFU of the MoE layer (grouped-GEMM bf16 path vs loop path vs dense floor) and of a
#   deepseek_1b training step, the trainer's CUDA smoke test (tests/training/test_gpu_smoke.py),
#   then the MoE peer table in bf16. Tables go to $OUT (or ./gpu_out).
# Installs nothing: pure-Python omegaconf, DeepSpeed and datasets for the smoke test, and the peers
# travel in .cache/gpu_carry (benchmarks/prepare_gpu_carry.sh builds it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
CARRY=.cache/gpu_carry
export PYTHONPATH="$PWD:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DEEPSUITE_PEERS="$PWD/$CARRY" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
SMALL=${SMALL:-0}  # 1: tiny sizes (a CPU smoke test of this script)
{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  $PY -c "import deepspeed" 2>/dev/null && echo "deepspeed present" || echo "deepspeed absent"
} 2>&1 | tee "$OUT/env.txt"
if [ "$SMALL" = 1 ]; then
  MFU_ARGS=(--tiny --device cpu); PEER_ARGS=(--device cpu --tokens 256 --experts 8 --top-k 2 --repeats 1)
else
  MFU_ARGS=(--tokens 4096,16384 --batch 4); PEER_ARGS=(--device cuda --tokens 16384 --repeats 10 --warmup 3)
fi
timeout 120 $PY benchmarks/mfu.py --mode moe --dtype bf16 "${MFU_ARGS[@]}" 2>&1 \
  | grep -v -e Warning -e '^  ' | tee "$OUT/mfu.txt"
# training step: bf16 weights (the grouped_mm path); then fp32 master weights under autocast
# (failed on 2026-11-28 before commit 0331fc8 made the grouped path cast fp32 expert weights)
timeout 100 $PY benchmarks/mfu.py --mode train --bf16-params --dtype bf16 "${MFU_ARGS[@]}" 2>&1 \
  | grep -v -e Warning -e '^  ' | tee -a "$OUT/mfu.txt"
timeout 100 $PY benchmarks/mfu.py --mode train --dtype bf16 "${MFU_ARGS[@]}" 2>&1 \
  | grep -v -e Warning -e '^  ' | tail -4 | tee -a "$OUT/mfu.txt"
# the trainer's CUDA path: EP over every local GPU on nccl, a few steps (DeepSpeed, datasets and
# their dependencies that the image lacks come from the carry)
PYTHONPATH="$PYTHONPATH:$PWD/$CARRY/train" timeout 300 $PY -m pytest -q -rs -m gpu \
  -p no:cacheprovider tests/training/test_gpu_smoke.py 2>&1 | tail -15 | tee "$OUT/gpu_smoke.txt"
timeout 150 $PY benchmarks/moe_peers.py --dtype bf16 --timeout 60 \
  --variants ours,dense,hf,hf_grouped,titan,seed_eff,seed_loop,deepspeed "${PEER_ARGS[@]}" \
  --json "$OUT/moe_peers_gpu.json" 2>&1 | tee "$OUT/moe_peers_gpu.txt"
echo "gpu_run done"
