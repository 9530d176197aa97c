"""The evaluation suites in final training and in `sbn-study evaluate`, through the real stack: Ray tasks, the
MLflow sqlite store, the command line; and their comparison across arms on constructed seeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sbn_study import cli
from sbn_study.final.comparison import suite_table
from sbn_study.final.evaluation import COMPARED, compare_suites
from sbn_study.final.render import render_comparison, render_summary
from sbn_study.spec.loader import load_spec
from tests import test_tracking
from tests.test_final_render import exported_plan, final_outcome, seed
from tests.test_tracking import open_trial, open_writer

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
# The quick start's configuration, cut to what a test can afford: a few hundred images (and one epoch, set
# on the command line: the spec's ASHA needs two), and a coarse heat map (stride 8: 8 frequencies on the half grid) on 32 images.
SMALL = [
    "data.val_size=128",
    "data.synthetic.train_size=512",
    "data.synthetic.test_size=96",
    "features.enabled=false",
]
FOURIER = ["--fourier-stride", "8", "--fourier-images", "32"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# --- the comparison of the suites' figures, on constructed seeds -----------------------------------------


def test_suite_figures_are_compared_per_seed_and_a_seed_without_one_counts_as_failed() -> None:
    seeds = [
        ("config", 0, "completed", {"robust/mce": 0.50, "calib/ece": 0.10}),
        ("config", 1, "completed", {"robust/mce": 0.40, "calib/ece": 0.20}),
        ("config", 2, "completed", {"robust/mce": 0.30}),  # calibration switched off, or its figure lost
        ("bn", 0, "completed", {"robust/mce": 0.45, "calib/ece": 0.12}),
        ("bn", 1, "completed", {"robust/mce": 0.38, "calib/ece": 0.25}),
        ("bn", 2, "diverged", {}),
    ]
    comparisons = compare_suites(seeds, "config")
    assert list(comparisons) == ["robust/mce", "calib/ece"]  # COMPARED's order, only figures some seed has
    summaries, (difference,) = comparisons["robust/mce"]
    assert (difference.n, difference.mean) == (2, pytest.approx(statistics.fmean([-0.05, -0.02])))
    assert (summaries["bn"].diverged, summaries["config"].completed) == (1, 3)
    summaries, (difference,) = comparisons["calib/ece"]
    assert (summaries["config"].completed, summaries["config"].failed) == (2, 1)
    assert difference.mean == pytest.approx(statistics.fmean([0.02, 0.05]))
    table = suite_table(comparisons, COMPARED, {"config": "sbn23 (config)"}).splitlines()
    assert table[0].startswith("| figure | arm | completed |")
    assert table[2].startswith("| mean corruption error | sbn23 (config) | 3/3 | 0 | 0 | 0.4000 ± 0.1000 |")
    assert table[5].startswith("| ECE | bn | 2/3 | 1 | 0 |") and "(n=2)" in table[5]


def test_the_summary_and_comparison_md_carry_the_suites_table_only_when_suites_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = (seed("config", 0, suites={"robust/mce": 0.5}), seed("bn", 0, suites={"robust/mce": 0.4}))
    suites = compare_suites([(r.arm, r.seed, r.status, r.suites) for r in results], "config")
    plan = exported_plan(monkeypatch, "bn")
    for compared in ({}, suites):
        outcome = final_outcome(tmp_path, results, suites=compared)
        summary = render_summary(outcome).splitlines()
        markdown = render_comparison(outcome.arms, outcome.differences, plan, compared)
        rows = [
            line for line in (*summary, *markdown.splitlines()) if line.startswith("| mean corruption error")
        ]
        # Printed and written: the config's row and bn's, whose Δ is 0.4 − 0.5.
        assert len(rows) == (4 if compared else 0)
        assert (
            not compared or "| mean corruption error | bn | 1/1 | 0 | 0 | 0.4000 ± – | -0.1000 |" in rows[1]
        )


store = test_tracking.store  # the fixture: a sqlite store with an experiment


def test_a_seed_file_the_store_never_took_is_saved_and_sent_by_the_replay(
    store: tuple[str, str], tmp_path: Path
) -> None:
    heat_map = tmp_path / "fourier_heat_map.csv"
    heat_map.write_text("0.25,0.5\n")
    writer, gated = open_writer(store, tmp_path)
    run_id = open_trial(writer, "a")
    gated.failing = True
    writer.log_artifact("a", heat_map, "evaluation")
    assert not writer.flush(deadline_s=0.5)
    assert writer.save_unsent() == 1
    gated.failing = False
    replay = writer.handle.writer()
    assert replay.send_saved() == 1
    (logged,) = replay.client.list_artifacts(run_id, "evaluation")
    assert logged.path == "evaluation/fourier_heat_map.csv"
    copy = Path(replay.client.download_artifacts(run_id, logged.path, str(tmp_path / "back")))
    assert copy.read_text() == "0.25,0.5\n"


# --- train and evaluate on the quick start's configuration ----------------------------------------------


@dataclass(frozen=True)
class Trained:
    output: Path
    runs: dict[tuple[str, int], Any]  # (arm, seed) → its MLflow run
    parent: Any
    uri: str


def train_quickstart(folder: Path) -> Trained:
    """`train --arms bn` on 2 seeds of the quick start's configuration, cut small, with every suite."""
    from mlflow.tracking import MlflowClient

    config = folder / "quickstart.yaml"
    config.write_text(yaml.safe_dump(load_spec(QUICKSTART, SMALL).base_config().model_dump(mode="json")))
    output = folder / "out"
    code = cli.main(
        [
            "train",
            str(config),
            "--set",
            "train.epochs=1",
            "--arms",
            "bn",
            "--seeds",
            "0,1",
            "--output",
            str(output),
            *FOURIER,
        ]
    )
    assert code == 0
    uri = f"sqlite:///{output / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart-final")
    runs = client.search_runs([experiment.experiment_id])
    seeds = {
        (r.data.tags["sbn.arm"], int(r.data.tags["sbn.seed"])): r for r in runs if "sbn.seed" in r.data.tags
    }
    parent = next(r for r in runs if "sbn.seed" not in r.data.tags)
    return Trained(output, seeds, parent, uri)


