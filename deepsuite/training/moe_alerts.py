"""Load-balance alerts: an expert dead for N steps, or a layer's window MaxVio over a threshold.

Pure (numpy only); reads a :class:`~deepsuite.training.moe_stats.MoEStatsTracker` on the steps
it is called (the trainer's logging steps: every step with ``logging.log_every=1``) and returns
the conditions that START there: each fires once per onset, not on every check it holds. A dead
expert is re-armed by a token (its run without one is then shorter than ``dead_steps``); a
layer's MaxVio alert is re-armed once the window MaxVio has stayed at or under the threshold for
``window`` checks (so a value hovering at the threshold does not alert on every crossing). Nothing fires before
``after_steps`` (the warm-up, while the balancing bias is still finding its level). The armed
state is checkpointed with the metrics window, so a resumed run alerts as the uninterrupted one.

Legend: E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from deepsuite.training.moe_stats import MoEStatsTracker, max_vio

__all__ = ["BalanceAlert", "BalanceAlerts"]


@dataclass(frozen=True)
class BalanceAlert:
    """One condition's onset: `kind` is "dead_experts" or "max_vio"; `text` is one line."""

    step: int
    layer: int
    kind: str
    title: str
    text: str


class BalanceAlerts:
    """dead_steps: alert when an expert has had no token for this many consecutive steps (0 =
    off); max_vio: alert when a layer's window MaxVio exceeds this (0 = off); after_steps: the
    warm-up, in optimizer steps, before which nothing fires."""

    def __init__(self, *, dead_steps: int = 0, max_vio: float = 0.0, after_steps: int = 0) -> None:
        for name, v in (("dead_steps", dead_steps), ("after_steps", after_steps)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not max_vio >= 0:
            raise ValueError(f"max_vio must be >= 0 (0 = off), got {max_vio!r}")
        self.dead_steps = dead_steps
        self.max_vio = float(max_vio)
        self.after_steps = after_steps
        self._dead: dict[int, set[int]] = {}  # layer -> experts already alerted as dead
        self._hot: dict[int, int] = {}  # layer alerted for MaxVio -> steps back under since

    @property
    def enabled(self) -> bool:
        return self.dead_steps > 0 or self.max_vio > 0

    def check(self, tracker: MoEStatsTracker, step: int) -> list[BalanceAlert]:
        """The conditions that start at `step` (after this step's `tracker.update` calls)."""
        out: list[BalanceAlert] = []
        if not self.enabled:
            return out
        warm = step > self.after_steps
        for layer in tracker.layers:
            if self.dead_steps > 0:
                out += self._check_dead(tracker, layer, step, warm)
            if self.max_vio > 0:
                out += self._check_max_vio(tracker, layer, step, warm)
        return out

    def _check_dead(
        self, tracker: MoEStatsTracker, layer: int, step: int, warm: bool
    ) -> list[BalanceAlert]:
        run_E = tracker.steps_without_tokens(layer)
        alerted = self._dead.setdefault(layer, set())
        # a token re-arms the expert (checked every step, the run is then 0; sparser checks
        # see a run shorter than dead_steps)
        alerted -= {int(e) for e in np.flatnonzero(run_E < self.dead_steps)}
        if not warm:
            return []
        new = [int(e) for e in np.flatnonzero(run_E >= self.dead_steps) if int(e) not in alerted]
        if not new:
            return []
        alerted.update(new)
        names = ", ".join(map(str, new))
        noun = "expert" if len(new) == 1 else "experts"
        text = (
            f"step {step}: MoE layer {layer}: {noun} {names} of {tracker.n_experts} received no "
            f"token for {self.dead_steps}+ steps (logging.alert_dead_steps={self.dead_steps})"
        )
        return [BalanceAlert(step, layer, "dead_experts", f"MoE layer {layer}: dead {noun}", text)]

    def _check_max_vio(
        self, tracker: MoEStatsTracker, layer: int, step: int, warm: bool
    ) -> list[BalanceAlert]:
        counts_E = tracker.window_counts(layer)
        vio = max_vio(counts_E)
        if layer in self._hot:
            if vio <= self.max_vio:
                self._hot[layer] += 1
                if self._hot[layer] >= tracker.window:  # a whole clean window: re-armed
                    del self._hot[layer]
            else:
                self._hot[layer] = 0
            return []
        if not warm or vio <= self.max_vio:
            return []
        self._hot[layer] = 0
        hot = int(np.argmax(counts_E))
        share = counts_E[hot] / counts_E.mean()
        text = (
            f"step {step}: MoE layer {layer}: MaxVio over the last {tracker.window_steps} steps "
            f"is {vio:.2f} > logging.alert_max_vio={self.max_vio:g} (expert {hot} got "
            f"{share:.2f}x its fair share)"
        )
        return [BalanceAlert(step, layer, "max_vio", f"MoE layer {layer}: imbalanced", text)]

    # ---- checkpointed state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "dead": {str(la): sorted(es) for la, es in self._dead.items()},
            "hot": {str(la): n for la, n in self._hot.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._dead = {int(la): {int(e) for e in es} for la, es in state.get("dead", {}).items()}
        self._hot = {int(la): int(n) for la, n in state.get("hot", {}).items()}
