"""RedNet: Li et al., "Involution: Inverting the Inherence of Convolution for Visual Recognition", CVPR 2021.

Involution generates a k x k kernel per pixel from that pixel's features and shares it across the
16 channels of a group: ``out[c, y, x] = sum_t kernel[g(c), t, y, x] * x[c, tap_t(y, x)]``.
RedNet is a ResNet whose bottleneck 3x3 is ``involution(width, 7, stride)`` and whose stem holds a
3x3 involution.

Built to compute what the authors' code computes (d-li14/involution, mmcls ``rednet.py`` and
``involution_naive.py``; facts in the project's ``reference/official_implementations.md``) and to
carry its parameter names, so an mmcls RedNet checkpoint loads strictly through the checkpoint
loader (which drops ``backbone.`` and reads ``head.fc.`` as ``fc.``):

- mmcv's ``ConvModule`` names its convolution ``conv`` and its BatchNorm ``bn``, and has a bias only
  when it has no norm (bias='auto'). So the stem is ``stem.0`` (conv3x3 3->32 stride 2: ``.conv``,
  ``.bn``), ``stem.1`` (involution(32, 3, 1)), ``stem.2`` (a bare ``BatchNorm2d``), ``stem.3`` (ReLU,
  no parameters), ``stem.4`` (conv3x3 32->64: ``.conv``, ``.bn``), then ``maxpool``.
- An involution is ``conv1`` (ConvModule 1x1 C -> C/4 + BN + ReLU: ``conv1.conv``, ``conv1.bn``)
  and ``conv2`` (ConvModule 1x1 C/4 -> k*k*C/16 without norm: ``conv2.conv`` with bias).
- Blocks are mmcls' Bottleneck: ``conv1``, ``bn1``, ``conv2`` (the involution), ``bn2``, ``conv3``,
  ``bn3``, ``downsample.0/1`` -- the same names as torchvision's, so the shared skeleton fits.

Odd sizes: at stride 2 the official code averages x with ``AvgPool2d(2, 2)`` (floor(H/2) rows)
before generating the kernel, while the unfolded input has ceil(H/2) rows, so it fails on odd
sizes. Here the pool has ``ceil_mode=True`` (the last window averages the rows that exist), which
gives ceil(H/2) kernels, the involution's own output size. At even sizes (224 input) it is the same.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from robustbench_dyn import ops
from robustbench_dyn.models.registry import register_model
from robustbench_dyn.models.resnet import ResNet, block_with_options

__all__ = ["ConvModule", "Involution", "InvolutionBottleneck", "rednet_stem"]

REDUCTION_RATIO = 4  # kernel generation squeezes C to C/4 (official involution)
GROUP_CHANNELS = 16  # channels that share one generated kernel (official involution)


class ConvModule(nn.Sequential):
    """conv (+ BatchNorm) (+ ReLU), with mmcv ConvModule's parameter names ``conv`` and ``bn``.

    The convolution has a bias exactly when there is no norm (mmcv's bias='auto').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                              bias=not norm)
        if norm:
            self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.activate = nn.ReLU(inplace=True)


class Involution(nn.Module):
    """involution(channels, kernel_size, stride): reduction 4, 16 channels per group (official).

    Kernel generation: (AvgPool2d(stride, stride, ceil_mode=True) when stride > 1), ``conv1`` 1x1
    C -> C/4 + BN + ReLU, ``conv2`` 1x1 C/4 -> k*k*G (bias), G = C/16 groups. Application:
    :func:`robustbench_dyn.ops.involution` with padding (k-1)//2 and the stride.
    Input (B, C, H, W); output (B, C, ceil(H/stride), ceil(W/stride)).

    Subclasses change the kernel generation by overriding :meth:`kernel` (Bi-volution's SAKG does).
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        if channels % GROUP_CHANNELS or channels % REDUCTION_RATIO:
            raise ValueError(f"involution needs channels divisible by {GROUP_CHANNELS}, got {channels}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = channels // GROUP_CHANNELS
        self.conv1 = ConvModule(channels, channels // REDUCTION_RATIO, 1)
        self.conv2 = ConvModule(channels // REDUCTION_RATIO, kernel_size * kernel_size * self.groups, 1,
                                norm=False, act=False)
        if stride > 1:
            self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels, (B, G, k*k, ceil(H/stride), ceil(W/stride))."""
        generated = self.conv2(self.conv1(self.avgpool(x) if self.stride > 1 else x))
        b, _, h, w = generated.shape
        return generated.view(b, self.groups, self.kernel_size * self.kernel_size, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.involution(x, self.kernel(x), self.kernel_size, stride=self.stride)


class InvolutionBottleneck(Bottleneck):
    """torchvision's bottleneck (stride on the spatial layer) with ``conv2`` an ``Involution(width, 7, stride)``."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, kernel_size: int = 7):
        if groups != 1 or dilation != 1:
            raise ValueError("RedNet bottlenecks have no groups and no dilation")
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self.conv2 = Involution(self.bn2.num_features, kernel_size, stride)


def rednet_stem(stem_channels: int = 64) -> nn.Sequential:
    """RedNet's stem, image -> ``stem_channels`` at stride 2 (the max-pool follows in the skeleton):
    conv3x3(3, C/2, stride 2)+BN+ReLU, involution(C/2, 3, 1), BN, ReLU, conv3x3(C/2, C)+BN+ReLU."""
    half = stem_channels // 2
    return nn.Sequential(
        ConvModule(3, half, 3, stride=2),
        Involution(half, 3, 1),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        ConvModule(half, stem_channels, 3),
    )


def _create_rednet(layers: list[int], *, num_classes: int, zero_init_residual: bool, block=InvolutionBottleneck,
                   **block_options) -> ResNet:
    return ResNet(block_with_options(block, **block_options), layers, num_classes=num_classes,
                  zero_init_residual=zero_init_residual, stem=rednet_stem())


# mmcls' RedNet zero-initialises the last BN of every bottleneck (zero_init_residual=True).
# Eval preprocessing: the registry's default, Resize(256) bilinear + CenterCrop(224), which is
# mmcls' ImageNet test pipeline (Resize size=(256, -1), its default bilinear; CenterCrop 224;
# ImageNet mean/std in 0-255 units, the same normalisation).


@register_model(family="rednet")
def rednet26(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """RedNet-26: involution bottlenecks (1, 2, 4, 1); 9.23M parameters (official)."""
    return _create_rednet([1, 2, 4, 1], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model(family="rednet")
def rednet38(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """RedNet-38: involution bottlenecks (2, 3, 5, 2); 12.39M parameters (official)."""
    return _create_rednet([2, 3, 5, 2], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model(family="rednet")
def rednet50(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """RedNet-50: involution bottlenecks (3, 4, 6, 3); 15.54M parameters (official)."""
    return _create_rednet([3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model(family="rednet")
def rednet101(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """RedNet-101: involution bottlenecks (3, 4, 23, 3); 25.65M parameters (official)."""
    return _create_rednet([3, 4, 23, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)