@pytest.fixture(scope="module")
def trained(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return train_quickstart(tmp_path_factory.mktemp("robustness"))


@pytest.mark.slow
def test_train_runs_every_suite_on_each_tested_checkpoint_and_compares_the_arms(trained: Trained) -> None:
    import numpy as np
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained.uri)
    assert sorted(trained.runs) == [("bn", 0), ("bn", 1), ("config", 0), ("config", 1)]
    for (arm, _), run in trained.runs.items():
        metrics, run_id = run.data.metrics, run.info.run_id
        assert {"robust/mce", "fourier/heat_map/mean_error", "calib/ece", "calib/ece_ts"} <= set(metrics)
        # The suites ran on the tested weights: their clean error is the test accuracy's complement.
        assert metrics["robust/clean/error"] == pytest.approx(1 - metrics["test_acc"])
        best = int(run.data.tags["sbn.best_epoch"])
        assert [m.step for m in client.get_metric_history(run_id, "robust/mce")] == [best]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"model", "evaluation"} <= artifacts
        files = {a.path for a in client.list_artifacts(run_id, "evaluation")}
        assert files == {
            f"evaluation/{n}" for n in ("fourier_heat_map.csv", "fourier_heat_map.png", "reliability.csv")
        }
        local = Path(client.download_artifacts(run_id, "evaluation", str(trained.output / run_id)))
        heat = np.loadtxt(local / "fourier_heat_map.csv", delimiter=",")
        assert heat.shape == (32, 32) and np.isfinite(heat).sum() == 4 * 4  # f_h, f_w ∈ {−16, −8, 0, 8}
        assert np.nanmean(heat) == pytest.approx(metrics["fourier/heat_map/mean_error"], abs=1e-5)
        bins = np.loadtxt(local / "reliability.csv", delimiter=",", skiprows=1)
        # Every test image falls in one bin, and the bins give back the ECE that was logged.
        assert bins[:, 2].sum() == 96
        filled = bins[:, 2] > 0
        ece = np.abs(bins[filled, 3] - bins[filled, 4]).sum() / 96
        assert ece == pytest.approx(metrics["calib/ece"], abs=1e-6)
        if arm == "config":
            bn = trained.runs["bn", int(run.data.tags["sbn.seed"])].data.metrics
            errors = [f"robust/gaussian_noise/{s}/error" for s in range(1, 6)]
            expected = sum(metrics[k] for k in errors) / sum(bn[k] for k in errors)
            assert metrics["robust/gaussian_noise/ce_vs_ref"] == pytest.approx(expected)
        else:
            assert "robust/mce_vs_ref" not in metrics

    paired = [
        trained.runs["bn", s].data.metrics["robust/mce"]
        - trained.runs["config", s].data.metrics["robust/mce"]
        for s in (0, 1)
    ]
    parent = trained.parent.data.metrics
    assert parent["diff/bn/robust/mce_mean"] == pytest.approx(statistics.fmean(paired))
    assert parent["diff/bn/robust/mce/pairs"] == 2
    (folder,) = (trained.output / "final").iterdir()
    markdown = (folder / "comparison.md").read_text()
    assert "| mean corruption error | bn | 2/2 | 0 | 0 |" in markdown
    assert (
        f"{statistics.fmean(paired):+.4f}"
        in markdown.split("| mean corruption error | bn |")[1].splitlines()[0]
    )
    assert all(f"| {name} | bn |" in markdown for name in COMPARED.values())


