#!/usr/bin/env bash
# Set up the environment and run the whole test suite (slow, distributed and SLURM tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# SLURM and munge for tests/slurm (Debian packages; needs root, as CI has). Without root the SLURM
# tests skip with a loud reason, except under CI where they must run.
if [ "$(id -u)" -eq 0 ] || [ -n "${CI:-}" ]; then
    bash scripts/ci_services.sh
fi
source scripts/env.sh
ruff check deepsuite train tests benchmarks
exec python -m pytest "$@"
