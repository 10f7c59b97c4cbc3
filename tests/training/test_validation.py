"""Bad config or data fails with a clear message before anything distributed starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepsuite.config import ConfigError, load_config
from deepsuite.distributed.env import DistEnv
from deepsuite.training.engine import validate_before_launch

ROOT = Path(__file__).resolve().parents[2]


def env(world: int) -> DistEnv:
    return DistEnv(0, world, 0, world, 0, 1, "127.0.0.1", 29500, "torchrun")


def cfg(*overrides: str):
    return load_config(ROOT / "configs/tiny.yaml", list(overrides))


def test_tiny_config_passes():
    validate_before_launch(cfg(), env(2))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        validate_before_launch(cfg(f"data.source={tmp_path}/nope.txt"), env(2))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        validate_before_launch(cfg(f"data.source={tmp_path}/empty.txt"), env(2))


def test_sequence_longer_than_model():
    with pytest.raises(ConfigError, match="data.seq_len: expected at most model.max_seq_len"):
        cfg("data.seq_len=512")


def test_world_does_not_divide_batch():
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        validate_before_launch(
            cfg("train.global_batch_size=16", "train.micro_batch_size=8"), env(3)
        )


def test_world_not_divisible_by_ep():
    with pytest.raises(ConfigError, match="parallel.ep"):
        validate_before_launch(
            cfg("parallel.ep=2", "train.global_batch_size=24", "train.micro_batch_size=8"), env(3)
        )


def test_missing_deepspeed_json():
    with pytest.raises(ValueError, match="parallel.deepspeed_config"):
        validate_before_launch(cfg("parallel.deepspeed_config=configs/deepspeed/nope.json"), env(2))
