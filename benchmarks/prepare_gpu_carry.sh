#!/usr/bin/env bash
# Build .cache/gpu_carry (ignored by git, ~40 MB) for benchmarks/gpu_run.sh on a machine that
# cannot reach a registry: pure-Python omegaconf, pytest and hypothesis (the GPU-marked tests),
# the seed wheel, torchtitan's MoE sources, the tree of commit feba6bf (the "before" of
# benchmarks/host_reads.py: the device copy of the checkout has no git history), the experts
# file before the gate/up fusion (benchmarks/gate_up.py's "before"), and DeepSpeed,
# datasets and their missing dependencies for the CUDA smoke test of the trainer.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/benchmarks/fetch_peers.sh"
C="$ROOT/.cache/gpu_carry"; P="$ROOT/.cache/peers"
rm -rf "$C"; mkdir -p "$C/tt"
"$ROOT/.venv/bin/pip" install -q --no-deps --no-compile --target "$C/site" \
  omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0 pytest-timeout==2.4.0 \
  hypothesis==6.170.17 sortedcontainers==2.4.0
# what the trainer needs beyond the device image (tests/training/test_gpu_smoke.py), as the
# versions installed here, for the device's Python 3.12
# (DeepSpeed ships no wheel: one is built here, pure Python with DS_BUILD_OPS=0)
ver() { "$ROOT/.venv/bin/pip" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pkgs=()
for p in hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess
do pkgs+=("$p==$(ver "$p")"); done
W=$(mktemp -d)
DS_BUILD_OPS=0 "$ROOT/.venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$W" \
  "deepspeed==$(ver deepspeed)"
"$ROOT/.venv/bin/pip" install -q --no-deps --no-compile --target "$C/train" --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 "${pkgs[@]}" "$W"/deepspeed-*.whl
rm -rf "$W"
mkdir -p "$C/before_feba6bf"
git -C "$ROOT" archive feba6bf deepsuite configs | tar -x -C "$C/before_feba6bf"
# the experts before gate and up were fused (the "before" of benchmarks/gate_up.py)
git -C "$ROOT" show 6e49e12:deepsuite/layers/moe/experts.py > "$C/experts_before_fusion.py"
cp -r "$P/seed" "$C/seed"
for d in torchtitan spmd_types tyro docstring_parser; do cp -r "$P/tt/$d" "$C/tt/"; done
find "$C" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$C"
