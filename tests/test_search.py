"""What StudySearch tells Optuna about each way a trial ends, driven the way Tune's controller drives it.

No Ray is started: the searcher is called directly, in the order Tune calls it. One detail of that order
matters: Tune passes a result to `on_trial_result` only when the trial goes on; the result on which the
scheduler stops a trial (or on which the trial ends) reaches the searcher only through `on_trial_complete`
(ray/tune/execution/tune_controller.py, `_process_trial_result`).
"""

from __future__ import annotations

import math

import pytest
from optuna.trial import FrozenTrial, TrialState

from sbn_study.protocol import worst_values
from sbn_study.spec import StudySpec, load_spec
from sbn_study.tune.search import StudySearch
from tests.conftest import QUICKSTART


@pytest.fixture
def spec() -> StudySpec:
    spec = load_spec(QUICKSTART, ["train.epochs=8"])
    assert (spec.search.metrics, spec.search.modes, spec.max_budget) == (["val_acc"], ["max"], 8)
    return spec


def run_trial(
    search: StudySearch, trial_id: str, results: list[dict], stopped_by_scheduler: bool
) -> FrozenTrial:
    """Feeds one trial's results to the searcher as Tune does, and returns what Optuna recorded of it."""
    assert search.suggest(trial_id) is not None
    *going_on, last = results
    for result in going_on:
        search.on_trial_result(trial_id, result)
    if not stopped_by_scheduler:
        # A trial that ends by itself: its last result is a plain result, then Tune completes the trial with it.
        search.on_trial_result(trial_id, last)
    search.on_trial_complete(trial_id, result=last)
    (recorded,) = [t for t in search._ot_study.trials if t.number == search._ot_trials[trial_id].number]
    return recorded


def test_a_diverged_trial_is_complete_with_the_worst_value(spec: StudySpec) -> None:
    search = StudySearch(spec)
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
    search = StudySearch(spec)
    results = [{"epoch": e, "val_acc": v} for e, v in [(1, 0.2), (2, 0.25), (3, 0.31)]]

    recorded = run_trial(search, "stopped", results, stopped_by_scheduler=True)

    assert recorded.state == TrialState.PRUNED
    # Step = epoch, and the value ASHA stopped it on is the one that says how far it got.
    assert recorded.intermediate_values == {1: 0.2, 2: 0.25, 3: 0.31}


def test_a_trial_stopped_at_its_first_rung_still_tells_its_value(spec: StudySpec) -> None:
    search = StudySearch(spec)

    recorded = run_trial(search, "first-rung", [{"epoch": 1, "val_acc": 0.2}], stopped_by_scheduler=True)

    assert recorded.state == TrialState.PRUNED
    # Without it TPE has nothing to rank this trial by (a pruned trial without values counts as the worst).
    assert recorded.intermediate_values == {1: 0.2}


def test_a_trial_that_ran_its_budget_is_complete_with_its_last_value(spec: StudySpec) -> None:
    search = StudySearch(spec)
    results = [{"epoch": e, "val_acc": 0.1 * e} for e in range(1, 9)]

    recorded = run_trial(search, "full", results, stopped_by_scheduler=False)

    assert recorded.state == TrialState.COMPLETE
    assert recorded.value == pytest.approx(0.8)
