"""`sbn-study report`, `export`, `validate` on exported configs and `train`, end to end on the small study."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sbn_study import cli
from sbn_study.config import TrialConfig, flatten
from sbn_study.export import Provenance
from sbn_study.final import SeedResult, summarize
from tests.conftest import FinishedStudy
from tests.test_analysis import copy_with_new_execution


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- without a study -----------------------------------------------------------------------------------


def test_validate_checks_a_final_config_like_a_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = TrialConfig.model_validate(
        {"model": {"arch": "tiny"}, "norm": {"placement": "23"}}
    ).model_dump(mode="json")
    good = tmp_path / "final.yaml"
    good.write_text(yaml.safe_dump(document))
    assert run_cli(capsys, "validate", str(good)) == (
        0,
        f"ok: {good}: final-training config (tiny, sbn at placement 23, 200 epochs)\n",
        "",
    )
    document["norm"]["placement"] = 4
    document["train"]["bogus"] = 1
    document["provenance"] = {"study": "x"}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document))
    code, out, err = run_cli(capsys, "validate", str(broken), "--set", "norm.kind=foo")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "error: train.bogus: unknown key",
        *(
            f"error: provenance.{key}: missing required key"
            for key in Provenance.model_fields
            if key != "study"
        ),
        "error: norm.kind: expected one of 2bn, bgn, bn, gn, none, sbn, got 'foo'",
        "error: norm.placement: stage 4 does not exist in tiny (stages 1-3)",
    ]


def test_paired_difference_is_a_student_t_interval_over_shared_seeds() -> None:
    from scipy import stats

    config = [0.90, 0.92, 0.91, 0.95]
    baseline = [0.89, 0.90, 0.91, math.nan]  # seed 3 of the baseline failed: not a pair
    results = [SeedResult("config", s, "r", "completed", a, 0.0, 0.0, 1, 1) for s, a in enumerate(config)]
    results += [
        SeedResult("baseline", s, "r", "completed" if s < 3 else "error", a, 0.0, 0.0, 1, 1)
        for s, a in enumerate(baseline)
    ]
    arms, diff = summarize(results)
    assert arms["config"].n == 4 and math.isclose(arms["config"].mean, statistics.fmean(config))
    assert math.isclose(arms["config"].std, statistics.stdev(config))
    assert arms["baseline"].n == 3 and math.isclose(arms["baseline"].std, statistics.stdev(baseline[:3]))
    d = [c - b for c, b in zip(config[:3], baseline[:3], strict=True)]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(d) / math.sqrt(3)
    assert diff is not None and diff.n == 3
    assert math.isclose(diff.mean, statistics.fmean(d))
    assert math.isclose(diff.low, statistics.fmean(d) - half) and math.isclose(
        diff.high, statistics.fmean(d) + half
    )


# --- on the small study --------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_prints_a_summary_and_writes_tables(
    small_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv, parquet = tmp_path / "out" / "trials.csv", tmp_path / "trials.parquet"
    code, out, err = run_cli(
        capsys,
        "report",
        small_study.spec.name,
        "--tracking-uri",
        small_study.tracking_uri,
        "--csv",
        str(csv),
        "--parquet",
        str(parquet),
    )
    assert (code, err) == (0, "")
    statuses = list(small_study.outcome.trial_statuses.values())
    stopped = statuses.count("stopped_early")
    assert f"6 trials: {statuses.count('completed')} completed, {stopped} stopped_early" in out
    assert f"{stopped} of 6 stopped early by the scheduler" in out
    assert "compute: " in out and "(Σ epoch_time_s)" in out
    assert small_study.outcome.best["trial_id"] in out
    from_csv, from_parquet = pd.read_csv(csv), pd.read_parquet(parquet)
    assert len(from_csv) == len(from_parquet) == 6
    assert list(from_csv.columns) == list(from_parquet.columns)
    assert {"trial_id", "status", "best_val_acc", "norm.placement", "train.epochs"} <= set(from_csv.columns)
    assert sorted(from_parquet["trial_id"]) == sorted(small_study.outcome.trial_statuses)


@pytest.mark.slow
def test_export_writes_top_k_configs_that_validate_and_carry_provenance(
    small_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from sbn_study.analysis import trials

    uri = small_study.tracking_uri
    code, out, err = run_cli(
        capsys, "export", "e2e-small", "--tracking-uri", uri, "--top-k", "4", "-o", str(tmp_path)
    )
    assert code == 0
    paths = sorted(tmp_path.glob("*.yaml"))
    assert [p.name.split("-")[2] for p in paths] == ["top1", "top2", "top3", "top4"]
    table = trials(uri, "e2e-small").set_index("trial_id")
    client = MlflowClient(uri)
    values = []
    for rank, path in enumerate(paths, start=1):
        document = yaml.safe_load(path.read_text())
        p = document.pop("provenance")
        row = table.loc[p["trial_id"]]
        assert path.name == f"e2e-small-top{rank}-{p['trial_id']}.yaml"
        assert (p["study"], p["rank"], p["run_id"], p["metric"], p["mode"]) == (
            "e2e-small",
            rank,
            row["run_id"],
            "val_acc",
            "max",
        )
        assert (p["value"], p["epoch"], p["epochs_run"], p["budget"]) == (
            row["best_val_acc"],
            row["best_epoch"],
            row["epochs"],
            3,
        )
        assert p["full_budget"] == (row["status"] == "completed") == (p["status"] == "completed")
        assert p["execution"] == small_study.outcome.parent_run_id
        # The trial's resolved configuration, exactly as MLflow recorded it.
        assert {k: str(v) for k, v in flatten(document).items()} == client.get_run(p["run_id"]).data.params
        values.append(p["value"])
        warning = f"warning: {path.name}: trial {p['trial_id']} was stopped by the scheduler after"
        assert (warning in err) == (not p["full_budget"])
        validated = run_cli(capsys, "validate", str(path))
        assert validated[:2] == (
            0,
            f"ok: {path}: final-training config (tiny, {document['norm']['kind']} at placement "
            f"{document['norm']['placement']}, 3 epochs; study e2e-small, trial {p['trial_id']}, "
            f"best val_acc {p['value']:.4g})\n",
        ), validated[2]
    assert values == sorted(values, reverse=True)
    assert f"next: sbn-study train {paths[0]} --baseline" in out


@pytest.mark.slow
def test_export_refuses_a_missing_study_or_one_without_completed_trials(
    small_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = small_study.tracking_uri
    assert run_cli(capsys, "export", "nope", "--tracking-uri", uri, "-o", str(tmp_path)) == (
        2,
        "",
        f"error: study 'nope' not found in {uri}\n",
    )
    stopped_only = copy_with_new_execution(small_study, tmp_path, ["stopped_early", "stopped_early", "error"])
    assert run_cli(capsys, "export", "e2e-small", "--tracking-uri", stopped_only, "-o", str(tmp_path)) == (
        2,
        "",
        "error: study 'e2e-small' has no completed trial (1 error, 2 stopped_early): nothing to export\n",
    )
    assert not list(tmp_path.glob("*.yaml"))


@pytest.mark.slow
def test_train_runs_seeds_and_baseline_on_ray_and_reports_the_paired_difference(
    small_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from mlflow.tracking import MlflowClient
    from scipy import stats

    uri = small_study.tracking_uri
    assert (
        run_cli(capsys, "export", "e2e-small", "--tracking-uri", uri, "--top-k", "6", "-o", str(tmp_path))[0]
        == 0
    )
    # The best trial with a norm placed somewhere: without one the configuration is the baseline itself.
    exported = [(path, yaml.safe_load(path.read_text())) for path in sorted(tmp_path.glob("*.yaml"))]
    placed = [(path, document) for path, document in exported if document["norm"]["placement"] != "none"]
    if not placed:
        pytest.skip("the sampler chose placement none for every trial")
    config_path, source = placed[0]
    if placed[0] != exported[0]:
        assert run_cli(capsys, "train", str(exported[0][0]), "--baseline") == (
            2,
            "",
            "error: --baseline: this configuration has norm.placement none, so it already is the plain-BN "
            "baseline\n",
        )
    output = tmp_path / "final"
    code, out, err = run_cli(
        capsys,
        "train",
        str(config_path),
        "--seeds",
        "0,1",
        "--baseline",
        "--set",
        "train.epochs=2",
        "--output",
        str(output),
    )
    assert code == 0, err
    assert ray.is_initialized()  # the session's Ray was used, and left running

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e-small-final")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "sbn.seed" in r.data.tags]
    accuracy = {
        (r.data.tags["sbn.arm"], int(r.data.tags["sbn.seed"])): r.data.metrics["test_acc"] for r in runs
    }
    assert sorted(accuracy) == [("baseline", 0), ("baseline", 1), ("config", 0), ("config", 1)]
    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert tags["sbn.source_run"] == source["provenance"]["run_id"] and tags["sbn.status"] == "completed"
        assert params["train.epochs"] == "2" and params["train.seed"] == tags["sbn.seed"]
        assert {"test_acc", "test_loss", "val_acc", "train_loss"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        if tags["sbn.arm"] == "baseline":
            assert (params["norm.kind"], params["norm.placement"]) == ("bn", "none")
        else:
            assert (params["norm.kind"], params["norm.placement"]) == (
                source["norm"]["kind"],
                source["norm"]["placement"],
            )

    lines = out.splitlines()
    for arm in ("config", "baseline"):
        values = [accuracy[arm, seed] for seed in (0, 1)]
        expected = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}  (n=2)"
        assert any(line.startswith(f"  {arm} ") and line.endswith(expected) for line in lines), (arm, out)
    paired = [accuracy["config", seed] - accuracy["baseline", seed] for seed in (0, 1)]
    mean, half = statistics.fmean(paired), stats.t.ppf(0.975, 1) * statistics.stdev(paired) / math.sqrt(2)
    assert (
        f"paired difference config − baseline: {mean:+.4f}, 95% CI [{mean - half:+.4f}, {mean + half:+.4f}] "
        "(Student t, n=2 seeds)"
    ) in lines
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"]).data.metrics
    assert math.isclose(parent["paired_diff/test_acc_mean"], mean, abs_tol=1e-12)
