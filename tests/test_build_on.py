"""Building on earlier work: queued configurations (`search.enqueue`), a warm start from an earlier study
(`search.warm_start`), a finished study extended by `--resume` with a larger `num_samples`, and the sampler's
Optuna study kept in a database that `optuna.load_study` reads back.

The searcher tests drive `StudySearch` as Tune does, over a real sqlite database, without Ray; the end-to-end
test runs studies through real Ray Tune, Optuna, ASHA and MLflow and compares what Optuna and MLflow hold.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sbn_study.errors import UserError
from sbn_study.spec import SpecError, StudySpec, load_spec
from sbn_study.tune.search import ENQUEUED_ATTR, TUNE_TRIAL_ID_ATTR, StudySearch, warm_start_trials
from tests.conftest import QUICKSTART, SMALL_STUDY_OVERRIDES

optuna.logging.set_verbosity(optuna.logging.WARNING)

QUEUE = "search.enqueue=[{norm.placement: 23, norm.momentum: 0.2}, {norm.placement: none}]"


def spec_with(*overrides: str) -> StudySpec:
    return load_spec(QUICKSTART, ["train.epochs=4", *overrides])


def spec_errors(*overrides: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        spec_with(*overrides)
    return caught.value.errors


def test_enqueued_configurations_are_checked_against_the_space_with_key_paths() -> None:
    assert spec_errors(
        "search.num_samples=1",
        "search.enqueue=[{norm.placement: 34, norm.momentum: 0.1}, {norm.placement: none, norm.eps: 0.001}, "
        "{norm.epz: 1, train.lr: 5}]",
    ) == [
        "search.enqueue: 3 configurations are more than the search.num_samples (1) trials they are counted in",
        "search.enqueue[0].norm.placement: expected one of the choices (none, 3, 23, 123, all), got '34'",
        "search.enqueue[1].norm.eps: not sampled where norm.placement is 'none' (its when: norm.placement in "
        "3, 23, 123, all)",
        "search.enqueue[2].norm.epz: not a searched key (did you mean norm.eps?); searched: norm.placement, "
        "norm.momentum, norm.eps, norm.fft_norm, train.weight_decay, train.lr",
        "search.enqueue[2].train.lr: expected a value in [0.01, 0.2] (loguniform), got 5",
    ]
    assert spec_errors("search.enqueue=[[norm.placement]]") == [
        "search.enqueue: expected a list of mappings of searched dotted.key: value, got ['norm.placement']"
    ]
    assert spec_errors("search.warm_start=../x") == [
        "search.warm_start: expected a letter or digit followed by letters, digits, '_', '.' or '-', got '../x'"
    ]
    # The placement is coerced as everywhere else: 23 is "23".
    assert spec_with(QUEUE).search.enqueue[0] == {"norm.placement": "23", "norm.momentum": 0.2}


def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def tell_complete(search: StudySearch, trial_id: str, value: float, epochs: int = 4) -> None:
    search.on_trial_complete(trial_id, result={"epoch": epochs, "val_acc": value})


def test_enqueued_configurations_come_first_and_the_rest_is_sampled(tmp_path: Path) -> None:
    spec = spec_with(QUEUE)
    search = StudySearch(spec, storage_url(tmp_path), "queued")
    first, second, third = (search.suggest(f"t{i}") for i in range(3))
    assert first["norm.placement"] == "23" and first["norm.momentum"] == 0.2
    assert set(first) == {
        "norm.placement",
        "norm.momentum",
        "norm.eps",
        "norm.fft_norm",
        "train.weight_decay",
        "train.lr",
    }
    assert second["norm.placement"] == "none" and "norm.momentum" not in second  # its when does not hold
    assert first["train.lr"] != second["train.lr"]  # what the queue leaves open is sampled
    trials = optuna.load_study(study_name="queued", storage=storage_url(tmp_path)).trials
    assert [t.user_attrs.get(ENQUEUED_ATTR) for t in trials] == [0, 1, None]
    assert third is not None


def test_a_resumed_searcher_reconciles_the_database_with_tunes_saved_state(tmp_path: Path) -> None:
    """Tune's saved state is older than the database: trials asked since fail (an enqueued one is queued
    again, so the queue is still served); a trial told since is not told twice."""
    spec = spec_with(QUEUE)
    search = StudySearch(spec, storage_url(tmp_path), "resumed")
    search.suggest("a")  # the first queued configuration
    search.on_trial_result("a", {"epoch": 1, "val_acc": 0.3})
    saved = pickle.dumps(search.get_state())  # what Tune saved
    search.suggest("b")  # the second queued one, asked after the save
    tell_complete(search, "a", 0.4)  # told after the save

    restored = StudySearch(spec, storage_url(tmp_path), "resumed")
    restored.set_state(pickle.loads(saved))
    trials = restored.study.trials
    assert [(t.user_attrs.get(TUNE_TRIAL_ID_ATTR), t.state) for t in trials[:2]] == [
        ("a", TrialState.COMPLETE),
        ("b", TrialState.FAIL),
    ]
    restored.on_trial_complete("a", result={"epoch": 4, "val_acc": 0.4})  # Tune ends it again: no error
    assert restored.study.trials[0].value == 0.4
    again = restored.suggest("c")
    assert again["norm.placement"] == "none" and restored.study.trials[-1].user_attrs[ENQUEUED_ATTR] == 1


def finished_study(tmp_path: Path, name: str, spec: StudySpec, values: list[float]) -> None:
    search = StudySearch(spec, storage_url(tmp_path), f"{name}-20260101-000000")
    for number, value in enumerate(values):
        search.suggest(f"{name}{number}")
        tell_complete(search, f"{name}{number}", value)


def test_a_warm_start_gives_the_sampler_the_earlier_studys_trials(tmp_path: Path) -> None:
    earlier = spec_with("name=earlier")
    finished_study(tmp_path, "earlier", earlier, [0.1, 0.5, 0.3])
    spec = spec_with("name=later", "search.warm_start=earlier")
    trials = warm_start_trials(storage_url(tmp_path), spec)
    assert sorted(t.value for t in trials) == [0.1, 0.3, 0.5]
    search = StudySearch(spec, storage_url(tmp_path), "later-1", trials)
    assert [t.state for t in search.study.trials] == [TrialState.COMPLETE] * 3
    assert search.study.best_value == 0.5
    search.suggest("first")  # the later study's first trial follows them
    assert len(search.study.trials) == 4


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            ["search.space.train.lr={loguniform: [0.001, 0.2]}"],
            "it searched train.lr over {loguniform: [0.01, 0.2]}, this spec over {loguniform: [0.001, 0.2]}",
        ),
        (["search.space.train.lr=null"], "it searched train.lr, which this spec does not"),
        (["search.space.train.momentum={uniform: [0.8, 0.95]}"], "it did not search train.momentum"),
    ],
)
def test_a_warm_start_over_another_space_is_refused_naming_the_parameter(
    tmp_path: Path, overrides: list[str], reason: str
) -> None:
    finished_study(tmp_path, "earlier", spec_with("name=earlier"), [0.2])
    spec = spec_with("name=later", "search.warm_start=earlier", *overrides)
    with pytest.raises(UserError) as caught:
        warm_start_trials(storage_url(tmp_path), spec)
    assert str(caught.value) == f"search.warm_start: study 'earlier' cannot start this one: {reason}"
    with pytest.raises(
        UserError, match=r"^search.warm_start: no study 'absent' in the Optuna storage sqlite"
    ):
        warm_start_trials(storage_url(tmp_path), spec_with("search.warm_start=absent"))


# The small study with a queue; 4 trials, then extended to 6.
QUEUED = [*SMALL_STUDY_OVERRIDES, "search.num_samples=4", QUEUE]


def compare_optuna_with_mlflow(output: Path, name: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """Every Optuna trial of the study has its MLflow run with the same sampled values, status and per-epoch
    values of the metric (Optuna's intermediate values are MLflow's `val_acc` history)."""
    from mlflow import MlflowClient

    from sbn_study.store.runs import STATUS_TAG, TRIAL_ID_TAG

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{output / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    runs = {
        run.data.tags[TRIAL_ID_TAG]: run
        for run in client.search_runs([experiment.experiment_id])
        if TRIAL_ID_TAG in run.data.tags
    }
    trials = [t for t in study.trials if TUNE_TRIAL_ID_ATTR in t.user_attrs]
    assert len(trials) == len(runs)
    told = {TrialState.COMPLETE: {"completed", "diverged"}, TrialState.PRUNED: {"stopped_early"}}
    for trial in trials:
        run = runs[trial.user_attrs[TUNE_TRIAL_ID_ATTR]]
        for key, value in trial.params.items():
            assert run.data.params[key] == str(value), key
        assert run.data.tags[STATUS_TAG] in told[trial.state]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
        assert trial.intermediate_values == history
        assert trial.value == history[max(history)]
    return trials


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_queued_study_extended_and_warm_started_agrees_with_mlflow(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sbn_study.study.lifecycle import RunOptions, run_study
    from sbn_study.study.state import StudyState, state_path

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    output = tmp_path.resolve()

    def run(overrides: list[str], resume: bool = False) -> StudyState:
        spec = load_spec(QUICKSTART, overrides)
        run_study(spec, QUICKSTART.read_text(), RunOptions(output, resume=resume, progress_interval_s=60.0))
        state = StudyState.load(state_path(output, spec.name))
        assert state is not None and state.status == "finished"
        return state

    first = run(QUEUED)
    assert first.optuna_study and first.optuna_storage == f"sqlite:///{output / 'optuna.db'}"
    trials = compare_optuna_with_mlflow(output, "e2e-small", first.optuna_study)
    assert len(trials) == 4
    assert trials[0].params["norm.placement"] == "23" and trials[0].params["norm.momentum"] == 0.2
    assert trials[1].params["norm.placement"] == "none"

    # The same study again, with the same queue, is refused: nothing to add.
    with pytest.raises(UserError, match="no unfinished run"):
        run(QUEUED, resume=True)
    with pytest.raises(UserError, match=r"a larger one adds trials to it, got 3"):
        run([*QUEUED, "search.num_samples=3"], resume=True)
    with pytest.raises(UserError, match=r"differs from the one it ran with in train.epochs too"):
        run([*QUEUED, "search.num_samples=6", "train.epochs=4"], resume=True)

    extended = run([*QUEUED, "search.num_samples=6"], resume=True)
    assert (extended.parent_run_id, extended.optuna_study) == (first.parent_run_id, first.optuna_study)
    assert extended.tune_path != first.tune_path and len(extended.earlier_trials or ()) == 4
    before = [(t.number, t.state, t.values) for t in trials]
    trials = compare_optuna_with_mlflow(output, "e2e-small", first.optuna_study)
    assert len(trials) == 6 and [(t.number, t.state, t.values) for t in trials[:4]] == before
    # The queue is not served twice, and the extension's trials follow the first ones in the run names.
    assert [t.user_attrs.get(ENQUEUED_ATTR) for t in trials] == [0, 1, None, None, None, None]
    from sbn_study.store.runs import open_client, trial_runs

    runs = trial_runs(
        open_client(f"sqlite:///{output / 'mlflow.db'}"), extended.experiment_id, extended.parent_run_id
    )
    assert sorted(run.info.run_name.split()[0] for run in runs) == ["t1", "t2", "t3", "t4", "t5", "t6"]
    # The parent's progress charts go on from the first execution's: all six trials counted, the best of all.
    from sbn_study.protocol import RANKED_STATUSES
    from sbn_study.store import ui
    from sbn_study.store.runs import STATUS_TAG
    from sbn_study.tune.callbacks import ENDED_STATUSES

    client = open_client(f"sqlite:///{output / 'mlflow.db'}")
    progress = client.get_run(extended.parent_run_id).data.metrics
    counts = {status: progress[ui.trials_with_status(status)] for status in ENDED_STATUSES}
    assert progress[ui.TRIALS_FINISHED] == sum(counts.values()) == 6, progress
    assert counts == {s: sum(r.data.tags[STATUS_TAG] == s for r in runs) for s in ENDED_STATUSES}
    bests = [
        max(m.value for m in client.get_metric_history(r.info.run_id, "val_acc"))
        for r in runs
        if r.data.tags[STATUS_TAG] in RANKED_STATUSES
    ]
    assert progress[ui.best_so_far("val_acc")] == max(bests)

    warm = run([*QUEUED, "name=e2e-warm", "search.num_samples=2", "search.warm_start=e2e-small"])
    study = optuna.load_study(study_name=warm.optuna_study, storage=f"sqlite:///{output / 'optuna.db'}")
    copied = [t for t in study.trials if "sbn.warm_start" in t.user_attrs]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.values for t in copied) == sorted(t.values for t in finished)
    assert len(study.trials) == len(copied) + 2
    assert json.loads(json.dumps(study.user_attrs["sbn.objective"])) == [["val_acc"], ["max"]]
    assert os.path.exists(output / "optuna.db")
