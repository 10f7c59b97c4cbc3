"""Decoding a whole model: ``deepsuite generate`` (MLA latent cache, absorbed decode) against
transformers' ``generate`` on the same weights, at a long context, and the cache each keeps.

Two random DeepSeek-V3 models written by transformers itself (``scripts/make_tiny_checkpoint.py``):
"tiny" (the README's fine-tuning model, dim 64, C 32 + R 8) and "larger" (dim 1024, 16 heads,
DeepSeek-V3's per-head dims C 512, R 64, N 128, V 128, 4 blocks, 16 experts top-2). Ours loads
the saved checkpoint (``load_pretrained``), so both run identical weights. For each: B prompts of
``--context`` tokens, greedy, ``1 + --new`` new tokens; each token's emission is timestamped
(ours: ``on_step``; transformers: a ``streamer``), and decode time is from the first new token
(which ends the prefill) to the last, so prefill is not counted; tokens/s = B * --new / decode
time (median of ``--repeats``).

Cache bytes per token are MEASURED from the caches after the prefill (bytes held / (B * context)):
ours must equal n_layers * (C + R) * itemsize (docs/formulas.md) or the script exits 1. The
greedy tokens of both are compared too (equal on these models; printed).

    .venv/bin/python benchmarks/generate_decode.py --context 2048 --new 32 --batch 1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepsuite.checkpoint.pretrained import load_pretrained
from deepsuite.models.generate import SamplingConfig, cache_bytes_per_token, generate

ROOT = Path(__file__).resolve().parents[1]
LARGER = dict(
    hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16, q_lora_rank=384,
    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    vocab_size=4096, initializer_range=0.02,
)  # fmt: skip


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hf_cache_bytes(past) -> int:
    """Bytes in a transformers cache (5.x DynamicCache layers, or legacy tuples)."""
    layers = getattr(past, "layers", None)
    if layers is not None:
        return sum(t.nbytes for lay in layers for t in (lay.keys, lay.values) if t is not None)
    return sum(t.nbytes for pair in past for t in pair)


def bench(name: str, path: Path, a: argparse.Namespace) -> dict:
    import transformers

    _src, ours = load_pretrained(path, dtype=a.torch_dtype, device=a.device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=a.torch_dtype)
    hf = hf.to(a.device).eval()
    V = ours.args.model.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (a.batch, a.context), generator=g).to(a.device)
    prompts = ids.tolist()

    n = a.new + 1

    def run_ours() -> tuple[list[list[int]], float]:
        stamps: list[float] = []
        out = generate(
            ours, prompts, SamplingConfig(max_new_tokens=n, temperature=0),
            on_step=lambda _new: stamps.append(time.perf_counter()),
        )  # fmt: skip
        return out, stamps[-1] - stamps[0]

    class Stamps:  # transformers' streamer protocol: put(prompt), put(token) per step, end()
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, _value) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run_hf() -> tuple[list[list[int]], float]:
        st = Stamps()
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, streamer=st,
            )  # fmt: skip
        return out[:, a.context :].tolist(), st.t[-1] - st.t[1]  # t[0]: the prompt

    same = run_ours()[0] == run_hf()[0]  # also warms both up
    times = {
        who: sorted(fn()[1] for _ in range(a.repeats))[a.repeats // 2]
        for who, fn in (("deepsuite", run_ours), ("transformers", run_hf))
    }
    caches = ours.new_caches(a.batch, a.context)
    with torch.no_grad():
        ours.forward_cached(ids, caches, 0)
        ours_bytes = sum(c.kv[:, : c.length].nbytes for c in caches) / (a.batch * a.context)
        out = hf(input_ids=ids, use_cache=True)
        past = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.x
    hf_bytes = _hf_cache_bytes(past) / (a.batch * a.context)
    want = cache_bytes_per_token(ours, a.torch_dtype)
    if ours_bytes != want:
        print(f"ERROR: {name}: our cache holds {ours_bytes} B/token, formula {want}")
        sys.exit(1)
    tps = {k: a.batch * a.new / v for k, v in times.items()}
    return {"name": name, "tps": tps, "bytes": (ours_bytes, hf_bytes), "same": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--models", default="tiny,larger")
    a = p.parse_args()
    a.torch_dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    if a.threads:
        torch.set_num_threads(a.threads)
    mk = _script()
    max_len = a.context + a.new + 8
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            out = Path(tmp) / name
            out.mkdir()
            extra = LARGER if name == "larger" else {}
            mk.write_model(out, "v3", 0, max_position_embeddings=max_len, **extra)
            rows.append(bench(name, out, a))
    print(
        f"context {a.context}, batch {a.batch}, {a.new} decoded tokens, {a.dtype} on {a.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| model | deepsuite tok/s | transformers tok/s | speed-up | cache B/token ours | "
          "transformers | ratio | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, (ob, hb) = r["tps"], r["bytes"]
        print(
            f"| {r['name']} | {t['deepsuite']:.1f} | {t['transformers']:.1f} | "
            f"{t['deepsuite'] / t['transformers']:.2f}x | {ob:.0f} | {hb:.0f} | {hb / ob:.1f}x | "
            f"{'yes' if r['same'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
