"""The study spec: a base trial configuration plus `name`, `resources`, `tracking`, `storage` and `search`.

`load_spec` / `spec_from_dict` are the only ways in: they apply `--set` overrides, validate the schema and
every cross-field rule, and raise one `SpecError` that lists *all* problems, one line each, as
`<yaml.key.path>: <what was expected>, got <what was found>`. `StudySpec.model_validate` alone checks the
schema only (not arch/placement/sampler rules), so code that reads a user's spec must go through them.

Searched keys (`search.space`) are dotted keys of the base trial configuration, the same keys `--set` and
the MLflow params use. Distributions are one-key mappings:

    {choice: [v, ...]}          categorical, non-empty, scalar values
    {uniform: [low, high]}      float, low < high
    {loguniform: [low, high]}   float on a log scale, 0 < low < high
    {int: [low, high]}          integer, bounds inclusive, low <= high (low == high pins a value)
    {logint: [low, high]}       integer on a log scale, bounds inclusive, 1 <= low < high
    {quniform: [low, high, q]}  float in steps of q, low < high, q > 0

plus an optional `when: {dotted.key: value or [values]}`: the parameter is sampled only when that other
(searched `choice` or base) key has one of those values.
"""

from __future__ import annotations

import copy
import difflib
import importlib.metadata
import math
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from sbn_study.errors import UserError
from sbn_study.spec.config import DataConfig, Strict, TrialConfig, flatten, set_dotted

MetricName = Literal["val_acc", "val_loss", "train_loss", "train_acc", "epoch_time_s", "images_per_s"]
Mode = Literal["max", "min"]
SamplerType = Literal["tpe", "random", "cmaes", "gp", "qmc", "nsga2"]
SchedulerType = Literal["asha", "hyperband", "median", "none"]
DistributionKind = Literal["choice", "uniform", "loguniform", "int", "logint", "quniform"]

METRICS: tuple[str, ...] = get_args(MetricName)
MODES: tuple[str, ...] = get_args(Mode)
DISTRIBUTION_KINDS: tuple[str, ...] = get_args(DistributionKind)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TRIAL_SECTIONS: tuple[str, ...] = tuple(TrialConfig.model_fields)
_TRIAL_DEFAULTS: dict[str, Any] = flatten(TrialConfig().model_dump())
_TRIAL_KEYS: tuple[str, ...] = tuple(_TRIAL_DEFAULTS)
_PLACEMENT = "norm.placement"


