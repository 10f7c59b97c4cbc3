"""The DeepSpeed JSON is checked against the run before launch: one rule per problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepsuite.config import ConfigError, load_config
from deepsuite.distributed.deepspeed_json import (
    RULES,
    read_deepspeed_json,
    validate_deepspeed_json,
)
from deepsuite.distributed.engine import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs/deepspeed").glob("*.json"))


def cfg_with(tmp_path: Path, ds: dict | str, *overrides: str):
    path = tmp_path / "ds.json"
    path.write_text(ds if isinstance(ds, str) else json.dumps(ds))
    return load_config(
        ROOT / "configs/tiny.yaml", [f"parallel.deepspeed_config={path}", *overrides]
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_json_passes_every_rule_at_ep_1_and_2(path):
    for ep in (1, 2):
        cfg = load_config(
            ROOT / "configs/tiny.yaml", [f"parallel.deepspeed_config={path}", f"parallel.ep={ep}"]
        )
        assert validate_deepspeed_json(cfg) == json.loads(path.read_text())
        built = deepspeed_config(cfg, grad_accum=1)  # what the engine gets: the YAML's values
        assert built["gradient_clipping"] == cfg.optim.grad_clip
        assert built["train_batch_size"] == cfg.train.global_batch_size


def test_a_relative_shipped_path_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_deepspeed_json("configs/deepspeed/zero1.json")["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    ("ds", "overrides", "fragment"),
    [
        ('{"zero_optimization": {"stage": 1},\n "x": }', (), "line 2, column 7: invalid JSON"),
        ("[1]", (), "expected a JSON object"),
        ({"zero_optimization": 1}, (), "zero_optimization: expected an object"),
        # ZeRO 3 builds the model differently (experts partitioned over their expert-data-
        # parallel group): set in the YAML and the JSON alike or not at all
        ({"zero_optimization": {"stage": 3}}, ("parallel.zero_stage=1",), "contradicts"),
        ({"zero_optimization": {"stage": 4}}, (), "zero_optimization.stage: expected one of"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, (), "offload_param"),
        ({"zero_optimization": {"stage": True}}, (), "zero_optimization.stage"),
        ({"zero_optimization": {"stage": 1, "reduce_scatter": False}}, (), "reduce_scatter"),
        (
            {"zero_optimization": {"stage": 2, "contiguous_gradients": False}},
            (),
            "contiguous_gradients",
        ),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, (), "offload"),
        ({"train_batch_size": 7}, (), "train.global_batch_size"),
        ({"train_micro_batch_size_per_gpu": 3}, (), "train.micro_batch_size"),
        ({"gradient_accumulation_steps": 2}, (), "gradient_accumulation_steps"),
        ({"gradient_clipping": 0.5}, (), "optim.grad_clip"),
        ({"bf16": {"enabled": True}}, (), "train.precision"),
        ({"optimizer": {"type": "Adam"}}, (), "optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, (), "optim.schedule"),
        ({"fp16": {"enabled": True}}, (), "fp16.enabled"),
        ({"zero_optimization": {"stage": 1, "overlap_comms": True}}, (), "overlap_comms"),
        (
            {"zero_optimization": {"stage": 1, "reduce_bucket_size": "big"}},
            (),
            "reduce_bucket_size",
        ),
    ],
)
def test_each_rule_names_the_file_and_the_key(tmp_path, ds, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        validate_deepspeed_json(cfg_with(tmp_path, ds, *overrides))
    msg = str(info.value)
    assert msg.startswith("parallel.deepspeed_config: ") and "ds.json" in msg
    assert fragment in msg


def test_the_moe_rules_apply_only_with_expert_parallelism(tmp_path):
    ds = {"zero_optimization": {"stage": 1, "reduce_scatter": False}}
    validate_deepspeed_json(cfg_with(tmp_path, ds, "parallel.ep=1"))
    agreeing = {"train_batch_size": 16, "gradient_clipping": 1.0, "bf16": {"enabled": False}}
    validate_deepspeed_json(cfg_with(tmp_path, agreeing))  # the YAML's own values are fine


def test_rules_are_plain_functions():
    assert all(callable(r) for r in RULES) and len(RULES) >= 5
