"""BiNet: Hu et al., "Bi-volution: A Static and Dynamic Coupled Filter", AAAI 2022.

Bi-volution couples a dynamic convolution with a static one (paper Eq. 6, Fig. 2):
``Y = f(X) * X + g(X)``, with BatchNorm and ReLU outside both branches, and generates the dynamic
kernel with a Spatial Augmented Kernel Generation module (SAKG): a Delta x Delta depthwise
"spatial context extractor" whose channels are re-weighted by a "channel information
aggregation" branch (global average pooling and a convolution mapping), feeding the kernel
generator. BiNet puts it in place of the 3x3 of every ResNet bottleneck, in two kinds:

- ``binet*_dc``: on involution (RedNet: involution stem, ``involution(width, 7, stride)``);
- ``binet*_dcca``: on DDF, the "dynamic convolution + channel attention" (DDF-ResNet).

No code was released (the authors' repository holds only a README), so the module is built from
the paper; every choice it leaves open is in docs/models.md, with the arithmetic that fixed it
against Tables 1 and 4. In short:

- SAKG, both kinds: ``depthwise(x) * sigmoid(attention(GAP(x)))``, a depthwise Delta x Delta conv
  (bias, ``sakg_dilation``, the block's stride) re-weighted per channel by a 1x1 conv C -> C on the
  pooled input: the paper's cost, Delta^2 hwc + hwc + c^2. The pointwise half of the
  "depthwise-separable convolution" is a 1x1 conv after it. Kernel size 1 means no SAKG: the base
  generator (Table 4's "1x1" rows equal RedNet-50 and DDF-ResNet-50).
- dc-ca: the pointwise half is the DDF spatial branch's own 1x1 conv C -> k*k (now unstrided), as in
  the official DDF's ``gen_kernel_size`` option. The DDF channel branch is unchanged.
- dc: the pointwise half is a new 1x1 C -> C/2 (+BN, ReLU) and the involution generator's first
  1x1 then reduces C/2 -> C/4 (+BN, ReLU) before its C/4 -> k*k*G. Table 4 gives +2.0M for SAKG 3x3
  over RedNet-50 but +1.3M over DDF-ResNet-50; the shared SAKG alone is the +1.3M, this pointwise
  the rest (docs/models.md).
- static branch g: dc: 1x1 group conv, 16 channels per group (involution's grouping);
  dc-ca: 3x3 group conv, 32 channels per group ("group convolution and small kernel size (i.e.,
  1x1 or 3x3)"; Table 1's params and MACs fix which). Both take the block's stride, no bias.

Eval preprocessing follows the training recipe the paper cites for each kind: dc the RedNet one
(mmcls: Resize 256 bilinear, CenterCrop 224), dc-ca the DDF one (timm: bicubic, crop_pct 0.875).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from robustbench_dyn.errors import DynrobustError
from robustbench_dyn.models.ddf_resnet import DDF_PREPROCESSING, DDFPack
from robustbench_dyn.models.rednet import REDUCTION_RATIO, ConvModule, Involution, rednet_stem
from robustbench_dyn.models.registry import register_model
from robustbench_dyn.models.resnet import ResNet, block_with_options

__all__ = ["SpatialAugmentedKernelGeneration", "InvolutionBivolution", "DDFBivolution", "BivolutionBottleneck"]

SAKG_KERNEL_SIZES = (1, 3, 5, 7)  # Table 4
STATIC_GROUP_CHANNELS = {"dc": 16, "dcca": 32}
STATIC_KERNEL_SIZE = {"dc": 1, "dcca": 3}


class SpatialAugmentedKernelGeneration(nn.Module):
    """SAKG's context, ``depthwise(x) * attention(x)``, for a kernel generator to read.

    ``depthwise``: ``Conv2d(C, C, k, stride, padding=dilation*(k-1)/2, dilation, groups=C)`` with
    bias, the spatial context extractor. ``attention``: ``AdaptiveAvgPool2d(1)``, ``Conv2d(C, C, 1)``
    (bias), sigmoid: the channel information aggregation.
    Input (B, C, H, W); output (B, C, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int = 1, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, stride=stride,
                                   padding=dilation * (kernel_size - 1) // 2, dilation=dilation, groups=channels)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(x) * self.attention(x)


def _static_branch(kind: str, channels: int, stride: int) -> nn.Conv2d:
    k = STATIC_KERNEL_SIZE[kind]
    return nn.Conv2d(channels, channels, k, stride=stride, padding=(k - 1) // 2,
                     groups=channels // STATIC_GROUP_CHANNELS[kind], bias=False)


class InvolutionBivolution(Involution):
    """Bi-volution on involution (BiNet dc): ``involution(x; SAKG-generated kernel) + static_branch(x)``.

    Without SAKG the kernel generator is the involution's (``avgpool`` at stride > 1, ``conv1``
    C -> C/4, ``conv2``). With SAKG: ``context`` (already strided), ``pointwise`` 1x1 C -> C/2 + BN +
    ReLU, ``conv1`` C/2 -> C/4 + BN + ReLU, ``conv2`` C/4 -> k*k*G.
    """

    def __init__(self, channels: int, kernel_size: int = 7, stride: int = 1, *, dual_branch: bool = True,
                 sakg_kernel_size: int = 3, sakg_dilation: int = 1):
        super().__init__(channels, kernel_size, stride)
        self.context = None
        if sakg_kernel_size > 1:
            self.context = SpatialAugmentedKernelGeneration(channels, sakg_kernel_size, sakg_dilation, stride)
            self.pointwise = ConvModule(channels, channels // 2, 1)
            self.conv1 = ConvModule(channels // 2, channels // REDUCTION_RATIO, 1)
            if stride > 1:
                del self.avgpool  # the strided depthwise conv downsamples instead
        self.static_branch = _static_branch("dc", channels, stride) if dual_branch else None

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            return super().kernel(x)
        generated = self.conv2(self.conv1(self.pointwise(self.context(x))))
        b, _, h, w = generated.shape
        return generated.view(b, self.groups, self.kernel_size * self.kernel_size, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.static_branch is None else out + self.static_branch(x)


class DDFBivolution(DDFPack):
    """Bi-volution on DDF (BiNet dc-ca): ``DDF(x; channel filter, SAKG spatial filter) + static_branch(x)``.

    With SAKG the spatial branch's 1x1 conv (unstrided) reads the SAKG context; the channel
    branch is DDF's.
    """

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, *, dual_branch: bool = True,
                 sakg_kernel_size: int = 3, sakg_dilation: int = 1, se_ratio: float = 0.2, combine: str = "mul"):
        with_sakg = sakg_kernel_size > 1
        super().__init__(channels, kernel_size, stride, se_ratio=se_ratio, combine=combine,
                         spatial_stride=1 if with_sakg else stride)
        self.context = None
        if with_sakg:
            self.context = SpatialAugmentedKernelGeneration(channels, sakg_kernel_size, sakg_dilation, stride)
        self.static_branch = _static_branch("dcca", channels, stride) if dual_branch else None

    def filters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.context is None:
            return super().filters(x)
        k = self.kernel_size
        channel_filter = self.channel_branch(x).view(x.shape[0], self.channels, k, k)
        return channel_filter, self.spatial_branch(self.context(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.static_branch is None else out + self.static_branch(x)


class BivolutionBottleneck(Bottleneck):
    """torchvision's bottleneck with ``conv2`` a Bi-volution of the same width (BN and ReLU outside it, Eq. 6)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, kind: str, dual_branch: bool, sakg_kernel_size: int, sakg_dilation: int):
        if groups != 1 or dilation != 1:
            raise ValueError("BiNet bottlenecks have no groups and no dilation")
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        width = self.bn2.num_features
        options = dict(dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)
        if kind == "dc":
            self.conv2 = InvolutionBivolution(width, 7, stride, **options)
        elif kind == "dcca":
            self.conv2 = DDFBivolution(width, 3, stride, **options)
        else:
            raise ValueError(f"kind must be 'dc' or 'dcca', not {kind!r}")


def _create_binet(layers: list[int], kind: str, *, num_classes: int, zero_init_residual: bool, dual_branch: bool,
                  sakg_kernel_size: int, sakg_dilation: int) -> ResNet:
    if not isinstance(dual_branch, bool):
        raise DynrobustError(f"dual_branch must be True or False, not {dual_branch!r}")
    if sakg_kernel_size not in SAKG_KERNEL_SIZES:
        raise DynrobustError(f"sakg_kernel_size must be one of {SAKG_KERNEL_SIZES} (Bi-volution Table 4), "
                             f"not {sakg_kernel_size!r}; 1 means no SAKG")
    if not isinstance(sakg_dilation, int) or isinstance(sakg_dilation, bool) or sakg_dilation < 1:
        raise DynrobustError(f"sakg_dilation must be a positive integer, not {sakg_dilation!r}")
    if sakg_kernel_size == 1 and sakg_dilation != 1:
        raise DynrobustError("sakg_dilation needs sakg_kernel_size > 1 (a 1x1 kernel has nothing to dilate)")
    block = block_with_options(BivolutionBottleneck, kind=kind, dual_branch=dual_branch,
                               sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)
    return ResNet(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual,
                  stem=rednet_stem() if kind == "dc" else None)


# zero_init_residual follows the base each kind was trained like: mmcls RedNet and timm DDF-ResNet
# both zero-initialise the last BN of every block.


@register_model(family="binet")
def binet26_dc(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
               sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-26 (dc): RedNet-26 with Bi-volution on involution. No paper numbers."""
    return _create_binet([1, 2, 4, 1], "dc", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet")
def binet38_dc(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
               sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-38 (dc): RedNet-38 with Bi-volution on involution (Table 1: 13.2M, 2.2G, 78.2)."""
    return _create_binet([2, 3, 5, 2], "dc", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet")
def binet50_dc(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
               sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-50 (dc): RedNet-50 with Bi-volution on involution (Table 1: 17.6M, 2.8G, 78.8)."""
    return _create_binet([3, 4, 6, 3], "dc", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet")
def binet101_dc(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
                sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-101 (dc): RedNet-101 with Bi-volution on involution (Table 1: 29.5M, 4.9G, 79.7)."""
    return _create_binet([3, 4, 23, 3], "dc", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet", preprocessing=DDF_PREPROCESSING)
def binet26_dcca(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
                 sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-26 (dc-ca): ResNet-26 with Bi-volution on DDF. No paper numbers."""
    return _create_binet([1, 2, 4, 1], "dcca", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet", preprocessing=DDF_PREPROCESSING)
def binet38_dcca(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
                 sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-38 (dc-ca): ResNet-38 with Bi-volution on DDF (Table 1: 14.8M, 2.1G, 78.7)."""
    return _create_binet([2, 3, 5, 2], "dcca", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet", preprocessing=DDF_PREPROCESSING)
def binet50_dcca(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
                 sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-50 (dc-ca): ResNet-50 with Bi-volution on DDF (Table 1: 19.3M, 2.7G, 79.6)."""
    return _create_binet([3, 4, 6, 3], "dcca", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet", preprocessing=DDF_PREPROCESSING)
def binet101_dcca(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
                  sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-101 (dc-ca): ResNet-101 with Bi-volution on DDF (Table 1: 33.0M, 4.7G, 80.7)."""
    return _create_binet([3, 4, 23, 3], "dcca", num_classes=num_classes, zero_init_residual=zero_init_residual,
                         dual_branch=dual_branch, sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


# The paper's headline BiNets are the dc-ca ones ("BiNet-50 ... 79.6%", robustness section).


@register_model(family="binet", preprocessing=DDF_PREPROCESSING, paper_name="binet38_dcca")
def binet38(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
            sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-38: the same model as ``binet38_dcca``."""
    return binet38_dcca(num_classes=num_classes, zero_init_residual=zero_init_residual, dual_branch=dual_branch,
                        sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet", preprocessing=DDF_PREPROCESSING, paper_name="binet50_dcca")
def binet50(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
            sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-50: the same model as ``binet50_dcca``."""
    return binet50_dcca(num_classes=num_classes, zero_init_residual=zero_init_residual, dual_branch=dual_branch,
                        sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)


@register_model(family="binet", preprocessing=DDF_PREPROCESSING, paper_name="binet101_dcca")
def binet101(*, num_classes: int = 1000, zero_init_residual: bool = True, dual_branch: bool = True,
             sakg_kernel_size: int = 3, sakg_dilation: int = 1) -> ResNet:
    """BiNet-101: the same model as ``binet101_dcca``."""
    return binet101_dcca(num_classes=num_classes, zero_init_residual=zero_init_residual, dual_branch=dual_branch,
                         sakg_kernel_size=sakg_kernel_size, sakg_dilation=sakg_dilation)
