"""Bad config or data fails with a clear message before anything distributed starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from deepsuite.config import ConfigError, load_config
from deepsuite.distributed.deepspeed_json import resolved_zero_stage
from deepsuite.distributed.env import DistEnv
from deepsuite.training.engine import validate_before_launch
from tests.training.runner import SMALL, metrics
from tests.training.runner import env as run_env

ROOT = Path(__file__).resolve().parents[2]


def env(world: int) -> DistEnv:
    return DistEnv(0, world, 0, world, 0, 1, "127.0.0.1", 29500, "torchrun")


def cfg(*overrides: str):
    # resume=never: a runs/tiny left by `bash scripts/train.sh` is not this test's checkpoint
    return load_config(ROOT / "configs/tiny.yaml", ["train.resume=never", *overrides])


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


@pytest.mark.slow
def test_two_plain_runs_at_once_and_a_txt_corpus_with_validation(tmp_path):
    """Two single-process runs started together do not collide on a port (a lone process binds
    none), and a .txt corpus, split into documents at blank lines, has a validation split."""
    book = tmp_path / "book.txt"
    book.write_text(
        "\n\n".join(topics[k].strip().replace("\n\n", "\n") for k in sorted(topics)[:80])
    )
    common = [
        sys.executable, str(ROOT / "train/train.py"), str(ROOT / "configs/tiny.yaml"), *SMALL,
        "parallel.ep=1", "train.steps=2",
    ]  # fmt: skip
    runs = {
        "builtin": [],
        "txt": [f"data.source={book}", "data.val_fraction=0.1", "train.eval_every=2",
                "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}"],
    }  # fmt: skip
    e = {k: v for k, v in run_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    procs = {
        name: subprocess.Popen(
            [*common, f"train.run_dir={tmp_path / name}", *extra],
            cwd=ROOT,
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, extra in runs.items()
    }
    outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, outs[name][-3000:]
        assert "Traceback" not in outs[name]
    val = [r["loss/val"] for r in metrics(tmp_path / "txt") if "loss/val" in r]
    assert len(val) == 1 and val[0] > 0


# ---- the DeepSpeed JSON is read and checked like the YAML --------------------------------------
def _json(tmp_path, zero: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero}))
    return str(path)


def test_zero3_json_is_accepted_with_experts():
    validate_before_launch(cfg("parallel.deepspeed_config=configs/deepspeed/zero3.json"), env(2))
    both = ("parallel.zero_stage=3", "parallel.deepspeed_config=configs/deepspeed/zero3.json")
    validate_before_launch(cfg(*both), env(2))
    assert resolved_zero_stage(cfg("parallel.deepspeed_config=configs/deepspeed/zero3.json")) == 3
    assert resolved_zero_stage(cfg("parallel.zero_stage=2")) == 2  # an override within 0-2


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["parallel.zero_stage=3"], "parallel.zero_stage=3 contradicts zero_optimization.stage=1"),
        (
            ["parallel.zero_stage=1", "parallel.deepspeed_config=configs/deepspeed/zero3.json"],
            "parallel.zero_stage=1 contradicts zero_optimization.stage=3",
        ),
    ],
)
def test_stage_three_set_in_one_place_only_is_an_error(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_before_launch(cfg(*overrides), env(2))


@pytest.mark.parametrize(
    ("zero", "ep", "fragment"),
    [
        ({"stage": "3"}, 2, "zero_optimization.stage: expected one of \\[0, 1, 2, 3\\], got '3'"),
        ({"stage": 4}, 1, "zero_optimization.stage: expected one of \\[0, 1, 2, 3\\], got 4"),
        (
            {"stage": 3, "offload_param": {"device": "cpu"}},
            1,
            "offload_param: offload is not supported",
        ),
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, 2, "offload_optimizer: offload"),
        ({"stage": 3, "zero_quantized_gradients": True}, 2, "zero_quantized_gradients: .*ep=2"),
        ({"stage": 3, "zero_hpz_partition_size": 2}, 2, "zero_hpz_partition_size"),
    ],
)
def test_bad_deepspeed_json_names_the_key(tmp_path, zero, ep, fragment):
    c = cfg(f"parallel.deepspeed_config={_json(tmp_path, zero)}", f"parallel.ep={ep}")
    with pytest.raises(ConfigError, match=fragment):
        validate_before_launch(c, env(2))


def test_refused_zero3_options_are_fine_without_experts(tmp_path):
    ds = _json(tmp_path, {"stage": 3, "zero_quantized_gradients": True})
    validate_before_launch(cfg(f"parallel.deepspeed_config={ds}", "parallel.ep=1"), env(2))


def test_deepspeed_json_that_is_not_json(tmp_path):
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3')
    with pytest.raises(
        ConfigError,
        match=r"parallel.deepspeed_config: .*bad.json, line 1, column \d+: invalid JSON",
    ):
        validate_before_launch(cfg(f"parallel.deepspeed_config={tmp_path}/bad.json"), env(2))
