"""What a trial can be built from, as data: the architectures and the norm kinds, which setting acts for
which of them (`acts_only_when`), the datasets' sizes, and the placement notation.

The spec checks (and so `sbn-study validate`) read these without importing torch; `sbn_study.trial.models`
builds from `ARCHITECTURES`, and `sbn_study.trial.norms` holds one factory per name in `NORM_KINDS` (tests
keep the two the same set, and build every kind and option to keep the "acts" facts true).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class NormKind:
    # The `norm.*` settings the placed layer is built from: the others cannot change a trial of this kind.
    reads: frozenset[str]
    # (setting, value, why) that the layer cannot be built without.
    requires: tuple[tuple[str, Any, str], ...] = ()


_BN_SETTINGS = frozenset({"eps", "momentum", "affine"})
# `impl` picks how a spectral layer computes (`sbn_study.trial.sbn`): exactly the spectral kinds read it.
_SPECTRAL_SETTINGS = _BN_SETTINGS | {"fft_norm", "impl"}

# What `norm.kind` may name (sorted, as errors list them) and what each reads; `sbn_study.trial.norms` has
# one factory per kind, and a test builds each with two values of every setting to keep `reads` true.
NORMS: dict[str, NormKind] = {
    "2bn": NormKind(_BN_SETTINGS),
    "bgn": NormKind(_BN_SETTINGS | {"groups"}),
    "bn": NormKind(_BN_SETTINGS),
    "bnscale": NormKind(
        frozenset({"eps", "momentum", "fft_norm"}),
        requires=(("affine", True, "it learns its downscale as the BatchNorm's γ"),),
    ),
    "gn": NormKind(frozenset({"eps", "affine", "groups"})),  # no running statistics
    "iebn": NormKind(_BN_SETTINGS),
    "none": NormKind(frozenset()),
    "sbn": NormKind(_SPECTRAL_SETTINGS),
    "sbn_center": NormKind(_SPECTRAL_SETTINGS - {"eps"}),  # it never divides, so never adds eps
    "sbn_noaffine": NormKind(_SPECTRAL_SETTINGS - {"affine"}),  # affine off, whatever the setting
    "sbn_nospike": NormKind(_SPECTRAL_SETTINGS),
    "sbn_var": NormKind(_SPECTRAL_SETTINGS),
    "scale": NormKind(_BN_SETTINGS | {"fft_norm"}),
    "spike": NormKind(_SPECTRAL_SETTINGS),
}
NORM_KINDS: tuple[str, ...] = tuple(NORMS)
# The kinds whose layer adds `eps` to a spectral variance, which `fft_norm` scales by (H·W)^±1.
SPECTRAL_EPS_KINDS: frozenset[str] = frozenset(k for k, n in NORMS.items() if {"eps", "impl"} <= n.reads)


@dataclass(frozen=True)
class Needs:
    """A setting acts only when `key` has one of `values` (with `negated`: none of them)."""

    key: str
    values: frozenset[Any]
    negated: bool = False

    def holds(self, value: Any) -> bool:
        return (value in self.values) != self.negated

    def __str__(self) -> str:
        listed = ", ".join(sorted(map(str, self.values)))
        return f"{self.key} is {'not ' if self.negated else ''}{'one of ' if len(self.values) > 1 else ''}{listed}"


_PLACED = Needs("norm.placement", frozenset({"none"}), negated=True)
_STEP_SCHEDULE = Needs("train.schedule", frozenset({"step"}))
_CONDITIONS: dict[str, tuple[Needs, ...]] = {
    "norm.kind": (_PLACED,),
    "train.milestones": (_STEP_SCHEDULE,),
    "train.gamma": (_STEP_SCHEDULE,),
}


def acts_only_when(key: str) -> tuple[Needs, ...]:
    """What must hold for the setting `key` (a dotted key of the trial configuration) to change a trial;
    every condition must. Model options act only for the architectures that take them, norm settings only
    for the kinds that read them and only where a placement places the kind."""
    section, _, setting = key.partition(".")
    if section == "norm" and setting not in ("kind", "placement"):
        return _one_of("norm.kind", {k for k, n in NORMS.items() if setting in n.reads}, NORMS), _PLACED
    if section == "model" and setting != "arch":
        return (
            _one_of(
                "model.arch", {a for a, e in ARCHITECTURES.items() if setting in e.options}, ARCHITECTURES
            ),
        )
    return _CONDITIONS.get(key, ())


def _one_of(key: str, acting: set[str], every: Iterable[str]) -> Needs:
    # Whichever of the two lists is shorter: errors then read "norm.kind is not one of none, sbn_center".
    idle = frozenset(every) - acting
    return Needs(key, idle, negated=True) if len(idle) < len(acting) else Needs(key, frozenset(acting))


# The data settings a trial applies itself (augmentation, in its loader). The others make the dataset, which
# the study's driver loads once and hands to every trial (`sbn_study.tune.trainable`).
PER_TRIAL_DATA_SETTINGS: frozenset[str] = frozenset({"data.augment"})

# The training images (before `data.val_size` is held out) of the datasets that are files; the synthetic
# one has `data.synthetic.train_size`.
TRAIN_IMAGES: dict[str, int] = {"cifar10": 50_000, "cifar100": 50_000}


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
