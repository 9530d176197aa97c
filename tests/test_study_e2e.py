"""`sbn-study run` through the real stack: Ray Tune, Optuna, ASHA, MLflow (sqlite), read back with the client."""

from __future__ import annotations

import pytest

from tests.conftest import FinishedStudy

pytestmark = pytest.mark.slow

EPOCH_METRICS = ("val_acc", "val_loss", "train_loss", "train_acc", "lr", "epoch_time_s", "images_per_s")


def trial_runs(study: FinishedStudy) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(study.tracking_uri)
    experiment = client.get_experiment_by_name(study.spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if "sbn.trial_id" in r.data.tags]


def test_one_nested_run_per_trial_with_params_metrics_and_tags(small_study: FinishedStudy) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(small_study.tracking_uri)
    runs = trial_runs(small_study)
    assert small_study.outcome.status == "finished"
    assert len(runs) == small_study.spec.search.num_samples
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {small_study.outcome.parent_run_id}
    parent = client.get_run(small_study.outcome.parent_run_id)
    assert parent.data.tags["sbn.study"] == "e2e-small"
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "spec.yaml",
        "resolved.yaml",
        "figures",
    }

    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["sbn.status"] in ("completed", "stopped_early")
        assert tags["sbn.node"]
        # The fully resolved configuration: every key, the sampled ones as sampled.
        assert params["model.arch"] == "tiny"
        assert params["train.epochs"] == "3"
        assert params["norm.placement"] in ("none", "3", "23", "123", "all")
        assert 0.01 <= float(params["norm.momentum"]) <= 0.5
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml"}
        epochs_run = 3 if tags["sbn.status"] == "completed" else None
        history = client.get_metric_history(run.info.run_id, "val_acc")
        steps = [m.step for m in history]
        assert steps == list(range(1, len(steps) + 1))
        if epochs_run:
            assert steps == [1, 2, 3]
        for name in EPOCH_METRICS:
            assert name in run.data.metrics, name
        # Feature statistics at initialization (step 0) and every epoch after (interval 1).
        norm_steps = [m.step for m in client.get_metric_history(run.info.run_id, "fm/layer3.bn/norm")]
        if params["norm.placement"] in ("3", "23", "123", "all"):
            norm_steps = [m.step for m in client.get_metric_history(run.info.run_id, "fm/layer3.bn.sbn/norm")]
        assert norm_steps == list(range(0, len(steps) + 1))


def test_asha_stopped_some_trials_early_and_optuna_saw_it(small_study: FinishedStudy) -> None:
    statuses = [r.data.tags["sbn.status"] for r in trial_runs(small_study)]
    assert "stopped_early" in statuses
    assert "completed" in statuses
    assert sorted(small_study.outcome.trial_statuses.values()) == sorted(statuses)


def test_best_trial_summary_points_at_a_real_run(small_study: FinishedStudy) -> None:
    from mlflow.tracking import MlflowClient

    best = small_study.outcome.best
    runs = {r.info.run_id: r for r in trial_runs(small_study)}
    assert best["run_id"] in runs and best["run_name"] == runs[best["run_id"]].info.run_name
    # The best value over epochs, as `sbn-study export` ranks trials: not each run's last value.
    client = MlflowClient(small_study.tracking_uri)
    best_of = {
        run_id: max(m.value for m in client.get_metric_history(run_id, "val_acc"))
        for run_id, run in runs.items()
        if run.data.tags["sbn.status"] in ("completed", "stopped_early")
    }
    assert best["value"] == max(best_of.values()) == best_of[best["run_id"]]
    history = client.get_metric_history(best["run_id"], "val_acc")
    assert best["epoch"] == min(m.step for m in history if m.value == best["value"])
    assert set(best["params"]) == set(small_study.spec.search.space)
