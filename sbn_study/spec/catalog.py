"""What a trial can be built from, as data: the architectures and the norm kinds, and the placement notation.

The spec checks (and so `sbn-study validate`) read these without importing torch; `sbn_study.trial.models`
builds from `ARCHITECTURES`, and `sbn_study.trial.norms` holds one factory per name in `NORM_KINDS` (a test
keeps the two the same set).
"""

from __future__ import annotations

from dataclasses import dataclass

from sbn_study.errors import UserError


@dataclass(frozen=True)
class Architecture:
    stages: int  # the stages a placement may name, 1..stages (stage 0 is the stem)
    builder: str  # "module:function", called as function(num_classes, norm_layer, **options)
    options: tuple[str, ...] = ()  # the ModelConfig fields the builder takes as keyword options


_RESNET = "sbn_study.trial.models.resnet"
_CIFAR_RESNET = "sbn_study.trial.models.cifar_resnet"
_VGG = "sbn_study.trial.models.vgg"

# In the order errors list them.
ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture(4, f"{_RESNET}:resnet18"),
    "resnet20": Architecture(3, f"{_CIFAR_RESNET}:resnet20"),
    "resnet32": Architecture(3, f"{_CIFAR_RESNET}:resnet32"),
    "resnet34": Architecture(4, f"{_RESNET}:resnet34"),
    "resnet50": Architecture(4, f"{_RESNET}:resnet50"),
    "resnet56": Architecture(3, f"{_CIFAR_RESNET}:resnet56"),
    "resnet110": Architecture(3, f"{_CIFAR_RESNET}:resnet110"),
    "tiny": Architecture(3, "sbn_study.trial.models.tiny:tiny", ("width",)),
    "vgg16_bn": Architecture(5, f"{_VGG}:vgg16_bn", ("dropout",)),
    "vgg19_bn": Architecture(5, f"{_VGG}:vgg19_bn", ("dropout",)),
}

# What `norm.kind` may name (sorted, as errors list them); `sbn_study.trial.norms` says what each one places.
NORM_KINDS: tuple[str, ...] = (
    "2bn",
    "bgn",
    "bn",
    "bnscale",
    "gn",
    "iebn",
    "none",
    "sbn",
    "sbn_center",
    "sbn_noaffine",
    "sbn_nospike",
    "sbn_var",
    "scale",
    "spike",
)


def architecture(arch: str) -> Architecture:
    """The registration of `arch`; UserError naming the known architectures if there is no such one."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        known = ", ".join(ARCHITECTURES)
        raise UserError(f"model.arch: unknown architecture {arch!r}; known: {known}") from None


def parse_placement(placement: str, num_stages: int, arch: str) -> frozenset[int]:
    """The stages a placement names, in the paper's notation: stage digits in any order ("34" = SBN34,
    counted from 1), "all" (every stage and the stem, stage 0) or "none". `arch` only names the model in
    errors.
    """
    if placement == "none":
        return frozenset()
    if placement == "all":
        return frozenset(range(num_stages + 1))
    if not placement or not all(ch in "0123456789" for ch in placement):
        raise UserError(
            f'norm.placement: expected stage digits like "34", "all" or "none", got "{placement}"'
        )
    stages = frozenset(int(ch) for ch in placement)
    for stage in sorted(stages):
        if not 1 <= stage <= num_stages:
            raise UserError(f"norm.placement: stage {stage} does not exist in {arch} (stages 1-{num_stages})")
    return stages
