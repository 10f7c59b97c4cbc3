"""Gate and up as one [L, 2F, D] parameter: one GEMM each way, the seed's names outside.

The unfused reference is ``GroupedExperts.forward_reference`` (per expert, gate and up as two
matmuls over the views); the name adapter is ``split_gate_up`` / ``fuse_gate_up``, held both
ways here and by the checkpoint, reshard, ZeRO-3 and Hugging Face tests that read and write
files through it.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deepsuite.layers.mlp import swiglu_reference
from deepsuite.layers.moe import DeepSeekMoE, GroupedExperts, fuse_gate_up, split_gate_up

L, D, Fh = 4, 16, 8


class _CountMM(TorchDispatchMode):
    """Counts the GEMMs dispatched (dense and grouped)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (
            torch.ops.aten.mm,
            torch.ops.aten.addmm,
            torch.ops.aten._grouped_mm,
            torch.ops.deepsuite.grouped_mm,  # the custom op the grouped path takes in float32
        ):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _seed_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Three separate expert tensors, as the seed and every checkpoint file hold them."""
    return {
        "gate_proj": torch.randn(L, Fh, D, generator=g),
        "up_proj": torch.randn(L, Fh, D, generator=g),
        "down_proj": torch.randn(L, D, Fh, generator=g),
    }


def test_state_dict_keeps_the_seed_names_and_loads_them_back() -> None:
    torch.manual_seed(0)
    ex = GroupedExperts(L, D, Fh)
    assert [n for n, _ in ex.named_parameters()] == ["gate_up_proj", "down_proj"]
    sd = ex.state_dict()
    assert list(sd) == ["gate_proj", "up_proj", "down_proj"]
    # views, so a checkpoint costs no copy of the experts ...
    assert (
        sd["up_proj"].untyped_storage().data_ptr() == ex.gate_up_proj.untyped_storage().data_ptr()
    )
    assert torch.equal(sd["gate_proj"], ex.gate_up_proj[:, :Fh])
    assert torch.equal(sd["up_proj"], ex.gate_up_proj[:, Fh:])
    # ... and a saved file holds their one storage once: the bytes of three separate tensors
    buf, big = io.BytesIO(), GroupedExperts(8, 64, 32)
    torch.save(big.state_dict(), buf)
    assert buf.tell() < 1.1 * 4 * 3 * 8 * 64 * 32
    # seed-named tensors load (strict), and the module computes with exactly them
    other = GroupedExperts(L, D, Fh)
    seed = _seed_state(torch.Generator().manual_seed(1))
    other.load_state_dict(seed)
    x, counts = torch.randn(9, D), [3, 0, 4, 2]
    want = torch.cat(
        [
            swiglu_reference(xe, seed["gate_proj"][e], seed["up_proj"][e], seed["down_proj"][e])
            for e, xe in enumerate(torch.split(x, counts))
        ]
    )
    torch.testing.assert_close(other(x, torch.tensor(counts)), want)
    # the fused name loads too; a missing half is a missing key
    other.load_state_dict({"gate_up_proj": ex.gate_up_proj.detach(), "down_proj": ex.down_proj})
    assert torch.equal(other.gate_up_proj, ex.gate_up_proj)
    with pytest.raises(RuntimeError, match="gate_up_proj"):
        other.load_state_dict({"gate_proj": seed["gate_proj"], "down_proj": seed["down_proj"]})


def test_adapter_both_ways_on_stacked_and_nested_names() -> None:
    g = torch.Generator().manual_seed(2)
    files = {
        "layers.1.ffn.experts.gate_proj": torch.randn(6, Fh, D, generator=g),
        "layers.1.ffn.experts.up_proj": torch.randn(6, Fh, D, generator=g),
        "layers.1.ffn.experts.down_proj": torch.randn(6, D, Fh, generator=g),
        "layers.0.ffn.gate_proj.weight": torch.randn(Fh, D, generator=g),  # a dense MLP: left
        "layers.0.ffn.up_proj.weight": torch.randn(Fh, D, generator=g),
    }
    fused = fuse_gate_up(dict(files))
    assert set(fused) == set(files) - {
        "layers.1.ffn.experts.gate_proj",
        "layers.1.ffn.experts.up_proj",
    } | {"layers.1.ffn.experts.gate_up_proj"}
    assert fused["layers.1.ffn.experts.gate_up_proj"].shape == (6, 2 * Fh, D)
    back = split_gate_up(dict(fused))
    assert back.keys() == files.keys() and all(torch.equal(back[k], files[k]) for k in files)
    # under ZeRO 3 a module holds an empty placeholder: it stands for both halves, and back
    hold = split_gate_up({"m.gate_up_proj": torch.empty(0)})
    assert set(hold) == {"m.gate_proj", "m.up_proj"}
    assert fuse_gate_up(hold)["m.gate_up_proj"].shape == (0,)


def test_initialisation_draws_gate_up_down_as_three_tensors_would() -> None:
    torch.manual_seed(3)
    ex = GroupedExperts(L, D, Fh)
    torch.manual_seed(3)
    b_in, b_hid = 1 / math.sqrt(D), 1 / math.sqrt(Fh)
    gate = torch.empty(L, Fh, D).uniform_(-b_in, b_in)
    up = torch.empty(L, Fh, D).uniform_(-b_in, b_in)
    down = torch.empty(L, D, Fh).uniform_(-b_hid, b_hid)
    assert torch.equal(ex.gate_proj, gate) and torch.equal(ex.up_proj, up)
    assert torch.equal(ex.down_proj, down)


@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped_mm"])
def test_fused_equals_unfused_with_one_gate_up_gemm_each_way(grouped: bool) -> None:
    """Values and gradients equal the per-expert two-matmul reference; the loop path runs one
    GEMM for gate and up per expert forward (2 per busy expert with down) and one per operand
    backward (dx, dW_gate_up, da, dW_down: 4), the device path 2 grouped GEMMs forward, 4
    backward."""
    torch.manual_seed(4)
    dtype = torch.float32 if grouped else torch.float64
    ex = GroupedExperts(L, D, Fh).to(dtype)
    ex.use_grouped_mm = grouped
    counts = torch.tensor([3, 0, 4, 2])
    x = torch.randn(9, D, dtype=dtype, requires_grad=True)
    with _CountMM() as fwd:
        y = ex(x, counts)
    params = [x, ex.gate_up_proj, ex.down_proj]
    g = torch.randn_like(y)
    with _CountMM() as bwd:
        grads = torch.autograd.grad(y, params, g)
    y_ref = ex.forward_reference(x, counts.tolist())
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, torch.autograd.grad(y_ref, params, g), strict=True):
        torch.testing.assert_close(a, b)
    busy = int((counts > 0).sum())
    if grouped:
        assert (fwd.n, bwd.n) == (2, 4)
    else:
        assert (fwd.n, bwd.n) == (2 * busy, 4 * busy)


def test_layer_views_write_through_and_stay_out_of_the_parameters() -> None:
    m = DeepSeekMoE(D, 1, L, 2, Fh)
    with torch.no_grad():
        m.experts.up_proj.zero_()  # through the view
    assert torch.count_nonzero(m.experts.gate_up_proj[:, Fh:]) == 0
    assert torch.count_nonzero(m.experts.gate_up_proj[:, :Fh]) > 0
    names = [n for n, _ in m.named_parameters()]
    assert "experts.gate_up_proj" in names and "experts.gate_proj" not in names
    with pytest.raises(KeyError, match="already exists"):  # a view, not a parameter slot
        m.experts.gate_proj = torch.nn.Parameter(torch.zeros(L, Fh, D))
