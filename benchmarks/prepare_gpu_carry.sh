#!/usr/bin/env bash
# Build .cache/gpu_carry (ignored by git, ~10 MB) for benchmarks/gpu_run.sh on a machine that
# cannot reach a registry: pure-Python omegaconf, the seed wheel and torchtitan's MoE sources.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/benchmarks/fetch_peers.sh"
C="$ROOT/.cache/gpu_carry"; P="$ROOT/.cache/peers"
rm -rf "$C"; mkdir -p "$C/tt"
"$ROOT/.venv/bin/pip" install -q --no-deps --no-compile --target "$C/site" \
  omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
cp -r "$P/seed" "$C/seed"
for d in torchtitan spmd_types tyro docstring_parser; do cp -r "$P/tt/$d" "$C/tt/"; done
find "$C" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$C"
