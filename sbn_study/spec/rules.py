"""The rules between settings that the schema checks one by one: searched keys and their distributions,
`when` conditions, the objective, the scheduler's budget, settings that conflict, and the components
(architecture, norm kind, placement) a trial is built from. Each rule returns its error lines.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from sbn_study.errors import UserError
from sbn_study.spec.catalog import (
    ARCHITECTURES,
    PER_TRIAL_DATA_SETTINGS,
    TRAIN_IMAGES,
    norm_kind_error,
    parse_placement,
)
from sbn_study.spec.config import TrialConfig, set_dotted
from sbn_study.spec.distributions import Distribution, is_integral, sampling_order
from sbn_study.spec.effects import effect_errors
from sbn_study.spec.messages import describe, model_at, show
from sbn_study.spec.schema import (
    PLACEMENT,
    TRIAL_KEYS,
    TRIAL_SECTIONS,
    SearchConfig,
    StudySpec,
    coerce,
)


def cross_field_errors(
    base: Mapping[str, Any], space: Mapping[str, Distribution], search: SearchConfig | None
) -> tuple[list[str], dict[str, Distribution]]:
    """Every rule's errors for the base settings (dotted key → value), the searched distributions and the
    search section (None for a standalone trial configuration), and the searchable distributions with their
    values as the trial config stores them.
    """
    errors, resolved = _space_errors(space)
    if search:
        # Studies only: the defaults (synthetic data with CIFAR's 5,000-image hold-out) do not fit together,
        # and final-training configs written with them exist; `sbn-study train` refuses those as it loads data.
        errors += (
            _objective_errors(search)
            + _budget_errors(search, base)
            + _dataset_size_errors(base, resolved)
            + _enqueue_errors(search, base, resolved)
        )
    errors += _setting_errors(base, search) + _component_errors(base, space, resolved)
    errors += effect_errors(base, resolved)
    return errors, resolved


def _section_class(key: str) -> type[BaseModel]:
    cls = model_at(TrialConfig, key.split(".")[:-1])
    assert cls is not None, key
    return cls


def as_stored(key: str, value: Any) -> Any:
    """`value` as the trial configuration stores it at `key` (e.g. 34 → "34" for norm.placement); raises
    ValidationError when that field does not accept it. Only the one field is checked, on a default section.
    """
    probe = _section_class(key)()
    leaf = key.rsplit(".", 1)[-1]
    setattr(probe, leaf, coerce(key, value))
    return getattr(probe, leaf)


def _messages(exc: ValidationError, key: str) -> list[str]:
    return [describe(err, _section_class(key)) for err in exc.errors()]


def _key_problem(key: str) -> str | None:
    """Why `key` cannot be searched (or conditioned on), or None when it is a setting of the trial config."""
    if key in TRIAL_KEYS:
        return None
    if key.split(".")[0] in set(StudySpec.model_fields) - set(TRIAL_SECTIONS):
        return f"cannot be searched: only keys of {', '.join(TRIAL_SECTIONS)} can"
    inside = [k for k in TRIAL_KEYS if k.startswith(f"{key}.")]
    if inside:
        return f"a section, not a single setting (search its keys: {', '.join(inside)})"
    match = difflib.get_close_matches(key, TRIAL_KEYS, n=1)
    return "not a key of the base configuration" + (f" (did you mean {match[0]}?)" if match else "")


def _per_study_problem(key: str) -> str | None:
    if not key.startswith("data.") or key in PER_TRIAL_DATA_SETTINGS:
        return None
    return (
        "cannot be searched: the driver loads the dataset once per study and every trial trains on it, so "
        f"each would use the base {key} while MLflow records the sampled one; run one study per value instead"
    )


def _kind_problem(key: str, dist: Distribution) -> str | None:
    """A distribution whose samples the field's type cannot take (floats for an int, numbers for a string)."""
    annotation = _section_class(key).model_fields[key.rsplit(".", 1)[-1]].annotation
    numeric = {a for a in (annotation, *get_args(annotation)) if a in (int, float)}
    if float in numeric or dist.kind == "choice":
        return None
    if int in numeric:
        if dist.kind in ("int", "logint") or (
            dist.kind == "quniform" and is_integral(dist.low) and is_integral(dist.q)
        ):
            return None
        return (
            "expected choice, int, logint or quniform with integral low and q (an integer setting), "
            f"got {dist.kind}"
        )
    return f"expected choice (not a numeric setting), got {dist.kind}"


