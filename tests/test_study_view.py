"""What MLflow's UI is given to show a study: trial run names, the parent run's description and figures, the
experiment's view, and the links that open it (the browser itself: tests/test_ui_browser.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from sbn_study.spec import load_spec
from sbn_study.store import ui
from sbn_study.study.overview import NOTE_MAX_CHARS, study_note
from sbn_study.study.render import render_ui
from sbn_study.tune.callbacks import run_name
from tests.conftest import QUICKSTART, FinishedStudy

LINK = "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=sbn-study"


def test_a_trial_run_is_named_by_its_number_arm_and_sampled_values() -> None:
    trial = SimpleNamespace(
        experiment_tag="7_norm_placement=34,train_lr=0.1234",
        config={"norm.placement": "34", "train.lr": 0.12345, "norm.kind": "2bn"},
    )
    assert run_name(trial, {"kind": "2bn", "placement": "34"}, num_samples=64) == "t07 2bn34 lr=0.123"
    plain = SimpleNamespace(experiment_tag="12_x", config={"norm.placement": "none"})
    assert run_name(plain, {"kind": "sbn", "placement": "none"}, num_samples=12) == "t12 bn"


def test_the_description_asks_the_studys_question_and_ranks_its_best_trials() -> None:
    spec = load_spec(QUICKSTART)
    best = pd.DataFrame(
        [
            {
                "trial_id": "t_short",
                "arm": "sbn23",
                "status": "stopped_early",
                "epochs": 2,
                "best_val_acc": 0.71234,
                "best_epoch": 2,
                "outranks_full_budget": True,
                "train.lr": 0.0512345,
                "norm.momentum": float("nan"),  # not sampled by this trial
            },
            {
                "trial_id": "t_full",
                "arm": "bn",
                "status": "completed",
                "epochs": 8,
                "best_val_acc": 0.7,
                "best_epoch": 8,
                "outranks_full_budget": False,
                "train.lr": 0.1,
                "norm.momentum": 0.2,
            },
        ]
    )
    note = study_note(spec, "https://alice:s3cret@mlflow.example.com", best)
    assert "the highest `val_acc` on `synthetic` within 8 epochs? 12 trials" in note
    assert (
        "| rank | trial | arm | status | epochs | best val_acc | at epoch | norm.momentum | train.lr |"
        in note
    )
    assert "| 1 | t_short | sbn23 | stopped_early ⚠ | 2 | 0.7123 | 2 | - | 0.0512 |" in note
    assert "| 2 | t_full | bn | completed | 8 | 0.7000 | 8 | 0.2 | 0.1 |" in note
    assert "sbn-study export sbn-quickstart --top-k 3 --tracking-uri https://mlflow.example.com" in note
    assert "s3cret" not in note
    assert "| `norm.momentum` | loguniform [0.01, 0.5] | `norm.placement` in 3, 23, 123, all |" in note
    running = study_note(spec, "sqlite:////runs/mlflow.db")
    assert "The study is running: the chart `study/best_val_acc` follows the best value so far" in running
    rates = [round(1e-4 * (i + 1), 4) for i in range(2000)]
    huge = load_spec(QUICKSTART, [f"search.space.train.lr={{choice: {rates}}}"])
    assert len(study_note(huge, "sqlite:///x.db")) == NOTE_MAX_CHARS


def test_links_open_the_model_training_runs_in_the_studys_view() -> None:
    assert ui.runs_link("http://127.0.0.1:5000/", "3") == LINK
    assert ui.runs_link("http://h:1", "3", charts=True, view=False) == (
        "http://h:1/#/experiments/3/runs?workflowType=machine_learning&compareRunsMode=CHART"
    )
    assert ui.served_ui("https://mlflow.example.com/team/") == "https://mlflow.example.com/team"
    assert ui.served_ui("sqlite:////runs/mlflow.db") is None
    assert render_ui("sqlite:////runs/mlflow.db", "http://127.0.0.1:5000", [("demo", LINK, LINK + "&c")]) == (
        "MLflow UI for sqlite:////runs/mlflow.db at http://127.0.0.1:5000 (Ctrl-C to stop)\n"
        f"  demo\n    runs:   {LINK}\n    charts: {LINK}&c"
    )


def test_the_ui_links_every_model_training_experiment_of_the_store(tmp_path: Path) -> None:
    from sbn_study.store.runs import ensure_experiment, open_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = ensure_experiment(uri, "study", None)
    final = ensure_experiment(uri, "study-final", None)
    client = open_client(uri)
    client.set_experiment_tag(study, ui.VIEW_TAG, "{}")
    client.create_experiment("someone-elses")
    assert ui.experiment_links(client, "http://h:1") == [
        ("study", *(ui.runs_link("http://h:1", study, charts) for charts in (False, True))),
        ("study-final", *(ui.runs_link("http://h:1", final, charts, view=False) for charts in (False, True))),
    ]


@pytest.mark.slow
def test_a_finished_study_describes_itself_with_its_best_trials_and_figures(
    small_study: FinishedStudy,
) -> None:
    from sbn_study.store.runs import open_client

    client = open_client(small_study.tracking_uri)
    outcome = small_study.outcome
    parent = client.get_run(outcome.parent_run_id)
    note = parent.data.tags[ui.NOTE_TAG]
    assert outcome.best is not None
    assert f"| 1 | {outcome.best['trial_id']} |" in note and "The study is running" not in note
    figures = {artifact.path for artifact in client.list_artifacts(outcome.parent_run_id, "figures")}
    assert figures == {
        "figures/learning_curves.png",
        "figures/accuracy_by_placement.png",
        "figures/feature_map_norms.png",
    }
    finished = client.get_metric_history(outcome.parent_run_id, ui.TRIALS_FINISHED)
    assert [m.step for m in finished] == list(range(1, small_study.spec.search.num_samples + 1))
