#!/usr/bin/env bash
# One prepared GPU run (the `run` device tool, or any one-GPU CUDA machine with torch), what is
# owed first; tables go to $OUT (or ./gpu_out):
#   1. the GPU-marked tests: no synchronising CUDA call in a step (sync debug mode), CUDA graphs
#      capture a MoE block, FlexAttention gradients == the dense mask's, grouped_mm bf16 == the
#      reference;
#   2. host reads / aten ops / CUDA syncs per MoE layer and training step, now vs feba6bf; the
#      fused gate/up experts vs two GEMMs (6e49e12);
#   3. MFU of the MoE layer (grouped-GEMM bf16 path, compiled, loop path, dense floor) at 4096 and
#      16384 tokens; of a deepseek_1b training step with fp32 master weights under bf16 autocast,
#      eager and compiled (train.compile's per-block compile);
#   4. the trainer's CUDA smoke test (tests/training/test_gpu_smoke.py: EP over every local GPU
#      on nccl, DeepSpeed on CUDA, a few steps);
#   5. the 1B step with bf16 weights, then the MoE peer table in bf16.
# Every step's timeout is cut to what is left of BUDGET seconds (570: one call of the device
# tool), so a slow step costs the later ones, not the run; a step that no longer fits says so.
# Installs nothing: omegaconf, pytest, hypothesis, the peers, the feba6bf tree, and DeepSpeed and
# datasets for the smoke test travel in .cache/gpu_carry (benchmarks/prepare_gpu_carry.sh).
# SMALL=1: tiny sizes on the CPU, a smoke test of this script (the GPU tests skip).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
CARRY=.cache/gpu_carry
export PYTHONPATH="$PWD:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DEEPSUITE_PEERS="$PWD/$CARRY" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
SMALL=${SMALL:-0}
{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  $PY -c "import deepspeed" 2>/dev/null && echo "deepspeed present" || echo "deepspeed absent"
} 2>&1 | tee "$OUT/env.txt"
BEFORE=$CARRY/before_feba6bf; [ -d "$BEFORE" ] || BEFORE=feba6bf  # a git revision where git is
if [ "$SMALL" = 1 ]; then  # inductor on 2 CPU cores takes minutes per compiled step
  BUDGET=${BUDGET:-3000}; DEV=cpu; MFU_ARGS=(--tiny --device cpu); HR_ARGS=(--tokens 256)
  GU_ARGS=(--tokens 256 --d-model 64 --hidden 64 --repeats 1)
  PEER_ARGS=(--device cpu --tokens 256 --experts 8 --top-k 2 --repeats 1)
else
  BUDGET=${BUDGET:-570}; DEV=cuda; MFU_ARGS=(--tokens 4096,16384 --batch 4); HR_ARGS=()
  GU_ARGS=(--tokens 16384 --experts 64 --repeats 10)
  PEER_ARGS=(--device cuda --tokens 16384 --repeats 10 --warmup 3)
fi
quiet() { grep -v -e Warning -e '^  '; }
last() { tail -"$1"; }
# step CAP FILE FILTER... -- CMD...: CMD under timeout min(CAP, time left), filtered, appended to FILE
step() {
  local cap=$1 file=$OUT/$2 left=$((BUDGET - SECONDS)) filter=(); shift 2
  while [ "$1" != -- ]; do filter+=("$1"); shift; done; shift
  if [ "$left" -lt 30 ]; then echo "not run (${left}s of BUDGET left): $*" | tee -a "$file"; return; fi
  [ "$cap" -gt "$left" ] && cap=$left
  timeout "$cap" "$@" 2>&1 | "${filter[@]}" | tee -a "$file"
  [ "${PIPESTATUS[0]}" = 124 ] && echo "timed out after ${cap}s: $*" | tee -a "$file"
}
step 200 gpu_tests.txt last 15 -- $PY -m pytest -q -p no:cacheprovider -m gpu -rs \
  tests/models/test_host_reads.py tests/models/test_compile.py tests/layers/test_doc_mask.py \
  tests/layers/test_moe_layer.py
step 120 host_reads.txt quiet -- $PY benchmarks/host_reads.py --device $DEV --before "$BEFORE" \
  --where "${HR_ARGS[@]}"
# the fused gate/up experts vs two GEMMs (6e49e12), bf16, both paths
GU_BEFORE=$CARRY/experts_before_fusion.py; [ -f "$GU_BEFORE" ] || GU_BEFORE=6e49e12
step 60 gate_up.txt quiet -- $PY benchmarks/gate_up.py --device $DEV --dtype bf16 \
  --before "$GU_BEFORE" "${GU_ARGS[@]}"
step 150 mfu.txt quiet -- $PY benchmarks/mfu.py --mode moe --dtype bf16 --compile "${MFU_ARGS[@]}"
# training step: fp32 master weights under bf16 autocast, eager then compiled
step 90 mfu.txt quiet -- $PY benchmarks/mfu.py --mode train --dtype bf16 "${MFU_ARGS[@]}"
step 200 mfu.txt quiet -- $PY benchmarks/mfu.py --mode train --dtype bf16 --compile "${MFU_ARGS[@]}"
# the trainer on CUDA (DeepSpeed, datasets and what the image lacks come from the carry)
PYTHONPATH="$PYTHONPATH:$PWD/$CARRY/train" step 150 gpu_smoke.txt last 15 -- $PY -m pytest -q \
  -rs -m gpu -p no:cacheprovider tests/training/test_gpu_smoke.py
step 60 mfu.txt quiet -- $PY benchmarks/mfu.py --mode train --bf16-params --dtype bf16 "${MFU_ARGS[@]}"
step 120 moe_peers_gpu.txt cat -- $PY benchmarks/moe_peers.py --dtype bf16 --timeout 60 \
  --variants ours,dense,hf,hf_grouped,titan,seed_eff,seed_loop,deepspeed "${PEER_ARGS[@]}" \
  --json "$OUT/moe_peers_gpu.json"
echo "gpu_run done in ${SECONDS}s"
