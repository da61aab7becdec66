"""Static baselines: ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
and ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017).

Built from torchvision's own ``ResNet``, ``BasicBlock`` and ``Bottleneck`` classes, so parameter names
and shapes are torchvision's and its released checkpoints load as they are (stride on the 3x3, "v1.5").
Nothing is downloaded: the models start randomly initialised; users pass weights files.

Depths 26 and 38 exist only as baselines in the dynamic-convolution papers (Bi-volution Table 1,
DCDC Table I). They use RedNet's depth settings (involution paper, d-li14/involution ``rednet.py``):
26 = (1, 2, 4, 1) and 38 = (2, 3, 5, 2) bottlenecks, with torchvision's stem and blocks. That gives
13.70M and 19.63M parameters, the papers' 13.7M and 19.6M.

The skeleton is shared: :class:`ResNet` is torchvision's class (its parameter names, its
initialisation) with an optional family ``stem`` in place of ``conv1``/``bn1``/``relu``, and
:func:`block_with_options` binds a family's block options (the DDF, involution and Bi-volution
bottlenecks replace ``conv2``, the spatial 3x3, and keep every other name).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from robustbench_dyn.models.registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "block_with_options"]


class ResNet(tv_resnet.ResNet):
    """torchvision's ResNet, whose parameter names every family keeps, with an optional stem.

    Without ``stem`` this is exactly torchvision's model (``conv1``, ``bn1``, ``relu``, ``maxpool``,
    ``layer1``-``layer4``, ``fc``). With ``stem`` (a module taking the RGB image to 64 channels at
    stride 2, e.g. RedNet's involution stem) that module, registered as ``stem``, replaces
    ``conv1``/``bn1``/``relu``; the max-pool and everything after it are unchanged.
    ``block`` may carry bound options (:func:`block_with_options`). Every other argument is
    torchvision's. The initialisation is torchvision's for every module, the stem's included.
    """

    def __init__(self, block, layers, *args, stem: Optional[nn.Module] = None, **kwargs):
        super().__init__(block, layers, *args, **kwargs)
        if stem is not None:
            del self.conv1, self.bn1, self.relu
            # Registered first, so that printing and state_dict() follow the forward order.
            later = {name: getattr(self, name) for name in list(self._modules)}
            for name in later:
                delattr(self, name)
            self.stem = stem
            for name, module in later.items():
                setattr(self, name, module)
            for module in stem.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                    nn.init.constant_(module.weight, 1)
                    nn.init.constant_(module.bias, 0)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        if "stem" in self._modules:
            x = self.stem(x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def block_with_options(block: type[nn.Module], **options) -> Callable[..., nn.Module]:
    """``block`` with keyword ``options`` bound, usable as :class:`ResNet`'s ``block``.

    torchvision's ResNet calls ``block(inplanes, planes, stride, downsample, groups, base_width,
    dilation, norm_layer)`` and reads ``block.expansion``; the returned factory passes ``options``
    on as keywords and carries the class's ``expansion``.
    """
    factory = functools.partial(block, **options)
    factory.expansion = block.expansion
    return factory


def _create_resnet(
    block: type[Union[BasicBlock, Bottleneck]],
    layers: list[int],
    *,
    num_classes: int,
    zero_init_residual: bool,
    groups: int = 1,
    width_per_group: int = 64,
) -> ResNet:
    return ResNet(
        block,
        layers,
        num_classes=num_classes,
        zero_init_residual=zero_init_residual,
        groups=groups,
        width_per_group=width_per_group,
    )


# Every baseline evaluates with torchvision's ImageNet transform (Resize 256 bilinear, CenterCrop 224,
# ImageNet mean/std), the registry's default Preprocessing; torchvision's released V1 weights were
# measured that way (ResNet-50 76.130, ResNeXt-50 32x4d 77.618 top-1).


@register_model
def resnet18(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18: BasicBlock (2, 2, 2, 2); 11.69M parameters. The ODConv papers' baseline."""
    return _create_resnet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model
def resnet26(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-26: Bottleneck (1, 2, 4, 1), RedNet-26's depth setting; 13.70M parameters."""
    return _create_resnet(Bottleneck, [1, 2, 4, 1], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model
def resnet38(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-38: Bottleneck (2, 3, 5, 2), RedNet-38's depth setting; 19.63M parameters."""
    return _create_resnet(Bottleneck, [2, 3, 5, 2], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model
def resnet50(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50: Bottleneck (3, 4, 6, 3); 25,557,032 parameters (torchvision)."""
    return _create_resnet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model
def resnet101(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNet-101: Bottleneck (3, 4, 23, 3); 44,549,160 parameters (torchvision)."""
    return _create_resnet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)


@register_model
def resnext50_32x4d(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNeXt-50 32x4d: Bottleneck (3, 4, 6, 3), 32 groups of width 4; 25,028,904 parameters (torchvision)."""
    return _create_resnet(
        Bottleneck, [3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual,
        groups=32, width_per_group=4,
    )


@register_model
def resnext101_32x4d(*, num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ResNeXt-101 32x4d: Bottleneck (3, 4, 23, 3), 32 groups of width 4; 44.18M parameters.

    torchvision has no builder for it (only 32x8d and 64x4d); this is its ResNet class with the
    ResNeXt paper's 32x4d setting, so torchvision-style names apply.
    """
    return _create_resnet(
        Bottleneck, [3, 4, 23, 3], num_classes=num_classes, zero_init_residual=zero_init_residual,
        groups=32, width_per_group=4,
    )
