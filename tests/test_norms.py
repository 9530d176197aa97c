from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbn_study.errors import UserError
from sbn_study.spec.config import NormConfig
from sbn_study.trial.norms import (
    NORM_KINDS,
    BatchGroupNorm2d,
    InstanceEnhancementBatchNorm2d,
    NormPlacement,
    get_norm_layer,
    norm_parameters,
    norm_sites,
    parse_placement,
)
from sbn_study.trial.proxynorm import ProxyNormAct2d
from sbn_study.trial.sbn import SpectralBatchNorm2d


def test_norm_kinds_are_the_registry_keys_sorted() -> None:
    assert NORM_KINDS == (
        "2bn",
        "bgn",
        "bn",
        "bnscale",
        "cbn",
        "gn",
        "iebn",
        "mbn",
        "none",
        "proxynorm",
        "sbn",
        "sbn_center",
        "sbn_noaffine",
        "sbn_nospike",
        "sbn_var",
        "scale",
        "spike",
    )
    for kind in NORM_KINDS:
        assert callable(get_norm_layer(kind))


def test_unknown_norm_kind_lists_the_known_ones() -> None:
    with pytest.raises(UserError) as info:
        get_norm_layer("xyz")
    assert str(info.value) == (
        "norm.kind: unknown norm 'xyz'; known: 2bn, bgn, bn, bnscale, cbn, gn, iebn, mbn, none, proxynorm, sbn, "
        "sbn_center, sbn_noaffine, sbn_nospike, sbn_var, scale, spike"
    )


def test_sbn_is_a_plain_bn_followed_by_the_configured_sbn() -> None:
    cfg = NormConfig(kind="sbn", eps=1e-3, momentum=0.2, affine=False, fft_norm="ortho")
    layer = get_norm_layer("sbn")(8, cfg)
    assert isinstance(layer, nn.Sequential)
    assert [name for name, _ in layer.named_children()] == ["bn", "sbn"]
    assert type(layer.bn) is nn.BatchNorm2d
    assert (layer.bn.eps, layer.bn.momentum, layer.bn.affine) == (1e-5, 0.1, True)
    assert isinstance(layer.sbn, SpectralBatchNorm2d)
    assert sum(p.numel() for p in layer.sbn.parameters()) == 0  # affine=False reached the SBN
    assert layer(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)


def test_2bn_is_two_batchnorms_the_second_configured() -> None:
    cfg = NormConfig(kind="2bn", eps=1e-3, momentum=0.2)
    layer = get_norm_layer("2bn")(8, cfg)
    assert [name for name, _ in layer.named_children()] == ["bn", "bn2"]
    assert (layer.bn.eps, layer.bn.momentum) == (1e-5, 0.1)
    assert (layer.bn2.eps, layer.bn2.momentum) == (1e-3, 0.2)


def test_bn_takes_the_config() -> None:
    layer = get_norm_layer("bn")(8, NormConfig(kind="bn", eps=1e-3, momentum=None, affine=False))
    assert type(layer) is nn.BatchNorm2d
    assert (layer.eps, layer.momentum, layer.affine) == (1e-3, None, False)


@pytest.mark.parametrize(
    ("channels", "groups", "expected"), [(64, 32, 32), (16, 32, 16), (48, 32, 24), (10, 4, 2)]
)
def test_group_count_is_clamped_to_a_divisor(channels: int, groups: int, expected: int) -> None:
    cfg = NormConfig(kind="gn", groups=groups, eps=1e-3)
    gn = get_norm_layer("gn")(channels, cfg)
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.eps) == (expected, 1e-3)
    bgn = get_norm_layer("bgn")(channels, cfg)
    assert isinstance(bgn, BatchGroupNorm2d)
    assert bgn.num_groups == expected


def test_none_is_an_identity() -> None:
    assert isinstance(get_norm_layer("none")(8, NormConfig(kind="none")), nn.Identity)


def test_batch_group_norm_reduces_to_group_norm_for_one_sample_and_to_bn_for_one_channel_per_group() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 5) * 3 + 1
    bgn = BatchGroupNorm2d(8, 4)
    torch.testing.assert_close(bgn(x), F.group_norm(x, 4, eps=1e-5))

    x = torch.randn(4, 8, 5, 5) * 3 + 1
    bgn, bn = BatchGroupNorm2d(8, 8, momentum=0.3), nn.BatchNorm2d(8, momentum=0.3)
    with torch.no_grad():
        for module in (bgn, bn):
            module.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
            module.bias.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(bgn(x), bn(x))
    torch.testing.assert_close(bgn.running_mean, bn.running_mean)
    torch.testing.assert_close(bgn.running_var, bn.running_var)
    bgn.eval()
    bn.eval()
    torch.testing.assert_close(bgn(x), bn(x))


