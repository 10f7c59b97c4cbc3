"""Count the host reads (device -> host synchronisations) a piece of code makes, on any device.

On a GPU the host blocks until the device has caught up whenever it needs a value computed there:
``.item()`` / ``int(t)`` / ``bool(t)`` (aten ``_local_scalar_dense``), ``.tolist()`` / ``.cpu()``,
and every op whose output SHAPE depends on the data (``nonzero``, boolean-mask
indexing, ``masked_select``, ``bincount``, ``unique``, ``repeat_interleave`` without
``output_size``): the host must learn the size before it can allocate the output. Such reads stall
the launch queue and make a step impossible to capture as a CUDA graph.

``HostSyncCounter`` records them by watching the ops themselves (a ``TorchDispatchMode`` for aten
ops; the Tensor methods that copy to the host without an aten op when the tensor is already on the
CPU are wrapped while the counter is open, since a ``TorchFunctionMode`` does not reach into
autograd's backward), so a run on the CPU counts exactly the reads the same code makes on a GPU;
each read keeps the first frame outside torch that caused it::

    with HostSyncCounter() as reads:
        model(**batch).loss.backward()
    assert reads.count == 0, reads.report()

Not seen: reads inside compiled graphs or C++ extensions, and copies written as ``.to("cpu")``
(indistinguishable on the CPU from a no-op move to the current device).
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostRead", "HostSyncCounter", "cuda_syncs"]

_aten = torch.ops.aten
# ops that always make the host wait for a value (scalar reads, equality to a Python bool)
_ALWAYS = {
    _aten._local_scalar_dense.default,
    _aten.equal.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten.unique_consecutive.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.repeat_interleave.Tensor,
}
# indexing ops that sync only when an index is a boolean mask (it is turned into nonzero)
_MASK_INDEXED = {
    _aten.index.Tensor,
    _aten.index_put.default,
    _aten.index_put_.default,
    _aten._index_put_impl_.default,
}
# Tensor methods that copy to the host with no aten op when the tensor is already on the CPU
# (``numpy()`` is not one: it refuses device tensors, the ``.cpu()`` before it is the read)
_HOST_COPIES = ("tolist", "cpu")

_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


@dataclass(frozen=True)
class HostRead:
    """One host read: the op (``aten.nonzero.default``, ``Tensor.tolist``) and where it came
    from (``path:line in function`` of the first frame outside torch and this module)."""

    op: str
    where: str


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        # other dispatch modes stacked with this one (op counters, ...) are not the caller
        if path != _HERE and not path.startswith(_TORCH) and frame.name != "__torch_dispatch__":
            return f"{os.path.relpath(path)}:{frame.lineno} in {frame.name}"
    return "<torch internals>"


def _is_host_read(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _ALWAYS:
        # repeat_interleave with output_size given knows its size
        return not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size"))
    if func in _MASK_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        )
    if func in (_aten._to_copy.default, _aten.copy_.default):  # a real device -> host copy
        src = args[1] if func is _aten.copy_.default else args[0]
        dst_cpu = (
            args[0].device.type == "cpu"
            if func is _aten.copy_.default
            else torch.device(kwargs.get("device") or src.device).type == "cpu"
        )
        return isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst_cpu
    return False


class _Dispatch(TorchDispatchMode):
    # higher-order ops (flex_attention, checkpoint tags) run as one call: on a GPU they are
    # fused kernels, so their eager CPU decomposition is not what to count
    supports_higher_order_operators = True

    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if _is_host_read(func, args, kwargs):
            self.counter._add(str(func))
        return func(*args, **kwargs)


def _counting(counter: HostSyncCounter, name: str, method: Any) -> Any:
    def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_deepsuite_on_host", False):  # e.g. t.cpu().tolist(): read once
            return method(self, *args, **kwargs)
        counter._add(f"Tensor.{name}")
        out = method(self, *args, **kwargs)
        if name == "cpu":  # mark the host copy (an alias here, where t is already on the CPU)
            out = self.view_as(self) if out is self else out
            out._deepsuite_on_host = True
        return out

    return wrapper


class HostSyncCounter:
    """Context manager recording every host read made inside it (see the module docstring).

    Attributes: ``reads`` (list of ``HostRead`` in order), ``count``; ``by_op()`` and
    ``by_place()`` group them; ``report()`` is a readable listing for assertion messages.
    While open, ``Tensor.tolist`` / ``cpu`` are wrapped process-wide (counters do not nest);
    ``cpu()`` then returns a marked alias, so ``t.cpu().tolist()`` counts once, as on a GPU.
    """

    def __init__(self) -> None:
        self.reads: list[HostRead] = []
        self._mode: _Dispatch | None = None
        self._methods: dict[str, Any] = {}

    def _add(self, op: str) -> None:
        self.reads.append(HostRead(op, _caller()))

    @property
    def count(self) -> int:
        return len(self.reads)

    def by_op(self) -> Counter[str]:
        return Counter(r.op for r in self.reads)

    def by_place(self) -> Counter[str]:
        return Counter(f"{r.where} ({r.op})" for r in self.reads)

    def report(self) -> str:
        lines = [f"{self.count} host read(s):"]
        lines += [f"  {n} x {place}" for place, n in self.by_place().most_common()]
        return "\n".join(lines)

    def __enter__(self) -> HostSyncCounter:
        if any(getattr(torch.Tensor, n).__name__ == "wrapper" for n in _HOST_COPIES):
            raise RuntimeError("HostSyncCounter: another counter is open (they do not nest)")
        self._methods = {n: getattr(torch.Tensor, n) for n in _HOST_COPIES}
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, _counting(self, name, method))
        self._mode = _Dispatch(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._mode is not None
        self._mode.__exit__(*exc)
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        self._mode, self._methods = None, {}


def cuda_syncs(fn: Callable[[], object]) -> list[str]:
    """The synchronising CUDA calls ``fn()`` makes, as the driver layer reports them
    (``torch.cuda.set_sync_debug_mode("warn")``): the ground truth on a GPU, where the counter
    above is the CPU's stand-in. Needs CUDA."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in seen if "synchroniz" in str(w.message)]
