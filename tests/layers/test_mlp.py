import pytest
import torch

from deepsuite.layers.mlp import SwiGLU, swiglu_reference


def test_swiglu_matches_formula_and_grads():
    torch.manual_seed(0)
    m = SwiGLU(12, 20).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    ref = swiglu_reference(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    out = m(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref)
    assert torch.autograd.gradcheck(m, (x[:1, :2].detach().requires_grad_(),))


def test_swiglu_param_count_and_errors():
    assert sum(p.numel() for p in SwiGLU(8, 16).parameters()) == 3 * 8 * 16
    with pytest.raises(ValueError, match="d_hidden"):
        SwiGLU(8, 0)
    with pytest.raises(TypeError, match="d_model"):
        SwiGLU(8.0, 4)
    with pytest.raises(ValueError, match="d_model=8"):
        SwiGLU(8, 4)(torch.randn(2, 7))
