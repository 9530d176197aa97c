"""What a trial can be built from, as data: the architectures and the norm kinds, which setting acts for
which of them (`acts_only_when`), the datasets' sizes, and the placement notation.

The spec checks (and so `sbn-study validate`) read these without importing torch; `sbn_study.trial.models`
builds from `ARCHITECTURES`, and `sbn_study.trial.norms` holds one factory per name in `NORM_KINDS` (tests
keep the two the same set, and build every kind and option to keep the "acts" facts true).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sbn_study.errors import UserError, one_line
from sbn_study.spec.config import DOMAINS
from sbn_study.spec.messages import show


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
    "resnet18": Architecture(4, f"{_RESNET}:resnet18", ("stem",)),
    "resnet20": Architecture(3, f"{_CIFAR_RESNET}:resnet20"),
    "resnet32": Architecture(3, f"{_CIFAR_RESNET}:resnet32"),
    "resnet34": Architecture(4, f"{_RESNET}:resnet34", ("stem",)),
    "resnet50": Architecture(4, f"{_RESNET}:resnet50", ("stem",)),
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
    "cbn": NormKind(_BN_SETTINGS | {"cbn_window", "cbn_burnin"}),
    "gn": NormKind(frozenset({"eps", "affine", "groups"})),  # no running statistics
    "iebn": NormKind(_BN_SETTINGS),
    # Its memory replaces running statistics in inference too, so no momentum.
    "mbn": NormKind(frozenset({"eps", "affine", "mbn_window", "mbn_double_forward"})),
    "none": NormKind(frozenset()),
    # `groups` acts with `proxynorm_base: gn` only (LN is GN with one group).
    "proxynorm": NormKind(frozenset({"eps", "affine", "groups", "proxynorm_base"})),
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
    "data.dg_method": (Needs("data.dataset", frozenset(DOMAINS)),),
    "data.bne_statistics": (
        Needs("data.dataset", frozenset(DOMAINS)),
        Needs("data.dg_method", frozenset({"bne"})),
    ),
}


def acts_only_when(key: str) -> tuple[Needs, ...]:
    """What must hold for the setting `key` (a dotted key of the trial configuration) to change a trial;
    every condition must. Model options act only for the architectures that take them, norm settings only
    for the kinds that read them and only where a placement places the kind."""
    section, _, setting = key.partition(".")
    if section == "norm" and setting.partition(".")[0] == "options":
        return Needs("norm.kind", frozenset(NORM_KINDS), negated=True), _PLACED
    if section == "norm" and setting not in ("kind", "placement"):
        return _one_of("norm.kind", {k for k, n in NORMS.items() if setting in n.reads}, NORMS), _PLACED
    # Weights load into any architecture they fit (`sbn_study.trial.pretrained`).
    if section == "model" and setting not in ("arch", "weights"):
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


# The data settings a trial applies itself (augmentation, in its loader; a multi-domain trial's method, in its
# training and test). The others make the dataset, which the study's driver loads once and hands to every trial
# (`sbn_study.tune.trainable`).
PER_TRIAL_DATA_SETTINGS: frozenset[str] = frozenset({"data.augment", "data.dg_method", "data.bne_statistics"})

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


def arm_label(kind: str, placement: str) -> str:
    """The paper's notation for a norm configuration: "sbn34" (SBN at stages 3 and 4), "2bn34" (the control),
    "sbn-all"; "bn" for plain BatchNorm everywhere (placement none, whatever the kind)."""
    if placement == "none":
        return "bn"
    return f"{kind}{placement}" if placement.isdigit() else f"{kind}-{placement}"


# A norm of the user's own: "package.module:Factory" (`sbn_study.trial.norms` builds it at the placed sites).
_CUSTOM_KIND = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
# The site `validate` builds a custom norm for, to check that its factory returns a module: a width and a map
# every architecture here has.
PROBE_SITE = {"channels": 64, "stage": 1, "spatial": (32, 32)}


def is_custom_norm(kind: str) -> bool:
    """Whether `kind` names a factory of the user's (it has the module:attribute colon) and not a built-in."""
    return ":" in kind


def norm_kind_error(kind: Any, options: dict[str, Any]) -> str | None:
    """What is wrong with `kind` as a `norm.kind` value (None if nothing); a custom kind is imported and its
    factory called once on `PROBE_SITE` with `options`, so only a custom kind imports anything."""
    if not isinstance(kind, str) or not is_custom_norm(kind):
        if isinstance(kind, str) and kind in NORMS:
            return None
        return f"expected one of {', '.join(NORM_KINDS)} or package.module:Factory, got {show(kind)}"
    try:
        factory = custom_norm_factory(kind, options)
        made = factory(
            PROBE_SITE["channels"], stage=PROBE_SITE["stage"], spatial=PROBE_SITE["spatial"], **options
        )
    except UserError as exc:
        return str(exc)
    except Exception as exc:  # the user's code: whatever it raises is the answer
        return f"{kind} failed on a {PROBE_SITE['channels']}-channel site: {one_line(exc, with_type=True)}"
    from torch import nn  # the user's module has imported torch already

    if not isinstance(made, nn.Module):
        return f"{kind} returned an object of type {type(made).__name__}, not a torch.nn.Module"
    return None


def custom_norm_factory(kind: str, options: dict[str, Any]) -> Callable[..., Any]:
    """The factory `kind` ("package.module:Factory") names, checked to take `(channels, stage=, spatial=,
    **options)`; UserError (without the key) if it cannot be imported or called so. The working directory
    is searched first, as `python -m` does, so a module beside the spec is found from the console script too.
    """
    if not _CUSTOM_KIND.fullmatch(kind):
        raise UserError(f"expected a custom norm as package.module:Factory, got {kind!r}")
    module_name, _, name = kind.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a module that fails to import raises anything
        raise UserError(f"cannot import {module_name} for {kind}: {one_line(exc, with_type=True)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {name}")
    try:
        inspect.signature(factory).bind(PROBE_SITE["channels"], stage=0, spatial=None, **options)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{kind} cannot be called as {name}(channels, stage=, spatial=, **norm.options): {exc}"
        ) from None
    return factory


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
