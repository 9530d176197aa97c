"""Proxy Normalization against a float64 reference that integrates the proxy's moments numerically; the
authors' quantile estimate converges to it; it is batch-independent; the norm-act slot places it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sbn_study.spec.config import ModelConfig, NormConfig
from sbn_study.trial.data import load_dataset
from sbn_study.trial.models import create_model_from_config
from sbn_study.trial.proxynorm import ProxyNormAct2d, relu_moments
from sbn_study.trial.train import train
from tests.test_train import tiny_config

EPS = 1e-3
# Parameters away from their initial values, one γ negative: the proxy's width is |γ·(1 + γ̃)|.
PARAMETERS = {
    "weight": [1.0, 0.5, 2.0, -0.7],
    "bias": [0.0, 0.3, -1.0, 0.2],
    "proxy_bias": [0.0, 0.2, -0.1, 0.3],
    "proxy_weight": [0.0, -0.3, 0.4, 0.1],
}


def _layer() -> ProxyNormAct2d:
    layer = ProxyNormAct2d(4, eps=EPS)
    with torch.no_grad():
        for name, values in PARAMETERS.items():
            getattr(layer, name).copy_(torch.tensor(values))
    return layer


def _reference(x, weight, bias, proxy_bias, proxy_weight):
    """PN-Act with E and Var over Y ~ N(β̃, (1 + γ̃)²) integrated numerically in float64 (trapezoid rule on
    Y = β̃ + (1 + γ̃)·u, over the u where γY + β > 0, up to 12 standard deviations): differentiable in every
    argument (ReLU's kink is at the edge of the range, where the integrands vanish)."""
    slope = weight * (1 + proxy_weight)
    kink = (-(weight * proxy_bias + bias) / slope).detach().clamp(-12, 12)
    end = torch.where(slope > 0, 12.0, -12.0).double()
    u = kink + (end - kink) * torch.linspace(0, 1, 100_001, dtype=torch.float64)[:, None]
    density = torch.exp(-0.5 * u.square()) / math.sqrt(2 * math.pi)
    positive = weight * (proxy_bias + (1 + proxy_weight) * u) + bias

    def expectation(values: torch.Tensor) -> torch.Tensor:
        return torch.trapezoid(values * density, dim=0) * (end - kink).abs() / (len(u) - 1)

    mean = expectation(positive)
    var = expectation(positive.square()) - mean.square()
    activated = torch.relu(x * weight[:, None, None] + bias[:, None, None])
    return (activated - mean[:, None, None]) / torch.sqrt(var[:, None, None] + EPS)


def test_pn_act_matches_a_float64_reference_forward_and_backward() -> None:
    layer = _layer()
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    leaves = [x.detach().double().requires_grad_()]
    leaves += [getattr(layer, name).detach().double().requires_grad_() for name in PARAMETERS]
    expected = _reference(*leaves)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (expected * upstream.double()).sum().backward()
    y = layer(x)
    (y * upstream).sum().backward()
    actual = [y, x.grad, *(getattr(layer, name).grad for name in PARAMETERS)]
    wanted = [expected, *(leaf.grad for leaf in leaves)]
    errors = [((a.double() - e).norm() / e.norm()).item() for a, e in zip(actual, wanted, strict=True)]
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize(("points", "tolerance"), [(256, 0.015), (4096, 0.001)])
def test_the_authors_quantile_estimate_of_the_moments_converges_to_the_closed_form(
    points: int, tolerance: float
) -> None:
    weight, bias, proxy_bias, proxy_weight = (
        torch.tensor(v, dtype=torch.float64) for v in PARAMETERS.values()
    )
    mean, var = relu_moments(weight * proxy_bias + bias, (weight * (1 + proxy_weight)).abs())
    quantiles = torch.special.ndtri((torch.arange(points, dtype=torch.float64) + 0.5) / points)
    proxy = torch.relu(weight * (proxy_bias + (1 + proxy_weight) * quantiles[:, None]) + bias)
    assert ((proxy.mean(0) - mean) / mean).abs().max() < tolerance
    assert ((proxy.var(0, unbiased=False) - var) / var).abs().max() < tolerance


def test_a_zero_width_proxy_is_a_point_mass() -> None:
    mean, var = relu_moments(torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 0.0]))
    assert mean.tolist() == [0.0, 0.5] and var.tolist() == [0.0, 0.0]


def test_pn_act_is_batch_independent_and_the_same_in_eval() -> None:
    layer = _layer()
    x = torch.randn(4, 4, 3, 3)
    alone = layer(x[:1])
    torch.testing.assert_close(layer(x)[:1], alone)
    torch.testing.assert_close(layer.eval()(x)[:1], alone)


def test_at_initialization_pn_act_normalizes_standard_normal_inputs() -> None:
    y = ProxyNormAct2d(3)(torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    flat = y.transpose(0, 1).flatten(1)
    assert flat.mean(1).abs().max() < 0.02
    assert (flat.var(1) - 1).abs().max() < 0.02


def _modules(arch: str, placement: str, **norm: object) -> dict[str, nn.Module]:
    config = NormConfig(kind="proxynorm", placement=placement, **norm)
    return dict(create_model_from_config(ModelConfig(arch=arch, width=8), config, 10).named_modules())


def test_the_norm_act_slot_places_gn_then_pn_act_and_gn_with_its_affine_where_no_activation_follows() -> None:
    modules = _modules("resnet18", "4", groups=8)
    for norm, act in (("layer4.0.bn1", "layer4.0.relu1"), ("layer4.1.bn1", "layer4.1.relu1")):
        assert isinstance(modules[norm], nn.GroupNorm) and not modules[norm].affine
        assert modules[norm].num_groups == 8
        assert isinstance(modules[act], ProxyNormAct2d)
    for norm in ("layer4.0.bn2", "layer4.0.downsample.1"):
        assert isinstance(modules[norm], nn.GroupNorm) and modules[norm].affine
    assert type(modules["layer3.1.bn1"]) is nn.BatchNorm2d and type(modules["layer3.1.relu1"]) is nn.ReLU
    tiny = _modules("tiny", "all", proxynorm_base="ln")
    assert [tiny[f"{layer}.bn"].num_groups for layer in ("layer1", "layer2", "layer3")] == [1, 1, 1]
    assert isinstance(tiny["relu"], ProxyNormAct2d)


@pytest.mark.parametrize("base", [{"groups": 2}, {"proxynorm_base": "ln"}], ids=["gn", "ln"])
def test_proxynorm_trains_the_tiny_model_well_above_chance(base: dict[str, object]) -> None:
    config = tiny_config(epochs=5, lr=0.2)
    # groups: 2, as the default 32 on the 8 to 32 channels of this model would be one channel per group, i.e.
    # instance norm, with which (as with plain gn) this model does not learn the synthetic data.
    config.norm = config.norm.model_copy(update={"kind": "proxynorm", "placement": "all", **base})
    config.features.enabled = False
    dataset = load_dataset(config.data)
    result = train(config, dataset=dataset)
    assert result.status == "completed"
    assert result.best_val_acc > 4 / dataset.num_classes, [round(m["val_acc"], 3) for m in result.history]
