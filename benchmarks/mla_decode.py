"""MLA decode step: absorbed (latent MQA) vs naive (re-expand K/V from the latent cache).

Prints per-token decode latency for both paths at a given context length, their ratio, the
max output difference, and the cache bytes per token against plain multi-head attention.

    .venv/bin/python benchmarks/mla_decode.py                      # small CPU default, ~10 s
    .venv/bin/python benchmarks/mla_decode.py --v3-heads 128 --context 4096 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

from deepsuite.layers.attention import MultiHeadLatentAttention, mha_cache_values_per_token


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v3-heads", type=int, default=8, help="heads, with DeepSeek-V3 per-head dims")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024, help="tokens already in the cache")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    dtype, dev = getattr(torch, a.dtype), a.device
    torch.manual_seed(0)
    mla = MultiHeadLatentAttention(
        dim=a.dim, n_heads=a.v3_heads, q_lora_rank=1536 if a.dim >= 4096 else 0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_seq_len=a.context + 8,
    ).to(dev, dtype).eval()  # fmt: skip
    x = torch.randn(a.batch, a.context + 1, a.dim, device=dev, dtype=dtype)
    cache = mla.new_cache(a.batch, a.context + 1)
    with torch.inference_mode():
        mla(x[:, : a.context], cache=cache)  # prefill
        step = x[:, a.context :]

        def run(absorb: bool):
            return lambda: mla(step, cache=cache, start_pos=a.context, absorb=absorb)

        diff = (run(True)().float() - run(False)().float()).abs().max().item()
        t_abs = _time(run(True), a.repeats, dev)
        t_naive = _time(run(False), a.repeats, dev)
    mla_vals = mla.cache_values_per_token
    mha_vals = mha_cache_values_per_token(a.v3_heads, 128)
    print(
        f"device={dev} dtype={a.dtype} B={a.batch} context={a.context} H={a.v3_heads} dim={a.dim}"
    )
    print(
        f"absorbed decode step: {t_abs * 1e3:8.3f} ms   naive (expand K/V): {t_naive * 1e3:8.3f} ms"
    )
    print(f"naive/absorbed time ratio: {t_naive / t_abs:.2f}x   max |diff|: {diff:.2e}")
    print(
        f"cache per token per layer: MLA {mla_vals} values ({cache.bytes_per_token} B), "
        f"MHA {mha_vals} values ({mha_vals * cache.c_kv.element_size()} B): {mha_vals / mla_vals:.1f}x smaller"
    )


if __name__ == "__main__":
    main()
