#!/usr/bin/env bash
# Install the system services the test suite drives for real: Debian's SLURM (slurmctld, slurmd,
# client tools) and munge, for tests/slurm. Idempotent and quick when already installed; the
# daemons are NOT started here (tests/slurm/cluster.py starts and stops its own, by PID).
# Needs root (CI runs as root); without root and without the binaries it says so and fails.
set -euo pipefail
need=(slurmctld slurmd sbatch srun scontrol munged)
missing=()
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
    echo "ci_services: SLURM and munge present ($(slurmctld -V))"
    exit 0
fi
echo "ci_services: installing SLURM + munge (missing: ${missing[*]})"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "ci_services: need root or sudo for apt-get" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge >/dev/null
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || { echo "ci_services: $b still missing after install" >&2; exit 1; }
done
echo "ci_services: installed $(slurmctld -V)"