class SpecError(UserError):
    """Every problem found in a spec, one `<yaml.key.path>: <expected>, got <found>` line each."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def _spec_error(message: str) -> PydanticCustomError:
    # The message goes in through the context because spec messages contain `{...}`, which pydantic would
    # otherwise read as template fields.
    return PydanticCustomError("spec", "{message}", {"message": message})


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_integral(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


def _coerce(key: str, value: Any) -> Any:
    """YAML and `--set` read `placement: 34` as an int; the placement is a string of stage digits."""
    if key == _PLACEMENT and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


# --- distributions -------------------------------------------------------------------------------------

# kind → (what its list must hold, the rule between the numbers)
_RANGE_RULES: dict[str, tuple[str, str]] = {
    "uniform": ("two numbers [low, high]", "low < high"),
    "loguniform": ("two numbers [low, high]", "0 < low < high"),
    "int": ("two integers [low, high]", "low <= high"),
    "logint": ("two integers [low, high]", "1 <= low < high"),
    "quniform": ("three numbers [low, high, q]", "low < high and q > 0"),
}


def _range_holds(kind: str, low: float, high: float, q: float | None) -> bool:
    if kind == "loguniform":
        return 0 < low < high
    if kind == "int":
        return low <= high
    if kind == "logint":
        return 1 <= low < high
    if kind == "quniform":
        return low < high and q is not None and q > 0
    return low < high


def _parse_range(kind: str, args: Any) -> dict[str, Any]:
    shape, rule = _RANGE_RULES[kind]
    size = 3 if kind == "quniform" else 2
    integers = kind in ("int", "logint")
    if (
        not isinstance(args, list)
        or len(args) != size
        or not all(_is_integral(a) if integers else _is_number(a) for a in args)
    ):
        raise _spec_error(f"{kind} needs {shape}, got {_show(args)}")
    numbers = [int(a) for a in args] if integers else list(args)
    low, high, q = numbers[0], numbers[1], numbers[2] if size == 3 else None
    if not _range_holds(kind, low, high, q):
        raise _spec_error(f"{kind} needs {rule}, got {_show(args)}")
    return {"low": low, "high": high, "q": q}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _parse_choice(args: Any) -> dict[str, Any]:
    if not isinstance(args, list) or not args:
        raise _spec_error(f"choice needs a non-empty list of values, got {_show(args)}")
    # Optuna's categorical distributions hold only these types.
    bad = [v for v in args if not _is_scalar(v)]
    if bad:
        raise _spec_error(f"choice values must be strings, numbers, booleans or null, got {_show(bad[0])}")
    return {"values": tuple(args)}


def _parse_when(raw: Any) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise _spec_error(f"when needs a mapping of dotted.key: value or [values], got {_show(raw)}")
    when: dict[str, list[Any]] = {}
    for key, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not isinstance(key, str) or not values or not all(_is_scalar(v) for v in values):
            raise _spec_error(f"when needs a mapping of dotted.key: value or [values], got {_show(raw)}")
        when[key] = list(values)
    return when


class Distribution(BaseModel):
    """One searched parameter. Built from (and dumped back to) the one-key mapping a spec writes, e.g.
    `Distribution.model_validate({"loguniform": [1e-6, 1e-2]})`; `kind` says which fields apply: `values`
    for `choice`, `low`/`high` (ints for `int`/`logint`) and `q` (for `quniform`) otherwise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DistributionKind
    values: tuple[Any, ...] = ()
    low: int | float | None = None
    high: int | float | None = None
    q: float | None = None
    when: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_written_form(cls, data: Any) -> Any:
        example = "a mapping such as {choice: [a, b]} or {loguniform: [low, high]}"
        if not isinstance(data, dict):
            raise _spec_error(f"expected {example}, got {_show(data)}")
        kinds = [key for key in data if key != "when"]
        unknown = [key for key in kinds if key not in DISTRIBUTION_KINDS]
        if unknown:
            raise _spec_error(
                f"expected one of {', '.join(DISTRIBUTION_KINDS)} (and optionally when), "
                f"got {_show(unknown[0])}"
            )
        if len(kinds) != 1:
            got = " and ".join(kinds) if kinds else "none"
            raise _spec_error(f"expected exactly one of {', '.join(DISTRIBUTION_KINDS)}, got {got}")
        kind = kinds[0]
        fields = _parse_choice(data[kind]) if kind == "choice" else _parse_range(kind, data[kind])
        return {"kind": kind, **fields, "when": _parse_when(data.get("when"))}

    @property
    def args(self) -> list[Any]:
        """The list the spec writes after the kind: the choices, `[low, high]` or `[low, high, q]`."""
        if self.kind == "choice":
            return list(self.values)
        return [self.low, self.high, self.q] if self.kind == "quniform" else [self.low, self.high]

    @model_serializer
    def _to_written_form(self) -> dict[str, Any]:
        written: dict[str, Any] = {self.kind: self.args}
        if self.when:
            written["when"] = self.when
        return written


# --- the schema ----------------------------------------------------------------------------------------


def _absolute_path(path: str) -> str:
    # Ray Tune runs each trial in its own working directory, so a relative path must be resolved here,
    # against the directory the user ran the command in.
    return os.path.abspath(os.path.expanduser(path))


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _absolute_location(location: str | None) -> str | None:
    """A local path made absolute; URIs (s3://, gs://, http://, ...) unchanged."""
    if location is None or _URI_SCHEME.match(location):
        return location
    return _absolute_path(location)


