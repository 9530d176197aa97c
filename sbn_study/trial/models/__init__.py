"""`create_model`: an architecture of the catalog (`sbn_study.spec.catalog.ARCHITECTURES`) with its norms placed.

Importing this package must not import torch (the spec validator and the CLI must start fast), so an
architecture's builder is imported when a model is created.

Every model takes a `norm_layer(num_features, stage) -> nn.Module` and calls it at every normalization site
(stage 0 = the stem, shortcut norms in their block's stage), or `norm_layer.norm_act(num_features, stage)` for a
(norm, activation) pair where the activation follows the norm; it registers each norm right after the conv
that feeds it. `sbn_study.trial.norms.NormPlacement` decides what it gets, and is handed the built model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sbn_study.spec.catalog import architecture

if TYPE_CHECKING:
    from torch import nn

    from sbn_study.spec.config import ModelConfig, NormConfig


def _build(
    arch: str,
    num_classes: int,
    norm_cfg: NormConfig,
    options: dict[str, Any],
    input_size: tuple[int, int] | None = None,
) -> nn.Module:
    from sbn_study.trial.norms import NormPlacement

    entry = architecture(arch)
    policy = NormPlacement(norm_cfg, arch, entry.stages)
    module, _, function = entry.builder.partition(":")
    builder = getattr(importlib.import_module(module), function)

    def build(norm_layer: NormPlacement) -> nn.Module:
        return builder(num_classes, norm_layer, **options)

    # Only a custom kind is told its sites' map sizes: the built-in layers need none.
    if input_size is not None and policy.custom is not None:
        policy.measure(build, input_size)
    return policy.bind(build(policy))


def create_model(
    arch: str, num_classes: int, norm: str = "bn", placement: str = "none", **options: Any
) -> nn.Module:
    """`arch` with `norm` at the `placement` stages and every other `NormConfig` field at its default;
    `options` go to the builder (`width` for tiny, `dropout` for the VGGs).
    """
    from sbn_study.spec.config import NormConfig

    return _build(arch, num_classes, NormConfig(kind=norm, placement=placement), options)


def create_model_from_config(
    model_cfg: ModelConfig, norm_cfg: NormConfig, num_classes: int, input_size: tuple[int, int] | None = None
) -> nn.Module:
    """The model of a trial configuration; `input_size` (H, W) of its images, where known, is what tells a
    custom norm kind the map size at each of its sites."""
    options = {name: getattr(model_cfg, name) for name in architecture(model_cfg.arch).options}
    model = _build(model_cfg.arch, num_classes, norm_cfg, options, input_size)
    if model_cfg.weights is not None:
        from sbn_study.trial.pretrained import load_weights

        described = " ".join([model_cfg.arch, *(f"({k} {v})" for k, v in options.items())])
        load_weights(model, model_cfg.weights, described)
    return model
