"""The study spec: a base trial configuration plus `name`, `resources`, `tracking`, `storage` and `search`.

`StudySpec.model_validate` alone checks the schema only (not the cross-field rules of `sbn_study.spec.rules`),
so code that reads a user's spec must go through `load_spec` / `spec_from_dict` (`sbn_study.spec.loader`).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, ValidationError, field_validator

from sbn_study.spec.config import DataConfig, PathText, Seed, Strict, TrialConfig, flatten, set_dotted
from sbn_study.spec.distributions import Distribution
from sbn_study.spec.effects import effect_warnings
from sbn_study.spec.messages import SpecError, error_lines, show, spec_error

MetricName = Literal["val_acc", "val_loss", "train_loss", "train_acc", "epoch_time_s", "images_per_s"]
Mode = Literal["max", "min"]
SamplerType = Literal["tpe", "random", "cmaes", "gp", "qmc", "nsga2"]
SchedulerType = Literal["asha", "hyperband", "median", "none"]

METRICS: tuple[str, ...] = get_args(MetricName)
MODES: tuple[str, ...] = get_args(Mode)

TRIAL_SECTIONS: tuple[str, ...] = tuple(TrialConfig.model_fields)
# Every setting of a trial as a dotted key, with its default.
TRIAL_DEFAULTS: dict[str, Any] = flatten(TrialConfig().model_dump())
TRIAL_KEYS: tuple[str, ...] = tuple(TRIAL_DEFAULTS)
PLACEMENT = "norm.placement"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# The name goes into file and folder names with suffixes (`<output>/studies/<name>.unsent.jsonl`, Tune's
# `<name>-<timestamp>/`) that file systems cap at 255 bytes, and into MLflow run names (`<name>-<trial id>`)
# that the UI must show: 100 characters leave the suffixes room and are more than any study needs.
NAME_MAX_LENGTH = 100


def coerce(key: str, value: Any) -> Any:
    """YAML and `--set` read `placement: 34` as an int; the placement is a string of stage digits."""
    if key == PLACEMENT and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


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


def _usable_name(name: str) -> str:
    """A study's name: it names an MLflow experiment and folders."""
    if not _NAME.fullmatch(name):
        raise spec_error(
            f"expected a letter or digit followed by letters, digits, '_', '.' or '-', got {show(name)}"
        )
    if len(name) > NAME_MAX_LENGTH:
        raise spec_error(f"expected at most {NAME_MAX_LENGTH} characters, got {len(name)}")
    return name


class ResourcesConfig(Strict):
    """What Ray reserves for each trial; fractional GPUs pack several trials onto one GPU."""

    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


class TrackingConfig(Strict):
    # None = the sqlite store under the run's output folder; --tracking-uri and MLFLOW_TRACKING_URI win.
    uri: PathText | None = None
    # The database (an SQLAlchemy URL) of the sampler's Optuna study; None = sqlite:///<output>/optuna.db
    # (`sbn_study.store.uri.resolve_optuna_storage`).
    optuna_storage: PathText | None = None

    @field_validator("uri", "optuna_storage")
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
    seed: Seed | None = 0
    n_startup_trials: int = Field(10, ge=0)


class SchedulerConfig(Strict):
    type: SchedulerType = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: int | None = Field(None, ge=1, description="the budget in epochs; None = train.epochs")


def _one_or_two(value: Any, allowed: tuple[str, ...]) -> Any:
    values = value if isinstance(value, list) and len(value) == 2 else [value]
    if not all(isinstance(v, str) and v in allowed for v in values):
        raise spec_error(f"expected one of {', '.join(allowed)} or a list of two of them, got {show(value)}")
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
    # Partial configurations (searched dotted key → value) the sampler hands out first, in this order;
    # counted in num_samples. Checked against `space` by `rules.enqueue_errors`.
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    # An earlier study (its name) whose finished trials the sampler starts from.
    warm_start: str | None = None

    @field_validator("enqueue", mode="before")
    @classmethod
    def _partial_configurations(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for entry in value:
            if not isinstance(entry, dict) or not entry or not all(isinstance(k, str) for k in entry):
                raise spec_error(
                    f"expected a list of mappings of searched dotted.key: value, got {show(entry)}"
                )
        return [{key: coerce(key, v) for key, v in entry.items()} for entry in value]

    @field_validator("warm_start")
    @classmethod
    def _study_name(cls, name: str | None) -> str | None:
        return None if name is None else _usable_name(name)

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
    storage: PathText | None = None
    search: SearchConfig

    @field_validator("name")
    @classmethod
    def _usable_name(cls, name: str) -> str:
        return _usable_name(name)

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
        return TrialConfig.model_validate(self.model_dump(include=set(TRIAL_SECTIONS)))

    def trial_config(self, sampled: Mapping[str, Any]) -> TrialConfig:
        """The fully resolved configuration of one trial: the dotted `sampled` values set on the base."""
        unknown = [key for key in sampled if key not in TRIAL_KEYS]
        if unknown:
            raise SpecError([f"{key}: not a key of the trial configuration" for key in unknown])
        tree = self.base_config().model_dump()
        for key, value in sampled.items():
            set_dotted(tree, key, coerce(key, value))
        try:
            return TrialConfig.model_validate(tree)
        except ValidationError as exc:
            raise SpecError(error_lines(exc, TrialConfig)) from None

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
        return found + effect_warnings(flatten(self.base_config().model_dump()), space)


def _samples_categoricals_at_random(sampler: str) -> bool:
    # CMA-ES has no model of categorical parameters; QMC got one in Optuna 5, the GP sampler always had one.
    if sampler == "qmc":
        return int(importlib.metadata.version("optuna").split(".")[0]) < 5
    return sampler == "cmaes"
