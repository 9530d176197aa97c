"""`sbn_study.results.analysis` on the shared small study: tidy tables straight from the real MLflow store."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from sbn_study import cli
from sbn_study.errors import UserError
from sbn_study.results import analysis, importance
from sbn_study.results.stats import t_interval
from sbn_study.trial.featstats import MECHANISM_STATS, STAT_NAMES
from tests.conftest import FinishedStudy

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s")


def copy_with_new_execution(
    study: FinishedStudy,
    folder: Path,
    trial_statuses: list[str],
    val_acc: Sequence[Sequence[float]] | None = None,
    chosen: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """A copy of the small study's store with one more, later execution whose trials (no training, made by
    hand) ended with `trial_statuses`, with the per-epoch `val_acc` given for each (default: 0.5 at epoch 1);
    returns its tracking URI. The shared store stays untouched.

    Each made trial carries the params and `config.yaml` of one real trial of the study, as the tracker
    logged them, so that `export` can write it out like any other trial; with `chosen`, the params of each
    made trial that the sampler chose instead (they replace the real trial's, and its `sbn.searched` tag
    lists them)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    shutil.copy(study.output / "mlflow.db", folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(study.spec.name).experiment_id
    real = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{study.outcome.parent_run_id}'", max_results=1
    )[0]
    params = [Param(key, value) for key, value in real.data.params.items()]
    with tempfile.TemporaryDirectory() as download:  # not into `folder`, where callers look for exports
        config_yaml = Path(client.download_artifacts(real.info.run_id, "config.yaml", download)).read_text()
    tags = {"sbn.study": study.spec.name, "sbn.kind": "study"}
    parent = client.create_run(experiment_id, run_name="later-execution", tags=tags).info.run_id
    client.log_text(parent, yaml.safe_dump(study.spec.model_dump(mode="json")), "resolved.yaml")
    for i, status in enumerate(trial_statuses):
        trial_tags = {"mlflow.parentRunId": parent, "sbn.trial_id": f"made{i}", "sbn.status": status}
        choices = chosen[i] if chosen else {}
        if chosen:
            trial_tags["sbn.searched"] = ",".join(sorted(choices))
        run = client.create_run(experiment_id, tags=trial_tags).info.run_id
        logged = [Param(p.key, str(choices[p.key])) if p.key in choices else p for p in params]
        for start in range(0, len(logged), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run, params=logged[start : start + 100])
        client.log_text(run, config_yaml, "config.yaml")
        for epoch, value in enumerate(val_acc[i] if val_acc else [0.5], start=1):
            client.log_metric(run, "val_acc", value, step=epoch)
        client.set_terminated(run)
    client.set_terminated(parent)
    return uri


def statuses(study: FinishedStudy) -> dict[str, str]:
    return study.outcome.trial_statuses


# --- without a study -----------------------------------------------------------------------------------


def test_site_roles_tell_composite_sites_from_plain_ones() -> None:
    sites = [
        "bn1",  # plain stem BN
        "layer1.0.bn2",  # a ResNet block's plain second BN
        "layer3.bn.bn",  # tiny, SBN at stage 3
        "layer3.bn.sbn",
        "layer4.0.bn1.bn",  # 2bn control
        "layer4.0.bn1.bn2",
        "layer2.bn",  # tiny's plain BN, also ending in .bn
    ]
    assert analysis.site_roles(sites) == {
        "bn1": ("norm", "bn1"),
        "layer1.0.bn2": ("norm", "layer1.0.bn2"),
        "layer3.bn.bn": ("bn", "layer3.bn"),
        "layer3.bn.sbn": ("sbn", "layer3.bn"),
        "layer4.0.bn1.bn": ("bn", "layer4.0.bn1"),
        "layer4.0.bn1.bn2": ("bn2", "layer4.0.bn1"),
        "layer2.bn": ("norm", "layer2.bn"),
    }


def test_arm_labels_follow_the_paper() -> None:
    assert analysis.arm_label("sbn", "34") == "sbn34"
    assert analysis.arm_label("2bn", "34") == "2bn34"
    assert analysis.arm_label("sbn", "all") == "sbn-all"
    assert analysis.arm_label("sbn", "none") == "bn"


