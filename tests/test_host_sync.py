"""HostSyncCounter: counts exactly the ops that make a GPU wait for the host, forward and backward."""

from __future__ import annotations

import pytest
import torch

from deepsuite.host_sync import HostSyncCounter


def _count(fn) -> HostSyncCounter:
    with HostSyncCounter() as reads:
        fn()
    return reads


@pytest.mark.parametrize(
    ("name", "fn", "op"),
    [
        ("item", lambda t: t.sum().item(), "aten._local_scalar_dense.default"),
        ("int", lambda t: int(t.max()), "aten._local_scalar_dense.default"),
        ("bool", lambda t: bool((t > 0).any()), "aten._local_scalar_dense.default"),
        ("tolist", lambda t: t.tolist(), "Tensor.tolist"),
        ("cpu", lambda t: t.cpu(), "Tensor.cpu"),
        ("cpu then tolist", lambda t: t.cpu().tolist(), "Tensor.cpu"),
        ("cpu then numpy", lambda t: t.double().cpu().numpy(), "Tensor.cpu"),
        ("nonzero", lambda t: t.nonzero(), "aten.nonzero.default"),
        ("mask index", lambda t: t[t > 1], "aten.index.Tensor"),
        ("mask assign", lambda t: t.clone().__setitem__(t > 1, 0), "aten.index_put_.default"),
        ("masked_select", lambda t: t.masked_select(t > 1), "aten.masked_select.default"),
        ("bincount", lambda t: torch.bincount(t, minlength=8), "aten.bincount.default"),
        ("unique", lambda t: torch.unique(t), "aten._unique2.default"),
        (
            "repeat_interleave",
            lambda t: torch.repeat_interleave(t),
            "aten.repeat_interleave.Tensor",
        ),
        ("equal", lambda t: torch.equal(t, t), "aten.equal.default"),
    ],
)
def test_each_kind_of_host_read_counts_once(name, fn, op):
    t = torch.tensor([3, 0, 2, 1])
    reads = _count(lambda: fn(t))
    assert reads.count == 1 and reads.by_op() == {op: 1}, reads.report()
    assert "test_host_sync.py" in reads.reads[0].where  # the caller, not torch's internals


def test_static_shape_ops_are_not_host_reads():
    t = torch.tensor([3, 0, 2, 1])

    def static():
        order = torch.sort(t, stable=True)[1]
        bins = torch.zeros(5, dtype=torch.int64).scatter_add_(0, t, torch.ones_like(t))
        torch.nonzero_static(t > 1, size=2)
        torch.repeat_interleave(t, output_size=6)
        torch._assert_async((t >= 0).all(), "never raised")
        torch.where(t > 1, t, bins[:4]).index_select(0, order)
        t.clone()[torch.tensor([0, 2])] = 7  # integer index: no mask, no sync

    assert _count(static).count == 0


def test_backward_reads_are_counted_with_their_place():
    class Peek(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            g.tolist()
            return g * 2

    x = torch.ones(3, requires_grad=True)
    reads = _count(lambda: Peek.apply(x).pow(2).sum().backward())
    assert reads.by_op() == {"Tensor.tolist": 1}
    assert "in backward" in reads.report()


def test_counters_do_not_nest_and_restore_the_methods():
    tolist = torch.Tensor.tolist
    with HostSyncCounter(), pytest.raises(RuntimeError, match="do not nest"):
        HostSyncCounter().__enter__()
    assert torch.Tensor.tolist is tolist
    assert _count(lambda: torch.ones(2).tolist()).count == 1
    assert torch.Tensor.tolist is tolist
