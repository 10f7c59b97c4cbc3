"""Hugging Face DeepSeek-V2/V3 ``config.json`` <-> deepsuite :class:`~deepsuite.config.Config`.

Field map (HF -> deepsuite): hidden_size -> model.dim, num_hidden_layers -> model.n_layers,
first_k_dense_replace -> model.n_dense_layers, intermediate_size -> model.inter_dim,
max_position_embeddings -> model.max_seq_len, rms_norm_eps -> model.norm_eps,
num_nextn_predict_layers -> model.mtp_depth (only when the weights are present), MLA dims 1:1
(q_lora_rank None -> 0), rope_parameters / rope_scaling + rope_theta -> mla.rope_*,
n_routed_experts / n_shared_experts / num_experts_per_tok / moe_intermediate_size /
n_group / topk_group / routed_scaling_factor / norm_topk_prob / scoring_func -> moe.*.

Where the DeepSeek reference code and ``transformers`` disagree, this follows the reference:
  * V2 ``norm_topk_prob``: the reference normalises the top-k weights and then does NOT apply
    ``routed_scaling_factor``; transformers 5.x ignores ``norm_topk_prob`` for V2 altogether. We
    map a V2 config with norm_topk_prob and top_k > 1 to route_scale 1.0 (the reference).
  * V2 ``group_limited_greedy`` masks dropped groups with 0.0 in transformers, -inf here. With
    softmax scores (all > 0) the two pick the same experts unless a score underflows to exactly
    0, and then the extra pick carries weight 0: the outputs agree (tests hold both facts).
  * V2 ``topk_method: greedy`` ignores n_group/topk_group: mapped to n_group = topk_group = 1.
  * V2 has no balancing bias and scores a group by its max: moe.use_expert_bias = False.
"""

from __future__ import annotations

from typing import Any

from deepsuite.config import Config, ConfigError, ModelArgs, config_from_dict

V3, V2 = "deepseek_v3", "deepseek_v2"
_ARCH = {V3: "DeepseekV3ForCausalLM", V2: "DeepseekV2ForCausalLM"}


def _need(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"config.json: expected a value for {key!r}, found none")
    return hf[key]


def _refuse(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"config.json {key}: expected {expected} (supported), got {got!r}")


def hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict) from either the 5.x ``rope_parameters`` or legacy keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in (params or legacy).items() if k != "rope_theta"}
    if not scaling and legacy:
        scaling = legacy
    return theta, scaling


