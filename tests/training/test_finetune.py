"""The README's "Fine-tune a DeepSeek checkpoint" commands, run as written (in a scratch
directory holding links to configs/, scripts/ and train/), then held to transformers:

* the step-1 loss of ``train.init_from`` at EP 2 (2 torchrun ranks, train/train.py) is the
  loss transformers computes on the same rows, so the step-0 logits are transformers';
* 20 steps lower the loss;
* ``deepsuite eval`` at EP 2 and at EP 1 give the same loss (1e-6);
* the export, converted back, loads in transformers, whose greedy ``generate`` gives
  ``deepsuite generate``'s tokens;
* a run stopped at step 10 and resumed, with the source deleted in between,
  ends where the uninterrupted run does.

tests/training/test_init_from.py compares the logits themselves, V2 checkpoints included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from deepsuite.config import load_config
from deepsuite.data import PackedLoader, load_hf_tokenizer
from deepsuite.data.loader import model_inputs
from deepsuite.models.deepseek import lm_cross_entropy
from tests.training.runner import BIN, ROOT, env, launch_cmd, losses

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]

README_BLOCK = re.search(
    r"## Fine-tune a DeepSeek checkpoint.*?```bash\n(.*?)```",
    (ROOT / "README.md").read_text(),
    flags=re.S,
).group(1)
STEP1_TOL = 1e-5  # fp32; the two models sum in different orders (observed ~1e-6)


def user_env() -> dict[str, str]:
    e = env()
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def sh(script: str, cwd: Path, timeout: float = 900) -> str:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def train(cwd: Path, *overrides: str) -> None:
    cmd = [*launch_cmd("torchrun", 2), "train/train.py", "configs/finetune_tiny.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]


def hf_first_step_loss(run_dir: Path, hf_dir: Path) -> float:
    """transformers' loss on the rows of the run's first optimizer step (2 ranks, one
    micro-batch each), with the run's document mask (made causal) and positions."""
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.grad_accumulation_steps(2) == 1
    tok = load_hf_tokenizer(cfg.data.tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = []
    for rank in range(2):
        loader = PackedLoader(
            cfg.data, tok, "train", cfg.train.micro_batch_size, rank, 2, run_dir=run_dir
        )
        inp = model_inputs(next(loader), "cpu", True)
        S = inp["input_ids"].shape[1]
        mask = inp["attention_mask"] & torch.ones(S, S, dtype=torch.bool).tril()
        with torch.no_grad():
            logits = hf(
                input_ids=inp["input_ids"], attention_mask=mask, position_ids=inp["position_ids"]
            ).logits
        out.append(float(lm_cross_entropy(logits, inp["labels"])))
    return sum(out) / 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch directory where the README's relative paths (configs/, runs/ ...) resolve."""
    d = tmp_path_factory.mktemp("readme")
    for name in ("configs", "scripts", "train"):
        (d / name).symlink_to(ROOT / name)
    return d


@pytest.fixture(scope="module")
def readme_run(workdir) -> dict[str, str]:
    return {"stdout": sh(README_BLOCK, workdir)}


def test_readme_commands_fine_tune_from_transformers_logits(workdir, readme_run, monkeypatch):
    monkeypatch.chdir(workdir)  # the run's config names its data and tokenizer relative to it
    run = workdir / "runs" / "finetune-tiny"
    loss = losses(run)
    assert sorted(loss) == list(range(1, 21))
    assert loss[1] == pytest.approx(
        hf_first_step_loss(run, workdir / "runs" / "tiny-hf"), abs=STEP1_TOL
    )
    assert loss[20] < loss[1] - 2.0, loss
    assert (run / "tokenizer.json").is_file() and (run / "final" / "model.safetensors").is_file()


def test_eval_at_ep1_equals_ep2(workdir, readme_run, monkeypatch):
    """The README's eval ran on 2 ranks at EP 2; the same evaluation in this one process."""
    from deepsuite.data import prepare_data
    from deepsuite.training.evaluate import (
        _data_config,
        build_eval_model,
        evaluate,
        find_pretrained,
        parse_args,
    )

    monkeypatch.chdir(workdir)
    ep2 = json.loads((workdir / "runs" / "finetune-tiny" / "eval.json").read_text())
    args = parse_args(
        ["runs/finetune-tiny", "--data", "runs/sft.jsonl", "--format", "sft", "--seq-len", "64"]
    )
    src = find_pretrained(args.path)
    data = _data_config(args, src)
    loader = PackedLoader(data, prepare_data(data), "train", args.batch_size, shuffle=False)
    ep1 = evaluate(build_eval_model(src, 1), loader, len(loader), True).to_dict()
    assert ep1["tokens"] == ep2["tokens"] > 1000
    assert abs(ep1["loss"] - ep2["loss"]) <= 1e-6
    assert ep1["counts"] == ep2["counts"]
    assert set(ep1["max_vio"]) == {"1", "2"} and all(v >= 0 for v in ep1["max_vio"].values())


def test_transformers_greedy_generate_equals_deepsuite_generate(workdir, readme_run):
    prompts = ["Question: What is 3 plus 4?\nAnswer:", "Question: What is 12 plus 30?\nAnswer:"]
    args = " ".join(f"--prompt $'{p.replace(chr(10), chr(92) + 'n')}'" for p in prompts)
    out = sh(f"deepsuite generate runs/finetune-tiny {args} --max-new-tokens 16 --ids", workdir)
    ours = [[int(t) for t in line.split("] ", 1)[1].split()] for line in out.strip().splitlines()]
    hf_dir = workdir / "runs" / "finetune-tiny-hf"
    tok = load_hf_tokenizer(hf_dir)  # the conversion carried the run's tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    for p, mine in zip(prompts, ours, strict=True):
        ids = torch.tensor([[tok.eos_id, *tok.encode(p)]])
        with torch.no_grad():
            ref = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
            )[0, ids.shape[1] :].tolist()  # fmt: skip
        assert len(mine) > 3 and mine == ref[: len(mine)], (p, mine, ref)


def test_resume_reads_its_own_checkpoint_not_the_source(workdir, readme_run):
    src = workdir / "runs" / "tiny-hf-copy"
    shutil.copytree(workdir / "runs" / "tiny-hf", src)
    common = [
        f"train.init_from={src}",
        "data.source=runs/sft.jsonl",
        "train.run_dir=runs/stopped",
        "data.cache_dir=runs/finetune-tiny/data_cache",  # the same tokens, tokenised once
    ]
    train(workdir, *common, "train.stop_at_step=10")
    shutil.rmtree(src)  # resuming must not need the source again
    train(workdir, *common)
    ref, got = workdir / "runs" / "finetune-tiny", workdir / "runs" / "stopped"
    a, b = losses(ref), losses(got)
    assert sorted(b) == list(range(1, 21))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), s
    from safetensors.torch import load_file

    wa = load_file(str(ref / "final" / "model.safetensors"))
    wb = load_file(str(got / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
