"""DCDC-ResNet: Yan, Qin, Liu and Chen, "Dual Complementary Dynamic Convolution for Image Recognition"
(IEEE TCSVT; ``papers/dcdc-dual-complementary-dynamic-convolution.md``).

No public code exists; this is built from the paper (Sec. III-B, Sec. IV-A1, Tables I, III, IV).
The DCDC operator is the sum of two branches (Eq. 4, 11):

- **LSA** (local spatial-adaptive, Eq. 5-7): RedNet's involution (:class:`robustbench_dyn.models.rednet.Involution`)
  whose kernel generator has a depth-wise convolution before each of its two point-wise ones (Fig. 3b):
  dw k_dw x k_dw (C) -> 1x1 C -> C/4 + BN + ReLU -> dw k_dw x k_dw (C/4) -> 1x1 C/4 -> k_lsa^2 * G (bias),
  G = C / 16 groups of 16 channels sharing a kernel (involution's settings, alpha = 1/4, k_lsa = 7).
  The per-pixel kernels are applied with :func:`robustbench_dyn.ops.involution`.
- **GSI** (global shift-invariant, Eq. 8-10): 1x1 C -> c' (+ BN + ReLU), c' = lambda * sqrt(C);
  GAP; 1x1 c' -> c' * c' * k_gsi^2 (bias) gives each sample its own kernel P (c' x c' x k_gsi x k_gsi),
  applied to the c'-channel map as one grouped convolution over the batch; 1x1 c' -> C.

Paper settings (Sec. IV-A1): k_dw = 3, k_gsi = 1, lambda = 1, alpha = 0.25, k_lsa = 7.
DCDC-ResNet is RedNet (d-li14/involution ``rednet.py``; here :mod:`robustbench_dyn.models.rednet` on the
shared skeleton) with every involution replaced by DCDC: the bottleneck's 3x3 (stride on it) and the
stem's (k_lsa = 3 there, as RedNet's stem involution). Parameter names follow RedNet's.

Choices the paper leaves open (each written down in ``docs/models.md``):
the depth-wise convolutions have no bias, norm or activation of their own; the GSI reduction has
BN + ReLU ("enhance nonlinearity"), its expansion neither bias nor norm (the block's BN follows);
c' = round(lambda * sqrt(C)); at stride s both branches read the input average-pooled s x s (ceil
mode): the LSA kernel generator, as involution's does, and the whole GSI branch, whose 1x1 kernel
would otherwise just subsample; the GSI kernel convolution uses zero padding k_gsi // 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from robustbench_dyn.models.registry import register_model
from robustbench_dyn.models.rednet import REDUCTION_RATIO, ConvModule, Involution
from robustbench_dyn.models.resnet import ResNet, block_with_options

__all__ = ["DCDC", "LocalSpatialAdaptive", "GlobalShiftInvariant", "DCDCBottleneck", "dcdc_stem"]


def _depthwise(channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)


class LocalSpatialAdaptive(Involution):
    """The LSA branch (DCDC Eq. 5-7, Fig. 3b): RedNet's involution whose kernel generator has a
    depth-wise convolution before each point-wise one:
    [AvgPool(s)] -> ``dw1`` (C) -> ``conv1`` 1x1 C -> C/4 + BN + ReLU -> ``dw2`` (C/4) -> ``conv2`` 1x1 -> k*k*G.

    Input (B, C, H, W); output (B, C, ceil(H/s), ceil(W/s)) from :func:`robustbench_dyn.ops.involution`.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, dw_kernel_size: int = 3):
        super().__init__(channels, kernel_size, stride)
        if dw_kernel_size < 1 or dw_kernel_size % 2 == 0:
            raise ValueError(f"the depth-wise kernel size must be odd, got {dw_kernel_size}")
        self.dw1 = _depthwise(channels, dw_kernel_size)
        self.dw2 = _depthwise(channels // REDUCTION_RATIO, dw_kernel_size)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernels, (B, G, k*k, ceil(H/stride), ceil(W/stride))."""
        pooled = self.avgpool(x) if self.stride > 1 else x
        generated = self.conv2(self.dw2(self.conv1(self.dw1(pooled))))
        b, _, h, w = generated.shape
        return generated.view(b, self.groups, self.kernel_size * self.kernel_size, h, w)


class GlobalShiftInvariant(nn.Module):
    """The GSI branch (DCDC Eq. 8-10): a per-sample c' x c' x k x k kernel predicted from the globally
    pooled, channel-reduced input, applied at every position, then mapped back to C channels:
    [AvgPool(s)] -> ``reduce`` 1x1 C -> c' + BN + ReLU -> z; P = ``kernel_generator``(GAP(z));
    y = P * z (one grouped convolution over the batch, zero padding k // 2); ``expand`` 1x1 c' -> C.

    c' = round(lambda * sqrt(C)) with lambda = ``width_scale``. Input (B, C, H, W); output
    (B, C, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, channels: int, stride: int = 1, kernel_size: int = 1, width_scale: float = 1.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the GSI kernel size must be odd, got {kernel_size}")
        self.stride = stride
        self.kernel_size = kernel_size
        self.width = max(1, round(width_scale * math.sqrt(channels)))
        c = self.width
        self.reduce = ConvModule(channels, c, 1)
        self.kernel_generator = nn.Conv2d(c, c * c * kernel_size * kernel_size, 1, bias=True)
        self.expand = nn.Conv2d(c, channels, 1, bias=False)
        if stride > 1:
            self.avgpool = nn.AvgPool2d(stride, stride, ceil_mode=True)

    def sample_kernels(self, reduced: torch.Tensor) -> torch.Tensor:
        """Each sample's kernel P (B, c', c', k, k) from the reduced map z (B, c', H, W) (Eq. 10)."""
        b, c = reduced.shape[:2]
        k = self.kernel_size
        return self.kernel_generator(F.adaptive_avg_pool2d(reduced, 1)).view(b, c, c, k, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce(self.avgpool(x) if self.stride > 1 else x)
        b, c, h, w = z.shape
        kernel = self.sample_kernels(z)
        y = F.conv2d(z.reshape(1, b * c, h, w), kernel.reshape(b * c, c, self.kernel_size, self.kernel_size),
                     padding=self.kernel_size // 2, groups=b)
        return self.expand(y.view(b, c, h, w))


class DCDC(nn.Module):
    """Dual complementary dynamic convolution, C -> C channels at stride s: ``lsa(x) + gsi(x)`` (Eq. 11).

    ``kernel_size`` is k_lsa, ``dw_kernel_size`` k_dw, ``gsi_kernel_size`` k_gsi, ``gsi_width_scale``
    lambda (paper: 7, 3, 1, 1). Output (B, C, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, dw_kernel_size: int = 3,
                 gsi_kernel_size: int = 1, gsi_width_scale: float = 1.0):
        super().__init__()
        self.lsa = LocalSpatialAdaptive(channels, kernel_size, stride, dw_kernel_size)
        self.gsi = GlobalShiftInvariant(channels, stride, gsi_kernel_size, gsi_width_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lsa(x) + self.gsi(x)


class DCDCBottleneck(Bottleneck):
    """torchvision's bottleneck (stride on the spatial layer) with ``conv2`` a ``DCDC(width, 7, stride)``."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, dw_kernel_size: int = 3, gsi_kernel_size: int = 1, gsi_width_scale: float = 1.0):
        if groups != 1 or dilation != 1:
            raise ValueError("DCDC bottlenecks have no groups and no dilation")
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self.conv2 = DCDC(self.bn2.num_features, 7, stride, dw_kernel_size, gsi_kernel_size, gsi_width_scale)


def dcdc_stem(stem_channels: int = 64, **options) -> nn.Sequential:
    """RedNet's stem with its involution a DCDC (k_lsa 3, as RedNet's stem involution), image ->
    ``stem_channels`` at stride 2: conv3x3(3, C/2, s2)+BN+ReLU, DCDC(C/2, 3), BN, ReLU, conv3x3(C/2, C)+BN+ReLU."""
    half = stem_channels // 2
    return nn.Sequential(
        ConvModule(3, half, 3, stride=2),
        DCDC(half, 3, 1, **options),
        nn.BatchNorm2d(half),
        nn.ReLU(inplace=True),
        ConvModule(half, stem_channels, 3),
    )


def _create_dcdc_resnet(layers: list[int], *, num_classes: int, zero_init_residual: bool, dw_kernel_size: int = 3,
                        gsi_kernel_size: int = 1, gsi_width_scale: float = 1.0) -> ResNet:
    options = dict(dw_kernel_size=dw_kernel_size, gsi_kernel_size=gsi_kernel_size, gsi_width_scale=gsi_width_scale)
    return ResNet(block_with_options(DCDCBottleneck, **options), layers, num_classes=num_classes,
                  zero_init_residual=zero_init_residual, stem=dcdc_stem(**options))


# Depth settings are RedNet's (involution paper; d-li14/involution rednet.py):
# 26 = (1, 2, 4, 1), 38 = (2, 3, 5, 2), 50 = (3, 4, 6, 3), 101 = (3, 4, 23, 3) bottlenecks.
# DCDC-ResNets were trained with RedNet's mmcls recipe (Sec. IV-A1), so, as RedNet: the last BN of
# each bottleneck zero-initialised, and mmcls' eval pipeline, Resize(256) bilinear + CenterCrop(224)
# (the registry's default preprocessing). The paper's starred (timm-trained) results would use timm's.


@register_model(family="dcdc")
def dcdc_resnet26(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """DCDC-ResNet-26: DCDC bottlenecks (1, 2, 4, 1); 9.35M parameters (paper Table I: 9.36M, 1.71 GFLOPs)."""
    return _create_dcdc_resnet([1, 2, 4, 1], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model(family="dcdc")
def dcdc_resnet38(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """DCDC-ResNet-38: DCDC bottlenecks (2, 3, 5, 2); 12.57M parameters (paper Table I: 12.58M, 2.2 GFLOPs)."""
    return _create_dcdc_resnet([2, 3, 5, 2], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model(family="dcdc")
def dcdc_resnet50(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """DCDC-ResNet-50: DCDC bottlenecks (3, 4, 6, 3); 15.79M parameters (paper Table I: 15.8M, 2.68 GFLOPs)."""
    return _create_dcdc_resnet([3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model(family="dcdc")
def dcdc_resnet101(*, num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """DCDC-ResNet-101: DCDC bottlenecks (3, 4, 23, 3); 26.17M parameters (paper Table I: 26.19M, 4.71 GFLOPs)."""
    return _create_dcdc_resnet([3, 4, 23, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)
