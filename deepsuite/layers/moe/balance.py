"""Load balancing for DeepSeekMoE: loss-free bias update, its gamma schedule, balance losses.

Letters: B sequences, S tokens per sequence, T tokens, E routed experts, K slots per token.
Formulas follow the DeepSeek-V3 report and Wang et al. 2024 (arXiv 2408.15664), written out in
docs/formulas.md. Nothing here touches torch.distributed: the trainer all-reduces
the counts over data-parallel ranks before calling ``sign_rule_update_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def max_vio(counts_E: Tensor) -> Tensor:
    """MaxVio = (max c - mean c) / mean c, as a float32 scalar (0 when no tokens were routed)."""
    c = counts_E.detach().float()
    mean = c.mean()
    return torch.where(mean > 0, (c.max() - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))


@torch.no_grad()
def sign_rule_update_(
    bias_E: Tensor, counts_E: Tensor, gamma: float, recenter: bool = False
) -> Tensor:
    """In place: b_i += gamma * sign(mean(c) - c_i); optionally subtract mean(b). Returns bias_E.

    Underloaded experts (c_i < mean) gain bias, overloaded ones lose it; the bias moves at most
    gamma per call, so short runs need a larger gamma (docs/formulas.md).
    """
    if bias_E.dtype != torch.float32:
        raise TypeError(
            f"bias_E must be float32 (bf16 bias loses the small updates), got {bias_E.dtype}"
        )
    if counts_E.shape != bias_E.shape:
        raise ValueError(
            f"counts_E must have shape {tuple(bias_E.shape)}, got {tuple(counts_E.shape)}"
        )
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    c = counts_E.to(device=bias_E.device, dtype=torch.float64)
    bias_E.add_(torch.sign(c.mean() - c).to(torch.float32), alpha=gamma)
    if recenter:
        bias_E.sub_(bias_E.mean())
    return bias_E


@dataclass(frozen=True)
class GammaSchedule:
    """Bias update speed: ``gamma`` until ``until_tokens`` tokens were seen, then 0.

    DeepSeek-V3: gamma = 0.001 for the first 14.3T tokens. ``until_tokens=None`` never stops.
    """

    gamma: float = 0.001
    until_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.until_tokens is not None and self.until_tokens < 0:
            raise ValueError(f"until_tokens must be >= 0 or None, got {self.until_tokens}")

    def __call__(self, tokens_seen: int) -> float:
        """gamma to use for the update after ``tokens_seen`` training tokens."""
        if self.until_tokens is not None and tokens_seen >= self.until_tokens:
            return 0.0
        return self.gamma


def _load_fraction(ids_BSK: Tensor, n_experts: int) -> Tensor:
    """f_{b,i} = E * (slots of sequence b routed to i) / (slots of b); = E/(K S) sum_t 1[i in TopK(t)]
    when every token has K experts. Empty slots (-1) are not counted. -> [B, E] float32."""
    B = ids_BSK.shape[0]
    ids = ids_BSK.reshape(B, -1)
    valid = ids >= 0
    hits = torch.zeros(B, n_experts + 1, device=ids.device, dtype=torch.float32)
    hits.scatter_add_(1, torch.where(valid, ids, n_experts), valid.float())
    n_slots = valid.sum(dim=1, keepdim=True).clamp_min(1).float()
    return n_experts * hits[:, :n_experts] / n_slots


def sequence_balance_loss(scores_BSE: Tensor, ids_BSK: Tensor, alpha: float) -> Tensor:
    """Complementary sequence-wise balance loss, averaged over the B sequences:

    L = alpha * sum_i f_i P_i, f_i = E/(K S) sum_t 1[i in TopK(t)], P_i = 1/S sum_t s_it / sum_j s_jt.
    Gradient flows through P (the scores); f is a count. Equals alpha when load and scores are uniform.
    """
    if scores_BSE.dim() != 3 or ids_BSK.dim() != 3 or scores_BSE.shape[:2] != ids_BSK.shape[:2]:
        raise ValueError(
            f"need scores [B, S, E] and ids [B, S, K], got {tuple(scores_BSE.shape)} "
            f"and {tuple(ids_BSK.shape)}"
        )
    E = scores_BSE.shape[-1]
    f_BE = _load_fraction(ids_BSK, E)
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True).clamp_min(1e-20)).mean(dim=1)
    return alpha * (f_BE * p_BE).sum(dim=-1).mean()


def aux_balance_loss(scores_TE: Tensor, ids_TK: Tensor, alpha: float) -> Tensor:
    """Classic (GShard/Switch, DeepSeek-V2 expert-level) auxiliary loss over the whole batch:
    the same formula as ``sequence_balance_loss`` with all T tokens as one sequence."""
    return sequence_balance_loss(scores_TE.unsqueeze(0), ids_TK.unsqueeze(0), alpha)


def routing_entropy(scores_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the normalised scores; log(E) = undecided."""
    p = scores_TE.detach().float()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(p * p.clamp_min(1e-20).log()).sum(dim=-1).mean()
