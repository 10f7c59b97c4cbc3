"""Rotary position embedding (RoPE) with linear, NTK/dynamic and YaRN scaling.

Legend: B batch, S sequence (query) length, H heads, R rotary dim (per head), P = R // 2 pairs.

Two layouts of the rotary dim, related by a fixed permutation of the last axis:
  * rotate-half (GPT-NeoX / Hugging Face): pair i is (x[i], x[i + P]);
  * interleaved (Meta / DeepSeek-V3 reference code): pair i is (x[2i], x[2i + 1]).
Pair i turns by angle ``position * inv_freq[i]`` in both.

Scaling dict (Hugging Face ``rope_scaling`` / ``rope_parameters`` keys): ``type`` or ``rope_type`` in
{"default"/"none", "linear", "dynamic", "ntk", "yarn"}, ``factor``, ``original_max_position_embeddings``,
``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``attention_factor``, ``truncate``.

YaRN follows the DeepSeek-V3 convention: the attention temperature is applied to the *softmax scale*
(``softmax_scale_factor = mscale**2`` with ``mscale = 0.1 * m * ln(factor) + 1`` and
``m = mscale_all_dim`` if given else ``mscale``), and cos/sin are multiplied by
``attention_factor = get_mscale(factor, mscale) / get_mscale(factor, m)`` (1.0 for DeepSeek-V3).
With both ``mscale`` and ``mscale_all_dim`` given this equals Hugging Face's DeepseekV3 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

_TYPES = {"default": "none", "none": "none", "linear": "linear", "dynamic": "dynamic"}
_TYPES.update({"ntk": "ntk", "yarn": "yarn"})
_KEYS = {
    "type",
    "rope_type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
    "rope_theta",
}


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature ``0.1 * mscale * ln(factor) + 1`` (1.0 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeScaling:
    """Parsed, validated RoPE scaling parameters (see the module docstring for the keys)."""

    kind: str = "none"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_dict(cls, cfg: dict | None, base: float | None = None) -> RopeScaling:
        """Build from a Hugging Face-style dict; ``None`` means no scaling."""
        if cfg is None:
            return cls()
        if not isinstance(cfg, dict):
            raise TypeError(f"rope scaling must be a dict or None, got {type(cfg).__name__}")
        unknown = set(cfg) - _KEYS
        if unknown:
            raise ValueError(
                f"rope scaling: unknown keys {sorted(unknown)}; allowed {sorted(_KEYS)}"
            )
        raw = cfg.get("rope_type", cfg.get("type", "none"))
        if raw not in _TYPES:
            raise ValueError(f"rope scaling type must be one of {sorted(_TYPES)}, got {raw!r}")
        if "rope_theta" in cfg and base is not None and float(cfg["rope_theta"]) != float(base):
            raise ValueError(
                f"rope scaling rope_theta={cfg['rope_theta']} differs from base={base}"
            )
        kind = _TYPES[raw]
        factor = float(cfg.get("factor", 1.0))
        if kind != "none" and not factor >= 1.0:
            raise ValueError(f"rope scaling factor must be >= 1 for type {raw!r}, got {factor}")
        orig = cfg.get("original_max_position_embeddings")
        if kind == "yarn" and orig is None:
            raise ValueError("rope scaling type 'yarn' needs original_max_position_embeddings")
        if orig is not None and int(orig) <= 0:
            raise ValueError(f"original_max_position_embeddings must be > 0, got {orig}")
        out = cls(
            kind=kind,
            factor=factor,
            original_max_seq_len=None if orig is None else int(orig),
            beta_fast=float(cfg.get("beta_fast") or 32.0),
            beta_slow=float(cfg.get("beta_slow") or 1.0),
            mscale=float(cfg.get("mscale") or 1.0),
            mscale_all_dim=None if not cfg.get("mscale_all_dim") else float(cfg["mscale_all_dim"]),
            attention_factor=None
            if cfg.get("attention_factor") is None
            else float(cfg["attention_factor"]),
            truncate=bool(cfg.get("truncate", True)),
        )
        if out.beta_fast <= out.beta_slow:
            raise ValueError(f"beta_fast ({out.beta_fast}) must exceed beta_slow ({out.beta_slow})")
        return out


def yarn_correction_range(
    dim: int,
    base: float,
    original_max_seq_len: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool = True,
) -> tuple[float, float]:
    """Pair-index range [low, high] over which YaRN ramps from extrapolation to interpolation.

    A pair whose wavelength fits ``beta`` times into ``original_max_seq_len`` sits at index
    ``dim * ln(L / (2 pi beta)) / (2 ln base)``; 64 dims, base 1e4, L 4096, beta 32/1 give 10..23.
    """

    def idx(beta: float) -> float:
        return dim * math.log(original_max_seq_len / (beta * 2 * math.pi)) / (2 * math.log(base))

    low, high = idx(beta_fast), idx(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(
    dim: int, base: float, scaling: RopeScaling, seq_len: int | Tensor | None = None
) -> Tensor:
    """Inverse frequencies (P,) in float32 for ``dim`` rotary dims; ``seq_len`` drives "dynamic".

    ``seq_len`` may be a 0-d tensor (the largest position + 1, still on the device): the
    stretch is then chosen on the device, and the result lives there, with no host read.
    """
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if scaling.kind == "ntk":  # static NTK-aware: stretch the base once
        base = base * scaling.factor ** (dim / (dim - 2))
    elif scaling.kind == "dynamic" and isinstance(seq_len, Tensor):
        orig = scaling.original_max_seq_len
        if orig is None:
            raise ValueError("dynamic rope scaling with a tensor seq_len needs an original length")
        s = seq_len.to(torch.float64)
        stretch = ((scaling.factor * s / orig) - (scaling.factor - 1)) ** (dim / (dim - 2))
        base_t = torch.where(s > orig, base * stretch, torch.full_like(s, base))
        return 1.0 / (base_t.float() ** exponent.to(s.device))
    elif scaling.kind == "dynamic" and seq_len is not None:
        orig = scaling.original_max_seq_len or seq_len
        if seq_len > orig:
            base = base * ((scaling.factor * seq_len / orig) - (scaling.factor - 1)) ** (
                dim / (dim - 2)
            )
    inv_freq = 1.0 / (base**exponent)
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "yarn":
        assert scaling.original_max_seq_len is not None
        low, high = yarn_correction_range(
            dim,
            base,
            scaling.original_max_seq_len,
            scaling.beta_fast,
            scaling.beta_slow,
            scaling.truncate,
        )
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        # ramp 0 -> keep the original (extrapolate, high freq), ramp 1 -> divide by factor (interpolate)
        inv_freq = inv_freq * (1 - ramp) + inv_freq / scaling.factor * ramp
    return inv_freq


class RotaryPositionEmbedding(nn.Module):
    """Rotary position embedding for (B, S, H, R) queries/keys.

    Args:
        dim: rotary dims per head R (even).
        max_seq_len: largest position + 1 accepted (not enforced for "dynamic", which extrapolates).
        base: rotary base (theta).
        interleaved: False = rotate-half layout (HF), True = interleaved pairs (DeepSeek/Meta).
        scaling: Hugging Face-style scaling dict, or None.

    ``forward(q, k, seq_len)`` returns ``(q_rot, k_rot)`` in the input dtype; the rotation is done
    in float32 (or wider). ``k`` may have one head that broadcasts against q's heads (MLA's shared key).
    ``softmax_scale_factor`` is what an attention layer multiplies its softmax scale by (YaRN).
    """

    inv_freq: Tensor

    def __init__(
        self,
        dim: int = 64,
        max_seq_len: int = 2048,
        base: float = 10000.0,
        *,
        interleaved: bool = False,
        scaling: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim (rotary dims per head) must be a positive even int, got {dim!r}")
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if not base > 1.0:
            raise ValueError(f"base must be > 1, got {base!r}")
        self.dim, self.max_seq_len, self.base = dim, max_seq_len, float(base)
        self.interleaved = bool(interleaved)
        self.scaling = RopeScaling.from_dict(scaling, base=self.base)
        if self.scaling.kind == "dynamic" and self.scaling.original_max_seq_len is None:
            # as in HF: dynamic NTK starts stretching past the trained length (here max_seq_len)
            self.scaling = replace(self.scaling, original_max_seq_len=max_seq_len)
        s = self.scaling
        m_all = s.mscale_all_dim if s.mscale_all_dim is not None else s.mscale
        if s.kind == "yarn":
            self.softmax_scale_factor = yarn_get_mscale(s.factor, m_all) ** 2
            af = s.attention_factor
            self.attention_factor = (
                af
                if af is not None
                else yarn_get_mscale(s.factor, s.mscale) / yarn_get_mscale(s.factor, m_all)
            )
        else:
            self.softmax_scale_factor, self.attention_factor = 1.0, 1.0
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the non-persistent ``inv_freq`` buffer, e.g. after ``to_empty`` from meta."""
        with torch.no_grad():
            freq = rope_inv_freq(self.dim, self.base, self.scaling)
            self.inv_freq.copy_(freq.to(self.inv_freq.device))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, "
            f"interleaved={self.interleaved}, scaling={self.scaling.kind}"
        )

    def positions(
        self, batch: int, seq_len: int, start_pos: int = 0, position_ids: Tensor | None = None
    ) -> Tensor:
        """Validated (B, S) int64 positions: ``position_ids`` or ``start_pos + arange(S)``.

        Given position ids are range-checked on the device (an asynchronous assert: the host
        never waits for their values; on a GPU a bad id fails the next synchronising call).
        """
        dev = self.inv_freq.device
        limited = self.scaling.kind != "dynamic"  # dynamic NTK extrapolates past max_seq_len
        if position_ids is None:
            if not isinstance(start_pos, int) or start_pos < 0:
                raise ValueError(f"start_pos must be a non-negative int, got {start_pos!r}")
            top = start_pos + seq_len - 1
            if seq_len and limited and top >= self.max_seq_len:
                raise ValueError(f"position {top} is beyond max_seq_len={self.max_seq_len}")
            return torch.arange(start_pos, start_pos + seq_len, device=dev).expand(batch, seq_len)
        if not isinstance(position_ids, Tensor) or position_ids.is_floating_point():
            raise TypeError("position_ids must be an integer tensor of shape (S,) or (B, S)")
        pos = position_ids.to(dev)
        if pos.dim() == 1:
            pos = pos.expand(batch, -1)
        if pos.shape != (batch, seq_len):
            raise ValueError(
                f"position_ids must have shape ({seq_len},) or ({batch}, {seq_len}), got {tuple(position_ids.shape)}"
            )
        if seq_len:
            ok = (pos >= 0) & (pos < self.max_seq_len) if limited else pos >= 0
            torch._assert_async(
                ok.all(),
                f"position_ids: expected values in [0, {self.max_seq_len})"
                if limited
                else "position_ids: expected values >= 0",
            )
        return pos

    def cos_sin(self, pos_BS: Tensor) -> tuple[Tensor, Tensor]:
        """float32 (B, S, P) cos and sin (times ``attention_factor``) for positions (B, S)."""
        inv_freq = self.inv_freq
        if self.scaling.kind == "dynamic" and pos_BS.numel():  # stretched on the device
            inv_freq = rope_inv_freq(self.dim, self.base, self.scaling, pos_BS.max() + 1)
        ang_BSP = pos_BS.float().unsqueeze(-1) * inv_freq.float()
        return ang_BSP.cos() * self.attention_factor, ang_BSP.sin() * self.attention_factor

    def rotate(self, x_BSHR: Tensor, cos_BSP: Tensor, sin_BSP: Tensor) -> Tensor:
        """Rotate one (B, S, H, R) tensor with precomputed (B, S, P) cos/sin; keeps x's dtype."""
        if x_BSHR.dim() != 4 or x_BSHR.shape[-1] != self.dim:
            raise ValueError(
                f"expected a (batch, seq_len, n_heads, {self.dim}) tensor, got {tuple(x_BSHR.shape)}"
            )
        if not x_BSHR.is_floating_point():
            raise TypeError(f"rope input must be floating point, got {x_BSHR.dtype}")
        cos, sin = cos_BSP.unsqueeze(2), sin_BSP.unsqueeze(2)  # broadcast over heads
        x = x_BSHR.to(torch.promote_types(x_BSHR.dtype, torch.float32))  # fp32 or wider
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = x.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x_BSHR.dtype)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        seq_len: int | None = None,
        *,
        start_pos: int = 0,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Rotate q (B, S, H, R) and k (B, S, H or 1, R) at positions ``start_pos + [0, S)``
        (or ``position_ids``, (S,) or (B, S)). ``seq_len``, if given, must equal S."""
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (batch, seq_len, n_heads, head_dim) tensor")
        B, S = q.shape[:2]
        if k.shape[:2] != (B, S):
            raise ValueError(f"k batch/seq {tuple(k.shape[:2])} must match q's {(B, S)}")
        if seq_len is not None and seq_len != S:
            raise ValueError(f"seq_len={seq_len} does not match q.shape[1]={S}")
        cos, sin = self.cos_sin(self.positions(B, S, start_pos, position_ids))
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
