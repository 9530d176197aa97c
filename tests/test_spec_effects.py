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
            "search.space.norm.groups: can never act: it acts only when norm.kind is one of bgn, gn, proxynorm, and "
            "norm.kind is always sbn in the trials that sample it; search norm.kind too, or drop norm.groups"
        ],
    ),
    (
        "a CBN setting of another kind",
        space(norm__cbn_window={"int": [2, 8]}),
        [
            "search.space.norm.cbn_window: can never act: it acts only when norm.kind is cbn, and norm.kind is "
            "always sbn in the trials that sample it; search norm.kind too, or drop norm.cbn_window"
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


def test_the_groups_of_the_group_norms_and_the_settings_of_cbn_mbn_and_proxynorm_can_be_searched() -> None:
    data = merged(
        BASE,
        space(
            norm__kind={"choice": ["gn", "bgn", "proxynorm", "cbn", "mbn"]},
            norm__groups={"choice": [2, 4, 8], "when": {"norm.kind": ["gn", "bgn", "proxynorm"]}},
            norm__cbn_window={"int": [2, 8], "when": {"norm.kind": ["cbn"]}},
            norm__cbn_burnin={"int": [0, 2000], "when": {"norm.kind": ["cbn"]}},
            norm__mbn_window={"int": [1, 8], "when": {"norm.kind": ["mbn"]}},
            norm__mbn_double_forward={"choice": [True, False], "when": {"norm.kind": ["mbn"]}},
            norm__proxynorm_base={"choice": ["gn", "ln"], "when": {"norm.kind": ["proxynorm"]}},
        ),
    )
    spec = spec_from_dict(data)
    assert spec.warnings() == []
    assert spec.search.space["norm.groups"].values == (2, 4, 8)


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

# A value of each setting other than its default (groups: 32 is clamped to the 8 channels built here). No
# built-in kind reads `options`: they are a custom kind's.
OTHER_VALUE: dict[str, Any] = {
    "eps": 0.5,
    "momentum": 0.9,
    "affine": False,
    "fft_norm": "forward",
    "impl": "fft",
    "groups": 2,
    "cbn_window": 2,
    "cbn_burnin": 2,
    "mbn_window": 2,
    "mbn_double_forward": False,
    "proxynorm_base": "ln",
    "options": {"gain": 2.0},
}
# Where the default would hide a setting within the few steps built here: CBN's default burn-in outlasts them.
BASE_SETTINGS: dict[str, dict[str, Any]] = {"cbn": {"cbn_burnin": 0}}
# A window of 2 batches differs from one of 4 from the third step on.
WINDOWS = frozenset({"cbn_window", "mbn_window"})


def _behaviour(kind: str, cfg: NormConfig) -> tuple[Any, ...]:
    """What `kind` does at a norm site and at a norm-act site (where that is not the norm and a ReLU), each
    behind a 1×1 conv that starts as the identity (CBN compensates for its weights): the parameters, the
    implementation, and the outputs of training steps with an SGD step after each (so that a setting that only
    reparametrizes β shows), then in eval mode (running statistics, memories)."""
    import torch
    from torch import nn

    from sbn_study.trial.norms import NormPlacement

    class Sites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            policy = NormPlacement(cfg, "toy", 1)
            self.conv = nn.Conv2d(8, 8, 1, bias=False)
            self.norm = policy(8, 1)
            self.act_conv = nn.Conv2d(8, 8, 1, bias=False)
            self.act_norm, self.act = policy.norm_act(8, 1)
            # A norm and a ReLU would only repeat the norm site.
            self.paired = not isinstance(self.act, nn.ReLU)
            for conv in (self.conv, self.act_conv):
                nn.init.eye_(conv.weight[:, :, 0, 0])
            policy.bind(self)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outputs = [self.norm(self.conv(x))]
            if self.paired:
                outputs.append(self.act(self.act_norm(self.act_conv(x))))
            return torch.cat(outputs)

    torch.manual_seed(0)
    sites = Sites()
    steps = 3 if WINDOWS & NORMS[kind].reads else 2
    inputs = torch.randn(steps + 2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 + 1
    parameters = [(name, tuple(p.shape)) for name, p in sites.named_parameters()]
    impls = [getattr(module, "impl", None) for module in sites.modules()]
    outputs = []
    for step in range(steps):
        output = sites(inputs[step])
        (output * inputs[-1].repeat(len(output) // len(inputs[-1]), 1, 1, 1)).sum().backward()
        with torch.no_grad():
            for parameter in sites.parameters():
                if parameter.grad is not None:  # the unpaired norm-act site's are unused
                    parameter -= 0.1 * parameter.grad
                    parameter.grad = None
        outputs.append(output.detach())
    outputs.append(sites.eval()(inputs[steps]).detach())
    return parameters, impls, outputs


def _differ(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    import torch

    return a[:2] != b[:2] or not all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a[2], b[2], strict=True)
    )


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_a_kind_reads_exactly_the_settings_the_catalog_says(kind: str) -> None:
    from sbn_study.errors import UserError

    required = {setting: needed for setting, needed, _ in NORMS[kind].requires}
    base = {"kind": kind, "placement": "1", **BASE_SETTINGS.get(kind, {})}
    default = _behaviour(kind, NormConfig(**base))
    for setting, value in OTHER_VALUE.items():
        changed = NormConfig(**{**base, setting: value})
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

    assert built() == built(kind="2bn", **{k: v for k, v in OTHER_VALUE.items() if k != "options"})
    assert built() == built(kind="tests.custom_norm_module:ScaledBatchNorm2d", options={"gain": 2.0})


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
