from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sbn_study.errors import UserError
from sbn_study.spec.catalog import ARCHITECTURES
from sbn_study.spec.config import ModelConfig, NormConfig
from sbn_study.trial.models import create_model, create_model_from_config
from sbn_study.trial.norms import norm_sites
from sbn_study.trial.sbn import SpectralBatchNorm2d

# Normalization sites per stage (index 0 = stem), counted by hand from the architectures: blocks × norms per
# block, plus one per projection shortcut (the first block of every stage whose shape changes).
SITES_PER_STAGE: dict[str, tuple[int, ...]] = {
    "resnet18": (1, 2 * 2, 2 * 2 + 1, 2 * 2 + 1, 2 * 2 + 1),
    "resnet34": (1, 3 * 2, 4 * 2 + 1, 6 * 2 + 1, 3 * 2 + 1),
    "resnet50": (1, 3 * 3 + 1, 4 * 3 + 1, 6 * 3 + 1, 3 * 3 + 1),
    "resnet20": (1, 3 * 2, 3 * 2 + 1, 3 * 2 + 1),
    "resnet32": (1, 5 * 2, 5 * 2 + 1, 5 * 2 + 1),
    "resnet56": (1, 9 * 2, 9 * 2 + 1, 9 * 2 + 1),
    "resnet110": (1, 18 * 2, 18 * 2 + 1, 18 * 2 + 1),
    "vgg16_bn": (0, 2, 2, 3, 3, 3),
    "vgg19_bn": (0, 2, 2, 4, 4, 4),
    "tiny": (1, 1, 1, 1),
}
# The paper's favourite: the last two stages (SBN34 on a 4-stage ResNet).
DEEP_PLACEMENT = {3: "23", 4: "34", 5: "45"}


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(type(module) is kind for module in model.modules())


def test_every_arch_has_a_site_table() -> None:
    assert set(SITES_PER_STAGE) == set(ARCHITECTURES)
    for arch, sites in SITES_PER_STAGE.items():
        assert len(sites) == ARCHITECTURES[arch].stages + 1, arch


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_arch_forward_and_sbn_counts(arch: str) -> None:
    sites = SITES_PER_STAGE[arch]
    model = create_model(arch, 7, "sbn", "all")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert _count(model, SpectralBatchNorm2d) == _count(model, nn.BatchNorm2d) == sum(sites)

    placement = DEEP_PLACEMENT[ARCHITECTURES[arch].stages]
    placed = sum(sites[int(stage)] for stage in placement)
    model = create_model(arch, 7, "sbn", placement)
    assert _count(model, SpectralBatchNorm2d) == placed
    assert _count(model, nn.BatchNorm2d) == sum(sites)

    model = create_model(arch, 7, "2bn", placement)
    assert _count(model, SpectralBatchNorm2d) == 0
    assert _count(model, nn.BatchNorm2d) == sum(sites) + placed

    baseline = create_model(arch, 7, "sbn", "none")
    assert _count(baseline, SpectralBatchNorm2d) == 0
    assert norm_sites(baseline) == norm_sites(create_model(arch, 7))


RESNET18_SITES = [
    "bn1",
    *(f"layer1.{b}.bn{i}" for b in range(2) for i in (1, 2)),
    *(
        site
        for stage in (2, 3, 4)
        for site in (
            f"layer{stage}.0.bn1",
            f"layer{stage}.0.bn2",
            f"layer{stage}.0.downsample.1",
            f"layer{stage}.1.bn1",
            f"layer{stage}.1.bn2",
        )
    ),
]


def _stage(site: str) -> int:
    return int(site[len("layer")]) if site.startswith("layer") else 0


def test_resnet18_sites() -> None:
    assert norm_sites(create_model("resnet18", 10)) == RESNET18_SITES


@pytest.mark.parametrize("placement", ["1", "2", "3", "4", "34", "all"])
def test_resnet18_placement_stage_by_stage(placement: str) -> None:
    stages = {0, 1, 2, 3, 4} if placement == "all" else {int(s) for s in placement}
    sites = norm_sites(create_model("resnet18", 10, "sbn", placement))
    expected = [
        leaf
        for site in RESNET18_SITES
        for leaf in ((f"{site}.bn", f"{site}.sbn") if _stage(site) in stages else (site,))
    ]
    assert sites == expected


def test_resnet18_sbn34_matches_the_paper() -> None:
    sbn = [site for site in norm_sites(create_model("resnet18", 100, "sbn", "34")) if site.endswith(".sbn")]
    assert sbn == [
        "layer3.0.bn1.sbn",
        "layer3.0.bn2.sbn",
        "layer3.0.downsample.1.sbn",
        "layer3.1.bn1.sbn",
        "layer3.1.bn2.sbn",
        "layer4.0.bn1.sbn",
        "layer4.0.bn2.sbn",
        "layer4.0.downsample.1.sbn",
        "layer4.1.bn1.sbn",
        "layer4.1.bn2.sbn",
    ]


