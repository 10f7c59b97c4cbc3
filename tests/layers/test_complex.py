"""Complex layers against torch's native complex ops, the real block expansion, per-part BN and
the whitening properties of Trabelsi et al."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.layers.complex import (
    ComplexBatchNorm1d,
    ComplexBatchNorm2d,
    ComplexConv1d,
    ComplexConv2d,
    ComplexConvTranspose2d,
    ComplexDropout,
    ComplexLayerNorm,
    ComplexLinear,
    CReLU,
    ModReLU,
    ZReLU,
    complex_from_polar,
    complex_magnitude,
    complex_phase,
    complex_rayleigh_init_,
)


def _w(layer):
    return torch.complex(layer.weight_real, layer.weight_imag).detach()


def _b(layer):
    return torch.complex(layer.bias_real, layer.bias_imag).detach()


def _randomise_bias(layer):
    with torch.no_grad():
        layer.bias_real.normal_()
        layer.bias_imag.normal_()
    return layer


@pytest.mark.parametrize(
    "kw", [{}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2, "groups": 2}]
)
def test_conv2d_equals_native_complex_conv(kw):
    torch.manual_seed(0)
    conv = _randomise_bias(ComplexConv2d(4, 6, 3, **kw).double())
    z = torch.randn(2, 4, 9, 8, dtype=torch.complex128)
    want = F.conv2d(z, _w(conv), _b(conv), **kw)
    torch.testing.assert_close(conv(z), want)
    torch.testing.assert_close(conv(torch.view_as_real(z)), torch.view_as_real(want))


def test_conv2d_equals_real_block_kernel():
    torch.manual_seed(1)
    conv = ComplexConv2d(3, 5, 3, padding=1, bias=False).double()
    x = torch.randn(2, 3, 7, 7, 2, dtype=torch.float64)
    a, b = conv.weight_real.detach(), conv.weight_imag.detach()
    block = torch.cat([torch.cat([a, -b], 1), torch.cat([b, a], 1)], 0)  # [[A, -B], [B, A]]
    real = F.conv2d(torch.cat([x[..., 0], x[..., 1]], 1), block, padding=1)
    torch.testing.assert_close(conv(x), torch.stack([real[:, :5], real[:, 5:]], -1))


def test_conv1d_and_transpose_equal_native():
    torch.manual_seed(2)
    c1 = _randomise_bias(ComplexConv1d(3, 4, 5, stride=2, padding=2).double())
    z1 = torch.randn(2, 3, 20, dtype=torch.complex128)
    torch.testing.assert_close(c1(z1), F.conv1d(z1, _w(c1), _b(c1), stride=2, padding=2))
    ct = _randomise_bias(
        ComplexConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2).double()
    )
    z2 = torch.randn(2, 4, 5, 5, dtype=torch.complex128)
    want = F.conv_transpose2d(z2, _w(ct), _b(ct), stride=2, padding=1, output_padding=1, groups=2)
    assert want.shape == (2, 6, 10, 10)
    torch.testing.assert_close(ct(z2), want)


def test_linear_equals_complex_matmul_in_both_layouts():
    torch.manual_seed(3)
    lin = _randomise_bias(ComplexLinear(5, 3).double())
    z = torch.randn(2, 7, 5, dtype=torch.complex128)
    want = z @ _w(lin).T + _b(lin)
    torch.testing.assert_close(lin(z), want)
    torch.testing.assert_close(lin(torch.view_as_real(z)), torch.view_as_real(want))


def test_rayleigh_init_statistics():
    g = torch.Generator().manual_seed(0)
    a, b = torch.empty(400, 500), torch.empty(400, 500)
    complex_rayleigh_init_(a, b, fan_in=100, fan_out=300, generator=g)
    sigma2 = 1 / 400
    mag2 = a**2 + b**2
    assert mag2.mean().item() == pytest.approx(2 * sigma2, rel=0.01)  # Var W = 2 sigma^2
    median = mag2.sqrt().median().item()
    assert median == pytest.approx(math.sqrt(sigma2 * 2 * math.log(2)), rel=0.01)
    phase = torch.atan2(b, a)
    assert abs(torch.cos(phase).mean().item()) < 0.01
    assert abs(torch.sin(phase).mean().item()) < 0.01
    assert (phase.histc(4, -math.pi, math.pi) / phase.numel() - 0.25).abs().max() < 0.01
    conv = ComplexConv2d(8, 16, 3, criterion="he")
    he = (conv.weight_real**2 + conv.weight_imag**2).mean().item()
    assert he == pytest.approx(2 / (8 * 9), rel=0.1)


def _correlated(n_batch=64, c=3, h=5, w=4, dtype=torch.float64):
    """(B, C, H, W, 2) with a different non-diagonal covariance and mean per channel."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(n_batch, c, h, w, 2, generator=g, dtype=dtype)
    mix = torch.randn(c, 2, 2, generator=g, dtype=dtype)
    shift = torch.randn(c, 2, generator=g, dtype=dtype) * 3
    return torch.einsum("bchwj,cij->bchwi", raw, mix) + shift[None, :, None, None, :]


