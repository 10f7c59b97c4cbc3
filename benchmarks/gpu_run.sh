#!/usr/bin/env bash
# One prepared GPU run (the `run` device tool, or any one-GPU CUDA machine with torch), in order
# of what is owed first; tables go to $OUT (or ./gpu_out):
#   1. the GPU-marked tests: no synchronising CUDA call in a step (sync debug mode), CUDA graphs
#      capture a MoE block, FlexAttention gradients == the dense mask's, grouped_mm bf16 == the
#      reference;
#   2. host reads / aten ops / CUDA syncs per MoE layer and training step, now vs feba6bf;
#   3. MFU of the MoE layer (grouped-GEMM bf16 path, compiled, loop path, dense floor) at 4096 and
#      16384 tokens; of a deepseek_1b training step with fp32 master weights under bf16 autocast,
#      eager and compiled (train.compile's per-block compile); then with bf16 weights;
#   4. the MoE peer table in bf16.
# Installs nothing: pure-Python omegaconf, pytest, the peers and the feba6bf tree travel in
# .cache/gpu_carry (benchmarks/prepare_gpu_carry.sh builds it); DeepSpeed is not expected on the
# device. SMALL=1: tiny sizes on the CPU (a smoke test of this script; the GPU tests skip).
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
TC=300  # seconds for a step that compiles (inductor on 2 CPU cores takes minutes)
if [ "$SMALL" = 1 ]; then
  TC=900; DEV=cpu; MFU_ARGS=(--tiny --device cpu); HR_ARGS=(--tokens 256)
  PEER_ARGS=(--device cpu --tokens 256 --experts 8 --top-k 2 --repeats 1)
else
  DEV=cuda; MFU_ARGS=(--tokens 4096,16384 --batch 4); HR_ARGS=()
  PEER_ARGS=(--device cuda --tokens 16384 --repeats 10 --warmup 3)
fi
quiet() { grep -v -e Warning -e '^  '; }
timeout 300 $PY -m pytest -q -p no:cacheprovider -m gpu -rs tests/models/test_host_reads.py \
  tests/models/test_compile.py tests/layers/test_doc_mask.py tests/layers/test_moe_layer.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 240 $PY benchmarks/host_reads.py --device $DEV --before "$BEFORE" --where "${HR_ARGS[@]}" \
  2>&1 | quiet | tee "$OUT/host_reads.txt"
timeout $TC $PY benchmarks/mfu.py --mode moe --dtype bf16 --compile "${MFU_ARGS[@]}" 2>&1 \
  | quiet | tee "$OUT/mfu.txt"
# training step: fp32 master weights under bf16 autocast, eager then compiled; then bf16 weights
timeout 150 $PY benchmarks/mfu.py --mode train --dtype bf16 "${MFU_ARGS[@]}" 2>&1 \
  | quiet | tail -3 | tee -a "$OUT/mfu.txt"
timeout $TC $PY benchmarks/mfu.py --mode train --dtype bf16 --compile "${MFU_ARGS[@]}" 2>&1 \
  | quiet | tail -3 | tee -a "$OUT/mfu.txt"
timeout 100 $PY benchmarks/mfu.py --mode train --bf16-params --dtype bf16 "${MFU_ARGS[@]}" 2>&1 \
  | quiet | tail -3 | tee -a "$OUT/mfu.txt"
timeout 150 $PY benchmarks/moe_peers.py --dtype bf16 --timeout 60 \
  --variants ours,dense,hf,hf_grouped,titan,seed_eff,seed_loop,deepspeed "${PEER_ARGS[@]}" \
  --json "$OUT/moe_peers_gpu.json" 2>&1 | tee "$OUT/moe_peers_gpu.txt"
echo "gpu_run done"