def test_batch_group_norm_pools_each_group_over_batch_channels_and_space() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6, 4, 4) * 2 + 5
    bgn = BatchGroupNorm2d(6, 2, momentum=None, affine=False)
    grouped = x.reshape(3, 2, 3, 4, 4)
    mean = grouped.mean(dim=(0, 2, 3, 4), keepdim=True)
    var = grouped.var(dim=(0, 2, 3, 4), unbiased=False, keepdim=True)
    expected = ((grouped - mean) / torch.sqrt(var + 1e-5)).reshape_as(x)
    torch.testing.assert_close(bgn(x), expected)
    # momentum=None: a cumulative average, so after one batch the running stats are that batch's.
    torch.testing.assert_close(bgn.running_mean, mean.flatten())
    torch.testing.assert_close(bgn.running_var, grouped.var(dim=(0, 2, 3, 4)).flatten())


def _iebn_reference(
    x: torch.Tensor, layer: InstanceEnhancementBatchNorm2d, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """y = (x − μ)/√(σ² + ε) · γ·σ(a·mean_hw(x) + b) + β, in float64."""
    c = x.shape[1]
    gain, shift = layer.gain.double(), layer.shift.double()
    a, b = layer.gate_weight.double(), layer.gate_bias.double()
    gate = torch.sigmoid(x.mean(dim=(2, 3)) * a + b)
    normalized = (x - mean.view(1, c, 1, 1)) / torch.sqrt(var.view(1, c, 1, 1) + layer.eps)
    return normalized * (gain * gate).view(*gate.shape, 1, 1) + shift.view(1, c, 1, 1)


def test_iebn_matches_a_float64_reference_in_training_and_eval() -> None:
    torch.manual_seed(0)
    layer = InstanceEnhancementBatchNorm2d(5, eps=1e-3, momentum=0.5)
    with torch.no_grad():
        for param, low, high in ((layer.gain, 0.5, 1.5), (layer.shift, -1, 1), (layer.gate_weight, -2, 2)):
            param.uniform_(low, high)
    x = (torch.randn(8, 5, 6, 7) * 3 + torch.randn(1, 5, 1, 1)).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
    y, expected = layer(x), _iebn_reference(x64, layer, mean, var)
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-5
    grad = torch.randn_like(x)
    (actual_grad,) = torch.autograd.grad(y, x, grad)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad.double())
    assert ((actual_grad.double() - expected_grad).norm() / expected_grad.norm()).item() < 1e-5
    # BN's own running statistics (momentum 0.5 from 0 and 1), used in eval mode.
    running_mean, running_var = 0.5 * mean.detach(), 0.5 + 0.5 * x64.detach().var(dim=(0, 2, 3))
    torch.testing.assert_close(layer.running_mean.double(), running_mean)
    torch.testing.assert_close(layer.running_var.double(), running_var)
    layer.eval()
    fresh = torch.randn(3, 5, 6, 7)
    expected_eval = _iebn_reference(fresh.double(), layer, running_mean, running_var)
    assert ((layer(fresh).double() - expected_eval).norm() / expected_eval.norm()).item() < 1e-5


def test_iebn_starts_as_bn_with_each_gain_gated_by_sigmoid_of_minus_one() -> None:
    # a = 0 and b = −1 at initialization: every channel's gain is σ(−1) ≈ 0.269 of BN's, whatever the sample.
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    iebn = get_norm_layer("iebn")(3, NormConfig(eps=1e-5, momentum=0.1))
    torch.testing.assert_close(iebn(x), nn.BatchNorm2d(3)(x) * torch.sigmoid(torch.tensor(-1.0)))
    assert {name for name, _ in iebn.named_parameters()} == {"gain", "shift", "gate_weight", "gate_bias"}


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("34", {3, 4}),
        ("43", {3, 4}),
        ("4", {4}),
        ("234", {2, 3, 4}),
        ("all", {0, 1, 2, 3, 4}),
        ("none", set()),
    ],
)
def test_parse_placement_accepts_the_paper_notation(placement: str, expected: set[int]) -> None:
    assert parse_placement(placement, 4, "resnet18") == frozenset(expected)


