"""A CNN small enough to train on a laptop CPU in seconds (about 26k parameters at width 16), for tests and
the quick-start: a stem and three stages of one conv + norm + ReLU each, `width`, 2·`width` and 4·`width`
channels, 2×2 max-pools between the stages, global average pool, `fc`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sbn_study.trial.models.resnet import NormLayer, conv3x3, init_weights


class TinyNet(nn.Module):
    """Names follow the ResNets: stem `conv1`/`bn1` (stage 0), `layerk.conv`/`layerk.bn`, `fc`."""

    def __init__(self, num_classes: int, norm_layer: NormLayer, width: int = 16) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, width)
        self.bn1, self.relu = norm_layer.norm_act(width, 0)
        in_channels = width
        for stage, channels in enumerate((width, 2 * width, 4 * width), start=1):
            conv = conv3x3(in_channels, channels)
            norm, act = norm_layer.norm_act(channels, stage)
            layer = OrderedDict(conv=conv, bn=norm, relu=act)
            self.add_module(f"layer{stage}", nn.Sequential(layer))
            in_channels = channels
        self.pool = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.layer1(x))
        x = self.pool(self.layer2(x))
        x = self.layer3(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny(num_classes: int, norm_layer: NormLayer, width: int = 16) -> TinyNet:
    return TinyNet(num_classes, norm_layer, width)
