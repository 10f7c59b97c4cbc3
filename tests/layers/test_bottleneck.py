"""Bottleneck against an independent functional re-computation, hand values and torchvision's
parameter counts and state-dict keys (torchvision itself does not import beside this torch)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepsuite.layers.bottleneck import Bottleneck, Bottleneck1d


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _bn(x, bn: nn.BatchNorm2d | nn.BatchNorm1d, training: bool):
    # copies of the running stats: the module's own forward updates the originals
    return F.batch_norm(
        x,
        bn.running_mean.clone(),
        bn.running_var.clone(),
        bn.weight,
        bn.bias,
        training,
        0.0,
        bn.eps,
    )


def _reference(block, x, training: bool, conv=F.conv2d):
    """The block written out with torch.nn.functional from the same weights."""
    sd = block.state_dict()
    s, g, d = block.stride, block.conv2.groups, block.conv2.dilation[0]
    out = F.relu(_bn(conv(x, sd["conv1.weight"]), block.bn1, training))
    out = conv(out, sd["conv2.weight"], stride=s, padding=d, dilation=d, groups=g)
    out = F.relu(_bn(out, block.bn2, training))
    out = _bn(conv(out, sd["conv3.weight"]), block.bn3, training)
    idt = x
    if block.downsample is not None:
        idt = _bn(conv(x, sd["downsample.0.weight"], stride=s), block.downsample[1], training)
    return F.relu(out + idt)


def _randomise_norms(block):
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def test_parameter_counts_match_torchvision():
    assert _n_params(Bottleneck(256, 64)) == 70_400
    # resnet50 layer1[0] (projection 64 -> 256) and layer2[0] (stride 2, 256 -> 512)
    assert _n_params(Bottleneck(64, 64)) == 75_008
    assert _n_params(Bottleneck(256, 128, stride=2)) == 379_392
    # resnext50_32x4d layer1[0]: width = 64 * 4/64 * 32 = 128
    assert _n_params(Bottleneck(64, 64, groups=32, base_width=4)) == 63_488


def test_state_dict_keys_are_torchvision_s():
    keys = set(Bottleneck(64, 64).state_dict())
    want = {"conv1.weight", "conv2.weight", "conv3.weight", "downsample.0.weight"}
    for bn in ("bn1", "bn2", "bn3", "downsample.1"):
        want |= {
            f"{bn}.{k}"
            for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
    assert keys == want
    assert "downsample.0.weight" not in Bottleneck(256, 64).state_dict()


@pytest.mark.parametrize(
    ("inplanes", "planes", "stride", "groups", "base_width", "dilation"),
    [(256, 64, 1, 1, 64, 1), (32, 16, 2, 1, 64, 1), (32, 8, 2, 4, 32, 1), (16, 8, 1, 2, 64, 2)],
)
@pytest.mark.parametrize("training", [False, True])
def test_matches_functional_recomputation(
    inplanes, planes, stride, groups, base_width, dilation, training
):
    torch.manual_seed(0)
    block = Bottleneck(
        inplanes, planes, stride, groups=groups, base_width=base_width, dilation=dilation
    ).double()
    _randomise_norms(block)
    block.train(training)
    x = torch.randn(2, inplanes, 9, 9, dtype=torch.float64)
    want = _reference(block, x, training)
    got = block(x)
    assert got.shape == (2, planes * 4, (9 - 1) // stride + 1, (9 - 1) // stride + 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [False, True])
def test_1d_matches_functional_recomputation(training):
    torch.manual_seed(0)
    block = Bottleneck1d(12, 8, stride=2, groups=2).double()
    _randomise_norms(block)
    block.train(training)
    x = torch.randn(3, 12, 17, dtype=torch.float64)
    torch.testing.assert_close(block(x), _reference(block, x, training, conv=F.conv1d))
    assert block(x).shape == (3, 32, 9)


def test_hand_computed_values():
    block = Bottleneck(4, 1).eval()  # 4 -> 1 -> 1 -> 4 channels: identity shortcut
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(1.0 - m.eps)  # eval norm becomes the identity
    out = block(torch.ones(1, 4, 3, 3))
    # conv1: 4 per pixel; 3x3 ones: 4 * (#pixels under the kernel); conv3: same; shortcut: x = 1
    want = torch.tensor([[16.0, 24.0, 16.0], [24.0, 36.0, 24.0], [16.0, 24.0, 16.0]]) + 1.0
    torch.testing.assert_close(out, want.expand(1, 4, 3, 3))
    assert block.downsample is None
    # with stride 2 the projection shortcut (1x1 ones over 4 channels) adds 4 at pixels 0 and 2
    block2 = Bottleneck(4, 1, stride=2).eval()
    with torch.no_grad():
        for name, p in block2.named_parameters():
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        for m in block2.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(1.0 - m.eps)
    out2 = block2(torch.ones(1, 4, 3, 3))
    torch.testing.assert_close(out2, torch.full((1, 4, 2, 2), 20.0))


def test_zero_init_residual_starts_as_identity():
    torch.manual_seed(0)
    block = Bottleneck(32, 8, zero_init_residual=True)
    assert torch.all(block.bn3.weight == 0)
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(block(x), F.relu(x))
    assert torch.all(Bottleneck(32, 8).bn3.weight == 1)


def test_given_downsample_is_used_and_left_alone():
    torch.manual_seed(0)
    ds = nn.Conv2d(8, 16, 1, stride=2)
    w = ds.weight.detach().clone()
    block = Bottleneck(8, 4, stride=2, downsample=ds)
    assert block.downsample is ds
    torch.testing.assert_close(ds.weight, w)


def test_trains_and_gradients_reach_input():
    torch.manual_seed(0)
    block = Bottleneck1d(8, 4)
    x = torch.randn(4, 8, 10, requires_grad=True)
    block(x).square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="planes"):
        Bottleneck(64, 0)
    with pytest.raises(ValueError, match="stride"):
        Bottleneck(64, 16, stride=0)
    with pytest.raises(ValueError, match="inplanes=64"):
        Bottleneck(64, 16)(torch.randn(1, 32, 4, 4))
    with pytest.raises(ValueError, match="B, C, L"):
        Bottleneck1d(8, 2)(torch.randn(1, 8, 4, 4))
