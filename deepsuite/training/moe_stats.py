"""Load-balance statistics of MoE layers, computed from global per-expert token counts.

Pure: numpy, no torch.distributed. The trainer sums the counts over every data-parallel rank and
micro-batch (the global batch) and passes them here once per optimizer step, as device tensors:
the tracker keeps them there and reads everything it holds in one transfer when metrics are
asked for (once per logging interval), so a training step never waits for the host.

Legend: E experts, T tokens, R expert-parallel ranks, W window length (steps).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

__all__ = [
    "MoEStatsTracker",
    "comm_stats",
    "flops_per_token",
    "load_entropy",
    "max_vio",
    "mfu",
]


def _as_vector(x: Any, name: str, n: int | None = None) -> np.ndarray:
    """Converts a list / numpy array / torch tensor to a float64 vector, checking its length."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().to("cpu").double().numpy()
    try:
        v = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(x).__name__}") from e
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(v.shape)}")
    if n is not None and v.shape[0] != n:
        raise ValueError(f"{name} must have length {n} (n_experts), got {v.shape[0]}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    return v


def max_vio(counts_E: Any) -> float:
    """MaxVio = (max_i c_i - mean c) / mean c (DeepSeek loss-free balancing paper).

    0 means perfectly balanced; E - 1 means every token went to one expert. Defined as 0 when no
    tokens were routed at all.
    """
    c = _as_vector(counts_E, "counts_E")
    if c.size == 0:
        raise ValueError("counts_E must have at least one expert")
    mean = c.mean()
    return 0.0 if mean <= 0 else float((c.max() - mean) / mean)


def load_entropy(counts_E: Any) -> float:
    """Entropy of the token share p_i = c_i / sum c, divided by log E: 1 = uniform, 0 = collapse."""
    c = _as_vector(counts_E, "counts_E")
    total = c.sum()
    if c.size < 2 or total <= 0:
        return 1.0
    p = c[c > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(c.size))


def comm_stats(
    tokens_received_R: Any,
    *,
    a2a_bytes: float | None = None,
    a2a_time_s: float | None = None,
    a2a_bytes_R: Any = None,
    a2a_time_R: Any = None,
) -> dict[str, float]:
    """Per expert-parallel rank keys: tokens each rank received (the straggler view), all-to-all
    bytes and seconds for the step, in total and (given the per-rank vectors) per rank.
    `comm/straggler` = max / mean tokens received (1 = even)."""
    t = _as_vector(tokens_received_R, "tokens_received_R")
    out: dict[str, float] = {f"comm/rank{r}/tokens_received": float(v) for r, v in enumerate(t)}
    mean = t.mean() if t.size else 0.0
    out["comm/straggler"] = float(t.max() / mean) if mean > 0 else 1.0
    if a2a_bytes is not None:
        out["comm/a2a_bytes"] = float(a2a_bytes)
    if a2a_time_s is not None:
        out["comm/a2a_time"] = float(a2a_time_s)
    for name, per_rank in (("a2a_bytes", a2a_bytes_R), ("a2a_time", a2a_time_R)):
        if per_rank is not None:
            v = _as_vector(per_rank, f"{name}_R", t.size)
            out.update({f"comm/rank{r}/{name}": float(x) for r, x in enumerate(v)})
    return out


def flops_per_token(active_params: int, *, n_layers: int, seq_len: int, attn_dim: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward matmuls over the ACTIVATED parameters)
    plus 12 L S d for attention scores and values (PaLM paper, appendix B). attn_dim is the
    per-layer sum of head dims used in q.k (n_heads * qk_head_dim)."""
    for name, v in (("active_params", active_params), ("n_layers", n_layers)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if seq_len <= 0 or attn_dim <= 0:
        raise ValueError(f"seq_len and attn_dim must be > 0, got {seq_len}, {attn_dim}")
    return 6.0 * active_params + 12.0 * n_layers * seq_len * attn_dim


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak (all devices)."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak_flops_per_s must be > 0, got {peak_flops_per_s}")
    return float(tokens_per_s * flops_per_tok / peak_flops_per_s)


class MoEStatsTracker:
    """Accumulates per-layer global expert counts and produces namespaced metric keys.

    Call `update(layer, counts_E, bias_E)` once per optimizer step for every MoE layer, and
    `metrics()` on the steps you log. The "window" is the last `window` updates of a layer
    (fewer at the start of a run); `moe/window_steps` says how many it holds, and window MaxVio,
    dead experts and `load_window` are all computed from the same summed counts. The batch
    figures are from the latest update. Tensors passed to `update` stay where they are (only
    their shape is checked; each expert's run of steps without a token is counted beside them,
    on their device) until a reader (`metrics()`, `window_counts()`, `steps_without_tokens()`,
    `state_dict()`) reads them all at once; plain numbers are checked on the spot. The window,
    the latest values and the runs without a token are state: `state_dict()` /
    `load_state_dict()` carry them through a checkpoint (plain JSON types), so a resumed run
    logs what an uninterrupted one logs.

    Keys, for layer L (the model's layer index):
      moe/layerL/load            list of E token counts of the latest global batch
      moe/layerL/load_window     list of E token counts summed over the window
      moe/layerL/max_vio         MaxVio of the latest batch
      moe/layerL/max_vio_global  MaxVio of load_window (the window's MaxVio)
      moe/layerL/load_min|max    fewest / most tokens any expert received in the batch
      moe/layerL/load_entropy    normalised entropy of the token shares (1 = uniform)
      moe/layerL/dead_experts    experts that received no token in the whole window
      moe/layerL/entropy         router entropy (nats), when given
      moe/layerL/bias, bias_mean|min|max   the balancing bias, when given
      moe/layerL/seq_aux_loss    the sequence-wise balance loss, when given
      moe/max_vio, moe/max_vio_global      mean over layers; moe/max_vio_worst = max over layers
      moe/window_steps           steps the window holds (the same for every layer)
    """

    def __init__(self, n_experts: int, *, window: int = 100) -> None:
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (steps), got {window!r}")
        self.n_experts = n_experts
        self.window = window
        self._counts: dict[int, deque[np.ndarray]] = {}
        self._latest: dict[int, dict[str, Any]] = {}
        self._zero_run: dict[int, np.ndarray] = {}  # [E] consecutive updates without a token

    def update(
        self,
        layer: int,
        counts_E: Any,
        bias_E: Any = None,
        *,
        entropy: Any = None,
        seq_aux_loss: Any = None,
    ) -> None:
        """Records one optimizer step of one layer. counts_E: [E] tokens per expert over the
        global batch; bias_E: [E] balancing bias (float32 in the model) or None; entropy and
        seq_aux_loss: numbers or 0-d tensors. A tensor bias is copied (the model updates its own
        in place)."""
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {layer!r}")
        latest: dict[str, Any] = {"counts": self._vector(counts_E, "counts_E")}
        if bias_E is not None:
            latest["bias"] = self._vector(bias_E, "bias_E")
        for key, v in (("entropy", entropy), ("seq_aux_loss", seq_aux_loss)):
            if v is not None:
                latest[key] = v.detach().reshape(1) if hasattr(v, "detach") else float(v)
        self._counts.setdefault(layer, deque(maxlen=self.window)).append(latest["counts"])
        self._latest[layer] = latest
        self._zero_run[layer] = _zero_run(latest["counts"], self._zero_run.get(layer))

    def _vector(self, x: Any, name: str) -> Any:
        """A tensor (shape checked, kept on its device) or a validated float64 numpy vector."""
        if hasattr(x, "detach"):
            if tuple(x.shape) != (self.n_experts,):
                raise ValueError(
                    f"{name} must have length {self.n_experts} (n_experts), got {tuple(x.shape)}"
                )
            return x.detach().clone()
        return _checked(_as_vector(x, name, self.n_experts), name)

    def _read(self) -> None:
        """Replace every tensor held by numpy values, in one transfer per device."""
        slots: list[tuple[Any, Any, str]] = []  # (container, key, name)
        for layer, latest in self._latest.items():
            slots += [(latest, k, k) for k, v in latest.items() if hasattr(v, "detach")]
            q = self._counts[layer]
            slots += [(q, i, "counts_E") for i, v in enumerate(q) if hasattr(v, "detach")]
            if hasattr(self._zero_run[layer], "detach"):
                slots.append((self._zero_run, layer, "zero_run"))
        by_device: dict[Any, list[tuple[Any, Any, str]]] = {}
        for slot in slots:
            by_device.setdefault(slot[0][slot[1]].device, []).append(slot)
        for group in by_device.values():
            flat = _host_concat([c[k] for c, k, _ in group])
            start = 0
            for container, key, name in group:
                n = container[key].numel()
                v = flat[start : start + n]
                start += n
                if name in ("entropy", "seq_aux_loss"):
                    container[key] = float(v[0])
                elif name == "zero_run":
                    container[key] = v.astype(np.int64)
                else:
                    container[key] = _checked(_as_vector(v, name, self.n_experts), name)

    @property
    def layers(self) -> list[int]:
        return sorted(self._latest)

    @property
    def window_steps(self) -> int:
        """Updates the window holds now: `window`, or fewer early in a run (0 before any)."""
        return max((len(d) for d in self._counts.values()), default=0)

    def window_counts(self, layer: int) -> np.ndarray:
        """[E] tokens per expert summed over the last `window` updates of `layer`."""
        if layer not in self._counts:
            raise ValueError(f"layer {layer} has no updates; known layers: {self.layers}")
        self._read()
        return np.sum(np.stack(list(self._counts[layer])), axis=0)

    def steps_without_tokens(self, layer: int) -> np.ndarray:
        """[E] for each expert of `layer`, the consecutive latest updates it received no token."""
        if layer not in self._zero_run:
            raise ValueError(f"layer {layer} has no updates; known layers: {self.layers}")
        self._read()
        return self._zero_run[layer].copy()

    def metrics(self) -> dict[str, float | int | list[float]]:
        """The keys listed in the class docstring, for every layer updated so far."""
        self._read()
        out: dict[str, float | int | list[float]] = {}
        vios, vios_g = [], []
        for layer in self.layers:
            p = f"moe/layer{layer}/"
            latest = self._latest[layer]
            c = latest["counts"]
            cw = self.window_counts(layer)
            vio, vio_g = max_vio(c), max_vio(cw)
            vios.append(vio)
            vios_g.append(vio_g)
            out[p + "load"] = [_num(v) for v in c]
            out[p + "load_window"] = [_num(v) for v in cw]
            out[p + "max_vio"] = vio
            out[p + "max_vio_global"] = vio_g
            out[p + "load_min"] = _num(c.min())
            out[p + "load_max"] = _num(c.max())
            out[p + "load_entropy"] = load_entropy(c)
            out[p + "dead_experts"] = int((cw == 0).sum())
            if "entropy" in latest:
                out[p + "entropy"] = latest["entropy"]
            if "bias" in latest:
                b = latest["bias"]
                out[p + "bias"] = [float(v) for v in b]
                out[p + "bias_mean"] = float(b.mean())
                out[p + "bias_min"] = float(b.min())
                out[p + "bias_max"] = float(b.max())
            if "seq_aux_loss" in latest:
                out[p + "seq_aux_loss"] = latest["seq_aux_loss"]
        if vios:
            out["moe/max_vio"] = float(np.mean(vios))
            out["moe/max_vio_global"] = float(np.mean(vios_g))
            out["moe/max_vio_worst"] = float(np.max(vios))
            out["moe/window_steps"] = self.window_steps
        return out

    # ---- checkpointed state (plain JSON: lists, numbers; floats round-trip exactly) ---------
    def state_dict(self) -> dict[str, Any]:
        self._read()
        layers = {}
        for layer in self.layers:
            latest = self._latest[layer]
            layers[str(layer)] = {
                "window": [[_num(v) for v in c] for c in self._counts[layer]],
                "latest": {
                    k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in latest.items()
                },
                "steps_without_tokens": self._zero_run[layer].tolist(),
            }
        return {"n_experts": self.n_experts, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()` output. A different `window` keeps the newest counts."""
        if state.get("n_experts") != self.n_experts:
            raise ValueError(
                f"metrics window: saved for {state.get('n_experts')} experts per layer, this "
                f"run has moe.n_routed_experts={self.n_experts}"
            )
        self._counts, self._latest, self._zero_run = {}, {}, {}
        for key, s in state["layers"].items():
            layer = int(key)
            window = [_as_vector(c, "window counts", self.n_experts) for c in s["window"]]
            self._counts[layer] = deque(window, maxlen=self.window)
            self._latest[layer] = {
                k: _as_vector(v, k, self.n_experts) if isinstance(v, list) else float(v)
                for k, v in s["latest"].items()
            }
            self._zero_run[layer] = np.asarray(s["steps_without_tokens"], dtype=np.int64)


def _checked(c: np.ndarray, name: str) -> np.ndarray:
    if name == "counts_E" and np.any(c < 0):
        raise ValueError(f"counts_E must be >= 0, got {c.tolist()}")
    return c


def _zero_run(counts_E: Any, run_E: Any) -> Any:
    """[E] consecutive updates without a token, after `counts_E` (run_E: the runs before it, or
    None). Computed where the counts are: a tensor's runs stay on its device, unread."""
    zero_E = counts_E == 0
    if hasattr(counts_E, "detach"):
        zero_E = zero_E.long()
        if run_E is not None and not hasattr(run_E, "detach"):  # restored from a checkpoint
            run_E = zero_E.new_tensor(run_E)
    else:
        zero_E = zero_E.astype(np.int64)
    return zero_E if run_E is None else (run_E + 1) * zero_E


def _host_concat(tensors: list[Any]) -> np.ndarray:
    """One device -> host copy of several same-device tensors, as float64."""
    import torch  # the tracker itself needs numpy only

    return torch.cat([t.double().reshape(-1) for t in tensors]).cpu().numpy()


def _num(v: float) -> float | int:
    """Token counts are integers: keep them as ints in jsonl so they read back exactly."""
    f = float(v)
    return int(f) if f.is_integer() else f
