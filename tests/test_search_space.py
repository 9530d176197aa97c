"""The spec's search section as Optuna sees it: conditional parameters, seeded samplers, schedulers."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from sbn_study.spec import load_spec
from sbn_study.tune.search import SearchSpace, make_sampler, make_scheduler
from tests.conftest import QUICKSTART

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_condition_holds_on_what_the_trial_sampled_wherever_the_spec_lists_it() -> None:
    # norm.fft_norm comes before norm.kind in the space: the condition must still see the sampled kind.
    spec = load_spec(
        QUICKSTART,
        [
            "search.space.norm.fft_norm={choice: [backward, ortho, forward], when: {norm.kind: [sbn]}}",
            "search.space.norm.kind={choice: [sbn, 2bn]}",
        ],
    )
    assert list(spec.search.space).index("norm.fft_norm") < list(spec.search.space).index("norm.kind")
    space = SearchSpace(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    kinds = set()
    for _ in range(40):
        sampled = space(study.ask())
        kinds.add(sampled["norm.kind"])
        assert ("norm.fft_norm" in sampled) == (sampled["norm.kind"] == "sbn"), sampled
    assert kinds == {"sbn", "2bn"}


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}


def _sampled_sequence(overrides: list[str], trials: int = 6) -> list[dict[str, Any]]:
    spec = load_spec(QUICKSTART, overrides)
    sampler = make_sampler(spec)
    assert isinstance(sampler, SAMPLERS[spec.search.sampler.type])
    study = optuna.create_study(sampler=sampler, directions=[f"{m}imize" for m in spec.search.modes])
    space, sequence = SearchSpace(spec), []
    for number in range(trials):
        trial = study.ask()
        sequence.append(space(trial))
        values = [float(number % 3), float(number)][: len(spec.search.metrics)]
        study.tell(trial, values)
    return sequence


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_is_built_and_reproducible_from_its_seed(sampler: str) -> None:
    overrides = [
        f"search.sampler={{type: {sampler}, seed: 7, n_startup_trials: 2}}",
        # Numeric parameters only: CMA-ES and GP then model them rather than sampling at random.
        "search.space={norm.momentum: {loguniform: [0.01, 0.5]}, train.lr: {uniform: [0.01, 0.2]}}",
    ]
    if sampler == "nsga2":
        overrides += ["search.metric=[val_acc, epoch_time_s]", "search.mode=[max, min]"]
    first = _sampled_sequence(overrides)
    assert first == _sampled_sequence(overrides)
    assert first != _sampled_sequence([*overrides, "search.sampler.seed=8"])


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("asha", "AsyncHyperBandScheduler"),
        ("hyperband", "HyperBandScheduler"),
        ("median", "MedianStoppingRule"),
        ("none", "FIFOScheduler"),
    ],
)
def test_every_scheduler_is_built_on_epochs_and_the_studys_metric(scheduler: str, expected: str) -> None:
    built = make_scheduler(load_spec(QUICKSTART, [f"search.scheduler.type={scheduler}"]))
    assert type(built).__name__ == expected
    if scheduler != "none":
        assert (built._time_attr, built._metric, built._mode) == ("epoch", "val_acc", "max")
