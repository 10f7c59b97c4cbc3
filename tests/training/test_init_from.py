"""Starting from a checkpoint: what a path holds, the architecture taken from or checked against
it, its tokenizer, and each bad input ending in an error that names what is wrong (the CLIs:
one line, exit status 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepsuite.checkpoint.pretrained import (
    PretrainedError,
    apply_pretrained_architecture,
    find_pretrained,
    load_pretrained,
)
from deepsuite.cli import run_command
from deepsuite.config import load_config
from deepsuite.data.pipeline import check_vocab_size
from deepsuite.errors import ConfigError
from deepsuite.models.hf import HFCheckpointError, hf_main
from deepsuite.training.engine import resolve_init_from
from tests.conftest import tiny_checkpoint_script

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = ROOT / "configs" / "finetune_tiny.yaml"


def finetune_cfg(*overrides: str):
    return load_config(FINETUNE, list(overrides))


@pytest.fixture(scope="module")
def export_dir(tiny_v3, tmp_path_factory) -> Path:
    """`deepsuite convert to-deepsuite` of the tiny V3 checkpoint (config.yaml + safetensors)."""
    out = tmp_path_factory.mktemp("export")
    assert hf_main(["to-deepsuite", str(tiny_v3), str(out), "--no-mtp"]) == 0
    return out


def test_architecture_and_tokenizer_come_from_the_checkpoint(tiny_v3):
    cfg, src = resolve_init_from(finetune_cfg(f"train.init_from={tiny_v3}"))
    assert src.kind == "hf" and src.tokenizer == str(tiny_v3 / "tokenizer.json")
    m, a, e = cfg.model, cfg.mla, cfg.moe
    assert (m.vocab_size, m.dim, m.n_layers, m.n_dense_layers, m.max_seq_len) == (
        512,
        64,
        3,
        1,
        256,
    )
    assert (a.q_lora_rank, a.rope_scaling, a.rope_factor, a.original_max_seq_len) == (
        32,
        "yarn",
        4.0,
        64,
    )
    assert (e.n_routed_experts, e.n_group, e.topk_group, e.route_scale) == (8, 4, 2, 2.5)
    assert cfg.data.tokenizer == str(tiny_v3 / "tokenizer.json")
    assert e.bias_update_speed == 0.001  # a training option: the YAML's, not the checkpoint's
    # keys the config sets to the checkpoint's value are fine; others are named with both values
    resolve_init_from(finetune_cfg(f"train.init_from={tiny_v3}", "model.dim=64", "moe.n_group=4"))
    with pytest.raises(PretrainedError) as err:
        resolve_init_from(
            finetune_cfg(f"train.init_from={tiny_v3}", "model.dim=96", "mla.kv_lora_rank=16")
        )
    assert "model.dim: config 96, checkpoint 64" in str(err.value)
    assert "mla.kv_lora_rank: config 16, checkpoint 32" in str(err.value)


def test_find_pretrained_reads_every_layout(tiny_v3, export_dir, tmp_path):
    assert find_pretrained(export_dir).kind == "export"
    assert find_pretrained(export_dir / "model.safetensors").tokenizer == str(
        export_dir / "tokenizer.json"
    )
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    shutil.copy(export_dir / "model.safetensors", run / "final" / "model.safetensors")
    shutil.copy(export_dir / "config.yaml", run / "config.yaml")
    src = find_pretrained(run)
    assert src.kind == "export" and src.tokenizer is None  # the export had no byte tokenizer
    with pytest.raises(PretrainedError, match="no such file or directory"):
        find_pretrained(tmp_path / "nope")
    with pytest.raises(PretrainedError, match="expected a Hugging Face checkpoint"):
        find_pretrained(tmp_path)


def test_export_and_hf_load_the_same_model(tiny_v3, export_dir):
    _, a = load_pretrained(tiny_v3)
    _, b = load_pretrained(export_dir)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_missing_tensor_and_wrong_shape_are_named(export_dir, tiny_v3, tmp_path):
    state = load_file(str(export_dir / "model.safetensors"))
    for name, change in (("missing", "drop"), ("shape", "grow")):
        bad = tmp_path / name
        shutil.copytree(export_dir, bad)
        s = dict(state)
        if change == "drop":
            s.pop("layers.2.ffn.experts.up_proj")
        else:
            s["layers.0.attn.kv_b_proj.weight"] = torch.zeros(7, 7)
        save_file(s, str(bad / "model.safetensors"))
        with pytest.raises(PretrainedError) as err:
            load_pretrained(bad)
        want = (
            "missing tensors (1): layers.2.ffn.experts.up_proj"
            if change == "drop"
            else "layers.0.attn.kv_b_proj.weight: shape (7, 7) in the checkpoint, (128, 32)"
        )
        assert want in str(err.value)
    hf_bad = tmp_path / "hf_missing"
    shutil.copytree(tiny_v3, hf_bad)
    index = json.loads((hf_bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight"]
    (hf_bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PretrainedError, match=r"missing \(1\): model\.layers\.1\.mlp\.experts\.3"):
        load_pretrained(hf_bad)
    assert issubclass(PretrainedError, ValueError) and issubclass(HFCheckpointError, ValueError)


def test_tokenizer_missing_or_larger_than_the_vocabulary(tiny_v3, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_v3, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(
        PretrainedError, match="data.tokenizer: train.init_from=.* has no tokenizer"
    ):
        resolve_init_from(finetune_cfg(f"train.init_from={bare}"))
    small = tmp_path / "small"
    tiny_checkpoint_script().write_model(small, vocab_size=300)
    cfg = finetune_cfg(f"train.init_from={small}", f"data.tokenizer={tiny_v3 / 'tokenizer.json'}")
    cfg, _ = resolve_init_from(cfg)
    assert cfg.model.vocab_size == 300  # the checkpoint's, which the tokenizer outgrows
    with pytest.raises(ConfigError, match=r"model.vocab_size: expected at least 512 .*got 300"):
        check_vocab_size(cfg.data, cfg.model.vocab_size)


def test_mtp_depth_beyond_the_checkpoint(tiny_v3):
    cfg = finetune_cfg(f"train.init_from={tiny_v3}", "model.mtp_depth=1")
    with pytest.raises(PretrainedError, match="model.mtp_depth=1: .* holds weights for 0 MTP"):
        apply_pretrained_architecture(cfg, find_pretrained(tiny_v3), "train.init_from")


def test_cli_errors_are_one_line(tiny_v3, tmp_path, capsys):
    long_prompt = "word " * 400
    assert run_command("generate", [str(tiny_v3), "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("deepsuite generate: error: prompt 0: ") and "model.max_seq_len=256" in err
    )
    assert len(err.splitlines()) == 1
    assert run_command("eval", [str(tmp_path / "nope"), "--data", "builtin"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"deepsuite eval: error: {tmp_path / 'nope'}: no such file or directory"
    )
    # as a user runs it: a separate process, one line on stderr, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "deepsuite.cli", "generate", str(tiny_v3), "--prompt", "hi",
         "--max-new-tokens", "1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("deepsuite generate: error: max_new_tokens=1000: prompt 0 has")
    )


def _build_run_worker(rank: int, world: int, runs: list[list[str]]) -> list[dict]:
    """The trainer's own build path (train/train.py calls it) at EP 2, once per override list;
    this rank's first micro-batch and the logits of the initialised model on it."""
    from deepsuite.data.loader import model_inputs
    from deepsuite.training.engine import build_run

    out = []
    for overrides in runs:
        parts = build_run(load_config(FINETUNE, overrides))
        batch = next(parts.train_loader)
        with torch.no_grad():
            logits = parts.model(**model_inputs(batch, "cpu", True)).logits
        experts = {m.experts.local.first_expert for m in parts.model.moe_layers()}
        out.append({"batch": batch, "logits": logits, "experts": experts})
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_init_from_at_ep2_gives_transformers_logits(tiny_v3, tiny_v2, sft_jsonl, tmp_path):
    """train.init_from at EP 2 on 2 gloo ranks, from a V3 checkpoint (groups, YaRN, nonzero
    bias) under ZeRO 1 and a V2 one (softmax, no bias) under ZeRO 3 (the engine partitions the
    loaded weights; its forward gathers them back): the initialised, sharded model's logits on each
    rank's first batch equal transformers' on the same rows (document mask made causal, the
    same positions) within 1e-4 (fp32; observed ~3e-6)."""
    transformers = pytest.importorskip("transformers")
    from tests.distributed.launch import run_ranks

    paths = [tiny_v3, tiny_v2]
    runs = [
        [
            f"train.init_from={p}", f"data.source={sft_jsonl}", f"train.run_dir={tmp_path / p.name}",
            f"parallel.deepspeed_config={ROOT / f'configs/deepspeed/zero{z}.json'}",
            f"parallel.zero_stage={z}",
        ]
        for p, z in zip(paths, (1, 3), strict=True)  # V2 under ZeRO 3: loaded, then partitioned
    ]  # fmt: skip
    out = run_ranks(_build_run_worker, 2, runs, init=None, timeout_s=600, pg_timeout_s=300)
    for i, path in enumerate(paths):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        assert [r[i]["experts"] for r in out] == [{0}, {4}]  # each rank: half of the 8 experts
        for r in (ranks[i] for ranks in out):
            ids, docs = r["batch"]["input_ids"], r["batch"]["doc_ids"]
            S = ids.shape[1]
            causal = torch.ones(S, S, dtype=torch.bool).tril()
            mask = (docs[:, :, None] == docs[:, None, :]).unsqueeze(1) & causal
            with torch.no_grad():
                ref = hf(ids, attention_mask=mask, position_ids=r["batch"]["position_ids"]).logits
            assert (r["logits"] - ref).abs().max().item() <= 1e-4, path.name