class ResourcesConfig(Strict):
    """What Ray reserves for each trial; fractional GPUs pack several trials onto one GPU."""

    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class TrackingConfig(Strict):
    # None = the sqlite store under the run's output folder; --tracking-uri and MLFLOW_TRACKING_URI win.
    uri: str | None = None

    @field_validator("uri")
    @classmethod
    def _absolute_uri(cls, uri: str | None) -> str | None:
        if uri is None or uri == "databricks":
            return uri
        if uri.startswith("sqlite:///"):
            # sqlite:///x.db is relative to the working directory, sqlite:////x.db is absolute.
            return "sqlite:///" + _absolute_path(uri.removeprefix("sqlite:///"))
        return _absolute_location(uri)


class SamplerConfig(Strict):
    type: SamplerType = "tpe"
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0)


class SchedulerConfig(Strict):
    type: SchedulerType = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="the budget in epochs; None = train.epochs")


def _one_or_two(value: Any, allowed: tuple[str, ...]) -> Any:
    values = value if isinstance(value, list) and len(value) == 2 else [value]
    if not all(isinstance(v, str) and v in allowed for v in values):
        raise _spec_error(
            f"expected one of {', '.join(allowed)} or a list of two of them, got {_show(value)}"
        )
    return value


class SearchConfig(Strict):
    metric: MetricName | list[MetricName] = "val_acc"
    mode: Mode | list[Mode] = "max"
    num_samples: int = Field(ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)
    sampler: SamplerConfig = SamplerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    space: dict[str, Distribution] = Field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """`metric` as a list: one metric, or the two NSGA-II optimizes."""
        return self.metric if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        """`mode` as a list, in the order of `metrics`."""
        return self.mode if isinstance(self.mode, list) else [self.mode]

    @field_validator("metric", mode="before")
    @classmethod
    def _known_metrics(cls, value: Any) -> Any:
        return _one_or_two(value, METRICS)

    @field_validator("mode", mode="before")
    @classmethod
    def _known_modes(cls, value: Any) -> Any:
        return _one_or_two(value, MODES)