def test_batchnorm_whitens_to_mean_zero_covariance_identity():
    x = _correlated()
    bn = ComplexBatchNorm2d(3, eps=1e-12, affine=False).double()
    y = bn(x)
    flat = y.permute(1, 0, 2, 3, 4).reshape(3, -1, 2)  # (C, N, 2)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3, 2, dtype=torch.float64))
    cov = torch.einsum("cni,cnj->cij", flat, flat) / flat.shape[1]
    torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    # the input really was correlated, so this is not a per-part standardisation
    xf = (x - x.mean((0, 2, 3), keepdim=True)).permute(1, 0, 2, 3, 4).reshape(3, -1, 2)
    assert (xf[..., 0] * xf[..., 1]).mean(1).abs().max() > 1.0


def test_batchnorm_with_zero_cross_covariance_is_per_part_batchnorm():
    x = _correlated()
    re, im = x[..., 0], x[..., 1]
    cr = re - re.mean((0, 2, 3), keepdim=True)
    ci = im - im.mean((0, 2, 3), keepdim=True)
    im = im - ((cr * ci).sum((0, 2, 3), keepdim=True) / (cr * cr).sum((0, 2, 3), keepdim=True)) * cr
    x = torch.stack([re, im], -1)  # now Vri = 0 exactly in every channel
    bn = ComplexBatchNorm2d(3, momentum=0.3).double()
    ref_re, ref_im = (nn.BatchNorm2d(3, momentum=0.3).double() for _ in range(2))
    with torch.no_grad():
        bn.gamma_rr.fill_(1.0)
        bn.gamma_ii.fill_(1.0)
        bn.beta.normal_()
        ref_re.bias.copy_(bn.beta[0])
        ref_im.bias.copy_(bn.beta[1])
    for _ in range(2):  # training: batch stats, and running stats updated as nn.BatchNorm does
        torch.testing.assert_close(bn(x), torch.stack([ref_re(re), ref_im(im)], -1))
    torch.testing.assert_close(
        bn.running_mean, torch.stack([ref_re.running_mean, ref_im.running_mean])
    )
    torch.testing.assert_close(
        bn.running_covar[[0, 2]], torch.stack([ref_re.running_var, ref_im.running_var])
    )
    for m in (bn, ref_re, ref_im):
        m.eval()
    torch.testing.assert_close(bn(x), torch.stack([ref_re(re), ref_im(im)], -1))


def test_batchnorm_is_equivariant_to_a_global_phase_rotation():
    torch.manual_seed(0)
    z = torch.view_as_complex(_correlated())
    bn = ComplexBatchNorm2d(3).double()  # default affine: gamma = I / sqrt(2), beta = 0
    rot = torch.exp(torch.tensor(1j * 0.83, dtype=torch.complex128))
    out = bn(z)
    assert out.is_complex()
    torch.testing.assert_close(bn(z * rot), out * rot)


def test_batchnorm1d_on_sequences_and_vectors():
    torch.manual_seed(0)
    z = torch.randn(32, 4, 10, dtype=torch.complex128) * 2 + 1
    y = ComplexBatchNorm1d(4, affine=False).double()(z)
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(4, dtype=torch.complex128))
    y2 = ComplexBatchNorm1d(4, affine=False).double()(z[..., 0])
    torch.testing.assert_close(
        (y2.abs() ** 2).mean(0), torch.full((4,), 2.0, dtype=torch.float64), rtol=1e-4, atol=1e-4
    )  # E|z|^2 = trace(I) = 2


def test_gradcheck_float64_and_complex128():
    torch.manual_seed(0)
    bn = ComplexBatchNorm2d(2).double()
    with torch.no_grad():
        bn.gamma_ri.fill_(0.3)
    x = torch.randn(3, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bn, (x,))
    conv = ComplexConv2d(2, 2, 2).double()
    z = torch.randn(2, 2, 3, 3, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(conv(t)), (z,))
    ln = ComplexLayerNorm(4).double()
    assert torch.autograd.gradcheck(
        lambda t: torch.view_as_real(ln(t)),
        (torch.randn(3, 4, dtype=torch.complex128, requires_grad=True),),
    )
    mr = ModReLU(2, bias_init=-0.2).double()
    assert torch.autograd.gradcheck(
        mr, (torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True),)
    )


