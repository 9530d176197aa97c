"""Which arms a final training compares with its configuration, with which values, and on which seeds.

A study tunes its hyperparameters for the configuration it searched (SBN's momentum, ε and FFT norm, the
weight decay, …). Trained with those values, a comparison arm (plain BN, the 2bn control, an ablation) would be
judged on settings chosen for another layer. So by default every arm takes the recipe's base value, from the
study's base configuration in its parent run's `resolved.yaml`, of every setting the search tuned; the user
may keep the tuned values (`keep_tuned`) or set others (`values`), and the plan says which values each arm got.

The study also says which seeds its trials trained with. A configuration selected on seed s won partly by the
luck of seed s (its initialization, its batch order), so a test on s again carries that luck into the result:
final seeds start after the search's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from sbn_study.errors import UserError, one_line
from sbn_study.results.export import FinalConfig, Provenance, search_seeds
from sbn_study.spec.catalog import acts_only_when, arm_label
from sbn_study.spec.config import TrialConfig, flatten, set_dotted
from sbn_study.spec.messages import error_lines
from sbn_study.spec.rules import cross_field_errors
from sbn_study.store.uri import redact_uri

REFERENCE = "config"
# What every arm shares with the configuration whatever the search did: the sites, the seed (set per run) and
# the budget; and the kind, which is what the arm is.
SHARED_BY_ARMS = ("norm.kind", "norm.placement", "train.seed", "train.epochs")
# What a study of SBN tunes for SBN: the values stated for the arms when the search is unknown or tuned nothing.
SBN_TUNED = ("norm.momentum", "norm.eps", "norm.fft_norm", "train.weight_decay")
DEFAULT_SEEDS = 5


@dataclass(frozen=True)
class ArmRequest:
    kinds: tuple[str, ...] = ()  # norm kinds, each trained at the configuration's sites
    keep_tuned: bool = False  # the arms keep the configuration's values of what the search tuned
    values: tuple[str, ...] = ()  # KEY=VALUE (VALUE is YAML) set on every arm after the above


@dataclass(frozen=True)
class Recipe:
    """What a study says about the configuration it selected."""

    base: dict[str, Any]  # its base configuration, dotted key → value
    tuned: tuple[str, ...]  # the searched keys an arm takes the base value of
    seeds: tuple[int, ...]  # every seed its trials trained with


@dataclass(frozen=True)
class ArmPlan:
    config: FinalConfig
    arms: dict[str, TrialConfig]  # REFERENCE first, then one arm per requested kind
    labels: dict[str, str]  # arm → the paper's name of its norm configuration ("sbn23", "bn", "2bn23")
    stated: tuple[str, ...]  # the keys whose values are stated per arm
    origin: str  # where the arms' values of those keys come from: recipe | config | hand-written
    note: str  # the same, in a sentence
    search_seeds: tuple[int, ...] | None  # None when the search is unknown
    warnings: tuple[str, ...] = ()
    # arm → tags of its runs besides its name and seed (a batch-size sweep's arm and batch size, to group by)
    run_tags: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def names(self) -> dict[str, str]:
        """arm → how tables and plots name it: its label, and the reference marked as the config."""
        return {arm: f"{label} (config)" if arm == REFERENCE else label for arm, label in self.labels.items()}

    def values(self, arm: str) -> dict[str, Any]:
        """The arm's value of each stated key; None where the setting does not act in the arm."""
        flat = flatten(self.arms[arm].model_dump())
        return {key: flat[key] if _acts(key, flat) else None for key in self.stated}

    @property
    def default_seeds(self) -> tuple[int, ...]:
        start = max(self.search_seeds) + 1 if self.search_seeds else 0
        return tuple(range(start, start + DEFAULT_SEEDS))

    def seed_overlap(self, seeds: Sequence[int]) -> list[int]:
        return sorted(set(seeds) & set(self.search_seeds or ()))


def _acts(key: str, flat: dict[str, Any]) -> bool:
    return all(need.holds(flat[need.key]) for need in acts_only_when(key))


def read_recipe(provenance: Provenance, tracking_uri: str) -> Recipe:
    """The base configuration, searched keys and trial seeds of the execution a configuration was exported
    from. `tracking_uri` (the final training's store, credentials included) is used when it is that store."""
    from sbn_study.results.analysis import load_study

    uri = tracking_uri if redact_uri(tracking_uri) == provenance.tracking_uri else provenance.tracking_uri
    study = load_study(uri, provenance.study, provenance.execution)
    tuned = tuple(key for key in study.spec.search.space if key not in SHARED_BY_ARMS)
    seeds = search_seeds(run.data.params.get("train.seed") for run in study.runs)
    return Recipe(flatten(study.spec.base_config().model_dump()), tuned, tuple(seeds))


