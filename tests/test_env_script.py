"""scripts/env.sh, sourced by every script and sbatch script: its defaults by machine.

A machine without a GPU keeps the CPU defaults the test suite and the README's two commands rely
on. A GPU node is simulated through the accelerator check itself: an ``nvidia-smi`` that lists a
GPU, as the real one does (no tensor is faked); there DeepSpeed's accelerator must be CUDA with
nccl, and hub access and cache locations must stay the user's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deepsuite.distributed.env import resolve_backend

ROOT = Path(__file__).resolve().parents[1]
BASE = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
NVIDIA_SMI = """#!/bin/sh
[ "$1" = -L ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-4bd7f9a1-0000-0000-0000-000000000000)"
"""


def sourced(env: dict[str, str], then: str = "env") -> subprocess.CompletedProcess:
    """``source scripts/env.sh; <then>`` in a clean environment (only ``env``)."""
    return subprocess.run(
        ["bash", "-c", f"source scripts/env.sh && {then}"],
        cwd=ROOT,
        env={**BASE, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def variables(env: dict[str, str]) -> dict[str, str]:
    res = sourced(env)
    assert res.returncode == 0, res.stderr
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


@pytest.fixture
def gpu_path(tmp_path: Path) -> str:
    """A PATH on which `nvidia-smi -L` lists one GPU."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    return f"{smi.parent}:{BASE['PATH']}"


def test_cpu_machine_keeps_the_cpu_defaults() -> None:
    v = variables({"TMPDIR": "/somewhere/else"})
    cache = str(ROOT / ".cache")
    assert v["DEEPSUITE_ACCELERATOR"] == "cpu" and v["DS_ACCELERATOR"] == "cpu"
    assert v["HF_DATASETS_OFFLINE"] == v["HF_HUB_OFFLINE"] == "1"
    assert v["DEEPSUITE_CACHE"] == cache and v["TMPDIR"] == f"{cache}/tmp"
    assert v["HF_HOME"] == f"{cache}/hf" and v["WANDB_DIR"] == f"{cache}/wandb"
    assert v["TORCH_EXTENSIONS_DIR"] == f"{cache}/torch_extensions"
    assert v["PATH"].startswith(f"{ROOT}/.venv/bin:")
    assert resolve_backend("auto") == "gloo"


def test_gpu_node_selects_cuda_and_nccl_and_leaves_hub_and_caches_to_the_user(
    gpu_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = variables({"PATH": gpu_path, "TMPDIR": "/scratch/job"})
    assert v["DEEPSUITE_ACCELERATOR"] == "cuda" and v["DS_ACCELERATOR"] == "cuda"
    assert v["TMPDIR"] == "/scratch/job"  # SLURM's / the user's, not the shared checkout
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "DEEPSUITE_CACHE", "HF_HOME"):
        assert name not in v, name
    for name in ("TORCH_EXTENSIONS_DIR", "WANDB_DIR"):
        assert name not in v, name
    # DeepSpeed in that environment: CUDA, with nccl as its communication backend
    res = sourced(
        {"PATH": gpu_path},
        "python -c 'from deepspeed.accelerator import get_accelerator as g; a = g();"
        " print(a.device_name(), a.communication_backend_name())'",
    )
    assert res.returncode == 0 and res.stdout.split()[-2:] == ["cuda", "nccl"], res.stderr
    # and the process group: "auto" is nccl once torch sees CUDA
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert resolve_backend("auto") == "nccl"


def test_gpu_node_caches_go_where_the_user_says(gpu_path: str, tmp_path: Path) -> None:
    v = variables({"PATH": gpu_path, "DEEPSUITE_CACHE": str(tmp_path), "HF_HOME": "/models/hf"})
    assert v["HF_HOME"] == "/models/hf"  # set by the user: kept
    assert v["TORCH_EXTENSIONS_DIR"] == f"{tmp_path}/torch_extensions"
    assert v["WANDB_DIR"] == f"{tmp_path}/wandb"


def test_accelerator_override_and_hidden_gpus(gpu_path: str) -> None:
    assert variables({"DEEPSUITE_ACCELERATOR": "cuda"})["DS_ACCELERATOR"] == "cuda"
    assert variables({"PATH": gpu_path, "DEEPSUITE_ACCELERATOR": "cpu"})["DS_ACCELERATOR"] == "cpu"
    hidden = variables({"PATH": gpu_path, "CUDA_VISIBLE_DEVICES": ""})
    assert hidden["DEEPSUITE_ACCELERATOR"] == "cpu" and hidden["DS_ACCELERATOR"] == "cpu"
    res = sourced({"DEEPSUITE_ACCELERATOR": "tpu"})
    assert res.returncode == 2
    assert res.stderr.strip() == "error: DEEPSUITE_ACCELERATOR: expected cuda or cpu, got 'tpu'"
