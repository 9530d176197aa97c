"""`sbn-study report`, `export`, `validate` on exported configs and `train`, end to end on the small study."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

from sbn_study import cli
from sbn_study.results.export import Provenance, export_name
from sbn_study.spec.config import TrialConfig, flatten
from tests.conftest import QUICKSTART, FinishedStudy
from tests.test_analysis import copy_with_new_execution
from tests.test_train import tiny_config


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
            for key, field in Provenance.model_fields.items()
            if key != "study" and field.is_required()
        ),
        "error: norm.kind: expected one of 2bn, bgn, bn, bnscale, cbn, gn, iebn, mbn, none, proxynorm, sbn, "
        "sbn_center, sbn_noaffine, sbn_nospike, sbn_var, scale, spike or package.module:Factory, got 'foo'",
        "error: norm.placement: stage 4 does not exist in tiny (stages 1-3)",
    ]


def test_train_given_a_study_spec_says_to_export_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "train", str(QUICKSTART), "--seeds", "1,2") == (
        2,
        "",
        f"error: {QUICKSTART}: a study spec (it has search:), not one trial's configuration: export the "
        "configs of a study's best trials with `sbn-study export STUDY` and train those\n",
    )


def test_exported_files_list_in_rank_order() -> None:
    names = [export_name("s", rank, 12, "t") for rank in range(1, 13)]
    assert sorted(names) == names and names[0] == "s-top01-t.yaml"
    assert export_name("s", 3, 3, "abc") == "s-top3-abc.yaml"


def test_a_seed_tests_the_weights_of_its_best_validation_epoch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import torch

    from sbn_study.final.training import _train_seed
    from sbn_study.trial import train as training
    from sbn_study.trial.data import DeviceLoader, load_dataset
    from sbn_study.trial.models import create_model_from_config

    config = tiny_config(epochs=3)
    config.features.enabled = False
    config.data.synthetic.train_size = 640  # 384 training images after the validation hold-out: enough here
    dataset = load_dataset(config.data)
    val_images, test_images = dataset.val.labels.numel(), dataset.test.labels.numel()
    assert val_images != test_images  # how the spy below tells a validation pass from the test pass
    real_evaluate = training.evaluate
    # Validation accuracies scripted to peak at epoch 2 of 3, so that the weights tested (epoch 2's) differ
    # from the last ones: a seed that tested its last weights, or the wrong epoch's, fails here.
    scripted = iter([0.3, 0.7, 0.5])
    validated: list[dict[str, torch.Tensor]] = []  # the weights at each validation pass, i.e. each epoch
    tested: list[dict[str, torch.Tensor]] = []

    def evaluate(model: torch.nn.Module, loader: DeviceLoader, *, amp: bool = False) -> tuple[float, float]:
        weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        if loader.num_images == val_images:
            validated.append(weights)
            return real_evaluate(model, loader, amp=amp)[0], next(scripted)
        tested.append(weights)
        return real_evaluate(model, loader, amp=amp)

    monkeypatch.setattr(training, "evaluate", evaluate)
    # The task asks Ray for its node id; this test runs it in-process, without Ray.
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-0"))
    out: dict[str, Any] = _train_seed(config, dataset)

    assert [m["val_acc"] for m in out["history"]] == [0.3, 0.7, 0.5]
    assert (out["status"], out["epochs_run"], out["best_epoch"], out["best_val_acc"]) == (
        "completed",
        3,
        2,
        0.7,
    )
    assert len(validated) == 3 and len(tested) == 1  # the test split is evaluated once
    (weights,) = tested
    assert all(torch.equal(weights[name], validated[1][name]) for name in weights)
    assert not all(torch.equal(weights[name], validated[2][name]) for name in weights)
    # test_acc/test_loss are those of epoch 2's weights, re-evaluated here on a fresh model.
    model = create_model_from_config(config.model, config.norm, dataset.num_classes)
    model.load_state_dict(validated[1])
    test = DeviceLoader(
        dataset.test,
        config.train.eval_batch_size,
        device=torch.device("cpu"),
        train=False,
        augment=False,
        mean=dataset.mean,
        std=dataset.std,
    )
    test_loss, test_acc = real_evaluate(model, test)
    assert out["test_acc"] == test_acc and math.isclose(out["test_loss"], test_loss, rel_tol=1e-6)


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

    from sbn_study.results.analysis import trials

    uri = small_study.tracking_uri
    code, out, err = run_cli(
        capsys, "export", "e2e-small", "--tracking-uri", uri, "--top-k", "4", "-o", str(tmp_path)
    )
    assert code == 0
    paths = sorted(tmp_path.glob("*.yaml"))
    assert [p.name.split("-")[2] for p in paths] == ["top1", "top2", "top3", "top4"]
    table = trials(uri, "e2e-small", all_params=True).set_index("trial_id")
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
        # The small study does not search train.seed: every trial trained with the base seed.
        assert p["search_seeds"] == sorted({int(v) for v in table["train.seed"]}) == [0]
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
def test_export_flags_a_best_trial_that_the_scheduler_stopped_early(
    small_study: FinishedStudy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Whether ASHA leaves a stopped-early trial on top of the shared study is up to chance, so this execution
    # is made by hand (a real trial's configuration, chosen values): a trial stopped after 1 of the 3 epochs
    # has the best val_acc, ahead of one that completed.
    uri = copy_with_new_execution(
        small_study, tmp_path, ["completed", "stopped_early"], val_acc=[[0.4, 0.6, 0.5], [0.9]]
    )
    out_dir = tmp_path / "exports"
    code, out, err = run_cli(
        capsys, "export", "e2e-small", "--tracking-uri", uri, "--top-k", "2", "-o", str(out_dir)
    )
    assert code == 0, err
    stopped, completed = out_dir / "e2e-small-top1-made1.yaml", out_dir / "e2e-small-top2-made0.yaml"
    assert sorted(out_dir.glob("*.yaml")) == [stopped, completed]
    fields = ("trial_id", "status", "rank", "value", "epoch", "epochs_run", "budget", "full_budget")
    provenance = [yaml.safe_load(path.read_text())["provenance"] for path in (stopped, completed)]
    assert [tuple(p[f] for f in fields) for p in provenance] == [
        ("made1", "stopped_early", 1, 0.9, 1, 1, 3, False),
        ("made0", "completed", 2, 0.6, 2, 3, 3, True),
    ]
    warning = (
        "trial made1 was stopped by the scheduler after 1 of 3 epochs: its val_acc is not a full-budget "
        "result (full_budget: false)"
    )
    # Said on stderr, in the file's header, and again by `validate` on the file; never for the completed one.
    assert err == f"warning: {stopped.name}: {warning}\n"
    assert f"# Warning: {warning}\n" in stopped.read_text() and "Warning" not in completed.read_text()
    assert f"wrote {stopped}: rank 1, trial made1 (stopped_early), best val_acc 0.9 at epoch 1 of 3" in out
    assert run_cli(capsys, "validate", str(stopped))[::2] == (0, f"warning: {warning}\n")
    assert run_cli(capsys, "validate", str(completed))[::2] == (0, "")


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
    export = run_cli(
        capsys, "export", "e2e-small", "--tracking-uri", uri, "--top-k", "1", "-o", str(tmp_path)
    )
    assert export[0] == 0
    (config_path,) = tmp_path.glob("e2e-small-top1-*.yaml")
    source = yaml.safe_load(config_path.read_text())
    # Whatever placement the sampler gave the best trial, --set pins it: with placement none the configuration
    # is the plain-BN baseline itself, which --baseline refuses, and with one it trains against the baseline.
    assert run_cli(capsys, "train", str(config_path), "--baseline", "--set", "norm.placement=none") == (
        2,
        "",
        "error: --arms: this configuration has norm.placement none, so it already is the plain-BN baseline "
        "and leaves the arms no site (--set norm.placement=... gives it one)\n",
    )
    output = tmp_path / "final"
    code, out, err = run_cli(
        capsys,
        "train",
        str(config_path),
        "--seeds",
        "1,2",  # the search trained with seed 0 only
        "--baseline",
        "--set",
        "train.epochs=2",
        "--set",
        "norm.placement=23",
        "--output",
        str(output),
    )
    assert code == 0, err
    assert "--seeds" not in err
    assert ray.is_initialized()  # the session's Ray was used, and left running

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e-small-final")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "sbn.seed" in r.data.tags]
    accuracy = {
        (r.data.tags["sbn.arm"], int(r.data.tags["sbn.seed"])): r.data.metrics["test_acc"] for r in runs
    }
    assert sorted(accuracy) == [("bn", 1), ("bn", 2), ("config", 1), ("config", 2)]
    base = small_study.spec.base_config()
    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert tags["sbn.source_run"] == source["provenance"]["run_id"] and tags["sbn.status"] == "completed"
        assert params["train.epochs"] == "2" and params["train.seed"] == tags["sbn.seed"]
        assert tags["sbn.arm_values"] == "recipe"
        assert {"test_acc", "test_loss", "val_acc", "train_loss"} <= set(run.data.metrics)
        val_acc = sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.step)
        assert [m.step for m in val_acc] == [1, 2]
        # The tested weights are those of the first epoch with the best val_acc, and test_acc is logged there.
        best = max(val_acc, key=lambda m: (m.value, -m.step))
        assert tags["sbn.best_epoch"] == str(best.step) and run.data.metrics["best_val_acc"] == best.value
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_acc")] == [best.step]
        if tags["sbn.arm"] == "bn":
            assert (params["norm.kind"], params["norm.placement"]) == ("bn", "none")
            # The study tuned weight decay and lr for the config: the baseline takes the recipe's values.
            assert (params["train.weight_decay"], params["train.lr"]) == tuple(
                str(v) for v in (base.train.weight_decay, base.train.lr)
            )
        else:
            assert (params["norm.kind"], params["norm.placement"]) == (source["norm"]["kind"], "23")
            assert params["train.weight_decay"] == str(source["train"]["weight_decay"])

    lines = out.splitlines()
    assert lines[1].startswith("arm values: the arms take the recipe's base values of what study 'e2e-small'")
    paired = [accuracy["bn", seed] - accuracy["config", seed] for seed in (1, 2)]
    mean, half = statistics.fmean(paired), stats.t.ppf(0.975, 1) * statistics.stdev(paired) / math.sqrt(2)
    bn_row = next(line for line in lines if line.startswith("| bn | 2/2 | 0 | 0 |"))
    assert f"{mean:+.4f}" in bn_row and f"[{mean - half:.4f}, {mean + half:.4f}] (n=2)" in bn_row
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert math.isclose(parent.data.metrics["diff/bn/test_acc_mean"], mean, abs_tol=1e-12)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.tex", "forest_plot.png", "config.yaml"} <= artifacts
