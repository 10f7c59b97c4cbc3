#!/usr/bin/env bash
# Set up the environment and run the whole test suite (slow, distributed and SLURM tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
ruff check deepsuite train tests benchmarks
exec python -m pytest "$@"
