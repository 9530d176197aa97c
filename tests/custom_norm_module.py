"""A user's own norms, as `norm.kind: "tests.custom_norm_module:<name>"` places them (tests/test_custom_norm.py)."""

from __future__ import annotations

import torch
from torch import nn


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """BN times a fixed `gain`; it keeps what it was told about its site, for the tests to read."""

    def __init__(
        self, channels: int, *, stage: int, spatial: tuple[int, int] | None, gain: float = 1.0
    ) -> None:
        super().__init__(channels)
        self.stage = stage
        self.spatial = spatial
        self.gain = gain

    def forward(self, input):
        return super().forward(input) * self.gain


def layer_norm(channels: int, *, stage: int, spatial: tuple[int, int] | None) -> nn.Module:
    """A factory function rather than a class: LayerNorm over (C, H, W), which needs the site's map size."""
    if spatial is None:
        raise ValueError("layer_norm needs the site's spatial size")
    return nn.LayerNorm([channels, *spatial])


def takes_no_site(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def returns_a_number(channels: int, *, stage: int, spatial: tuple[int, int] | None) -> int:
    return channels


NOT_CALLABLE = 3


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost BN with a fixed ghost batch (Hoffer et al. 2017): statistics over each group of `ghost` images.
    A batch smaller than a ghost batch has no group to take them over, and fails, as BN fails at one value
    per channel: what the batch-size sweep must count rather than drop (tests/test_batch_sizes.py)."""

    def __init__(self, channels: int, *, stage: int, spatial: tuple[int, int] | None, ghost: int = 4) -> None:
        super().__init__(channels)
        self.ghost = ghost

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        if input.shape[0] < self.ghost:
            raise ValueError(f"expected a batch of at least {self.ghost} images, got {input.shape[0]}")
        groups = input.split(self.ghost)
        return torch.cat([super(GhostBatchNorm2d, self).forward(group) for group in groups])
