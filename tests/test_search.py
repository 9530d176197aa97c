"""What StudySearch tells Optuna about each way a trial ends, driven the way Tune's controller drives it.

No Ray is started: the searcher is called directly, in the order Tune calls it. One detail of that order
matters: Tune passes a result to `on_trial_result` only when the trial goes on; the result on which the
scheduler stops a trial (or on which the trial ends) reaches the searcher only through `on_trial_complete`
(ray/tune/execution/tune_controller.py, `_process_trial_result`). Saving and restoring go through Tune's own
`SearchGenerator` and `ConcurrencyLimiter`, the wrappers `Tuner` puts around the searcher.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.search_generator import SearchGenerator

from sbn_study.protocol import worst_values
from sbn_study.spec import StudySpec, load_spec
from sbn_study.tune.search import TUNE_TRIAL_ID_ATTR, StudySearch
from tests.conftest import QUICKSTART

optuna.logging.set_verbosity(optuna.logging.WARNING)


def in_memory(spec: StudySpec) -> StudySearch:
    return StudySearch(spec, None, "test")


@pytest.fixture
def spec() -> StudySpec:
    spec = load_spec(QUICKSTART, ["train.epochs=8"])
    assert (spec.search.metrics, spec.search.modes, spec.max_budget) == (["val_acc"], ["max"], 8)
    return spec


def run_trial(
    search: StudySearch, trial_id: str, results: list[dict], stopped_by_scheduler: bool
) -> FrozenTrial:
    """Feeds one trial's results to the searcher as Tune does, and returns what Optuna recorded of it."""
    feed(search, trial_id, results, stopped_by_scheduler)
    return optuna_trial(search, trial_id)


def feed(searcher: Searcher, trial_id: str, results: list[dict], stopped_by_scheduler: bool) -> None:
    assert searcher.suggest(trial_id) is not None
    *going_on, last = results
    for result in going_on:
        searcher.on_trial_result(trial_id, result)
    if not stopped_by_scheduler:
        # A trial that ends by itself: its last result is a plain result, then Tune completes the trial with it.
        searcher.on_trial_result(trial_id, last)
    searcher.on_trial_complete(trial_id, result=last)


def optuna_trial(search: StudySearch, trial_id: str) -> FrozenTrial:
    """What the searcher's Optuna study holds of one Tune trial."""
    (trial,) = [t for t in search.study.trials if t.user_attrs[TUNE_TRIAL_ID_ATTR] == trial_id]
    return trial


def epochs(values: list[float], **extra: float) -> list[dict[str, float]]:
    return [{"epoch": e, "val_acc": v, **extra} for e, v in enumerate(values, start=1)]


def test_a_diverged_trial_is_complete_with_the_worst_value(spec: StudySpec) -> None:
    search = in_memory(spec)
    # Epoch 2 diverges: the trainable replaces the searched metric with its worst value (-inf for max).
    results = [
        {"epoch": 1, "val_acc": 0.3},
        {"epoch": 2, "diverged": 1.0, **worst_values(spec.search.metrics, spec.search.modes)},
    ]
    assert results[1]["val_acc"] == -math.inf

    recorded = run_trial(search, "diverged", results, stopped_by_scheduler=False)

    # COMPLETE, not PRUNED although it ended before the budget: TPE ranks it below every real score.
    assert recorded.state == TrialState.COMPLETE
    assert recorded.value == -math.inf
    assert recorded.intermediate_values == {1: 0.3}  # the stand-in is not a measurement


def test_a_trial_the_scheduler_stopped_is_pruned_with_its_values_per_epoch(spec: StudySpec) -> None:
    search = in_memory(spec)
    results = [{"epoch": e, "val_acc": v} for e, v in [(1, 0.2), (2, 0.25), (3, 0.31)]]

    recorded = run_trial(search, "stopped", results, stopped_by_scheduler=True)

    assert recorded.state == TrialState.PRUNED
    # Step = epoch, and the value ASHA stopped it on is the one that says how far it got.
    assert recorded.intermediate_values == {1: 0.2, 2: 0.25, 3: 0.31}