def _space_errors(space: Mapping[str, Distribution]) -> tuple[list[str], dict[str, Distribution]]:
    """The errors of `search.space`, and its searchable distributions with their `choice` values (only the
    valid ones) and `when` values as the trial config stores them.
    """
    errors: list[str] = []
    resolved: dict[str, Distribution] = {}
    for key, dist in space.items():
        where = f"search.space.{key}"
        problem = _key_problem(key) or _per_study_problem(key) or _kind_problem(key, dist)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        # The ends of a range stand for all of it: the fields' constraints are intervals.
        candidates = (
            [("choice", v) for v in dist.values]
            if dist.kind == "choice"
            else [("low", dist.low), ("high", dist.high)]
        )
        valid = []
        for label, value in candidates:
            try:
                valid.append(as_stored(key, value))
            except ValidationError as exc:
                errors += [f"{where}: {label}: {message}" for message in _messages(exc, key)]
        twice = next((value for i, value in enumerate(valid) if value in valid[:i]), None)
        if twice is not None:
            # Samplers would weigh the one setting twice ("34" and 34 are one placement).
            errors.append(f"{where}: choice values must differ, got {show(twice)} twice")
        resolved[key] = dist.model_copy(update={"values": tuple(valid)}) if dist.kind == "choice" else dist
    for key, dist in resolved.items():
        when = {}
        for condition, values in dist.when.items():
            condition_errors, when[condition] = _when_errors(key, condition, values, resolved)
            errors += condition_errors
        resolved[key] = dist.model_copy(update={"when": when})
    try:
        sampling_order(resolved)
    except ValueError as cycle:
        errors.append(
            f"search.space: the when conditions form a cycle ({cycle}): none could be sampled first"
        )
    return errors, resolved


def _when_errors(
    key: str, condition: str, values: Sequence[Any], resolved: Mapping[str, Distribution]
) -> tuple[list[str], list[Any]]:
    """The errors of one `when` condition, and its values as the trial config stores them."""
    where = f"search.space.{key}.when.{condition}"
    if condition == key:
        return [f"{where}: a parameter cannot depend on itself"], []
    problem = _key_problem(condition)
    if problem:
        return [f"{where}: {problem}"], []
    searched = resolved.get(condition)
    if searched is not None and searched.kind != "choice":
        return [f"{where}: expected a key searched with choice, got {searched.kind}"], []
    errors, stored = [], []
    for value in values:
        try:
            stored.append(as_stored(condition, value))
        except ValidationError as exc:
            errors += [f"{where}: {message}" for message in _messages(exc, condition)]
            continue
        if searched is not None and stored[-1] not in searched.values:
            listed = ", ".join(map(str, searched.values))
            errors.append(
                f"{where}: expected one of the choices of {condition} ({listed}), got {show(value)}"
            )
    return errors, stored


def _objective_errors(search: SearchConfig) -> list[str]:
    two = isinstance(search.metric, list)
    errors = []
    if isinstance(search.mode, list) != two:
        expected = "a list of two modes" if two else "max or min"
        errors.append(f"search.mode: expected {expected} to match search.metric, got {show(search.mode)}")
    if two and len(set(search.metric)) != 2:
        errors.append(f"search.metric: expected two different metrics, got {show(search.metric)}")
    sampler = search.sampler.type
    if two and sampler != "nsga2":
        errors.append(f"search.metric: two metrics need search.sampler.type nsga2, got {sampler!r}")
    if not two and sampler == "nsga2":
        errors.append(
            f"search.sampler.type: nsga2 needs a list of two metrics, got search.metric {search.metric!r}"
        )
    return errors


def _enqueue_errors(
    search: SearchConfig, base: Mapping[str, Any], resolved: Mapping[str, Distribution]
) -> list[str]:
    """Each enqueued configuration must be one the sampler could give: searched keys only, values its
    distributions hold, and no key whose `when` excludes it there (the sampler would never ask for it)."""
    errors = []
    if len(search.enqueue) > search.num_samples:
        errors.append(
            f"search.enqueue: {len(search.enqueue)} configurations are more than the "
            f"search.num_samples ({search.num_samples}) trials they are counted in"
        )
    for index, entry in enumerate(search.enqueue):
        refused = set()
        for key, value in entry.items():
            where = f"search.enqueue[{index}].{key}"
            dist = resolved.get(key)
            if dist is None:
                listed = ", ".join(resolved) or "none"
                match = difflib.get_close_matches(key, list(resolved), n=1)
                hint = f" (did you mean {match[0]}?)" if match else ""
                errors.append(f"{where}: not a searched key{hint}; searched: {listed}")
            elif problem := dist.refusal(value):
                errors.append(f"{where}: {problem}")
            else:
                continue
            refused.add(key)
        for key in entry.keys() - refused:
            where = f"search.enqueue[{index}].{key}"
            for condition, values in resolved[key].when.items():
                # A condition on a searched key this entry leaves to the sampler may still hold; one on a
                # refused value has its own line.
                known = condition in entry or condition not in resolved
                current = entry.get(condition, base.get(condition))
                if known and condition not in refused and current not in values:
                    errors.append(
                        f"{where}: not sampled where {condition} is {show(current)} (its when: "
                        f"{condition} in {', '.join(map(str, values))})"
                    )
    return errors