class StudySpec(TrialConfig):
    """A study: the base trial configuration (the inherited sections) and how to search around it."""

    # validate_default so that the default `data.root` is made absolute too.
    model_config = ConfigDict(validate_default=True)

    name: str
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    # Where Ray Tune keeps checkpoints and experiment state; None = <output>/ray. Multi-node: shared storage.
    storage: str | None = None
    search: SearchConfig

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        # It names an MLflow experiment and folders.
        if not _NAME.fullmatch(name):
            raise _spec_error(
                f"expected a letter or digit followed by letters, digits, '_', '.' or '-', got {_show(name)}"
            )
        return name

    @field_validator("data")
    @classmethod
    def _absolute_root(cls, data: DataConfig) -> DataConfig:
        return data.model_copy(update={"root": _absolute_path(data.root)})

    @field_validator("storage")
    @classmethod
    def _absolute_storage(cls, storage: str | None) -> str | None:
        return _absolute_location(storage)

    @property
    def max_budget(self) -> int:
        """The scheduler's budget in epochs: `search.scheduler.max_t`, else `train.epochs`."""
        max_t = self.search.scheduler.max_t
        return self.train.epochs if max_t is None else max_t

    def base_config(self) -> TrialConfig:
        """The base trial configuration (a copy): what every trial starts from."""
        return TrialConfig.model_validate(self.model_dump(include=set(_TRIAL_SECTIONS)))

    def trial_config(self, sampled: Mapping[str, Any]) -> TrialConfig:
        """The fully resolved configuration of one trial: the dotted `sampled` values set on the base."""
        unknown = [key for key in sampled if key not in _TRIAL_KEYS]
        if unknown:
            raise SpecError([f"{key}: not a key of the trial configuration" for key in unknown])
        tree = self.base_config().model_dump()
        for key, value in sampled.items():
            set_dotted(tree, key, _coerce(key, value))
        try:
            return TrialConfig.model_validate(tree)
        except ValidationError as exc:
            raise SpecError(_error_lines(exc, TrialConfig)) from None

    def warnings(self) -> list[str]:
        """Problems that do not stop the study but probably are not what the user meant."""
        found: list[str] = []
        space, sampler = self.search.space, self.search.sampler.type
        categorical = [key for key, dist in space.items() if dist.kind == "choice"]
        if categorical and _samples_categoricals_at_random(sampler):
            found.append(
                f"sampler {sampler!r} samples categorical parameters ({', '.join(categorical)}) at random"
            )
        conditional = [key for key, dist in space.items() if dist.when]
        if conditional and sampler in ("cmaes", "gp", "qmc"):
            # Their relative sampling needs a fixed search space; Optuna samples the rest independently.
            found.append(
                f"sampler {sampler!r} samples conditional parameters ({', '.join(conditional)}) at random"
            )
        if (
            "train.epochs" in space
            and self.search.scheduler.type != "none"
            and self.search.scheduler.max_t is None
        ):
            found.append(
                "train.epochs is searched but search.scheduler.max_t is not set: the scheduler's budget is "
                f"the base train.epochs ({self.train.epochs})"
            )
        if (
            sampler in ("random", "qmc", "nsga2")
            and "n_startup_trials" in self.search.sampler.model_fields_set
        ):
            found.append(
                f"search.sampler.n_startup_trials: sampler {sampler!r} has no start-up phase; ignored"
            )
        scheduler = self.search.scheduler
        if scheduler.type in ("hyperband", "none") and "grace_period" in scheduler.model_fields_set:
            found.append(f"search.scheduler.grace_period: scheduler {scheduler.type!r} takes none; ignored")
        if not space and self.search.num_samples > 1:
            found.append(
                f"search.space is empty: all {self.search.num_samples} trials run the base configuration"
            )
        return found


def _samples_categoricals_at_random(sampler: str) -> bool:
    # CMA-ES has no model of categorical parameters; QMC got one in Optuna 5, the GP sampler always had one.
    if sampler == "qmc":
        return int(importlib.metadata.version("optuna").split(".")[0]) < 5
    return sampler == "cmaes"


# --- pydantic errors as spec lines ---------------------------------------------------------------------

