"""ResNets with torchvision's module names, built for 32×32 inputs.

`resnet18/34/50` are the ImageNet ResNets as the paper trains them on CIFAR: a 3×3 stride-1 stem and no
max-pool (`stem="imagenet"`: torchvision's, for 224-pixel images), then four stages (64-512 channels). The same `ResNet` also builds He et al.'s 3-stage CIFAR ResNets
(`cifar_resnet.py`). Every normalization comes from `norm_layer(num_features, stage)`, stage 0 being the stem,
and every norm the activation follows comes with its activation from `norm_layer.norm_act(num_features,
stage)`; a block's shortcut norm belongs to the block's stage. Each norm is registered right after the conv
that feeds it (Cross-Iteration BN finds its conv so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn


class NormLayer(Protocol):
    """What a model asks for its norms (`sbn_study.trial.norms.NormPlacement` answers)."""

    def __call__(self, num_features: int, stage: int) -> nn.Module: ...

    def norm_act(self, num_features: int, stage: int) -> tuple[nn.Module, nn.Module]: ...


def init_weights(model: nn.Module) -> None:
    """The paper's Kaiming-uniform (fan_in, ReLU gain) for every conv. Norm layers keep their own init
    (BN: weight 1, bias 0) and linear layers PyTorch's default, which is what torchvision's CIFAR ports do.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shortcut(
    in_planes: int, out_planes: int, stride: int, norm_layer: NormLayer, stage: int
) -> nn.Module | None:
    # A projection (He et al.'s option B) wherever the shape changes, so placement reaches shortcut norms too.
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), norm_layer(out_planes, stage))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer, stage: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1, self.relu1 = norm_layer.norm_act(planes, stage)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes, stage)
        # Not in place: feature-statistics hooks may hold on to a norm's output.
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_planes, planes, stride, norm_layer, stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3×3 conv."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer, stage: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1, self.relu1 = norm_layer.norm_act(planes, stage)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2, self.relu2 = norm_layer.norm_act(planes, stage)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = norm_layer(out_planes, stage)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(in_planes, out_planes, stride, norm_layer, stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem `conv1`/`bn1` (stage 0), stages `layer1..layerK` (the first keeps the resolution, each later one
    halves it), global average pool, `fc`.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        in_planes = widths[0]
        self.conv1 = conv3x3(3, in_planes)
        self.bn1, self.relu = norm_layer.norm_act(in_planes, 0)
        self.maxpool: nn.Module = nn.Identity()  # `with_stem` sets ImageNet's
        self.stage_names: list[str] = []
        for stage, (num_blocks, planes) in enumerate(zip(blocks_per_stage, widths, strict=True), start=1):
            layer = []
            for index in range(num_blocks):
                stride = 2 if stage > 1 and index == 0 else 1
                layer.append(block(in_planes, planes, stride, norm_layer, stage))
                in_planes = planes * block.expansion
            self.stage_names.append(f"layer{stage}")
            self.add_module(f"layer{stage}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_IMAGENET_WIDTHS = (64, 128, 256, 512)


def with_stem(model: ResNet, stem: str) -> ResNet:
    """`model` with `stem` "cifar" (as built) or "imagenet": torchvision's 7×7 stride-2 conv and 3×3 stride-2
    max-pool, for 224-pixel images and the ImageNet weights trained with them."""
    if stem == "imagenet":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 7, stride=2, padding=3, bias=False)
        init_weights(model.conv1)
        model.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    elif stem != "cifar":
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    return model


def resnet18(num_classes: int, norm_layer: NormLayer, stem: str = "cifar") -> ResNet:
    return with_stem(ResNet(BasicBlock, (2, 2, 2, 2), _IMAGENET_WIDTHS, num_classes, norm_layer), stem)


def resnet34(num_classes: int, norm_layer: NormLayer, stem: str = "cifar") -> ResNet:
    return with_stem(ResNet(BasicBlock, (3, 4, 6, 3), _IMAGENET_WIDTHS, num_classes, norm_layer), stem)


def resnet50(num_classes: int, norm_layer: NormLayer, stem: str = "cifar") -> ResNet:
    return with_stem(ResNet(Bottleneck, (3, 4, 6, 3), _IMAGENET_WIDTHS, num_classes, norm_layer), stem)
