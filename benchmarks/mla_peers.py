"""MLA decode: KV-cache bytes per token and decode tokens/s, ours (absorbed, naive) vs transformers.

Letters: B batch, H heads, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.
One attention layer with DeepSeek-V3 per-head dims (C 512, R 64, N 128, V 128), ``--heads``
heads. Transformers' DeepseekV3Attention (sdpa) gets OUR weights (same parameter names). Since
transformers 5.x it caches the latent [c_KV; k_rope] too (4.x cached full per-head K and V) and
decodes by re-expanding K/V from it every step, like our naive path; ours decodes absorbed. Both
caches are filled by a chunked prefill of the same context, then one decode step is timed.

Cache bytes are MEASURED from the cache tensors (bytes held / (B * context)). Ours must equal the
formula exactly (docs/formulas.md: C + R values per token per layer; plain multi-head attention
caches 2 H V, 56.9x more at V3's 128 heads); the script exits 1 if it does not.

    .venv/bin/python benchmarks/mla_peers.py --contexts 512,2048,8192
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from deepsuite.layers.attention import (
    MultiHeadLatentAttention,
    mha_cache_values_per_token,
    mla_cache_values_per_token,
)

C, R, N, V = 512, 64, 128, 128


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _hf_layer(mla: MultiHeadLatentAttention, a: argparse.Namespace, max_len: int):
    cfg = hf.DeepseekV3Config(
        hidden_size=a.dim, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        q_lora_rank=None, kv_lora_rank=C, qk_nope_head_dim=N, qk_rope_head_dim=R, v_head_dim=V,
        max_position_embeddings=max_len, rope_interleave=True, attention_bias=False,
        rms_norm_eps=mla.kv_a_layernorm.eps, num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}  # our default,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    ref = hf.DeepseekV3Attention(cfg, layer_idx=0).eval()
    missing, _ = ref.load_state_dict(mla.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"HF layer did not get our weights for {missing}")
    return ref, hf.DeepseekV3RotaryEmbedding(cfg), cfg


def bench(a: argparse.Namespace, ctx: int) -> dict:
    torch.manual_seed(0)
    B, chunk = a.batch, a.chunk
    mla = MultiHeadLatentAttention(
        dim=a.dim, n_heads=a.heads, q_lora_rank=0, kv_lora_rank=C, qk_nope_head_dim=N,
        qk_rope_head_dim=R, v_head_dim=V, max_seq_len=ctx + 8,
    ).eval()  # fmt: skip
    ref, rot, cfg = _hf_layer(mla, a, ctx + 8)
    x = torch.randn(B, ctx + 1, a.dim) * 0.5
    ours = mla.new_cache(B, ctx + 1)
    theirs = DynamicCache(config=cfg)
    with torch.inference_mode():
        for s in range(0, ctx, chunk):
            t = min(ctx, s + chunk)
            mla(x[:, s:t], cache=ours, start_pos=s)
            pos = torch.arange(s, t).unsqueeze(0).expand(B, -1)
            keep = torch.ones(t - s, t, dtype=torch.bool).tril(s)  # query i sees keys <= s + i
            mask = torch.zeros(t - s, t).masked_fill(~keep, float("-inf"))[None, None]
            ref(x[:, s:t], rot(x, pos), mask, cache=theirs)
        step, pos = x[:, ctx:], torch.full((B, 1), ctx)
        pe = rot(x, pos)

        def ours_step(absorb: bool):
            return lambda: mla(step, cache=ours, start_pos=ctx, absorb=absorb)

        def hf_step():
            out = ref(step, pe, None, cache=theirs)[0]
            theirs.crop(-1)  # drop the appended token so every repeat decodes at the same context
            return out

        y_abs, y_naive, y_hf = ours_step(True)(), ours_step(False)(), hf_step()
        diff = max((y_abs - y_hf).abs().max().item(), (y_naive - y_hf).abs().max().item())
        t_abs = _time(ours_step(True), a.repeats)
        t_naive = _time(ours_step(False), a.repeats)
        t_hf = _time(hf_step, a.repeats)
    ours_bytes = ours.kv.nbytes / (B * ours.capacity)
    lay = theirs.layers[0]
    hf_bytes = (lay.keys.nbytes + lay.values.nbytes) / (B * lay.keys.shape[-2])
    return {
        "ctx": ctx, "ours_B": ours_bytes, "hf_B": hf_bytes, "t_abs": t_abs, "t_naive": t_naive,
        "t_hf": t_hf, "diff": diff, "elt": ours.kv.element_size(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk length")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    H = a.heads
    f_mla = mla_cache_values_per_token(C, R)
    f_mha = mha_cache_values_per_token(H, V)
    print(
        f"MLA decode, fp32 CPU, threads={torch.get_num_threads()}, B={a.batch}, H={H}, dim={a.dim}, "
        f"C={C} R={R} N={N} V={V} (median of {a.repeats} steps)"
    )
    print(
        f"formula values/token/layer: ours C+R={f_mla}; plain MHA 2HV={f_mha} "
        f"({f_mha / f_mla:.2f}x ours); at V3's 128 heads 2HV={mha_cache_values_per_token(128, V)} "
        f"({mha_cache_values_per_token(128, V) / f_mla:.2f}x ours)"
    )
    print(
        "| context | cache B/token ours | HF | MHA/ours | ours absorbed tok/s | ours naive tok/s "
        "| HF tok/s | absorbed vs HF | max diff |"
    )
    print("|" + "|".join("-" * w for w in (9, 20, 8, 10, 21, 18, 10, 16, 10)) + "|")
    ok = True
    for ctx in (int(c) for c in a.contexts.split(",")):
        r = bench(a, ctx)
        ratio = f_mha * r["elt"] / r["ours_B"]
        ok &= r["ours_B"] == f_mla * r["elt"]
        tps = [a.batch / r[k] for k in ("t_abs", "t_naive", "t_hf")]
        print(
            f"| {ctx:>7} | {r['ours_B']:>18.0f} | {r['hf_B']:>6.0f} | {ratio:>7.2f}x "
            f"| {tps[0]:>19.0f} | {tps[1]:>16.0f} | {tps[2]:>8.0f} | {tps[0] / tps[2]:>13.2f}x "
            f"| {r['diff']:.1e} |",
            flush=True,
        )
    print("our cache bytes equal (C+R) x element size exactly" if ok else "CACHE != FORMULA")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
