"""Write a tiny random Hugging Face DeepSeek checkpoint with a BPE tokenizer beside it, and
optionally a small fine-tuning jsonl: the model the README's fine-tuning commands run on.

    python scripts/make_tiny_checkpoint.py runs/tiny-hf --sft-data runs/sft.jsonl
    python scripts/make_tiny_checkpoint.py runs/tiny-hf-v2 --flavor v2

The V3 model has the features a real DeepSeek-V3 checkpoint exercises: query compression, YaRN
rope scaling, 4 expert groups of which each token keeps 2, sigmoid routing with a nonzero
balancing bias (``e_score_correction_bias``) and routed_scaling_factor 2.5. The V2 model is
V2-Lite-shaped: no query compression, softmax routing, no bias. Weights come from
``transformers`` itself (``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM``) and the tokenizer
is a byte-level BPE trained with ``tokenizers`` on the interpreter's own documentation, so
nothing is downloaded. Needs ``transformers`` (a test dependency).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

VOCAB = 512
# a ChatML-style template, so chat records and `deepsuite generate --chat` have one to apply
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,  # peaked logits: greedy decoding has no near-ties to flip
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=None,  # transformers would zero the embedding row of a pad id (our separator)
    tie_word_embeddings=False,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def write_tokenizer(out: Path) -> int:
    """A byte-level BPE of VOCAB tokens (id 0 the separator, plus the two chat markers) with a
    chat template; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from deepsuite.data.corpus import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in builtin_documents(["docs"])), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    conf = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=1) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)


def write_model(out: Path, flavor: str = "v3", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random transformers DeepSeek model saved with ``save_pretrained`` in a few shards."""
    import transformers

    torch.manual_seed(seed)
    args = dict(COMMON)
    if flavor == "v3":
        args.update(q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2)
        args.update(routed_scaling_factor=2.5, rope_parameters=YARN)
        args.update(overrides)
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**args))
        with torch.no_grad():  # a real checkpoint's bias is far from zero: routing depends on it
            for m in model.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.normal_(0.0, 0.1)
    elif flavor == "v2":
        args.update(q_lora_rank=None, n_shared_experts=2, topk_method="greedy")
        args.update(overrides)
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**args))
    else:
        raise ValueError(f"flavor: expected 'v3' or 'v2', got {flavor!r}")
    model.eval().save_pretrained(out, max_shard_size="200KB")
    return model


def write_sft_data(path: Path, n: int = 400, seed: int = 0) -> Path:
    """Records the README fine-tunes on: sums as prompt/completion pairs, one in four as a chat
    conversation (through the tokenizer's template)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.randint(0, 49), rng.randint(0, 49)
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
            if i % 4 == 3:
                rec = {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
            else:
                rec = {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"}
            f.write(json.dumps(rec) + "\n")
    return path


def make_tiny_checkpoint(out: str | Path, flavor: str = "v3", seed: int = 0, **overrides) -> Path:
    """The model and its tokenizer in ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_model(out, flavor, seed, **overrides)
    write_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "out", type=Path, help="directory to write (config.json, safetensors, tokenizer)"
    )
    p.add_argument("--flavor", choices=("v3", "v2"), default="v3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-data", type=Path, default=None, help="also write this jsonl")
    a = p.parse_args(argv)
    make_tiny_checkpoint(a.out, a.flavor, a.seed)
    print(f"wrote {a.out} ({a.flavor}, vocab {VOCAB})")
    if a.sft_data is not None:
        print(f"wrote {write_sft_data(a.sft_data)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
