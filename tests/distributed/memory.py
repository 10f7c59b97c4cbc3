"""Live tensor bytes of one rank over a training step, from the allocator's events (not RSS).

Used to hold the planner's memory rules to a real DeepSpeed engine. The probe runs torch's
profiler from before the model is built to after the measured step, and replays its allocation
events (address, size) in order: the live bytes at any moment are those allocated during the
profile and not yet freed, so everything the run allocates is counted and nothing else. The
census of tensors the garbage collector can see, at the end, must agree (``census``).

    probe = StepMemory()                  # before building the model
    ...build the engine, take a first step (optimizer states are created lazily)...
    with probe.phase("forward_backward"):  loss = engine(...); engine.backward(loss)
    with probe.phase("step"):              engine.step()
    probe.result()  # bytes: after_backward, peak_backward, peak_step, after_step, census
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["StepMemory", "live_storage_bytes"]


def live_storage_bytes() -> int:
    """Bytes of the distinct CPU storages of every tensor the garbage collector can see."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.device.type == "cpu":
                s = obj.untyped_storage()
                if s.data_ptr():
                    seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, ReferenceError):  # tensors without a plain storage
            continue
    return sum(seen.values())


class StepMemory:
    """Profiles from construction to :meth:`result` (see the module docstring)."""

    def __init__(self) -> None:
        self._before = live_storage_bytes()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with record_function(f"probe:{name}"):
            yield

    def result(self) -> dict[str, int]:
        from torch._C._profiler import _EventType

        self._prof.__exit__(None, None, None)
        census = live_storage_bytes() - self._before
        allocs, phases = [], {}
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            stack.extend(e.children)
            if e.typed[0] == _EventType.Allocation:
                f = e.typed[1]
                if f.device.type == "cpu":
                    allocs.append((e.start_time_ns, f.ptr, f.alloc_size))
            elif e.name.startswith("probe:"):
                phases[e.name[6:]] = (e.start_time_ns, e.end_time_ns)
        (fb0, fb1), (st0, st1) = phases["forward_backward"], phases["step"]
        live: dict[int, int] = {}
        now, at = 0, {}
        peak = {"backward": 0, "step": 0}
        for t, ptr, size in sorted(allocs):
            if t > fb0 and "start" not in at:
                at["start"] = now
            if t > fb1 and "after_backward" not in at:
                at["after_backward"] = now
            if size > 0:
                now += size - live.pop(ptr, 0)  # a reused address: its free was not seen
                live[ptr] = size
            elif ptr in live:  # blocks from before the profile are not tracked
                now -= live.pop(ptr)
            if fb0 <= t <= fb1:
                peak["backward"] = max(peak["backward"], now)
            elif st0 <= t <= st1:
                peak["step"] = max(peak["step"], now)
        start = at.get("start", now)
        after_backward = at.get("after_backward", now)
        return {
            "start": start,
            "after_backward": after_backward,
            "peak_backward": max(start, peak["backward"]),
            "peak_step": max(after_backward, peak["step"]),
            "after_step": now,
            "census": census,
        }
