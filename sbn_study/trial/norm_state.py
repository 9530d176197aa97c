"""The parameters and buffers the batch normalizers share, under `nn.BatchNorm2d`'s names, so that a checkpoint,
an optimizer's weight-decay groups and the feature statistics find them whichever normalizer a model got."""

from __future__ import annotations

import torch
from torch import nn


def add_affine(module: nn.Module, num_features: int, affine: bool) -> None:
    """The per-channel affine transform `weight` (γ = 1) and `bias` (β = 0), or None for both."""
    module.weight = nn.Parameter(torch.ones(num_features)) if affine else None
    module.bias = nn.Parameter(torch.zeros(num_features)) if affine else None


def add_running_statistics(module: nn.Module, size: int) -> None:
    """`running_mean` (0), `running_var` (1) of `size` entries and `num_batches_tracked`."""
    module.register_buffer("running_mean", torch.zeros(size))
    module.register_buffer("running_var", torch.ones(size))
    module.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
