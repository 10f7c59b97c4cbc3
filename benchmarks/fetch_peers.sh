#!/usr/bin/env bash
# Fetch the peer implementations into .cache/peers (never committed): the seed package
# deepsuite==1.0.8 (same import name as ours, so it is unpacked on its own path) and torchtitan
# (installed --no-deps on its own path: its dependency pins would downgrade datasets in the venv).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PIP="$ROOT/.venv/bin/pip"
P="$ROOT/.cache/peers"
mkdir -p "$P"
if [ ! -f "$P/seed/deepsuite/layers/moe.py" ]; then
  "$PIP" download -q --no-deps deepsuite==1.0.8 -d "$P"
  python3 -m zipfile -e "$P"/deepsuite-1.0.8-py3-none-any.whl "$P/seed"
fi
if [ ! -d "$P/tt/torchtitan" ]; then
  # torchtitan's MoE module imports these at load time
  "$PIP" install -q --no-deps --target "$P/tt" torchtitan==0.3.0 spmd-types tyro docstring-parser triton \
    || echo "torchtitan not installed: its MoE row will say why" >&2
fi
echo "peers in $P"
