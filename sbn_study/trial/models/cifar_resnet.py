"""He et al.'s CIFAR ResNets (depth 6n+2): a 16-channel stem and three stages of n basic blocks with 16, 32
and 64 channels. Where the shape changes the shortcut is a 1×1 conv + norm projection (option B) rather than
the paper's zero-padding (option A), so a placement also reaches the shortcut norms; that adds about 1 %
parameters.
"""

from __future__ import annotations

from sbn_study.trial.models.resnet import BasicBlock, NormLayer, ResNet

_WIDTHS = (16, 32, 64)


def _cifar_resnet(depth: int, num_classes: int, norm_layer: NormLayer) -> ResNet:
    blocks = (depth - 2) // 6
    return ResNet(BasicBlock, (blocks,) * 3, _WIDTHS, num_classes, norm_layer)


def resnet20(num_classes: int, norm_layer: NormLayer) -> ResNet:
    return _cifar_resnet(20, num_classes, norm_layer)


def resnet32(num_classes: int, norm_layer: NormLayer) -> ResNet:
    return _cifar_resnet(32, num_classes, norm_layer)


def resnet56(num_classes: int, norm_layer: NormLayer) -> ResNet:
    return _cifar_resnet(56, num_classes, norm_layer)


def resnet110(num_classes: int, norm_layer: NormLayer) -> ResNet:
    return _cifar_resnet(110, num_classes, norm_layer)
