"""The architectures and `create_model`.

Importing this package must not import torch: the spec validator and the CLI read `ARCHS` and have to start
fast, so the builders are imported inside `create_model`.

Every model takes a `norm_layer(num_features, stage) -> nn.Module` and calls it at every normalization site
(stage 0 = the stem, shortcut norms in their block's stage); `sbn_study.trial.norms.NormPlacement` decides what it
gets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sbn_study.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from sbn_study.spec.config import ModelConfig, NormConfig

# Architecture → number of stages a placement may name (1..n). Listed in the order errors show them.
ARCHS: dict[str, int] = {
    "resnet18": 4,
    "resnet20": 3,
    "resnet32": 3,
    "resnet34": 4,
    "resnet50": 4,
    "resnet56": 3,
    "resnet110": 3,
    "tiny": 3,
    "vgg16_bn": 5,
    "vgg19_bn": 5,
}

_MODULES: dict[str, str] = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "resnet20": "cifar_resnet",
    "resnet32": "cifar_resnet",
    "resnet56": "cifar_resnet",
    "resnet110": "cifar_resnet",
    "tiny": "tiny",
    "vgg16_bn": "vgg",
    "vgg19_bn": "vgg",
}

# The ModelConfig fields an architecture's builder takes as keyword options; the others ignore them.
_CONFIG_OPTIONS: dict[str, tuple[str, ...]] = {
    "tiny": ("width",),
    "vgg16_bn": ("dropout",),
    "vgg19_bn": ("dropout",),
}


def num_stages(arch: str) -> int:
    """The stage count of `arch`; UserError naming the known architectures if there is no such one."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise UserError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(ARCHS)}") from None


def _build(arch: str, num_classes: int, norm_cfg: NormConfig, options: dict[str, Any]) -> nn.Module:
    from sbn_study.trial.norms import NormPlacement

    policy = NormPlacement(norm_cfg, arch, num_stages(arch))
    builder = getattr(importlib.import_module(f"sbn_study.trial.models.{_MODULES[arch]}"), arch)
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
    options = {name: getattr(model_cfg, name) for name in _CONFIG_OPTIONS.get(model_cfg.arch, ())}
    return _build(model_cfg.arch, num_classes, norm_cfg, options)
