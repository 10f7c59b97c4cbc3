"""Session fixtures shared by several test packages: the tiny random DeepSeek checkpoints of
``scripts/make_tiny_checkpoint.py`` (the README's fine-tuning model), built once per session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_checkpoint_script() -> ModuleType:
    """scripts/make_tiny_checkpoint.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_v3(tmp_path_factory) -> Path:
    """A random transformers DeepseekV3 (groups, YaRN, nonzero bias) + BPE tokenizer."""
    pytest.importorskip("transformers")
    return tiny_checkpoint_script().make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v3"))


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory) -> Path:
    """A random transformers DeepseekV2 (softmax routing, no bias) + BPE tokenizer."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny_v2")
    return tiny_checkpoint_script().make_tiny_checkpoint(out, "v2")


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory) -> Path:
    """The README's fine-tuning records (prompt/completion pairs and chat conversations)."""
    out = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    return tiny_checkpoint_script().write_sft_data(out)