def test_layernorm_whitens_each_sample():
    torch.manual_seed(0)
    z = torch.randn(5, 64, dtype=torch.complex128) * (1 + 2j) + 0.5
    y = torch.view_as_real(ComplexLayerNorm(64, eps=1e-12, elementwise_affine=False).double()(z))
    torch.testing.assert_close(y.mean(1), torch.zeros(5, 2, dtype=torch.float64))
    cov = torch.einsum("bni,bnj->bij", y, y) / 64
    torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64).expand(5, 2, 2))


def test_activations():
    z = torch.tensor([[3 + 4j, -1 + 2j, 0.5 - 0.1j, -2 - 2j]], dtype=torch.complex128)
    torch.testing.assert_close(CReLU()(z), torch.tensor([[3 + 4j, 2j, 0.5, 0]], dtype=z.dtype))
    torch.testing.assert_close(ZReLU()(z), torch.tensor([[3 + 4j, 0, 0, 0]], dtype=z.dtype))
    m = ModReLU(4, feature_dim=-1, eps=1e-9).double()
    with torch.no_grad():
        m.bias.copy_(torch.tensor([-1.0, -3.0, 0.5, 0.0]))
    want = F.relu(z.abs() + m.bias.detach()) * z / (z.abs() + 1e-9)
    torch.testing.assert_close(m(z), want.detach())
    assert m(z)[0, 1] == 0  # |z| = sqrt 5 < 3
    torch.testing.assert_close(m(torch.view_as_real(z)), torch.view_as_real(want.detach()))


def test_dropout_uses_one_mask_for_both_parts():
    torch.manual_seed(0)
    x = torch.randn(1000, 8, 2).abs() + 0.1
    drop = ComplexDropout(0.4)
    y = drop(x)
    dropped = y == 0
    assert torch.equal(dropped[..., 0], dropped[..., 1])
    assert 0.35 < dropped[..., 0].float().mean() < 0.45
    torch.testing.assert_close(y[~dropped], (x / 0.6)[~dropped])
    drop.eval()
    assert drop(x) is x


def test_polar_helpers_agree_with_torch():
    z = torch.randn(6, 3, dtype=torch.complex128)
    torch.testing.assert_close(complex_magnitude(z), z.abs())
    torch.testing.assert_close(complex_phase(torch.view_as_real(z)), z.angle())
    torch.testing.assert_close(complex_from_polar(z.abs(), z.angle(), native=True), z)
    torch.testing.assert_close(complex_from_polar(z.abs(), z.angle()), torch.view_as_real(z))


def test_bad_arguments_raise_clear_errors():
    conv = ComplexConv2d(4, 8, 3)
    with pytest.raises(ValueError, match="last dim 2"):
        conv(torch.randn(1, 4, 6, 6, 3))
    with pytest.raises(ValueError, match="in_channels=4"):
        conv(torch.randn(1, 3, 6, 6, 2))
    with pytest.raises(ValueError, match="num_features=8"):
        ComplexBatchNorm2d(8)(torch.randn(2, 4, 3, 3, 2))
    with pytest.raises(ValueError, match="complex dims"):
        ComplexBatchNorm2d(4)(torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="groups"):
        ComplexConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="in_features=5"):
        ComplexLinear(5, 2)(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="momentum"):
        ComplexBatchNorm1d(4, momentum=1.5)
    with pytest.raises(ValueError, match="p must"):
        ComplexDropout(1.2)
    with pytest.raises(ValueError, match="criterion"):
        ComplexLinear(2, 2, criterion="lecun")


def test_seed_readme_usage():
    torch.manual_seed(0)
    conv = ComplexConv2d(in_channels=64, out_channels=128, kernel_size=3, padding=1)
    bn = ComplexBatchNorm2d(128)
    x_complex = torch.randn(2, 64, 6, 5, 2)  # last dim: [real, imag]
    out = bn(conv(x_complex))
    assert out.shape == (2, 128, 6, 5, 2)
    # default affine gamma = I / sqrt(2): E|out|^2 per channel is 2 * 1/2 = 1
    power = out.pow(2).sum(-1).mean((0, 2, 3))
    torch.testing.assert_close(power, torch.ones(128), rtol=1e-3, atol=1e-3)
