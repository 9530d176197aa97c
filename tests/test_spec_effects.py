"""Searched settings that cannot change a trial are refused (or warned about where they act only for some of
the sampled values), and the catalog's "which setting acts where" agrees with what the trial side builds."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from sbn_study.spec import spec_from_dict
from sbn_study.spec.catalog import ARCHITECTURES, NORMS
from sbn_study.spec.config import ModelConfig, NormConfig, TrainConfig, TrialConfig
from tests.test_spec import BASE, errors_of, merged, space

LOG_EPS = {"loguniform": [1e-6, 1e-2]}
FEW_PLACEMENTS = {"choice": ["none", "3", "23"]}

REFUSED: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "the dataset",
        space(data__dataset={"choice": ["cifar10", "cifar100"]}),
        [
            "search.space.data.dataset: cannot be searched: the driver loads the dataset once per study and every "
            "trial trains on it, so each would use the base data.dataset while MLflow records the sampled one; run "
            "one study per value instead"
        ],
    ),
    (
        "a VGG option on tiny",
        space(model__dropout={"uniform": [0.1, 0.5]}),
        [
            "search.space.model.dropout: can never act: it acts only when model.arch is one of vgg16_bn, "
            "vgg19_bn, and model.arch is always tiny in the trials that sample it; search model.arch too, or drop "
            "model.dropout"
        ],
    ),
    (
        "groups of a kind without groups",
        space(norm__groups={"choice": [4, 8]}),
        [
            "search.space.norm.groups: can never act: it acts only when norm.kind is one of bgn, gn, and "
            "norm.kind is always sbn in the trials that sample it; search norm.kind too, or drop norm.groups"
        ],
    ),
    (
        "eps of a kind that never adds it",
        {"norm": {"kind": "sbn_center"}},
        [
            "search.space.norm.eps: can never act: it acts only when norm.kind is not one of none, sbn_center, and "
            "norm.kind is always sbn_center in the trials that sample it; search norm.kind too, or drop norm.eps"
        ],
    ),
    (
        "a norm setting without a placement",
        {"norm": {"placement": "none"}},
        [
            "search.space.norm.eps: can never act: it acts only when norm.placement is not none, and "
            "norm.placement is always none in the trials that sample it; search norm.placement too, or drop "
            "norm.eps"
        ],
    ),
    (
        "a step-schedule setting under cosine",
        {"train": {"schedule": "cosine"}, **space(train__gamma={"uniform": [0.1, 0.5]})},
        [
            "search.space.train.gamma: can never act: it acts only when train.schedule is step, and "
            "train.schedule is always cosine in the trials that sample it; search train.schedule too, or drop "
            "train.gamma"
        ],
    ),
    (
        "a condition that never holds",
        space(norm__eps={**LOG_EPS, "when": {"norm.kind": "gn"}}),
        ['search.space.norm.eps: never sampled: its when needs norm.kind in ["gn"], which is always sbn'],
    ),
    (
        "bnscale without affine",
        {"norm": {"kind": "bnscale", "affine": False}},
        [
            "norm.affine: norm.kind bnscale needs norm.affine: true (it learns its downscale as the BatchNorm's "
            "γ), but a trial of kind bnscale can have norm.affine: false"
        ],
    ),
    (
        "bnscale searched where affine is off",
        {"norm": {"affine": False}, **space(norm__kind={"choice": ["sbn", "bnscale"]})},
        [
            "search.space.norm.kind: norm.kind bnscale needs norm.affine: true (it learns its downscale as the "
            "BatchNorm's γ), but a trial of kind bnscale can have norm.affine: false"
        ],
    ),
]


@pytest.mark.parametrize(
    ("patch", "expected"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_a_searched_setting_that_can_never_act_is_refused(patch: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(merged(BASE, patch)) == expected


def test_settings_that_act_where_they_are_sampled_pass() -> None:
    data = merged(
        BASE,
        space(
            data__augment={"choice": [True, False]},  # applied by each trial's loader
            model__width={"choice": [8, 16]},
            norm__kind={"choice": ["sbn", "gn", "bnscale"]},
            norm__groups={"choice": [4, 8], "when": {"norm.kind": ["gn"]}},
            norm__affine={"choice": [True, False], "when": {"norm.kind": ["sbn", "gn"]}},
        ),
    )
    assert spec_from_dict(data).warnings() == []


def test_a_setting_sampled_also_where_it_cannot_act_is_warned_about_until_its_when_says_so() -> None:
    unconditional = merged(BASE, space(norm__placement=FEW_PLACEMENTS, norm__eps=LOG_EPS))
    assert spec_from_dict(unconditional).warnings() == [
        "search.space.norm.eps: acts only when norm.placement is not none, but is also sampled when "
        'norm.placement is none; restrict it with when: {norm.placement: ["3", "23"]}'
    ]
    conditional = space(
        norm__placement=FEW_PLACEMENTS, norm__eps={**LOG_EPS, "when": {"norm.placement": ["3", "23"]}}
    )
    assert spec_from_dict(merged(BASE, conditional)).warnings() == []


def test_a_condition_on_a_conditional_key_sees_its_base_value() -> None:
    # fft_norm's when holds on kind, but kind is not sampled under placement none and keeps its base (sbn).
    data = space(
        norm__placement=FEW_PLACEMENTS,
        norm__kind={"choice": ["sbn", "2bn"], "when": {"norm.placement": ["3", "23"]}},
        norm__fft_norm={"choice": ["backward", "ortho"], "when": {"norm.kind": ["sbn"]}},
    )
    assert spec_from_dict(merged(BASE, data)).warnings() == [
        "search.space.norm.fft_norm: acts only when norm.placement is not none, but is also sampled when "
        'norm.placement is none; restrict it with when: {norm.placement: ["3", "23"]}'
    ]


def test_an_eps_large_against_the_spectral_variance_of_its_fft_norm_is_warned_about() -> None:
    fft_norms = {"choice": ["backward", "ortho", "forward"]}
    data = merged(BASE, space(norm__eps=LOG_EPS, norm__fft_norm=fft_norms))
    assert spec_from_dict(data).warnings() == [
        "search.space.norm.eps: reaches 0.01 where norm.fft_norm is forward, under which SBN's spectral variance "
        "of a unit-variance 32×32 map is about 1e-03: an eps above 1e-04 changes what SBN computes; restrict it "
        'with when: {norm.fft_norm: ["backward", "ortho"]} or a smaller eps'
    ]
    restricted = space(
        norm__eps={**LOG_EPS, "when": {"norm.fft_norm": ["backward", "ortho"]}}, norm__fft_norm=fft_norms
    )
    assert spec_from_dict(merged(BASE, restricted)).warnings() == []
    # Only the kinds that add eps to a spectral variance: 2BN's eps meets no FFT norm.
    assert spec_from_dict(merged(BASE, {"norm": {"kind": "2bn", "fft_norm": "forward"}})).warnings() == []


# --- the catalog against the trial side ------------------------------------------------------------------

# A value of each setting other than its default (groups: 32 is clamped to the 8 channels built here).
OTHER_VALUE: dict[str, Any] = {
    "eps": 0.5,
    "momentum": 0.9,
    "affine": False,
    "fft_norm": "forward",
    "impl": "fft",
    "groups": 2,
}


def _behaviour(kind: str, cfg: NormConfig) -> tuple[Any, ...]:
    """What a layer of `kind` does: its parameters, its implementation, and its outputs in training, after one
    SGD step (so that a setting that only reparametrizes β shows) and in eval mode (running statistics)."""
    import torch

    from sbn_study.trial.norms import get_norm_layer

    torch.manual_seed(0)
    layer = get_norm_layer(kind)(8, cfg)
    inputs = torch.randn(4, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    parameters = [(name, tuple(p.shape)) for name, p in layer.named_parameters()]
    impls = [getattr(module, "impl", None) for module in layer.modules()]
    first = layer(inputs[0])
    if parameters:
        (first * inputs[3]).sum().backward()
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter -= 0.1 * parameter.grad
    second = layer(inputs[1])
    outputs = [first, second, layer.eval()(inputs[2])]
    return parameters, impls, [output.detach() for output in outputs]


def _differ(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    import torch

    return a[:2] != b[:2] or not all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a[2], b[2], strict=True)
    )


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_a_kind_reads_exactly_the_settings_the_catalog_says(kind: str) -> None:
    from sbn_study.errors import UserError

    required = {setting: needed for setting, needed, _ in NORMS[kind].requires}
    default = _behaviour(kind, NormConfig(kind=kind))
    for setting, value in OTHER_VALUE.items():
        changed = NormConfig(kind=kind, **{setting: value})
        if setting in required and value != required[setting]:
            with pytest.raises(UserError):
                _behaviour(kind, changed)
        else:
            assert _differ(default, _behaviour(kind, changed)) == (setting in NORMS[kind].reads), setting


def test_no_norm_setting_acts_without_a_placement() -> None:
    from sbn_study.trial.models import create_model_from_config

    def built(**norm: Any) -> str:
        return repr(
            create_model_from_config(
                ModelConfig(arch="tiny", width=4), NormConfig(placement="none", **norm), 10
            )
        )

    assert built() == built(kind="2bn", eps=0.5, momentum=0.9, affine=False, fft_norm="forward", groups=2)


def test_an_architecture_takes_exactly_the_model_options_the_catalog_says() -> None:
    from sbn_study.trial.models import create_model_from_config

    options = set(ModelConfig.model_fields) - {"arch"}
    for arch, entry in ARCHITECTURES.items():
        module, _, function = entry.builder.partition(":")
        builder = getattr(importlib.import_module(module), function)
        assert options & set(inspect.signature(builder).parameters) == set(entry.options), arch
    norm = NormConfig(placement="none")
    for arch, option, values in (("tiny", "width", (4, 8)), ("vgg16_bn", "dropout", (0.1, 0.5))):
        first, second = (
            repr(create_model_from_config(ModelConfig(arch=arch, **{option: v}), norm, 10)) for v in values
        )
        assert first != second, (arch, option)


@pytest.mark.parametrize("schedule", ["step", "cosine", "constant"])
def test_gamma_and_milestones_act_under_the_step_schedule_only(schedule: str) -> None:
    from sbn_study.trial.train import lr_at

    def lrs(**train: Any) -> list[float]:
        config = TrialConfig(train=TrainConfig(epochs=10, schedule=schedule, **train))
        return [lr_at(config, epoch) for epoch in range(10)]

    acts = schedule == "step"
    assert (lrs(gamma=0.1) != lrs(gamma=0.5)) == acts
    assert (lrs(milestones=[2]) != lrs(milestones=[5])) == acts