def _budget_errors(search: SearchConfig, base: Mapping[str, Any]) -> list[str]:
    scheduler, epochs = search.scheduler, base.get("train.epochs")
    errors = []
    fixed_epochs = None if "train.epochs" in search.space else epochs
    if scheduler.max_t is not None and fixed_epochs is not None and scheduler.max_t > fixed_epochs:
        # Every trial would end below the budget, and a trial that ends below it counts as stopped early.
        errors.append(f"search.scheduler.max_t: must be <= train.epochs ({epochs}), got {scheduler.max_t}")
    budget = epochs if scheduler.max_t is None else scheduler.max_t
    if scheduler.type != "none" and budget is not None and scheduler.grace_period > budget:
        errors.append(
            f"search.scheduler.grace_period: must be <= the budget of {budget} epochs "
            f"(search.scheduler.max_t, else train.epochs), got {scheduler.grace_period}"
        )
    return errors


def _setting_errors(base: Mapping[str, Any], search: SearchConfig | None) -> list[str]:
    """Settings that are valid one by one but not together."""
    errors = []
    if base.get("train.nesterov") and base.get("train.momentum") == 0:
        errors.append("train.nesterov: Nesterov momentum needs train.momentum > 0, got 0")
    epochs = base.get("train.epochs")
    if epochs is not None and not (search and "train.epochs" in search.space):
        errors += [
            f"train.milestones[{i}]: must be < train.epochs ({epochs}): the lr would never step there, got {m}"
            for i, m in enumerate(base.get("train.milestones") or [])
            if m >= epochs
        ]
    on_validation = [m for m in (search.metrics if search else []) if m.startswith("val_")]
    if on_validation and base.get("data.val_size") == 0:
        errors.append(
            f"data.val_size: search.metric {on_validation[0]} is measured on the validation split, "
            "which needs at least 1 image, got 0"
        )
    return errors


def _dataset_size_errors(base: Mapping[str, Any], resolved: Mapping[str, Distribution]) -> list[str]:
    """A hold-out or a batch larger than the training images."""
    dataset, val_size = base.get("data.dataset"), base.get("data.val_size")
    images = (
        base.get("data.synthetic.train_size") if dataset == "synthetic" else TRAIN_IMAGES.get(str(dataset))
    )
    if images is None or val_size is None:
        return []
    if val_size >= images:
        return [f"data.val_size: must be < the {images} training images of {dataset}, got {val_size}"]
    dist = resolved.get("train.batch_size")
    if dist is None:
        where, batch = "train.batch_size", base.get("train.batch_size")
    else:
        where = "search.space.train.batch_size"
        batch = max(dist.values, default=None) if dist.kind == "choice" else dist.high
    if batch is not None and batch > images - val_size:
        # A training epoch takes whole batches only: it would have none.
        return [
            f"{where}: must be <= the {images - val_size} training images left after data.val_size, got {batch}"
        ]
    return []


def _component_errors(
    base: Mapping[str, Any], space: Mapping[str, Distribution], resolved: Mapping[str, Distribution]
) -> list[str]:
    """Architecture, norm kind and placement: valid names, and every placement that can meet an
    architecture exists in it."""

    def candidates(key: str) -> tuple[str, list[Any]]:
        """Where the values a trial can get for `key` are written, and those values."""
        if key in space:
            dist = resolved.get(key)
            return f"search.space.{key}: choice: ", list(dist.values) if dist else []
        return f"{key}: ", [base[key]] if key in base else []

    options: dict[str, Any] = {}
    for key, value in base.items():
        if key.startswith("norm.options."):
            set_dotted(options, key.removeprefix("norm.options."), value)

    def problem(key: str, value: Any) -> str | None:
        if key == "norm.kind":
            return norm_kind_error(value, options)
        known = tuple(ARCHITECTURES)
        return None if value in known else f"expected one of {', '.join(known)}, got {show(value)}"

    errors = []
    for key in ("model.arch", "norm.kind"):
        # The base value must be valid even when searched: base_config() hands it out.
        where, values = candidates(key)
        checked = [(where, value) for value in values]
        if key in space and key in base:
            checked.append((f"{key}: ", base[key]))
        errors += [w + message for w, v in checked if (message := problem(key, v))]
    where, placements = candidates(PLACEMENT)
    for arch in candidates("model.arch")[1]:
        for placement in placements if arch in ARCHITECTURES else []:
            try:
                parse_placement(placement, ARCHITECTURES[arch].stages, arch)
            except UserError as exc:
                errors.append(where + str(exc).removeprefix(f"{PLACEMENT}: "))
    return errors
