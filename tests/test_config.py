"""Config tree: precedence, strict keys, type errors and value errors that name the field."""

from pathlib import Path

import pytest

from deepsuite.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  micro_batch_size: 2\nmoe:\n  n_routed_experts: 8\n")
    cfg = load_config(path, ["train.steps=9", "moe.score_func=softmax"])
    assert cfg.train.steps == 9  # override beats YAML
    assert cfg.train.micro_batch_size == 2  # YAML beats default
    assert cfg.moe.n_routed_experts == 8
    assert cfg.moe.score_func == "softmax"
    assert cfg.optim.lr == Config().optim.lr  # untouched default
    assert cfg.name == "c"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.stepz=3"], "train.stepz"),
        (["nosuchsection.x=1"], "nosuchsection"),
        (["train.steps=abc"], "train.steps"),
        (["moe.top_p=lots"], "moe.top_p"),
        (["train.steps=0"], "train.steps: expected a positive number"),
        (["moe.score_func=relu"], "moe.score_func: expected one of ['sigmoid', 'softmax']"),
        (
            ["train.activation_checkpointing=selective"],
            "train.activation_checkpointing: expected one of ['none', 'full']",
        ),
        (["train.compile=maybe"], "train.compile"),
        (
            ["train.compile_backend=tvm"],
            "train.compile_backend: expected one of ['inductor', 'aot_eager']",
        ),
        (["moe.n_expert_per_token=20", "moe.n_routed_experts=16"], "moe.n_expert_per_token"),
        (["moe.n_group=3"], "moe.n_group: expected a divisor of moe.n_routed_experts"),
        (["moe.n_group=4", "moe.topk_group=5"], "moe.topk_group"),
        (["mla.qk_rope_head_dim=15"], "mla.qk_rope_head_dim: expected an even number"),
        (["data.seq_len=4096"], "data.seq_len: expected at most model.max_seq_len"),
        (["parallel.ep=3"], "parallel.ep: expected a divisor of moe.n_routed_experts"),
        (["train.global_batch_size=12", "train.micro_batch_size=8"], "train.global_batch_size"),
        (["parallel.zero_stage=4"], "parallel.zero_stage"),
        (["logging.wandb=maybe"], "logging.wandb"),
        (['data.prompt_field=""'], "data.prompt_field: expected a column name, got ''"),
        (["train.steps"], "key.sub=value"),
    ],
)
def test_errors_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_config(path)


def test_world_checks():
    cfg = load_config(
        None, ["train.micro_batch_size=4", "train.global_batch_size=16", "parallel.ep=2"]
    )
    cfg.check_world(2)
    assert cfg.grad_accumulation_steps(2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size x world size"):
        cfg.check_world(3)
    cfg = load_config(
        None, ["train.micro_batch_size=2", "train.global_batch_size=12", "parallel.ep=4"]
    )
    with pytest.raises(ConfigError, match=r"parallel\.ep: expected a divisor of the world size"):
        cfg.check_world(2 * 3)


def test_extends_merges_base_first(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n  micro_batch_size: 2\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.steps, cfg.train.micro_batch_size, cfg.name) == (9, 2, "child")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