def test_a_trial_stopped_at_its_first_rung_still_tells_its_value(spec: StudySpec) -> None:
    search = in_memory(spec)

    recorded = run_trial(search, "first-rung", [{"epoch": 1, "val_acc": 0.2}], stopped_by_scheduler=True)

    assert recorded.state == TrialState.PRUNED
    # Without it TPE has nothing to rank this trial by (a pruned trial without values counts as the worst).
    assert recorded.intermediate_values == {1: 0.2}


def test_a_trial_that_ran_its_budget_is_complete_with_its_last_value(spec: StudySpec) -> None:
    search = in_memory(spec)
    results = [{"epoch": e, "val_acc": 0.1 * e} for e in range(1, 9)]

    recorded = run_trial(search, "full", results, stopped_by_scheduler=False)

    assert recorded.state == TrialState.COMPLETE
    assert recorded.value == pytest.approx(0.8)


def test_a_crashed_trial_is_failed_with_the_values_it_reported(spec: StudySpec) -> None:
    search = in_memory(spec)
    search.suggest("crashed")
    search.on_trial_result("crashed", {"epoch": 1, "val_acc": 0.2})
    search.on_trial_complete("crashed", error=True)  # what Tune calls once max_failures are spent

    assert optuna_trial(search, "crashed").state == TrialState.FAIL
    assert optuna_trial(search, "crashed").intermediate_values == {1: 0.2}


def test_a_trial_removed_before_any_result_is_failed(spec: StudySpec) -> None:
    search = in_memory(spec)
    search.suggest("pending")
    search.on_trial_complete("pending")  # Tune's stop_trial of a PENDING trial: no result, no error

    assert optuna_trial(search, "pending").state == TrialState.FAIL


def test_calls_after_a_trial_was_told_or_for_unknown_trials_change_nothing(spec: StudySpec) -> None:
    search = in_memory(spec)
    told = run_trial(search, "done", epochs([0.2, 0.3]), stopped_by_scheduler=True)

    search.on_trial_result("done", {"epoch": 3, "val_acc": 0.9})
    search.on_trial_complete("done", result={"epoch": 8, "val_acc": 0.9})
    search.on_trial_result("unknown", {"epoch": 1, "val_acc": 0.5})
    search.on_trial_complete("unknown", result={"epoch": 8, "val_acc": 0.5})

    assert [optuna_trial(search, "done")] == search.study.trials
    assert optuna_trial(search, "done").state == TrialState.PRUNED
    assert optuna_trial(search, "done").intermediate_values == told.intermediate_values == {1: 0.2, 2: 0.3}


def test_multi_objective_trials_are_told_both_values_and_no_intermediate_ones() -> None:
    spec = load_spec(
        QUICKSTART,
        [
            "train.epochs=4",
            "search.metric=[val_acc, epoch_time_s]",
            "search.mode=[max, min]",
            "search.sampler={type: nsga2, seed: 0}",
        ],
    )
    search = in_memory(spec)
    assert (search.metric, search.mode) == (["val_acc", "epoch_time_s"], ["max", "min"])
    assert search.study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]

    full = run_trial(
        search, "full", epochs([0.1, 0.2, 0.3, 0.4], epoch_time_s=2.0), stopped_by_scheduler=False
    )
    stopped = run_trial(search, "stopped", epochs([0.1], epoch_time_s=3.0), stopped_by_scheduler=True)

    assert (full.state, full.values, full.intermediate_values) == (TrialState.COMPLETE, [0.4, 2.0], {})
    assert (stopped.state, stopped.intermediate_values) == (TrialState.PRUNED, {})


def test_a_seeded_searcher_suggests_the_same_trials_and_conditions_hold(spec: StudySpec) -> None:
    conditional = [
        "search.space.norm.kind={choice: [sbn, 2bn]}",
        "search.space.norm.fft_norm={choice: [backward, ortho, forward], when: {norm.kind: [sbn]}}",
    ]
    spec = load_spec(QUICKSTART, ["train.epochs=8", *conditional])

    def sequence(spec: StudySpec) -> list[dict[str, Any]]:
        search, suggested = in_memory(spec), []
        for number in range(8):  # past n_startup_trials: TPE's model draws the last ones
            suggested.append(search.suggest(f"t{number}"))
            run_trial(search, f"t{number}", epochs([0.1 * (number % 3)] * 8), stopped_by_scheduler=False)
        return suggested

    first = sequence(spec)
    assert first == sequence(spec)
    assert first != sequence(load_spec(QUICKSTART, ["train.epochs=8", *conditional, "search.sampler.seed=1"]))
    assert {params["norm.kind"] for params in first} == {"sbn", "2bn"}
    for params in first:
        assert ("norm.fft_norm" in params) == (params["norm.kind"] == "sbn"), params