@pytest.mark.parametrize(
    ("placement", "stages", "arch", "message"),
    [
        ("5", 4, "resnet18", "norm.placement: stage 5 does not exist in resnet18 (stages 1-4)"),
        ("4", 3, "resnet20", "norm.placement: stage 4 does not exist in resnet20 (stages 1-3)"),
        ("34", 3, "tiny", "norm.placement: stage 4 does not exist in tiny (stages 1-3)"),
        ("0", 3, "resnet20", "norm.placement: stage 0 does not exist in resnet20 (stages 1-3)"),
        ("x", 4, "resnet18", 'norm.placement: expected stage digits like "34", "all" or "none", got "x"'),
        ("x3", 4, "resnet18", 'norm.placement: expected stage digits like "34", "all" or "none", got "x3"'),
        ("3 4", 4, "resnet18", 'norm.placement: expected stage digits like "34", "all" or "none", got "3 4"'),
        ("", 4, "resnet18", 'norm.placement: expected stage digits like "34", "all" or "none", got ""'),
        ("ALL", 4, "resnet18", 'norm.placement: expected stage digits like "34", "all" or "none", got "ALL"'),
    ],
)
def test_parse_placement_rejects_with_the_key_path(
    placement: str, stages: int, arch: str, message: str
) -> None:
    with pytest.raises(UserError) as info:
        parse_placement(placement, stages, arch)
    assert str(info.value) == message


def test_placement_policy_places_the_kind_only_at_placed_stages() -> None:
    policy = NormPlacement(NormConfig(kind="2bn", placement="3", eps=1e-3), "resnet20", 3)
    placed = policy(16, 3)
    assert [name for name, _ in placed.named_children()] == ["bn", "bn2"]
    for stage in (0, 1, 2):
        plain = policy(16, stage)
        assert type(plain) is nn.BatchNorm2d
        assert plain.eps == 1e-5  # cfg only reaches the placed layer
    with pytest.raises(ValueError, match="stage 4 outside 0-3"):
        policy(16, 4)


def test_placement_policy_validates_kind_and_placement_up_front() -> None:
    with pytest.raises(UserError, match="unknown norm 'sbm'"):
        NormPlacement(NormConfig(kind="sbm", placement="none"), "resnet20", 3)
    with pytest.raises(UserError, match="stage 4 does not exist in resnet20"):
        NormPlacement(NormConfig(kind="sbn", placement="34"), "resnet20", 3)


def _toy(kind: str) -> nn.Sequential:
    policy = NormPlacement(NormConfig(kind=kind, placement="1"), "toy", 1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), policy(4, 0), nn.Conv2d(4, 4, 3), policy(4, 1), nn.Linear(2, 2))


def test_norm_sites_lists_the_normalizing_leaves() -> None:
    assert norm_sites(_toy("sbn")) == ["1", "3.bn", "3.sbn"]
    assert norm_sites(_toy("2bn")) == ["1", "3.bn", "3.bn2"]
    assert norm_sites(_toy("gn")) == ["1", "3"]
    assert norm_sites(_toy("bgn")) == ["1", "3"]
    assert norm_sites(_toy("none")) == ["1"]


def test_norm_parameters_are_exactly_the_norm_affine_parameters() -> None:
    model = _toy("sbn")
    params = {id(p) for p in norm_parameters(model)}
    expected = [
        model[1].weight,
        model[1].bias,
        model[3].bn.weight,
        model[3].bn.bias,
        *model[3].sbn.parameters(),
    ]
    assert params == {id(p) for p in expected}
    assert all(id(p) not in params for p in [*model[0].parameters(), *model[4].parameters()])


def test_the_norm_act_slot_is_the_norm_and_a_relu_for_every_kind_but_proxynorm() -> None:
    for kind in NORM_KINDS:
        policy = NormPlacement(NormConfig(kind=kind, placement="1"), "toy", 1)
        norm, act = policy.norm_act(4, 1)
        if kind == "proxynorm":
            assert isinstance(norm, nn.GroupNorm) and not norm.affine and isinstance(act, ProxyNormAct2d)
        else:
            assert type(norm) is type(policy(4, 1)) and type(act) is nn.ReLU, kind
        plain, relu = policy.norm_act(4, 0)
        assert type(plain) is nn.BatchNorm2d and type(relu) is nn.ReLU


def test_the_new_kinds_are_norm_sites_and_proxy_parameters_are_norm_parameters() -> None:
    for kind in ("cbn", "mbn", "proxynorm"):
        assert norm_sites(_toy(kind)) == ["1", "3"], kind
    policy = NormPlacement(NormConfig(kind="proxynorm", placement="1"), "toy", 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), *policy.norm_act(4, 1))
    assert norm_sites(model) == ["1", "2"]
    assert {id(p) for p in norm_parameters(model)} == {id(p) for p in model[2].parameters()}
    assert {name for name, _ in model[2].named_parameters()} == {
        "weight",
        "bias",
        "proxy_weight",
        "proxy_bias",
    }