def test_dashboard_source_prefers_the_environment_and_resolves_against_the_repo_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "dashboards").mkdir()
    monkeypatch.chdir(tmp_path / "dashboards")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SBN_STUDY", raising=False)
    assert analysis.dashboard_source("sqlite:///sbn-runs/mlflow.db", "sbn-quickstart") == (
        f"sqlite:///{tmp_path.resolve() / 'sbn-runs' / 'mlflow.db'}",
        "sbn-quickstart",
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("SBN_STUDY", "other")
    assert analysis.dashboard_source("sqlite:///sbn-runs/mlflow.db", "sbn-quickstart") == (
        "http://tracking:5000",
        "other",
    )


def test_a_missing_store_is_an_error_not_a_new_file(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'nope.db'}"
    with pytest.raises(UserError, match="does not exist"):
        analysis.trials(uri, "any")
    assert not (tmp_path / "nope.db").exists()


# --- on the small study --------------------------------------------------------------------------------


@pytest.mark.slow
def test_trials_has_one_row_per_trial_with_results_and_parameters(small_study: FinishedStudy) -> None:
    table = analysis.trials(small_study.tracking_uri, small_study.spec.name)
    assert sorted(table["trial_id"]) == sorted(statuses(small_study))
    assert dict(zip(table["trial_id"], table["status"], strict=True)) == statuses(small_study)
    searched = list(small_study.spec.search.space)
    expected = {
        "trial_id",
        "run_id",
        "status",
        "arm",
        "epochs",
        "full_budget",
        "best_epoch",
        "compute_s",
        "node",
        "searched",
        *EPOCH_METRICS,
        *(f"best_{m}" for m in analysis.BETTER),
        *searched,
        "norm.kind",
        "norm.placement",
    }
    assert expected <= set(table.columns)
    assert table.attrs["metric"] == "val_acc" and table.attrs["mode"] == "max" and table.attrs["budget"] == 3
    assert table.attrs["searched"] == searched
    for row in table.to_dict("records"):
        assert row["full_budget"] == (row["status"] == "completed") == (row["epochs"] == 3)
        assert 1 <= row["epochs"] <= 3 and 1 <= row["best_epoch"] <= row["epochs"]
        assert row["best_val_acc"] >= row["val_acc"] and row["best_val_loss"] <= row["val_loss"]
        assert row["compute_s"] > 0 and row["node"]
        assert isinstance(row["norm.placement"], str)  # "3", not 3
        assert row["arm"] == analysis.arm_label(row["norm.kind"], row["norm.placement"])
        assert 0.01 <= row["norm.momentum"] <= 0.5
    everything = analysis.trials(small_study.tracking_uri, small_study.spec.name, all_params=True)
    assert {"model.arch", "train.epochs", "data.val_size"} <= set(everything.columns)
    assert set(everything["train.epochs"]) == {3}


@pytest.mark.slow
def test_curves_are_long_per_epoch_tables(small_study: FinishedStudy) -> None:
    table = analysis.trials(small_study.tracking_uri, small_study.spec.name)
    curves = analysis.curves(small_study.tracking_uri, small_study.spec.name, metrics=["val_acc", "lr"])
    assert list(curves.columns) == ["trial_id", "epoch", "metric", "value", "status", "run_id"]
    assert set(curves["metric"]) == {"val_acc", "lr"}
    for row in table.to_dict("records"):
        val = curves[(curves.trial_id == row["trial_id"]) & (curves.metric == "val_acc")]
        assert list(val["epoch"]) == list(range(1, row["epochs"] + 1))
        assert set(val["status"]) == {row["status"]}
        assert val["value"].iloc[-1] == row["val_acc"] and val["value"].max() == row["best_val_acc"]


@pytest.mark.slow
def test_feature_stats_name_sites_roles_and_stats(small_study: FinishedStudy) -> None:
    stats = analysis.feature_stats(small_study.tracking_uri, small_study.spec.name)
    columns = ["trial_id", "epoch", "site", "role", "base_site", "stat", "value", "status", "run_id"]
    assert list(stats.columns) == columns
    # The mechanism statistics (scale, additive share) exist at spectral sites only.
    assert set(STAT_NAMES) <= set(stats["stat"]) <= {*STAT_NAMES, *MECHANISM_STATS}
    assert set(stats.loc[stats.stat.isin(MECHANISM_STATS), "role"]) <= {"sbn"}
    assert set(stats["role"]) <= {"bn", "sbn", "bn2", "norm"}
    assert set(stats["trial_id"]) == set(statuses(small_study))
    assert stats.groupby("trial_id")["epoch"].min().eq(0).all()  # initialization is measured
    table = analysis.trials(small_study.tracking_uri, small_study.spec.name).set_index("trial_id")
    for trial_id, sites in stats.groupby("trial_id"):
        placement = table.loc[trial_id, "norm.placement"]
        sbn_bases = set(sites.loc[sites.role == "sbn", "base_site"])
        assert sbn_bases == set(sites.loc[sites.role == "bn", "base_site"])
        assert bool(sbn_bases) == (placement != "none")
        if placement.isdigit():
            assert sbn_bases == {f"layer{stage}.bn" for stage in placement}
    only = analysis.feature_stats(
        small_study.tracking_uri, small_study.spec.name, sites=["bn1"], stats=["norm"]
    )
    assert set(only["site"]) == {"bn1"} and set(only["stat"]) == {"norm"} and set(only["role"]) == {"norm"}


@pytest.mark.slow
def test_param_importance_and_best_trials(small_study: FinishedStudy) -> None:
    table = analysis.trials(small_study.tracking_uri, small_study.spec.name)
    ranked = importance.param_importance(
        table, "best_val_acc", statuses=("completed", "stopped_early"), bootstrap=importance.Bootstrap(8)
    )
    space = small_study.spec.search.space
    assert set(ranked.index) == set(space)
    # A conditional parameter (the quick-start's SBN settings) rests on the trials that sampled it.
    rated = table[table.status.isin(["completed", "stopped_early"])]
    sampled = {key: sum(key in row.split(",") for row in rated.searched) for key in space}
    assert ranked["n"].to_dict() == sampled
    assert ranked["conditional"].to_dict() == {key: bool(dist.when) for key, dist in space.items()}
    # The parameters every trial has are rated together: their shares of the variance add up to 1.
    together = ranked.loc[ranked["n"] == len(rated), "importance"]
    assert math.isclose(together.sum(), 1.0, rel_tol=1e-6) or together.isna().all()
    assert list(together) == sorted(together, reverse=True)
    assert all(w.startswith(("only ", "never sampled")) for w in ranked["warning"])  # of 6 trials

    best = analysis.best_trials(table, k=3)
    assert len(best) == 3
    assert list(best["best_val_acc"]) == sorted(table["best_val_acc"], reverse=True)[:3]
    full = list(analysis.best_trials(table, k=len(table))["full_budget"])  # in rank order
    assert list(best["outranks_full_budget"]) == [not full[i] and any(full[i + 1 :]) for i in range(3)]
    assert (
        list(analysis.best_trials(table, "val_loss", "min", k=2)["val_loss"]) == sorted(table["val_loss"])[:2]
    )


@pytest.mark.slow
def test_group_summary_means_stds_and_t_intervals(small_study: FinishedStudy) -> None:
    table = analysis.trials(small_study.tracking_uri, small_study.spec.name)
    summary = analysis.group_summary(table, "arm", "best_val_acc")
    for arm, group in table.groupby("arm"):
        values = list(group["best_val_acc"])
        row = summary.loc[arm]
        assert row["n"] == len(values)
        assert row[["mean", "std", "ci_low", "ci_high"]].tolist() == pytest.approx(
            t_interval(values), nan_ok=True
        )


@pytest.mark.slow
def test_rungs_fidelity_and_importance_from_a_store(
    small_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Made by hand so that every number is known: three trials completed the 3 epochs, the last two of them
    # swapped places after the rung (epoch 1; ρ = 1 − 6·2/(3·8) = 0.5), three were stopped there; three
    # trials sampled fft_norm, two of them went on.
    chosen = [
        {
            "norm.placement": placement,
            "norm.momentum": 0.05 * (i + 1),
            "norm.eps": 1e-4,
            "train.weight_decay": 1e-4 * (i + 1),
            "train.lr": 0.02 * (i + 1),
            **({"norm.fft_norm": "ortho" if i % 2 else "backward"} if i in (0, 1, 3) else {}),
        }
        for i, placement in enumerate(["none", "3", "23", "123", "all", "3"])
    ]
    statuses = ["completed"] * 3 + ["stopped_early"] * 3
    val_acc = [[0.3, 0.5, 0.7], [0.2, 0.4, 0.6], [0.1, 0.6, 0.65], [0.05], [0.01], [0.02]]
    uri = copy_with_new_execution(small_study, tmp_path, statuses, val_acc, chosen)
    name = small_study.spec.name
    table = analysis.trials(uri, name)
    curves = analysis.curves(uri, name, ["val_acc"])
    rungs = importance.study_rungs(table, small_study.spec.search.scheduler)
    assert rungs == importance.Rungs("val_acc", 3, (1,))
    fidelity = importance.rung_fidelity(curves, rungs)
    assert fidelity.to_dict("records") == [{"rung": 1, "against": 3, "n": 3, "rho": pytest.approx(0.5)}]
    rated = importance.rung_importance(curves, table, rungs, bootstrap=importance.Bootstrap(8))
    n = rated.pivot(index="parameter", columns="epoch", values="n")
    assert n.to_dict("index") == {
        key: {1: 3, 3: 2} if key == "norm.fft_norm" else {1: 6, 3: 3} for key in n.index
    }
    assert set(n.index) == set(small_study.spec.search.space)
    assert cli.main(["report", name, "--tracking-uri", uri]) == 0
    assert "fidelity: rung 1 → final: Spearman ρ = 0.50 (n = 3)" in capsys.readouterr().out


@pytest.mark.slow
def test_latest_execution_by_default_and_others_by_name(small_study: FinishedStudy, tmp_path: Path) -> None:
    uri = copy_with_new_execution(small_study, tmp_path, ["completed"])
    runs = analysis.executions(uri, small_study.spec.name)
    assert runs["name"].iloc[0] == "later-execution" and len(runs) == 2
    assert list(analysis.trials(uri, small_study.spec.name)["trial_id"]) == ["made0"]
    earlier = analysis.trials(uri, small_study.spec.name, execution=small_study.outcome.parent_run_id)
    assert len(earlier) == small_study.spec.search.num_samples
    with pytest.raises(UserError, match="has no execution 'nope'"):
        analysis.trials(uri, small_study.spec.name, execution="nope")
    with pytest.raises(UserError, match="study 'missing' not found"):
        analysis.trials(uri, "missing")