@pytest.mark.slow
def test_evaluate_a_finished_run_logs_the_same_figures_to_it(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    run = trained.runs["config", 1]
    run_id = run.info.run_id
    code, out, err = run_cli(
        capsys,
        "evaluate",
        run_id,
        "--suite",
        "fourier,calibration",
        "--output",
        str(trained.output),
        *FOURIER,
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    best = run.data.tags["sbn.best_epoch"]
    assert lines[0] == f"evaluated run {run_id} (config, seed 1), the weights of epoch {best}:"
    assert f"| calib/ece | {run.data.metrics['calib/ece']:.4f} |" in lines
    assert not any(line.startswith("| robust/") for line in lines)
    client = MlflowClient(trained.uri)
    for key in ("calib/ece", "fourier/heat_map/mean_error", "fourier/low_pass/8/error"):
        history = client.get_metric_history(run_id, key)
        # Logged again at the tested epoch's step, with the value train logged: the same weights and images.
        assert {m.step for m in history} == {int(best)}
        assert all(m.value == run.data.metrics[key] for m in history)

    (folder,) = (trained.output / "final").iterdir()
    checkpoint = folder / "bn-seed0" / "checkpoint.pt"
    code, out, err = run_cli(capsys, "evaluate", str(checkpoint), "--suites", "calibration")
    assert (code, err) == (0, "")
    assert f"| calib/brier | {trained.runs['bn', 0].data.metrics['calib/brier']:.4f} |" in out.splitlines()
    assert out.splitlines()[-1] == f"wrote {folder / 'bn-seed0' / 'evaluation'}/: reliability.csv"


@pytest.mark.slow
def test_evaluate_refuses_what_it_cannot_evaluate_in_one_line(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    store = ["--output", str(trained.output)]
    parent = trained.parent.info.run_id
    client = MlflowClient(trained.uri)
    # A seed run whose checkpoint was never kept: what train logged before it kept one.
    bare = client.create_run(
        trained.parent.info.experiment_id, tags={"sbn.kind": "final", "sbn.seed": "0", "sbn.arm": "bn"}
    ).info.run_id
    not_a_checkpoint = tmp_path / "weights.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    unknown = "0123456789abcdef0123456789abcdef"
    cases = {
        (unknown,): f"error: no run '{unknown}' in {trained.uri}, and no checkpoint file of that name",
        (parent,): f"error: run {parent} is no seed run of `sbn-study train`: only those have a checkpoint",
        (
            bare,
        ): f"error: run {bare} has no model/checkpoint.pt artifact (its seed never validated, or `train` ran "
        "before it kept the tested weights): nothing to evaluate",
        ("missing.pt",): "error: missing.pt: no such checkpoint file, and no MLflow run id (32 hex digits)",
        (str(not_a_checkpoint),): f"error: {not_a_checkpoint}: not a checkpoint of `sbn-study train` "
        "(UnpicklingError)",
        (bare, "--suites", "fourier,noise"): "error: --suites: unknown suite 'noise'; expected some of "
        "corruptions, fourier, calibration, or none",
        (bare, "--suites", "none"): "error: --suites: none leaves nothing to evaluate",
    }
    for args, message in cases.items():
        assert run_cli(capsys, "evaluate", *args, *store) == (2, "", message + "\n"), args


def test_train_refuses_an_unknown_suite_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "quickstart.yaml"
    config.write_text(yaml.safe_dump(load_spec(QUICKSTART, SMALL).base_config().model_dump(mode="json")))
    output = tmp_path / "out"
    code, out, err = run_cli(
        capsys, "train", str(config), "--suites", "calibration,fourer", "--output", str(output)
    )
    assert (code, out) == (2, "")
    assert (
        err
        == "error: --suites: unknown suite 'fourer'; expected some of corruptions, fourier, calibration, or none\n"
    )
    assert not output.exists()
