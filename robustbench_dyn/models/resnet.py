"""Static baselines: ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
and ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017).

Built from torchvision's own ``ResNet``, ``BasicBlock`` and ``Bottleneck`` classes, so parameter names
and shapes are torchvision's and its released checkpoints load as they are (stride on the 3x3, "v1.5").
Nothing is downloaded: the models start randomly initialised; users pass weights files.

Depths 26 and 38 exist only as baselines in the dynamic-convolution papers (Bi-volution Table 1,
DCDC Table I). They use RedNet's depth settings (involution paper, d-li14/involution ``rednet.py``):
26 = (1, 2, 4, 1) and 38 = (2, 3, 5, 2) bottlenecks, with torchvision's stem and blocks. That gives
13.70M and 19.63M parameters, the papers' 13.7M and 19.6M.
"""

from __future__ import annotations

from typing import Union

from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from robustbench_dyn.models.registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]


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
