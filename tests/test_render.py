"""What the commands print, on constructed outcomes and tables: no Ray, no MLflow store, no training."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sbn_study import cli
from sbn_study.errors import UserError
from sbn_study.results.export import Exported, Provenance
from sbn_study.results.report import export_warnings, render_exported, render_report, write_table
from sbn_study.spec import load_spec
from sbn_study.study import render as study_render
from sbn_study.study.lifecycle import StudyOutcome
from sbn_study.study.render import RunCommand
from tests.conftest import QUICKSTART

URI = "sqlite:////runs/mlflow.db"


def study_outcome(**changes: Any) -> StudyOutcome:
    fields: dict[str, Any] = {
        "name": "demo",
        "status": "finished",
        "tracking_uri": URI,
        "experiment_id": "1",
        "parent_run_id": "parent",
        "tune_path": "/runs/ray/demo-20250101-000000",
        "trial_statuses": {"t1": "completed", "t2": "stopped_early", "t3": "completed", "t4": "error"},
        "best": {
            "trial_id": "6d9ee71e",
            "run_name": "t3 sbn23 lr=0.05",
            "status": "completed",
            "metric": "val_acc",
            "value": 0.91234,
            "epoch": 7,
            "params": {"norm.placement": "23", "train.lr": 0.05},
            "run_id": "run-t3",
        },
        "unsent_writes": 0,
    }
    return StudyOutcome(**{**fields, **changes})


# --- study: validate, run ---------------------------------------------------------------------------------


def test_outcome_names_the_best_trial_its_parameters_and_counts_by_status() -> None:
    assert study_render.render_outcome(study_outcome()).splitlines() == [
        "",  # apart from the live table above
        "study 'demo' finished: 2 completed, 1 error, 1 stopped_early",
        "best trial t3 sbn23 (completed): val_acc = 0.9123 at epoch 7",
        "  norm.placement = 23",
        "  train.lr = 0.05",
        "  MLflow run run-t3 · Tune trial 6d9ee71e",
        f"results: MLflow {URI} (experiment 'demo'), Tune state /runs/ray/demo-20250101-000000",
        f"browse:  sbn-study ui --tracking-uri '{URI}'",
        "runs:    http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
        "&viewStateShareKey=sbn-study",
    ]


def test_outcome_without_a_best_trial_says_where_the_results_are() -> None:
    lines = study_render.render_outcome(study_outcome(status="interrupted", trial_statuses={}, best=None))
    assert lines.splitlines()[1:3] == [
        "study 'demo' interrupted: ",
        f"results: MLflow {URI} (experiment 'demo'), Tune state /runs/ray/demo-20250101-000000",
    ]
    # A URI the shell would split stays one word.
    odd = study_render.render_outcome(study_outcome(tracking_uri="sqlite:////it's/mlflow.db"))
    assert shlex.split(odd.splitlines()[-2])[-1] == "sqlite:////it's/mlflow.db"


def test_a_study_on_a_tracking_server_links_to_its_runs_there() -> None:
    lines = study_render.render_outcome(study_outcome(tracking_uri="https://mlflow.example.com/team/"))
    assert lines.splitlines()[-1] == (
        "runs:    https://mlflow.example.com/team/#/experiments/1/runs?workflowType=machine_learning"
        "&viewStateShareKey=sbn-study"
    )


def test_unsent_writes_are_a_warning_with_the_file_that_keeps_them() -> None:
    assert study_render.outcome_warnings(study_outcome(), Path("out")) == []
    assert study_render.outcome_warnings(study_outcome(unsent_writes=3), Path("out")) == [
        "warning: the tracking server did not take 3 writes; they are saved in out/studies/demo.unsent.jsonl"
    ]


def test_resume_hint_is_the_same_invocation_plus_resume_and_survives_the_shell() -> None:
    assert study_render.resume_command(RunCommand("spec.yaml")) == "resume:  sbn-study run spec.yaml --resume"
    command = RunCommand(
        spec="my specs/study.yaml",
        overrides=("search.num_samples=4", "search.space.norm.eps={loguniform: [1e-6, 1e-2]}"),
        output="runs",
        tracking_uri="http://alice:secret@mlflow:5000",
        address="ray://head:10001",
    )
    hint = study_render.resume_command(command)
    assert "secret" not in hint  # credentials never reach the screen
    words = shlex.split(hint.removeprefix("resume:  "))
    assert words[0] == "sbn-study"
    args = cli.build_parser().parse_args(words[1:])
    assert args.command == "run"
    assert (args.spec, args.overrides, args.resume) == (command.spec, list(command.overrides), True)
    assert (args.output, args.tracking_uri, args.address) == (
        "runs",
        "http://mlflow:5000",
        "ray://head:10001",
    )


def test_spec_lines_count_trials_and_searched_parameters() -> None:
    spec = load_spec(QUICKSTART, ["search.num_samples=1"])
    searched = len(spec.search.space)
    assert study_render.render_valid(spec) == (
        f"ok: sbn-quickstart: 1 trial over {searched} searched parameters "
        f"(sampler {spec.search.sampler.type}, scheduler {spec.search.scheduler.type})"
    )
    assert study_render.render_start(spec, resuming=True) == (
        f"sbn-study: resuming study 'sbn-quickstart': 1 trials, "
        f"{spec.search.sampler.type} + {spec.search.scheduler.type}"
    )


def test_interrupted_run_prints_the_summary_then_the_resume_hint_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = []

    def run_study(spec: Any, spec_text: str, options: Any) -> StudyOutcome:
        seen.append((spec.search.num_samples, options.output))
        return study_outcome(status="interrupted", unsent_writes=2)

    monkeypatch.setattr("sbn_study.study.lifecycle.run_study", run_study)
    code = cli.main(["run", str(QUICKSTART), "--set", "search.num_samples=3", "--output", "elsewhere"])
    out, err = capsys.readouterr()
    assert (code, seen) == (130, [(3, Path("elsewhere"))])
    lines = out.splitlines()
    assert lines[0].startswith("sbn-study: starting study 'sbn-quickstart': 3 trials")
    assert "best trial t3 sbn23 (completed): val_acc = 0.9123 at epoch 7" in lines
    assert lines[-1] == (
        f"resume:  sbn-study run {QUICKSTART} --resume --set search.num_samples=3 --output elsewhere"
    )
    assert err == (
        "warning: the tracking server did not take 2 writes; they are saved in "
        "elsewhere/studies/demo.unsent.jsonl\n"
    )


# --- report, export ---------------------------------------------------------------------------------------


def trials_table(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    table = pd.DataFrame(
        [
            {
                "trial_id": trial_id,
                "run_name": f"t{i + 1} sbn23 lr={0.01 * (i + 1):.2f}",
                "status": status,
                "epochs": epochs,
                "best_val_acc": best,
                "best_epoch": epochs,
                "arm": "sbn23",
                "compute_s": 1.5 * epochs,
                "train.lr": 0.01 * (i + 1),
            }
            for i, (trial_id, status, epochs, best) in enumerate(rows)
        ]
    )
    table.attrs.update(
        study="demo", execution="parent", metric="val_acc", mode="max", budget=4, searched=["train.lr"]
    )
    return table


def test_report_counts_statuses_compute_and_lists_the_best_trials_first() -> None:
    table = trials_table(
        [
            ("a", "completed", 4, 0.5),
            ("b", "stopped_early", 1, 0.3),
            ("c", "completed", 4, 0.8),
            ("d", "error", 2, math.nan),
        ]
    )
    lines = render_report(table, "http://bob:pw@mlflow:5000", top=2).splitlines()
    assert lines[:4] == [
        "study 'demo' (execution parent) in http://mlflow:5000",
        "4 trials: 2 completed, 1 error, 1 stopped_early; 1 of 4 stopped early by the scheduler",
        "compute: 16.5 s of training over 11 trial-epochs (Σ epoch_time_s); metric val_acc (max), "
        "full budget 4 epochs",
        "best trials by best val_acc:",
    ]
    header, *rows = lines[4:]
    assert header.split() == [
        "trial",
        "trial_id",
        "status",
        "epochs",
        "best_val_acc",
        "best_epoch",
        "arm",
        "train.lr",
    ]
    assert [row.split()[:2] for row in rows] == [["t3", "c"], ["t1", "a"]]  # top 2, best first


def test_report_of_a_study_without_trials() -> None:
    empty = pd.DataFrame(columns=["status"])
    empty.attrs.update(study="demo", execution="parent", metric="val_acc", mode="max", budget=4, searched=[])
    assert render_report(empty, URI, top=5).splitlines() == [
        f"study 'demo' (execution parent) in {URI}",
        "0 trials: none; 0 of 0 stopped early by the scheduler",
    ]


def test_trials_table_is_written_or_refused_in_the_flags_words(tmp_path: Path) -> None:
    table = trials_table([("a", "completed", 4, 0.5)])
    path = tmp_path / "new" / "trials.csv"
    assert write_table(table, str(path), "csv") == f"wrote the trials table (1 rows) to {path}"
    assert pd.read_csv(path)["trial_id"].tolist() == ["a"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"^--parquet: cannot write .*/a-file/t\.parquet \("):
        write_table(table, str(blocker / "t.parquet"), "parquet")


def provenance(rank: int, trial_id: str, **changes: Any) -> Provenance:
    fields: dict[str, Any] = {
        "study": "demo",
        "execution": "parent",
        "trial_id": trial_id,
        "run_id": f"run-{trial_id}",
        "tracking_uri": URI,
        "status": "completed",
        "rank": rank,
        "metric": "val_acc",
        "mode": "max",
        "value": 0.91234,
        "epoch": 3,
        "epochs_run": 4,
        "budget": 4,
        "full_budget": True,
    }
    return Provenance.model_validate({**fields, **changes})


def test_export_lines_rank_each_config_and_warn_of_a_stopped_one() -> None:
    exported = [
        Exported(
            Path("out dir/demo-top1-a.yaml"),
            provenance(1, "a", status="stopped_early", epochs_run=1, full_budget=False),
        ),
        Exported(Path("out dir/demo-top2-b.yaml"), provenance(2, "b", value=0.5)),
    ]
    assert render_exported(exported).splitlines() == [
        "wrote out dir/demo-top1-a.yaml: rank 1, trial a (stopped_early), best val_acc 0.9123 at epoch 3 of 4",
        "wrote out dir/demo-top2-b.yaml: rank 2, trial b (completed), best val_acc 0.5 at epoch 3 of 4",
        "next: sbn-study train 'out dir/demo-top1-a.yaml' --baseline",
    ]
    warnings = export_warnings(exported, top_k=3)
    assert warnings[0].startswith(
        "warning: demo-top1-a.yaml: trial a was stopped by the scheduler after 1 of 4"
    )
    assert warnings[1:] == ["note: only 2 trials have a val_acc to rank"]
    assert export_warnings(exported[1:], top_k=1) == []
