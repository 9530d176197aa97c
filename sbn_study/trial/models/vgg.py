"""VGG-16/19 with BN for CIFAR: five conv blocks, each closed by a 2×2 max-pool, are the stages
`layer1..layer5` (no stem, so "all" places at stages 1-5). 32×32 inputs leave a 512×1×1 map for the
classifier, which is the usual CIFAR one: two 512-wide hidden layers, each preceded by dropout (the paper's
0.5).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from sbn_study.trial.models.resnet import NormLayer, conv3x3, init_weights

_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_VGG19_STAGES = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))


class VGG(nn.Module):
    """Stage k is `layerk` = conv1, bn1, relu1, conv2, ... , pool; sites read e.g. `layer4.bn2`."""

    def __init__(
        self,
        stages: Sequence[Sequence[int]],
        num_classes: int,
        norm_layer: NormLayer,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        in_channels = 3
        self.stage_names: list[str] = []
        for stage, widths in enumerate(stages, start=1):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for index, width in enumerate(widths, start=1):
                layers[f"conv{index}"] = conv3x3(in_channels, width)
                layers[f"bn{index}"], layers[f"relu{index}"] = norm_layer.norm_act(width, stage)
                in_channels = width
            layers["pool"] = nn.MaxPool2d(2)
            self.stage_names.append(f"layer{stage}")
            self.add_module(f"layer{stage}", nn.Sequential(layers))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_channels, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn(num_classes: int, norm_layer: NormLayer, dropout: float = 0.5) -> VGG:
    return VGG(_VGG16_STAGES, num_classes, norm_layer, dropout)


def vgg19_bn(num_classes: int, norm_layer: NormLayer, dropout: float = 0.5) -> VGG:
    return VGG(_VGG19_STAGES, num_classes, norm_layer, dropout)
