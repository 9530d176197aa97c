"""Shared fixtures: one local Ray per test session, and one small real study that many tests read back."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "search_spaces" / "quickstart.yaml"
DOMAINS_QUICKSTART = REPO / "search_spaces" / "domains_quickstart.yaml"

# The small study the end-to-end tests share: the quick-start spec, cut down to seconds.
SMALL_STUDY_OVERRIDES = [
    "name=e2e-small",
    "search.num_samples=6",
    "search.max_concurrent=2",
    "search.sampler.n_startup_trials=3",
    "search.scheduler.grace_period=1",
    "search.scheduler.reduction_factor=3",
    "train.epochs=3",
    "features.interval=1",
    "data.val_size=256",
    "data.synthetic.train_size=1024",
    "data.synthetic.test_size=256",
    "model.width=8",
]


def run_command(output: Path, overrides: list[str], *extra: str) -> list[str]:
    """`sbn-study run` of the small study as a subprocess command line."""
    sets = [arg for override in [*SMALL_STUDY_OVERRIDES, *overrides] for arg in ("--set", override)]
    return [
        sys.executable,
        "-m",
        "sbn_study.cli",
        "run",
        str(QUICKSTART),
        *sets,
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(autouse=True)
def no_tracking_store_left_in_the_environment() -> Iterator[None]:
    """Every driver a later test starts writes to $MLFLOW_TRACKING_URI: a test that leaves it set (as
    `mlflow.set_tracking_uri` does) fails here, at its source, instead of the tests after it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    left = os.environ.get("MLFLOW_TRACKING_URI")
    if left != before:
        if before is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        pytest.fail(f"the test left MLFLOW_TRACKING_URI={left!r} in the environment")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray with 2 CPUs for the whole session; shut down only if this fixture started it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@dataclass(frozen=True)
class FinishedStudy:
    spec: Any
    outcome: Any
    output: Path
    tracking_uri: str


def run_small_study(
    output: Path, overrides: list[str] | None = None, path: Path = QUICKSTART
) -> FinishedStudy:
    """The spec at `path` (a tiny model's) cut down by SMALL_STUDY_OVERRIDES, then `overrides`, run to the end."""
    from sbn_study.spec import load_spec
    from sbn_study.study.lifecycle import RunOptions, run_study

    spec = load_spec(path, SMALL_STUDY_OVERRIDES + (overrides or []))
    options = RunOptions(output=output, progress_interval_s=60.0)
    outcome = run_study(spec, path.read_text(), options)
    return FinishedStudy(spec, outcome, output, f"sqlite:///{output / 'mlflow.db'}")


@pytest.fixture(scope="session")
def small_study(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> FinishedStudy:
    """A finished 6-trial study through real Ray Tune, Optuna (TPE), ASHA and MLflow (sqlite)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return run_small_study(tmp_path_factory.mktemp("small-study"))


# The domain-generalization quick start cut down to seconds: 4 trials of 4 folds on 96 images per domain.
DOMAIN_STUDY_OVERRIDES = [
    "name=e2e-domains",
    "search.num_samples=4",
    "data.synthetic_domains.images_per_domain=96",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "features.enabled=true",
]


@pytest.fixture(scope="session")
def domain_study(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> FinishedStudy:
    """The domain-generalization quick start, finished through Ray Tune, Optuna (TPE), ASHA and MLflow."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        output = tmp_path_factory.mktemp("domain-study")
        return run_small_study(output, DOMAIN_STUDY_OVERRIDES, DOMAINS_QUICKSTART)


@dataclass(frozen=True)
class TuneTrial:
    """One trial as Tune saved it in its experiment state: what a resumed Tune starts from."""

    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    config: dict[str, Any]  # the sampled parameters
    runtime: dict[str, Any]  # num_failures, last_result (training_iteration, iterations_since_restore, ...)

    @property
    def iteration(self) -> int:
        """Epochs reported so far; each report carries a checkpoint, so also the epoch of the latest one."""
        return int(self.runtime["last_result"].get("training_iteration", 0))


def tune_trials(output: Path) -> dict[str, TuneTrial]:
    """Every trial of the study in `output`, from Tune's newest experiment state file ({} before the first).

    Tune rewrites the file in place: read while it is being written, this raises json.JSONDecodeError.
    """
    import json

    files = sorted((output / "ray").glob("*/experiment_state-*.json"))
    if not files:
        return {}
    trials = {}
    for trial_json, runtime_json in json.loads(files[-1].read_text())["trial_data"]:
        trial = json.loads(trial_json)
        trials[trial["trial_id"]] = TuneTrial(trial["status"], trial["config"], json.loads(runtime_json))
    return trials


def tune_trial_state(output: Path, trial_id: str) -> dict[str, Any]:
    """Tune's saved runtime state of one trial (failures, last result), read from its experiment state file."""
    trials = tune_trials(output)
    if trial_id not in trials:
        raise AssertionError(f"trial {trial_id} is not in Tune's experiment state under {output / 'ray'}")
    return trials[trial_id].runtime
