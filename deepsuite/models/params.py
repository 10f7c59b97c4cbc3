"""Parameter counts of a config, total and activated per token, from a model built on the meta device.

Convention (docs/formulas.md, "Parameter counts"): "activated" counts every dense parameter (attention, dense FFNs, norms,
the embedding table and the output head) plus, per MoE layer, the router, the shared experts and
``n_expert_per_token`` routed experts. MTP modules are reported separately, as the report does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from deepsuite.config import ModelArgs


@dataclass(frozen=True)
class ParamCount:
    total: int  # main model, MTP excluded
    activated: int  # per token, main model, MTP excluded
    mtp: int  # all MTP modules (their embedding and head are shared, so not counted again)
    expert: int  # routed-expert parameters of the main model

    def __str__(self) -> str:
        return (
            f"total {human(self.total)}, activated {human(self.activated)}, "
            f"routed experts {human(self.expert)}, MTP {human(self.mtp)}"
        )


def human(n: float) -> str:
    """12_345_678 -> '12.35M'; 671_026_000_000 -> '671.03B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def count_parameters(cfg: ModelArgs, vocab_size: int | None = None) -> ParamCount:
    """Build the model on the meta device (no memory) and count its parameters."""
    from deepsuite.models.deepseek import DeepSeekLM

    if vocab_size is not None:  # on a copy: the caller's config stays as it was
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    with torch.device("meta"):
        model = DeepSeekLM(cfg)
    return count_model_parameters(model)


def count_model_parameters(model: torch.nn.Module) -> ParamCount:
    """Counts for an instantiated :class:`DeepSeekLM` (meta or real); see the module docstring."""
    args: ModelArgs = model.args  # type: ignore[assignment]
    n_active_routed = args.moe.n_expert_per_token
    total = activated = expert = mtp = 0
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if ".ffn.experts." in name:
            expert += n
            n_experts = p.shape[0]
            activated += n // n_experts * n_active_routed
        else:
            activated += n
    return ParamCount(total=total, activated=activated, mtp=mtp, expert=expert)