def test_module_names_are_torchvision_like() -> None:
    names = dict(create_model("resnet50", 10).named_modules())
    assert {"conv1", "bn1", "layer1.0.conv3", "layer1.0.bn3", "layer4.2.bn3", "fc"} <= set(names)
    assert norm_sites(create_model("vgg16_bn", 10))[:3] == ["layer1.bn1", "layer1.bn2", "layer2.bn1"]
    assert norm_sites(create_model("tiny", 10)) == ["bn1", "layer1.bn", "layer2.bn", "layer3.bn"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts() -> None:
    assert _params(create_model("resnet18", 100)) == pytest.approx(11.2e6, rel=0.01)
    # He et al.'s 0.27M; the projection shortcuts add 2,752 parameters.
    assert _params(create_model("resnet20", 10)) == pytest.approx(0.27e6, rel=0.02)
    assert 10_000 <= _params(create_model("tiny", 10)) <= 60_000


def test_convs_get_kaiming_uniform() -> None:
    conv = create_model("resnet20", 10).layer3[1].conv2
    bound = math.sqrt(6 / (64 * 3 * 3))
    assert 0.95 * bound < conv.weight.abs().max().item() <= bound


def test_unknown_arch_lists_the_known_ones() -> None:
    with pytest.raises(UserError) as info:
        create_model("x", 10)
    assert str(info.value) == (
        "model.arch: unknown architecture 'x'; known: resnet18, resnet20, resnet32, resnet34, resnet50, "
        "resnet56, resnet110, tiny, vgg16_bn, vgg19_bn"
    )


def test_invalid_placement_and_kind_surface_as_user_errors() -> None:
    with pytest.raises(UserError) as info:
        create_model("resnet20", 10, "sbn", "4")
    assert str(info.value) == "norm.placement: stage 4 does not exist in resnet20 (stages 1-3)"
    with pytest.raises(UserError) as info:
        create_model("resnet20", 10, "xyz", "none")
    assert str(info.value) == (
        "norm.kind: unknown norm 'xyz'; known: 2bn, bgn, bn, bnscale, cbn, gn, iebn, mbn, none, proxynorm, sbn, "
        "sbn_center, sbn_noaffine, sbn_nospike, sbn_var, scale, spike"
    )


def test_create_model_from_config_passes_the_arch_options() -> None:
    norm = NormConfig(kind="gn", placement="all", groups=4, eps=1e-3)
    tiny = create_model_from_config(ModelConfig(arch="tiny", width=8), norm, 5)
    assert tiny.fc.in_features == 32
    assert isinstance(tiny.layer3.bn, nn.GroupNorm)
    assert (tiny.layer3.bn.num_groups, tiny.layer3.bn.eps) == (4, 1e-3)
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 5)

    vgg = create_model_from_config(ModelConfig(arch="vgg16_bn", dropout=0.25), NormConfig(placement="4"), 5)
    assert [m.p for m in vgg.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.25]
    # width belongs to tiny only; a ResNet builds from the same config without it.
    create_model_from_config(ModelConfig(arch="resnet20", width=8), NormConfig(placement="3"), 5)


def test_importing_models_does_not_import_torch() -> None:
    code = "import sys, sbn_study.trial.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=True)


# --- the norm-act slot left every earlier kind as it was --------------------------------------------------

BEFORE_NORM_ACT = json.loads((Path(__file__).parent / "data" / "models_before_norm_act.json").read_text())
EARLIER_KINDS = sorted({key.split("/")[1] for key in BEFORE_NORM_ACT["models"]})


def _digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _as_recorded(arch: str, kind: str, outputs: bool) -> dict[str, Any]:
    """What the recording holds for `create_model(arch, 10, kind, "all")`, built as it was built."""
    torch.manual_seed(0)
    model = create_model(arch, 10, kind, "all")
    built: dict[str, Any] = {
        "state_dict": _digest(list(model.state_dict())),
        "parameters": _digest([name for name, _ in model.named_parameters()]),
        "sites": _digest(norm_sites(model)),
    }
    if outputs:
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            built["train"] = model(x).flatten().tolist()
            built["eval"] = model.eval()(x).flatten().tolist()
    return built


def _check(arch: str, kind: str, outputs: bool) -> None:
    recorded = BEFORE_NORM_ACT["models"][f"{arch}/{kind}"]
    built = _as_recorded(arch, kind, outputs)
    for key, value in built.items():
        if key in ("train", "eval"):
            assert value == pytest.approx(recorded[key], abs=2e-6), (arch, kind, key)
        else:
            assert value == recorded[key], (arch, kind, key)


@pytest.mark.parametrize("arch", ["resnet18", "tiny", "vgg16_bn"])
def test_every_earlier_kind_keeps_its_state_dict_parameter_and_site_names(arch: str) -> None:
    for kind in EARLIER_KINDS:
        _check(arch, kind, outputs=arch == "tiny" or kind in ("bn", "sbn"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vgg16_bn"])
def test_every_earlier_kind_computes_what_it_computed_before_the_norm_act_slot(arch: str) -> None:
    for kind in EARLIER_KINDS:
        _check(arch, kind, outputs=True)
