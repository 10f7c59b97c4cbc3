"""Fine-tuning records (data.format=sft): only completion tokens are targets, the loss equals a
hand-computed one over them and prompt positions get no gradient; chat records train on the
assistant turns; bad records and configs are named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepsuite.config import DataConfig, load_config
from deepsuite.data import ByteTokenizer, PackedLoader, load_hf_tokenizer, validate_data_config
from deepsuite.data.loader import model_inputs
from deepsuite.data.pipeline import target_mask, token_stream
from deepsuite.data.sft import IGNORE_INDEX, chat_segments
from deepsuite.models import DeepSeekLM

PAIRS = [(f"Q{i}: add {i} and {i + 1}?", f" {2 * i + 1}!") for i in range(40)]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg_for(tmp_path, source, **kw) -> DataConfig:
    base = dict(
        source=str(source), format="sft", document_masking=True, seq_len=24,
        val_fraction=0.0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def test_only_completion_tokens_are_targets(tmp_path):
    src = write(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    cfg, tok = cfg_for(tmp_path, src), ByteTokenizer()
    tokens, starts = token_stream(cfg, tok, "train", cfg.cache_dir)
    mask = np.asarray(target_mask(cfg, tok, "train", cfg.cache_dir))
    assert len(starts) == len(PAIRS) and mask.shape == tokens.shape
    for i, (p, c) in enumerate(PAIRS):
        a = starts[i]
        doc = [tok.eos_id, *tok.encode(p), *tok.encode(c)]
        assert tokens[a : a + len(doc)].tolist() == doc
        assert mask[a : a + len(doc)].tolist() == [1] + [0] * len(p.encode()) + [1] * len(
            c.encode()
        )
    # in a batch, a label is kept exactly when its token is a target
    loader = PackedLoader(cfg, tok, "train", 4, shuffle=False)
    b = next(loader)
    rows = [np.asarray(tokens[k * 24 : k * 24 + 25]) for k in range(4)]
    flags = [mask[k * 24 : k * 24 + 25] for k in range(4)]
    for r in range(4):
        want = np.where(flags[r][1:] == 1, rows[r][1:], IGNORE_INDEX)
        assert b["labels"][r].tolist() == want.tolist()


def test_loss_is_completion_only_and_prompts_get_no_gradient(tmp_path):
    src = write(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    cfg, tok = cfg_for(tmp_path, src), ByteTokenizer()
    batch = next(PackedLoader(cfg, tok, "train", 2, shuffle=False))
    torch.manual_seed(0)
    model = DeepSeekLM(
        load_config(None, ["model.vocab_size=257", "model.dim=32", "data.seq_len=24"])
    )
    inputs = model_inputs(batch, "cpu", True)
    out = model(**inputs)
    out.logits.retain_grad()
    out.lm_loss.backward()
    # by hand: mean of -log p(label) over the completion positions only
    logp = torch.log_softmax(out.logits.detach().double(), -1)
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    assert 0 < int(keep.sum()) < labels.numel()
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert out.lm_loss.item() == pytest.approx(float(nll[keep].mean()), rel=1e-6)
    grad = out.logits.grad
    assert torch.all(grad[~keep] == 0) and torch.all(grad[keep].abs().sum(-1) > 0)


def test_a_batch_of_prompt_tokens_only_has_zero_loss_not_nan():
    torch.manual_seed(0)
    model = DeepSeekLM(load_config(None, ["model.vocab_size=257", "model.dim=32"]))
    ids = torch.randint(0, 257, (2, 8))
    out = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.lm_loss.item() == 0.0


def test_chat_records_train_on_assistant_turns(tmp_path, tiny_v3):
    tok = load_hf_tokenizer(tiny_v3)
    assert tok.chat_template and tok.eos_id == 0
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "6."},
    ]
    segs = chat_segments(tok, msgs)
    assert [t for t, target in segs if target] == ["4.<|im_end|>\n", "6.<|im_end|>\n"]
    assert "".join(t for t, _ in segs).endswith("<|im_start|>assistant\n6.<|im_end|>\n")
    src = write(tmp_path / "chat.jsonl", [{"messages": msgs}] * 6)
    cfg = cfg_for(tmp_path, src, tokenizer=str(tiny_v3))
    tokens, _ = token_stream(cfg, tok, "train", cfg.cache_dir)
    mask = np.asarray(target_mask(cfg, tok, "train", cfg.cache_dir))
    n = len(tokens) // 6
    targets = [int(t) for t, m in zip(tokens[1:n], mask[1:n], strict=True) if m]
    assert tok.decode(targets) == "4.\n6.\n"  # the markers are special: decode skips them


def test_bad_records_and_configs_are_named(tmp_path, tiny_v3):
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "x"}])
    cfg = cfg_for(tmp_path, bad)
    with pytest.raises(ValueError, match=r"record 1 of the split: expected a 'prompt' string"):
        token_stream(cfg, ByteTokenizer(), "train", cfg.cache_dir)
    text = write(tmp_path / "text.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match=r"expected 'prompt' and 'completion'"):
        token_stream(cfg_for(tmp_path, text), ByteTokenizer(), "train", cfg.cache_dir)
    chat = write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="no chat_template"):
        token_stream(cfg_for(tmp_path, chat), ByteTokenizer(), "train", cfg.cache_dir)
    kw = dict(model_max_seq_len=64, world_size=1, micro_batch_size=1, global_batch_size=1)
    with pytest.raises(ValueError, match="data.document_masking: expected true"):
        validate_data_config(cfg_for(tmp_path, bad, document_masking=False), **kw)
    with pytest.raises(ValueError, match="data.source: data.format=sft"):
        validate_data_config(cfg_for(tmp_path, "builtin"), **kw)
    with pytest.raises(ValueError, match="data.format: expected one of"):
        cfg_for(tmp_path, bad, format="chat")


def test_a_saved_tokenizer_keeps_its_fingerprint_and_template(tiny_v3, tmp_path):
    """A run saves its tokenizer into RUN_DIR; resuming from that copy must key the same cache."""
    a = load_hf_tokenizer(tiny_v3 / "tokenizer.json")
    b = load_hf_tokenizer(a.save(tmp_path).parent)
    assert (b.fingerprint, b.eos_id, b.chat_template) == (a.fingerprint, a.eos_id, a.chat_template)
    assert b.encode("What is 2 plus 2?") == a.encode("What is 2 plus 2?")
