"""DDF-ResNet: Zhou et al., "Decoupled Dynamic Filter Networks", CVPR 2021.

A ResNet whose spatial 3x3 convolutions are decoupled dynamic filters (DDF): each output pixel and
channel is filtered by ``channel_filter[c] (x) spatial_filter[y, x]``, the spatial filter predicted
per pixel by a 1x1 convolution, the channel filter per image by a squeeze-and-excitation branch,
both normalised by filter normalisation (paper Sec. 4, Eq. 3).

Built to compute what the authors' code computes (theFoxofSky/ddfnet ``ddf/ddf.py``,
``ddf_resnet.py``; facts in the project's ``reference/official_implementations.md``) and to carry
its parameter names, so an official timm checkpoint (bare or ``{'state_dict': ...}``) loads strictly:
the bottleneck is torchvision's/timm's with ``conv2`` replaced by ``DDFPack(width, 3, stride,
se_ratio=0.2)``, whose keys are ``conv2.spatial_branch.0.*``, ``conv2.channel_branch.{1,3}.*``
and ``conv2.channel_branch.4.std``. Stem, downsample and classifier are ResNet's.

Depths: 50 and 101 are the released models (``ddf_mul_*``, ``ddf_add_*``; ``ddf_resnet50/101``
are the ``mul`` ones the papers tabulate). 38 = RedNet's (2, 3, 5, 2), the Bi-volution paper's
DDF-ResNet-38 (Table 1). There is no DDF-ResNet-18: the DDF paper's R18 (Table 4: 7.7M parameters,
0.4G MACs) is not reproducible from what the paper says (docs/models.md shows the arithmetic).

Where the official op asserts ``H // stride`` (even sizes at stride 2), an odd size is handled as a
strided 3x3 convolution with padding would: the filtered feature map is zero-extended at the bottom
and right to a multiple of the stride, so the output has ``ceil(H / stride)`` rows like the 1x1
strided spatial branch and the downsample shortcut. At even sizes (224 input) nothing changes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from robustbench_dyn import ops
from robustbench_dyn.models.registry import Preprocessing, register_model
from robustbench_dyn.models.resnet import ResNet, block_with_options

__all__ = ["FilterNorm", "DDFPack", "DDFBottleneck", "DDF_PREPROCESSING"]

# timm's default eval transform for the DDF models (their default_cfg sets interpolation='bicubic',
# crop_pct 0.875): Resize(224 / 0.875 = 256, bicubic), CenterCrop(224), ImageNet mean/std.
DDF_PREPROCESSING = Preprocessing(resize=256, crop=224, interpolation="bicubic")

# torch.nn.init.calculate_gain(nonlinearity): the filter scale of DDF's FilterNorm is gain / k.
_GAINS = {"linear": 1.0, "relu": math.sqrt(2.0)}


class FilterNorm(nn.Module):
    """Filter normalisation (DDF paper Eq. 3): standardise each predicted k x k filter over its
    k*k taps, ``(f - mean) / (std + 1e-10)`` with the unbiased std, then scale.

    ``'spatial'``: input (B, head*k*k, H, W), one filter per pixel and head; the scale is the
    constant ``gain / k`` (no parameter). ``'channel'``: input (B, C*k*k, 1, 1), one filter per
    channel; the scale is a learnable ``std`` of shape (C*k*k,), initialised ``randn * gain / k``
    (the official ``running_std=True``). Returns a tensor of the input's shape.
    """

    def __init__(self, filters: int, kernel_size: int, filter_type: str, nonlinearity: str = "relu"):
        super().__init__()
        if filter_type not in ("spatial", "channel"):
            raise ValueError(f"filter_type must be 'spatial' or 'channel', not {filter_type!r}")
        if nonlinearity not in _GAINS:
            raise ValueError(f"nonlinearity must be one of {sorted(_GAINS)}, not {nonlinearity!r}")
        self.filters = filters
        self.taps = kernel_size * kernel_size
        self.filter_type = filter_type
        scale = _GAINS[nonlinearity] / kernel_size
        if filter_type == "channel":
            self.std = nn.Parameter(torch.randn(filters * self.taps) * scale)
        else:
            self.scale = scale  # a constant, as in the official code: not a parameter, not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        taps = x.reshape(b, self.filters, self.taps, h, w)
        taps = taps - taps.mean(dim=2, keepdim=True)
        taps = taps / (taps.std(dim=2, keepdim=True) + 1e-10)
        x = taps.reshape(b, self.filters * self.taps, h, w)
        if self.filter_type == "channel":
            return x * self.std.view(1, -1, 1, 1)
        return x * self.scale


class DDFPack(nn.Module):
    """The DDF module: spatial and channel filter branches and the DDF operation.

    ``spatial_branch``: ``Conv2d(C, head*k*k, 1, stride)`` (bias) + FilterNorm('spatial').
    ``channel_branch``: ``AdaptiveAvgPool2d(1)``, ``Conv2d(C, int(C*se_ratio), 1)``, ReLU,
    ``Conv2d(int(C*se_ratio), C*k*k, 1)`` (biases), FilterNorm('channel') with its ``std``.
    Input (B, C, H, W); output (B, C, ceil(H/stride), ceil(W/stride)).

    Subclasses change the filters by overriding :meth:`filters` (Bi-volution's SAKG does);
    ``spatial_stride`` (default ``stride``) is the stride of the spatial branch's 1x1 conv, 1 for a
    subclass whose spatial branch reads an already strided input.
    """

    def __init__(self, in_channels: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1, head: int = 1,
                 se_ratio: float = 0.2, nonlinearity: str = "relu", combine: str = "mul",
                 spatial_stride: Optional[int] = None):
        super().__init__()
        if combine not in ops.COMBINES:
            raise ValueError(f"combine must be one of {ops.COMBINES}, not {combine!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if head < 1 or in_channels % head:
            raise ValueError(f"head must divide the {in_channels} channels, got {head}")
        mid_channels = int(in_channels * se_ratio)
        if mid_channels < 1:
            raise ValueError(f"se_ratio {se_ratio} leaves no channel in the squeeze layer ({in_channels} channels)")
        self.channels = in_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.head = head
        self.combine = combine
        taps = kernel_size * kernel_size
        self.spatial_branch = nn.Sequential(
            nn.Conv2d(in_channels, head * taps, 1, stride=stride if spatial_stride is None else spatial_stride),
            FilterNorm(head, kernel_size, "spatial", nonlinearity),
        )
        self.channel_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, mid_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, in_channels * taps, 1),
            FilterNorm(in_channels, kernel_size, "channel", nonlinearity),
        )

    def filters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(channel_filter (B, C, k, k), spatial_filter (B, head*k*k, ceil(H/s), ceil(W/s)))."""
        k = self.kernel_size
        channel_filter = self.channel_branch(x).view(x.shape[0], self.channels, k, k)
        return channel_filter, self.spatial_branch(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_filter, spatial_filter = self.filters(x)
        out_h, out_w = spatial_filter.shape[-2:]
        # ops.ddf gives H // stride rows; extend x so that this equals the spatial filter's ceil(H / stride).
        pad_h, pad_w = out_h * self.stride - x.shape[-2], out_w * self.stride - x.shape[-1]
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return ops.ddf(x, channel_filter, spatial_filter, self.kernel_size, dilation=self.dilation,
                       stride=self.stride, combine=self.combine, head=self.head)


class DDFBottleneck(Bottleneck):
    """torchvision's bottleneck (stride on the 3x3) with ``conv2`` a :class:`DDFPack` of the same width."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, combine: str = "mul", se_ratio: float = 0.2):
        if groups != 1:
            raise ValueError("DDF replaces the 3x3 by a depthwise-like filter; grouped bottlenecks make no sense")
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        width = self.bn2.num_features
        self.conv2 = DDFPack(width, kernel_size=3, stride=stride, dilation=dilation, se_ratio=se_ratio,
                             combine=combine)


def _create_ddf_resnet(layers: list[int], *, combine: str, num_classes: int, zero_init_residual: bool,
                       se_ratio: float) -> ResNet:
    return ResNet(block_with_options(DDFBottleneck, combine=combine, se_ratio=se_ratio), layers,
                  num_classes=num_classes, zero_init_residual=zero_init_residual)


# timm's ResNet (the official code's skeleton) zero-initialises the last BN of each block
# (zero_init_last_bn=True in timm 0.4.5); so do these builders by default. The papers' rows are the
# 'mul' models (DDF-ResNet-50 79.1 = ddf_mul_resnet50); the 'add' ones have their own top-1 and no row.


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING, paper_name="ddf_resnet50")
def ddf_mul_resnet50(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-50, 'mul' combination (the official ``ddf_mul_resnet50``); 16.84M parameters, top-1 79.1."""
    return _create_ddf_resnet([3, 4, 6, 3], combine="mul", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING, paper_name="ddf_resnet101")
def ddf_mul_resnet101(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-101, 'mul' (the official ``ddf_mul_resnet101``); 28.15M parameters, top-1 80.5."""
    return _create_ddf_resnet([3, 4, 23, 3], combine="mul", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING)
def ddf_add_resnet50(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-50, 'add' combination (the official ``ddf_add_resnet50``); 16.84M parameters, top-1 78.8."""
    return _create_ddf_resnet([3, 4, 6, 3], combine="add", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING)
def ddf_add_resnet101(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-101, 'add' (the official ``ddf_add_resnet101``); 28.15M parameters, top-1 79.9."""
    return _create_ddf_resnet([3, 4, 23, 3], combine="add", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING)
def ddf_resnet50(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-50 as the papers tabulate it: ``ddf_mul_resnet50`` (DDF Tables 3-5, Bi-volution Table 1)."""
    return _create_ddf_resnet([3, 4, 6, 3], combine="mul", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING)
def ddf_resnet101(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-101 as the papers tabulate it: ``ddf_mul_resnet101`` (DDF Table 5, Bi-volution Table 1)."""
    return _create_ddf_resnet([3, 4, 23, 3], combine="mul", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)


@register_model(family="ddf", preprocessing=DDF_PREPROCESSING)
def ddf_resnet38(*, num_classes: int = 1000, zero_init_residual: bool = True, se_ratio: float = 0.2) -> ResNet:
    """DDF-ResNet-38, 'mul': bottlenecks (2, 3, 5, 2) as RedNet-38 (Bi-volution Table 1: 13.1M, 1.9G)."""
    return _create_ddf_resnet([2, 3, 5, 2], combine="mul", num_classes=num_classes,
                              zero_init_residual=zero_init_residual, se_ratio=se_ratio)