def plan_arms(config: FinalConfig, request: ArmRequest, tracking_uri: str) -> ArmPlan:
    """The configuration and one arm per requested kind, all checked before anything trains.

    The study the configuration came from is read when the arms need its base values, or its seeds are not in
    the provenance; UserError when the arms need it and it cannot be read.
    """
    reference = TrialConfig.model_validate(config.model_dump(exclude={"provenance"}))
    kinds = _checked_kinds(request.kinds, reference)
    source = config.provenance
    recipe, warnings = None, []
    if source is not None and ((kinds and not request.keep_tuned) or source.search_seeds is None):
        try:
            recipe = read_recipe(source, tracking_uri)
        except Exception as exc:
            where = f"study '{source.study}' (execution {source.execution}) from {source.tracking_uri}"
            reason = f"cannot read {where}: {one_line(exc)}"
            if kinds and not request.keep_tuned:
                raise UserError(
                    f"--arms: {reason}; the arms take the base values of what it tuned from there "
                    "(--arms-keep-tuned trains them with this config's values instead)"
                ) from None
            warnings.append(f"the search's seeds are unknown ({reason}): pick --seeds it did not use")
    settings = _settings(request.values)
    reset = {} if request.keep_tuned or recipe is None else {k: recipe.base[k] for k in recipe.tuned}
    arms = {REFERENCE: reference}
    for kind in kinds:
        placement = "none" if kind == "bn" else reference.norm.placement  # bn: plain BN everywhere
        arm = _with_values(reference, {**reset, **settings, "norm.kind": kind, "norm.placement": placement})
        if arm == reference:
            raise UserError(f"--arms {kind}: that is the config itself (same kind, same values)")
        arms[kind] = arm
    origin, note = _origin(source, recipe, request.keep_tuned)
    if settings:
        note += "; --arm-set " + ", ".join(f"{k}={v}" for k, v in settings.items())
    seeds = source.search_seeds if source else None
    if seeds is None and recipe is not None:
        seeds = list(recipe.seeds)
    stated = recipe.tuned if recipe and recipe.tuned and not request.keep_tuned else SBN_TUNED
    return ArmPlan(
        config=config,
        arms=arms,
        labels=_labels(arms),
        stated=tuple(dict.fromkeys([*stated, *settings])),
        origin=origin,
        note=note,
        search_seeds=tuple(seeds) if seeds is not None else None,
        warnings=tuple(warnings),
    )


def _checked_kinds(kinds: Sequence[str], reference: TrialConfig) -> tuple[str, ...]:
    # Each kind itself is checked with its arm, as `norm.kind` of a configuration file is.
    if kinds and reference.norm.placement == "none":
        raise UserError(
            "--arms: this configuration has norm.placement none, so it already is the plain-BN baseline and "
            "leaves the arms no site (--set norm.placement=... gives it one)"
        )
    return tuple(kinds)


def _settings(items: Sequence[str]) -> dict[str, Any]:
    """--arm-set KEY=VALUE items as dotted key → value."""
    known = flatten(TrialConfig().model_dump())
    settings = {}
    for item in items:
        key, equals, raw = item.partition("=")
        if not equals or key not in known:
            raise UserError(f"--arm-set {item}: expected KEY=VALUE with a key of the trial configuration")
        if key in SHARED_BY_ARMS:
            raise UserError(
                f"--arm-set {item}: every arm shares {key} with the config (--arms sets the kind)"
            )
        try:
            settings[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--arm-set {item}: the value is not valid YAML ({one_line(exc)})") from None
    return settings


def _with_values(reference: TrialConfig, values: dict[str, Any]) -> TrialConfig:
    """The reference with `values` set, checked like a configuration file."""
    tree = reference.model_dump()
    for key, value in values.items():
        set_dotted(tree, key, value)
    kind = values["norm.kind"]
    try:
        arm = TrialConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError("\n".join(f"arm {kind}: {line}" for line in error_lines(exc, TrialConfig))) from None
    errors = cross_field_errors(flatten(arm.model_dump()), {}, None)[0]
    if errors:
        raise UserError("\n".join(f"arm {kind}: {line}" for line in errors))
    return arm


def _origin(source: Provenance | None, recipe: Recipe | None, keep_tuned: bool) -> tuple[str, str]:
    if source is None:
        return "hand-written", (
            "no provenance (a hand-written config): the arms take this config's own values, as no search "
            "says which of them were tuned"
        )
    if keep_tuned or recipe is None:
        return "config", "the arms keep this config's values of what the search tuned (--arms-keep-tuned)"
    if not recipe.tuned:
        return (
            "recipe",
            f"study '{source.study}' tuned nothing but the arm: the arms take this config's values",
        )
    return "recipe", (
        f"the arms take the recipe's base values of what study '{source.study}' tuned "
        f"(resolved.yaml of execution {source.execution})"
    )


def _labels(arms: dict[str, TrialConfig]) -> dict[str, str]:
    return {arm: arm_label(config.norm.kind, config.norm.placement) for arm, config in arms.items()}