def test_suggest_again_for_the_same_trial_returns_its_parameters(spec: StudySpec) -> None:
    search = in_memory(spec)
    assert search.suggest("t") == search.suggest("t")
    assert len(search.study.trials) == 1


def tuner_wrapped(spec: StudySpec) -> SearchGenerator:
    """The searcher as `Tuner` holds it when the spec sets max_concurrent (TuneConfig.max_concurrent_trials)."""
    return SearchGenerator(ConcurrencyLimiter(in_memory(spec), max_concurrent=spec.search.max_concurrent))


def base(generator: SearchGenerator) -> StudySearch:
    return generator.searcher.searcher


def test_max_concurrent_holds_back_suggestions_until_a_trial_ends(spec: StudySpec) -> None:
    generator = tuner_wrapped(spec)
    assert spec.search.max_concurrent == 2
    assert generator.searcher.suggest("a") is not None
    assert generator.searcher.suggest("b") is not None
    assert generator.searcher.suggest("c") is None  # Tune asks again later
    generator.on_trial_complete("a", result={"epoch": 8, "val_acc": 0.5})
    assert generator.searcher.suggest("c") is not None
    assert [t.user_attrs[TUNE_TRIAL_ID_ATTR] for t in base(generator).study.trials] == ["a", "b", "c"]


def test_save_and_restore_keep_the_samplers_history_and_its_next_suggestions(
    spec: StudySpec, tmp_path: Path
) -> None:
    generator = tuner_wrapped(spec)
    limiter, original = generator.searcher, base(generator)
    # Past TPE's n_startup_trials (4), so that what comes next depends on the history, not on the seed alone.
    for number, values in enumerate([[0.2] * 8, [0.1, 0.15], [0.3] * 8, [0.25] * 8, [0.05]]):
        feed(limiter, f"t{number}", epochs(values), stopped_by_scheduler=len(values) < 8)
    limiter.suggest("midway")
    limiter.on_trial_result("midway", {"epoch": 1, "val_acc": 0.4})
    # What Tune does after every result, and on `Tuner.restore` into a searcher built anew from the spec.
    generator.save_to_dir(str(tmp_path), session_str="2026-01-01_00-00-00")
    restored_generator = tuner_wrapped(spec)
    restored_generator.restore_from_dir(str(tmp_path))
    restored = base(restored_generator)

    def history(search: StudySearch) -> list[tuple]:
        return [
            (t.user_attrs[TUNE_TRIAL_ID_ATTR], t.params, t.state, t.value, t.intermediate_values)
            for t in search.study.trials
        ]

    assert history(restored) == history(original)
    assert [t.state for t in restored.study.trials].count(TrialState.PRUNED) == 2
    assert restored_generator.searcher.live_trials == {"midway"}

    def go_on(generator: SearchGenerator) -> list[dict[str, Any]]:
        """The midway trial ends, then three more are sampled and told."""
        limiter = generator.searcher
        limiter.on_trial_result("midway", {"epoch": 1, "val_acc": 0.4})  # replayed: not told twice
        limiter.on_trial_result("midway", {"epoch": 2, "val_acc": 0.45})
        limiter.on_trial_complete("midway", result={"epoch": 2, "val_acc": 0.45})
        suggested = []
        for number in range(3):
            suggested.append(limiter.suggest(f"next{number}"))
            limiter.on_trial_complete(f"next{number}", result={"epoch": 8, "val_acc": 0.1 * number})
        return suggested

    assert go_on(restored_generator) == go_on(generator)
    assert optuna_trial(restored, "midway").intermediate_values == {1: 0.4, 2: 0.45}
    assert optuna_trial(restored, "midway").state == TrialState.PRUNED
    assert history(restored) == history(original) and len(restored.study.trials) == 9

    # The history matters: a searcher that lost it would have sampled something else.
    fresh = in_memory(spec)
    assert [fresh.suggest(f"next{n}") for n in range(3)] != [
        optuna_trial(restored, f"next{n}").params for n in range(3)
    ]