_EXPECTED_TYPES: dict[str, str] = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
_BOUNDS: dict[str, str] = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _model_at(root: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The model class found by following `path` (field names) from `root`, or None off the models."""
    cls = root
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def _field_at(root: type[BaseModel], loc: Sequence[Any]) -> FieldInfo | None:
    parent = _model_at(root, loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent and loc and isinstance(loc[-1], str) else None


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds(field: FieldInfo | None, err: ErrorDetails) -> str:
    sources = field.metadata if field else [err.get("ctx", {})]
    parts = []
    for source in sources:
        for name, symbol in _BOUNDS.items():
            bound = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if bound is not None:
                parts.append(f"{symbol} {_number(bound)}")
    return " and ".join(parts)


def _loc_text(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a dict key rather than its value
            continue
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _describe(err: ErrorDetails, root: type[BaseModel]) -> str:
    """The part of an error line after `<yaml.key.path>: `."""
    kind, loc = err["type"], err["loc"]
    got = f", got {_show(err['input'])}"
    if kind == "spec":
        return err["msg"]
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        match = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1) if parent else []
        return f"unknown key (did you mean {_loc_text((*loc[:-1], match[0]))}?)" if match else "unknown key"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        return f"expected one of {', '.join(allowed)}{got}"
    bounds = _bounds(_field_at(root, loc), err)
    if kind in _BOUND_ERRORS:
        return f"must be {bounds}{got}"
    if kind in _EXPECTED_TYPES:
        return f"expected {_EXPECTED_TYPES[kind]}{' ' + bounds if bounds else ''}{got}"
    message = err["msg"]
    return f"{message[:1].lower()}{message[1:]}{got}"


def _error_lines(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    return [f"{_loc_text(err['loc'])}: {_describe(err, root)}" for err in exc.errors()]


# --- cross-field rules ---------------------------------------------------------------------------------


def _section_class(key: str) -> type[BaseModel]:
    cls = _model_at(TrialConfig, key.split(".")[:-1])
    assert cls is not None, key
    return cls


def _as_stored(key: str, value: Any) -> Any:
    """`value` as the trial configuration stores it at `key` (e.g. 34 → "34" for norm.placement); raises
    ValidationError when that field does not accept it. Only the one field is checked, on a default section.
    """
    probe = _section_class(key)()
    leaf = key.rsplit(".", 1)[-1]
    setattr(probe, leaf, _coerce(key, value))
    return getattr(probe, leaf)


def _messages(exc: ValidationError, key: str) -> list[str]:
    return [_describe(err, _section_class(key)) for err in exc.errors()]


def _key_problem(key: str) -> str | None:
    """Why `key` cannot be searched (or conditioned on), or None when it is a setting of the trial config."""
    if key in _TRIAL_KEYS:
        return None
    if key.split(".")[0] in set(StudySpec.model_fields) - set(_TRIAL_SECTIONS):
        return f"cannot be searched: only keys of {', '.join(_TRIAL_SECTIONS)} can"
    inside = [k for k in _TRIAL_KEYS if k.startswith(f"{key}.")]
    if inside:
        return f"a section, not a single setting (search its keys: {', '.join(inside)})"
    match = difflib.get_close_matches(key, _TRIAL_KEYS, n=1)
    return "not a key of the base configuration" + (f" (did you mean {match[0]}?)" if match else "")


def _kind_problem(key: str, dist: Distribution) -> str | None:
    """A distribution whose samples the field's type cannot take (floats for an int, numbers for a string)."""
    annotation = _section_class(key).model_fields[key.rsplit(".", 1)[-1]].annotation
    numeric = {a for a in (annotation, *get_args(annotation)) if a in (int, float)}
    if float in numeric or dist.kind == "choice":
        return None
    if int in numeric:
        if dist.kind in ("int", "logint") or (
            dist.kind == "quniform" and _is_integral(dist.low) and _is_integral(dist.q)
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
        problem = _key_problem(key) or _kind_problem(key, dist)
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
                valid.append(_as_stored(key, value))
            except ValidationError as exc:
                errors += [f"{where}: {label}: {message}" for message in _messages(exc, key)]
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


def sampling_order(space: Mapping[str, Distribution]) -> list[str]:
    """The searched keys, each after the searched keys its `when` conditions name, else in spec order.

    A condition is checked against what this trial sampled, so the key it names must be sampled first,
    wherever the spec lists it. Raises ValueError naming the keys of a cycle.
    """
    order: list[str] = []
    path: list[str] = []

    def visit(key: str) -> None:
        if key in order:
            return
        if key in path:
            raise ValueError(" → ".join([*path[path.index(key) :], key]))
        path.append(key)
        for condition in space[key].when:
            if condition in space:
                visit(condition)
        path.pop()
        order.append(key)

    for key in space:
        visit(key)
    return order


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
            stored.append(_as_stored(condition, value))
        except ValidationError as exc:
            errors += [f"{where}: {message}" for message in _messages(exc, condition)]
            continue
        if searched is not None and stored[-1] not in searched.values:
            listed = ", ".join(map(str, searched.values))
            errors.append(
                f"{where}: expected one of the choices of {condition} ({listed}), got {_show(value)}"
            )
    return errors, stored


def _objective_errors(search: SearchConfig) -> list[str]:
    two = isinstance(search.metric, list)
    errors = []
    if isinstance(search.mode, list) != two:
        expected = "a list of two modes" if two else "max or min"
        errors.append(f"search.mode: expected {expected} to match search.metric, got {_show(search.mode)}")
    if two and len(set(search.metric)) != 2:
        errors.append(f"search.metric: expected two different metrics, got {_show(search.metric)}")
    sampler = search.sampler.type
    if two and sampler != "nsga2":
        errors.append(f"search.metric: two metrics need search.sampler.type nsga2, got {sampler!r}")
    if not two and sampler == "nsga2":
        errors.append(
            f"search.sampler.type: nsga2 needs a list of two metrics, got search.metric {search.metric!r}"
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
    on_validation = [m for m in (search.metrics if search else []) if m.startswith("val_")]
    if on_validation and base.get("data.val_size") == 0:
        errors.append(
            f"data.val_size: search.metric {on_validation[0]} is measured on the validation split, "
            "which needs at least 1 image, got 0"
        )
    return errors


def _component_errors(
    base: Mapping[str, Any], space: Mapping[str, Distribution], resolved: Mapping[str, Distribution]
) -> list[str]:
    """Architecture, norm kind and placement: valid names, and every placement that can meet an
    architecture exists in it."""
    from sbn_study.trial.models import ARCHS
    from sbn_study.trial.norms import (  # imports torch: only once a spec is checked
        NORM_KINDS,
        parse_placement,
    )

    def candidates(key: str) -> tuple[str, list[Any]]:
        """Where the values a trial can get for `key` are written, and those values."""
        if key in space:
            dist = resolved.get(key)
            return f"search.space.{key}: choice: ", list(dist.values) if dist else []
        return f"{key}: ", [base[key]] if key in base else []

    errors = []
    for key, known in (("model.arch", tuple(ARCHS)), ("norm.kind", NORM_KINDS)):
        # The base value must be valid even when searched: base_config() hands it out.
        where, values = candidates(key)
        checked = [(where, value) for value in values]
        if key in space and key in base:
            checked.append((f"{key}: ", base[key]))
        errors += [
            f"{w}expected one of {', '.join(known)}, got {_show(v)}" for w, v in checked if v not in known
        ]
    where, placements = candidates(_PLACEMENT)
    for arch in candidates("model.arch")[1]:
        for placement in placements if arch in ARCHS else []:
            try:
                parse_placement(placement, ARCHS[arch], arch)
            except UserError as exc:
                errors.append(where + str(exc).removeprefix(f"{_PLACEMENT}: "))
    return errors


# --- loading -------------------------------------------------------------------------------------------


class _SpecLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no Python tags) that also rejects duplicate keys, which PyYAML otherwise drops
    silently (a second `space:` block would replace the first), and reads `1e-6` as a float like YAML 1.2
    (YAML 1.1 wants `1.0e-6`).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"line {exc.problem_mark.line + 1}: {exc.problem}"
    return str(exc)


def _apply_override(data: dict[str, Any], override: str) -> str | None:
    """Applies one `--set key=value` to the raw spec; returns an error line instead when it cannot."""
    key, equals, raw = override.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        return f"--set {override}: expected key=value"
    try:
        value = yaml.load(raw, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        return f"--set {override}: value is not valid YAML: {_yaml_problem(exc)}"
    searched = parts[:2] == ["search", "space"] and len(parts) > 2
    if searched:
        # A searched key is itself dotted: search.space.norm.eps is space["norm.eps"].
        parts = [*parts[:2], ".".join(parts[2:])]
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            return f"--set {override}: {'.'.join(parts[:depth])} is not a mapping, got {_show(node[part])}"
        node = node[part]
    if searched and value is None:
        # `--set search.space.KEY=null` stops searching KEY.
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return None


def _valid_parts(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Distribution], SearchConfig | None]:
    """What of a spec that failed validation is still valid: the base settings (dotted key → value, the
    default where none is given), the distributions, and the search section with those distributions, so
    that the cross-field rules still run and report what they find.
    """
    given = flatten({name: data[name] for name in _TRIAL_SECTIONS if isinstance(data.get(name), dict)})
    base: dict[str, Any] = {}
    for key, default in _TRIAL_DEFAULTS.items():
        if not isinstance(data.get(key.split(".")[0], {}), dict):
            continue  # a broken section: its defaults would only add false cross-field errors
        try:
            base[key] = _as_stored(key, given.get(key, default))
        except ValidationError:
            continue
    raw = data.get("search")
    if not isinstance(raw, dict):
        return base, {}, None
    space: dict[str, Distribution] = {}
    for key, value in raw["space"].items() if isinstance(raw.get("space"), dict) else ():
        try:
            space[str(key)] = Distribution.model_validate(value)
        except ValidationError:
            continue
    try:
        return base, space, SearchConfig.model_validate({**raw, "space": space})
    except ValidationError:
        return base, space, None


def _prepared(data: Any, overrides: Sequence[str], source: str) -> tuple[dict[str, Any], list[str]]:
    """A copy of the document with the overrides applied and the placement coerced, and the override errors."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else type(data).__name__
        raise SpecError([f"{source}: expected a mapping at the top level, got {got}"])
    data = copy.deepcopy(data)
    errors = [error for override in overrides if (error := _apply_override(data, override))]
    if isinstance(data.get("norm"), dict) and "placement" in data["norm"]:
        data["norm"]["placement"] = _coerce(_PLACEMENT, data["norm"]["placement"])
    return data, errors


def _build(data: Any, overrides: Sequence[str], source: str) -> StudySpec:
    data, errors = _prepared(data, overrides, source)
    spec: StudySpec | None = None
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        errors += _error_lines(exc, StudySpec)
        base, space, search = _valid_parts(data)
    else:
        base, space, search = flatten(spec.base_config().model_dump()), spec.search.space, spec.search
    space_errors, resolved = _space_errors(space)
    errors += space_errors
    if search:
        errors += _objective_errors(search) + _budget_errors(search, base)
    errors += _setting_errors(base, search) + _component_errors(base, space, resolved)
    if errors or spec is None:
        raise SpecError(list(dict.fromkeys(errors)))
    # Trials then sample the values the trial config stores ("34", not 34), and MLflow logs those.
    spec.search.space.update(resolved)
    return spec


def spec_from_dict(data: Any, overrides: Sequence[str] = ()) -> StudySpec:
    """Validates a spec given as (YAML-shaped) data; `overrides` are `key=value` strings as for --set."""
    return _build(data, overrides, "spec")


def _read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([f"{path}: cannot read {what}: {reason}"]) from None
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError([f"{path}: not valid YAML: {_yaml_problem(exc)}"]) from None


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> StudySpec:
    """Reads, overrides (`key=value` strings, values in YAML) and validates a spec file; relative paths in
    it resolve against the current directory. Raises SpecError listing every problem."""
    return _build(_read_yaml(path, "spec"), overrides, str(path))


TrialModel = TypeVar("TrialModel", bound=TrialConfig)


def load_trial_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), model: type[TrialModel] = TrialConfig
) -> TrialModel:
    """Reads a standalone trial configuration (no `name`, `search`, ...: what final training takes) and
    checks it like a spec's base configuration (schema, architecture, norm kind, placement), with `--set`
    overrides and the same error lines. `model` may extend TrialConfig with more sections.
    """
    data, errors = _prepared(_read_yaml(path, "config"), overrides, str(path))
    config: TrialModel | None = None
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        errors += _error_lines(exc, model)
        base = _valid_parts(data)[0]
    else:
        base = flatten(config.model_dump(include=set(_TRIAL_SECTIONS)))
    errors += _setting_errors(base, None) + _component_errors(base, {}, {})
    if errors or config is None:
        raise SpecError(list(dict.fromkeys(errors)))
    return config
