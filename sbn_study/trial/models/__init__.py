"""`create_model`: an architecture of the catalog (`sbn_study.spec.catalog.ARCHITECTURES`) with its norms placed.

Importing this package must not import torch (the spec validator and the CLI must start fast), so an
architecture's builder is imported when a model is created.

Every model takes a `norm_layer(num_features, stage) -> nn.Module` and calls it at every normalization site
(stage 0 = the stem, shortcut norms in their block's stage); `sbn_study.trial.norms.NormPlacement` decides what it
gets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sbn_study.spec.catalog import architecture

if TYPE_CHECKING:
    from torch import nn

    from sbn_study.spec.config import ModelConfig, NormConfig


def _build(arch: str, num_classes: int, norm_cfg: NormConfig, options: dict[str, Any]) -> nn.Module:
    from sbn_study.trial.norms import NormPlacement

    entry = architecture(arch)
    policy = NormPlacement(norm_cfg, arch, entry.stages)
    module, _, function = entry.builder.partition(":")
    builder = getattr(importlib.import_module(module), function)
    return builder(num_classes, policy, **options)


def create_model(
    arch: str, num_classes: int, norm: str = "bn", placement: str = "none", **options: Any
) -> nn.Module:
    """`arch` with `norm` at the `placement` stages and every other `NormConfig` field at its default;
    `options` go to the builder (`width` for tiny, `dropout` for the VGGs).
    """
    from sbn_study.spec.config import NormConfig

    return _build(arch, num_classes, NormConfig(kind=norm, placement=placement), options)


def create_model_from_config(model_cfg: ModelConfig, norm_cfg: NormConfig, num_classes: int) -> nn.Module:
    options = {name: getattr(model_cfg, name) for name in architecture(model_cfg.arch).options}
    return _build(model_cfg.arch, num_classes, norm_cfg, options)