def hf_to_config(hf: dict[str, Any], *, mtp_depth: int | None = None, name: str = "hf") -> Config:
    """A deepsuite Config for an HF DeepSeek-V2/V3 ``config.json`` dict.

    Args:
        hf: the parsed config.json.
        mtp_depth: MTP modules to build; None = ``num_nextn_predict_layers`` (V3) or 0.
        name: the config's name.

    Raises:
        ConfigError: naming the HF key for anything deepsuite cannot represent exactly.
    """
    kind = hf.get("model_type")
    _refuse(kind in (V2, V3), "model_type", f"one of {[V2, V3]}", kind)
    _refuse(hf.get("hidden_act", "silu") == "silu", "hidden_act", "'silu'", hf.get("hidden_act"))
    _refuse(not hf.get("attention_bias"), "attention_bias", "false", hf.get("attention_bias"))
    _refuse(not hf.get("mlp_bias"), "mlp_bias", "false", hf.get("mlp_bias"))
    _refuse(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq", "1", hf.get("moe_layer_freq"))
    n_layers = int(_need(hf, "num_hidden_layers"))
    n_routed = hf.get("n_routed_experts") or 0
    theta, scaling = hf_rope(hf)
    rope_kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    rope_kind = {"default": "none", None: "none"}.get(rope_kind, rope_kind)
    _refuse(
        rope_kind in ("none", "linear", "dynamic", "yarn"),
        "rope_scaling.type",
        "none/linear/dynamic/yarn",
        rope_kind,
    )
    _refuse(
        scaling.get("attention_factor") is None,
        "rope_scaling.attention_factor",
        "absent",
        scaling.get("attention_factor"),
    )
    _refuse(scaling.get("truncate", True), "rope_scaling.truncate", "true", scaling.get("truncate"))
    mla = {
        "q_lora_rank": int(hf.get("q_lora_rank") or 0),
        "kv_lora_rank": int(_need(hf, "kv_lora_rank")),
        "qk_nope_head_dim": int(_need(hf, "qk_nope_head_dim")),
        "qk_rope_head_dim": int(_need(hf, "qk_rope_head_dim")),
        "v_head_dim": int(_need(hf, "v_head_dim")),
        "rope_theta": theta,
        "rope_scaling": rope_kind,
        "rope_interleave": bool(hf.get("rope_interleave", True)) if kind == V3 else True,
    }
    if rope_kind != "none":
        mla["rope_factor"] = float(scaling.get("factor", 1.0))
    if rope_kind in ("yarn", "dynamic") and scaling.get("original_max_position_embeddings"):
        mla["original_max_seq_len"] = int(scaling["original_max_position_embeddings"])
    if rope_kind == "yarn":
        mla.update(
            beta_fast=float(scaling.get("beta_fast") or 32.0),
            beta_slow=float(scaling.get("beta_slow") or 1.0),
            mscale=float(scaling.get("mscale") or 1.0),
            mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        )
    top_k = int(hf.get("num_experts_per_tok") or 1)
    moe: dict[str, Any] = {
        "n_routed_experts": int(n_routed) or max(top_k, 1),
        "n_shared_experts": int(hf.get("n_shared_experts") or 0),
        "n_expert_per_token": top_k,
        "expert_intermediate_size": int(hf.get("moe_intermediate_size") or 1),
        "n_group": int(hf.get("n_group") or 1),
        "topk_group": int(hf.get("topk_group") or 1),
        "route_scale": float(hf.get("routed_scaling_factor") or 1.0),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", kind == V3)),
    }
    if kind == V3:
        score = hf.get("scoring_func", "sigmoid")
        _refuse(score == "sigmoid", "scoring_func", "'sigmoid' for deepseek_v3", score)
        method = hf.get("topk_method", "noaux_tc")
        _refuse(method == "noaux_tc", "topk_method", "'noaux_tc' for deepseek_v3", method)
        moe["score_func"] = "sigmoid"
    else:
        score = hf.get("scoring_func", "softmax")
        _refuse(score == "softmax", "scoring_func", "'softmax' for deepseek_v2", score)
        method = hf.get("topk_method", "greedy")
        _refuse(
            method in ("greedy", "group_limited_greedy"),
            "topk_method",
            "'greedy' or 'group_limited_greedy'",
            method,
        )
        moe.update(score_func="softmax", use_expert_bias=False)
        if method == "greedy":
            moe.update(n_group=1, topk_group=1)
        if moe["norm_topk_prob"] and top_k > 1:
            moe["route_scale"] = 1.0  # the V2 reference normalises OR scales, never both
    n_dense = int(hf.get("first_k_dense_replace") or 0) if n_routed else n_layers
    if mtp_depth is None:
        mtp_depth = int(hf.get("num_nextn_predict_layers") or 0) if kind == V3 else 0
    max_len = int(hf.get("max_position_embeddings") or 4096)
    tree = {
        "name": name,
        "model": {
            "vocab_size": int(_need(hf, "vocab_size")),
            "dim": int(_need(hf, "hidden_size")),
            "n_layers": n_layers,
            "n_dense_layers": min(n_dense, n_layers),
            "n_heads": int(_need(hf, "num_attention_heads")),
            "inter_dim": int(_need(hf, "intermediate_size")),
            "max_seq_len": max_len,
            "norm_eps": float(hf.get("rms_norm_eps") or 1e-6),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range") or 0.02),
            "mtp_depth": int(mtp_depth),
        },
        "mla": mla,
        "moe": moe,
        "data": {"seq_len": min(128, max_len)},
    }
    return config_from_dict(tree)


def hf_flavor(cfg: ModelArgs) -> str:
    """``deepseek_v3`` (sigmoid + bias) or ``deepseek_v2`` (softmax, no bias) for a config.

    Raises ConfigError when the routing matches neither (e.g. softmax with a balancing bias).
    """
    e = cfg.moe
    if e.score_func == "sigmoid" and e.use_expert_bias:
        return V3
    if e.score_func == "softmax" and (not e.use_expert_bias or e.n_group == 1):
        return V2
    raise ConfigError(
        f"moe.score_func={e.score_func!r} with moe.use_expert_bias={e.use_expert_bias} and "
        f"moe.n_group={e.n_group}: expected sigmoid with the bias (DeepSeek-V3) or softmax "
        "without it (DeepSeek-V2); transformers has no class for this routing"
    )


def config_to_hf(cfg: ModelArgs, *, dtype: str = "float32") -> dict[str, Any]:
    """The HF ``config.json`` dict (V3 or V2, see :func:`hf_flavor`) for a deepsuite Config."""
    kind = hf_flavor(cfg)
    m, a, e = cfg.model, cfg.mla, cfg.moe
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling != "none":
        rope = {"rope_theta": a.rope_theta, **(a.rope_scaling_dict() or {})}
        rope["rope_type"] = rope.pop("type")
        if a.rope_scaling == "yarn" and not a.mscale_all_dim:
            rope.pop("mscale_all_dim")
    if kind == V2 and not a.rope_interleave:
        raise ConfigError("mla.rope_interleave: expected true for DeepSeek-V2 (always interleaved)")
    route_scale = e.route_scale
    if kind == V2 and e.norm_topk_prob and e.n_expert_per_token > 1 and route_scale != 1.0:
        raise ConfigError(
            f"moe.route_scale={route_scale}: DeepSeek-V2 applies routed_scaling_factor only "
            "without norm_topk_prob; expected 1.0 with moe.norm_topk_prob=true"
        )
    out: dict[str, Any] = {
        "architectures": [_ARCH[kind]],
        "model_type": kind,
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "intermediate_size": m.inter_dim,
        "moe_intermediate_size": e.expert_intermediate_size,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "n_shared_experts": e.n_shared_experts,
        "n_routed_experts": e.n_routed_experts,
        "num_experts_per_tok": e.n_expert_per_token,
        "routed_scaling_factor": route_scale,
        "norm_topk_prob": e.norm_topk_prob,
        "n_group": e.n_group,
        "topk_group": e.topk_group,
        "first_k_dense_replace": m.n_dense_layers,
        "moe_layer_freq": 1,
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank or None,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": a.rope_theta,
        "rope_parameters": rope,
        "dtype": dtype,
    }
    if kind == V3:
        out.update(
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            rope_interleave=a.rope_interleave,
            num_nextn_predict_layers=m.mtp_depth,
        )
    else:
        grouped = e.n_group > 1
        out.update(
            scoring_func="softmax",
            topk_method="group_limited_greedy" if grouped else "greedy",
            mlp_bias=False,
        )
    return out
