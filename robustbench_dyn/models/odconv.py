"""ODConv-ResNet: Li, Zhou and Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022
(official code: OSVAI/ODConv, ``modules/odconv.py`` and ``models/od_resnet.py``).

ODConv2d keeps ``kernel_num`` static kernels and, per sample, computes four attentions from the
globally pooled input: over the input channels (``channel_fc``, sigmoid), the output filters
(``filter_fc``, sigmoid), the k x k spatial positions (``spatial_fc``, sigmoid) and the kernels
(``kernel_fc``, softmax). The sample's kernel is ``spatial * sum_n kernel_att[n] * weight[n]``;
the input is scaled by the channel attention before the convolution and the output by the filter
attention after it (the official order; the same function as folding both into the kernel).

The models follow ``od_resnet.py``: the shared ResNet skeleton (torchvision's) with every convolution
inside a block (conv1, conv2, conv3) an ODConv2d; the stem and downsample convolutions stay static, and dropout
(0.1, the class default) comes before ``fc``. Parameter names are the official ones, so the
released ``{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`` files (``module.`` keys) load
strictly. Eval preprocessing is the repository's ``main.py``: Resize(256), CenterCrop(224),
bilinear, ImageNet mean/std (the registry's default).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from robustbench_dyn.models.registry import register_model
from robustbench_dyn.models.resnet import ResNet, block_with_options

__all__ = ["ODConv2d", "ODConvAttention", "ODBasicBlock", "ODBottleneck", "ODResNet"]


class ODConvAttention(nn.Module):
    """The four attentions of ODConv from one squeeze: GAP -> ``fc`` (1x1, no bias) -> ``bn`` -> ReLU,
    then one 1x1 head per attention, each divided by ``temperature`` before its activation.

    ``temperature`` is a plain attribute (not saved): the official training anneals it from 30 to 1
    over the first epochs; evaluation uses 1.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, groups: int = 1,
                 reduction: float = 0.0625, kernel_num: int = 4, min_channel: int = 16):
        super().__init__()
        hidden = max(int(in_planes * reduction), min_channel)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = 1.0
        self.fc = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_planes, 1, bias=True)
        depthwise = in_planes == groups == out_planes
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_planes, 1, bias=True)
        self.spatial_fc = None if kernel_size == 1 else nn.Conv2d(hidden, kernel_size * kernel_size, 1, bias=True)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(hidden, kernel_num, 1, bias=True)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor):
        """Returns ``(channel (B, C_in, 1, 1), filter (B, C_out, 1, 1) or None, spatial (B, k, k) or None,
        kernel (B, kernel_num) or None)``; None where the head does not exist (its factor is 1)."""
        b = x.shape[0]
        squeezed = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        t = self.temperature
        channel = torch.sigmoid(self.channel_fc(squeezed) / t)
        filt = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(squeezed) / t)
        spatial = None
        if self.spatial_fc is not None:
            spatial = torch.sigmoid(self.spatial_fc(squeezed).view(b, self.kernel_size, self.kernel_size) / t)
        kernel = None if self.kernel_fc is None else torch.softmax(self.kernel_fc(squeezed).view(b, -1) / t, dim=1)
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution (no bias), as the official ``ODConv2d``.

    ``weight``: (kernel_num, out, in/groups, k, k). Output (B, out, H', W') with H' as nn.Conv2d's.
    With k = 1 and one kernel the kernel is the same for the whole batch, so it is one ordinary
    convolution; otherwise each sample gets its own kernel and the batch runs as one grouped
    convolution (groups = B * groups; on the CPU one convolution per sample, see
    :meth:`per_sample_conv`). The kernels are mixed with one matrix product
    (B, kernel_num) x (kernel_num, out*in*k*k), never materialising the (B, kernel_num, ...) stack.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, reduction: float = 0.0625, kernel_num: int = 4):
        super().__init__()
        if in_planes % groups or out_planes % groups:
            raise ValueError(f"groups={groups} must divide in_planes={in_planes} and out_planes={out_planes}")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.kernel_num = kernel_num
        self.attention = ODConvAttention(in_planes, out_planes, kernel_size, groups=groups,
                                         reduction=reduction, kernel_num=kernel_num)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))
        for n in range(kernel_num):
            nn.init.kaiming_normal_(self.weight[n], mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return (f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, kernel_num={self.kernel_num}")

    def aggregated_weight(self, spatial, kernel, batch: int) -> torch.Tensor:
        """Each sample's kernel, (B, out, in/groups, k, k): ``spatial * sum_n kernel[n] * weight[n]``."""
        if kernel is None:
            mixed = self.weight.expand(batch, *self.weight.shape[1:])
        else:
            mixed = (kernel @ self.weight.flatten(1)).view(batch, *self.weight.shape[1:])
        if spatial is not None:
            mixed = mixed * spatial.view(batch, 1, 1, self.kernel_size, self.kernel_size)
        return mixed

    def per_sample_conv(self, x: torch.Tensor, weight: torch.Tensor, grouped: Optional[bool] = None) -> torch.Tensor:
        """Convolve sample i of ``x`` (B, C, H, W) with ``weight[i]`` (B, out, in/groups, k, k).

        ``grouped`` (default: everywhere but on the CPU): the whole batch as one convolution with
        groups = B * groups, as the official code. On the CPU, oneDNN runs that 1.5-2.4x slower than
        one convolution per sample (measured at ResNet-50 stage 3-4 shapes, batch 16, 3x3), so there
        the samples are convolved one by one. Both compute the same function.
        """
        b, c, h, w = x.shape
        if grouped is None:
            grouped = x.device.type != "cpu"
        if not grouped:
            return torch.cat([F.conv2d(x[i : i + 1], weight[i], None, self.stride, self.padding, self.dilation,
                                       self.groups) for i in range(b)])
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(-1, *weight.shape[2:]), None,
                       self.stride, self.padding, self.dilation, self.groups * b)
        return out.view(b, self.out_planes, *out.shape[-2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel, filt, spatial, kernel = self.attention(x)
        x = x * channel
        if self.kernel_size == 1 and self.kernel_num == 1:
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            out = self.per_sample_conv(x, self.aggregated_weight(spatial, kernel, x.shape[0]))
        if filt is not None:
            out = out * filt
        return out

    def uncounted_macs(self, inputs, output) -> int:
        """Multiply-accumulates of this layer that torch's flop counter does not see (the element-wise
        products): channel attention on the input, spatial attention on each sample's kernel, filter
        attention on the output. The convolutions and the kernel-mixing matrix product it does see."""
        x = inputs[0]
        b = x.shape[0]
        macs = x.numel()
        if self.attention.spatial_fc is not None:
            macs += b * self.weight[0].numel()
        if self.attention.filter_fc is not None:
            macs += output.numel()
        return macs


def _odconv_like(conv: nn.Conv2d, kernel_num: int, reduction: float) -> ODConv2d:
    return ODConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0],
                    padding=conv.padding[0], dilation=conv.dilation[0], groups=conv.groups,
                    reduction=reduction, kernel_num=kernel_num)


class ODBasicBlock(BasicBlock):
    """torchvision's basic block with ``conv1`` and ``conv2`` ODConv2d (od_resnet.py ``BasicBlock``)."""

    def __init__(self, *args, kernel_num: int = 1, reduction: float = 0.0625, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv1 = _odconv_like(self.conv1, kernel_num, reduction)
        self.conv2 = _odconv_like(self.conv2, kernel_num, reduction)


class ODBottleneck(Bottleneck):
    """torchvision's bottleneck (stride on the 3x3) with ``conv1``, ``conv2`` and ``conv3`` ODConv2d
    (od_resnet.py ``Bottleneck``)."""

    def __init__(self, *args, kernel_num: int = 1, reduction: float = 0.0625, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv1 = _odconv_like(self.conv1, kernel_num, reduction)
        self.conv2 = _odconv_like(self.conv2, kernel_num, reduction)
        self.conv3 = _odconv_like(self.conv3, kernel_num, reduction)


class ODResNet(ResNet):
    """The shared ResNet skeleton (torchvision's names) with ODConv blocks and dropout before ``fc``."""

    def __init__(self, block, layers, *, num_classes: int = 1000, dropout: float = 0.1,
                 reduction: float = 0.0625, kernel_num: int = 1):
        super().__init__(block_with_options(block, kernel_num=kernel_num, reduction=reduction), layers,
                         num_classes=num_classes)
        self.kernel_num = kernel_num
        self.dropout = nn.Dropout(p=dropout)
        # As od_resnet.py: kaiming (fan_out) convolutions (torchvision's loop; each ODConv2d kernel by
        # ODConv2d itself, attention biases zero), and the classifier N(0, 0.01) with a zero bias.
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def set_temperature(self, temperature: float) -> None:
        """Set the attention temperature of every ODConv2d (1 for evaluation; training anneals it)."""
        for module in self.modules():
            if isinstance(module, ODConvAttention):
                module.temperature = float(temperature)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def _create_od_resnet(block, layers, kernel_num: int, *, num_classes: int, dropout: float) -> ODResNet:
    return ODResNet(block, layers, num_classes=num_classes, dropout=dropout, kernel_num=kernel_num)


_R18 = (ODBasicBlock, [2, 2, 2, 2])
_R50 = (ODBottleneck, [3, 4, 6, 3])
_R101 = (ODBottleneck, [3, 4, 23, 3])

# Parameter counts in the docstrings are this implementation's (robustbench_dyn.profile.count_parameters);
# the ODConv paper's (ICLR 2022 Tables 2-3, ablation Table 5) are in reference/paper_tables.csv.


@register_model
def od_resnet18_1x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-18, 1 kernel per layer; 11.94M parameters (paper 11.94M)."""
    return _create_od_resnet(*_R18, 1, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet18_2x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-18, 2 kernels per layer; 22.93M parameters (paper ablation: 22.93M)."""
    return _create_od_resnet(*_R18, 2, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet18_4x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-18, 4 kernels per layer; 44.90M parameters (paper 44.90M)."""
    return _create_od_resnet(*_R18, 4, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet50_1x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-50, 1 kernel per layer; 28.64M parameters (paper 28.64M)."""
    return _create_od_resnet(*_R50, 1, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet50_2x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-50, 2 kernels per layer (no paper row)."""
    return _create_od_resnet(*_R50, 2, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet50_4x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-50, 4 kernels per layer; 90.67M parameters (paper 90.67M)."""
    return _create_od_resnet(*_R50, 4, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet101_1x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-101, 1 kernel per layer; 50.82M parameters (paper 50.82M)."""
    return _create_od_resnet(*_R101, 1, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet101_2x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-101, 2 kernels per layer; 90.44M parameters (paper 90.44M)."""
    return _create_od_resnet(*_R101, 2, num_classes=num_classes, dropout=dropout)


@register_model
def od_resnet101_4x(*, num_classes: int = 1000, dropout: float = 0.1) -> ODResNet:
    """ODConv ResNet-101, 4 kernels per layer (no paper row)."""
    return _create_od_resnet(*_R101, 4, num_classes=num_classes, dropout=dropout)
