"""ResNet v1.5 bottleneck blocks: 2-D (images) and 1-D (sequence features).

Shapes: 2-D (B, C, H, W) -> (B, planes * 4, H / stride, W / stride);
1-D (B, C, L) -> (B, planes * 4, L / stride). B batch, C channels, L sequence length.

1x1 conv -> norm -> ReLU -> 3x3 conv (stride, groups, dilation here: "v1.5") -> norm -> ReLU
-> 1x1 conv (x4 channels) -> norm, plus the shortcut, then ReLU. The shortcut is a 1x1 strided
conv + norm when the stride or channel count changes (built automatically unless a
``downsample`` module is given). Names and state-dict keys follow torchvision's Bottleneck, so
its weights load as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]


def _check_args(
    inplanes: int, planes: int, stride: int, groups: int, base_width: int, dilation: int
) -> None:
    for name, value in (
        ("inplanes", inplanes),
        ("planes", planes),
        ("stride", stride),
        ("groups", groups),
        ("base_width", base_width),
        ("dilation", dilation),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class _BottleneckNd(nn.Module):
    expansion: int = 4
    _conv: type[nn.Module]
    _norm: type[nn.Module]

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormFactory | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_args(inplanes, planes, stride, groups, base_width, dilation)
        width = int(planes * (base_width / 64.0)) * groups
        if width % groups:
            raise ValueError(f"width {width} must be divisible by groups={groups}")
        norm = norm_layer or self._norm
        out = planes * self.expansion
        conv = self._conv
        self.conv1 = conv(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = conv(
            width,
            width,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            groups=groups,
            dilation=dilation,
            bias=False,
        )
        self.bn2 = norm(width)
        self.conv3 = conv(width, out, kernel_size=1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if downsample is None and (stride != 1 or inplanes != out):
            self.downsample = nn.Sequential(
                conv(inplanes, out, kernel_size=1, stride=stride, bias=False), norm(out)
            )
        self.stride = stride
        self.inplanes, self.planes = inplanes, planes
        self._init_weights(zero_init_residual)
        if downsample is not None:  # a caller's module keeps its own initialisation
            self.downsample = downsample

    def _init_weights(self, zero_init_residual: bool) -> None:
        # As torchvision's ResNet does for its blocks: He init for convs, norms at (1, 0).
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif getattr(m, "weight", None) is not None and isinstance(
                m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
            ):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual and getattr(self.bn3, "weight", None) is not None:
            # The block then starts as (nearly) the identity: gamma of the last norm is 0.
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self._ndim or x.shape[1] != self.inplanes:
            raise ValueError(
                f"x must be {self._layout} with C=inplanes={self.inplanes}, "
                f"got shape {tuple(x.shape)}"
            )
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def extra_repr(self) -> str:
        return f"inplanes={self.inplanes}, planes={self.planes}, stride={self.stride}"


class Bottleneck(_BottleneckNd):
    """ResNet v1.5 bottleneck on images: (B, inplanes, H, W) -> (B, planes * 4, H', W').

    Arguments as torchvision's ``Bottleneck(inplanes, planes, stride, downsample, groups,
    base_width, dilation, norm_layer)``; inner width = planes * base_width / 64 * groups.
    ``zero_init_residual`` zeroes the last norm's gamma. Bottleneck(256, 64) has 70,400
    parameters.
    """

    _conv = nn.Conv2d
    _norm = nn.BatchNorm2d
    _ndim = 4
    _layout = "(B, C, H, W)"


class Bottleneck1d(_BottleneckNd):
    """1-D bottleneck for sequence features: (B, inplanes, L) -> (B, planes * 4, L').

    Same structure and arguments as :class:`Bottleneck` with Conv1d / BatchNorm1d (kernel 3 on
    the sequence axis). For (B, L, D) hidden states, transpose to (B, D, L) first.
    """

    _conv = nn.Conv1d
    _norm = nn.BatchNorm1d
    _ndim = 3
    _layout = "(B, C, L)"
