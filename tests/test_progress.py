"""The live table a person reads while a study runs."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from sbn_study.spec import load_spec
from sbn_study.tune.callbacks import ProgressTable
from tests.conftest import QUICKSTART


@dataclass
class FakeTrial:
    trial_id: str
    status: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)


def test_table_shows_each_trials_state_epoch_best_metric_and_params() -> None:
    spec = load_spec(QUICKSTART)  # 8 epochs, metric val_acc (max)
    stream = io.StringIO()
    table = ProgressTable(spec, interval_s=3600, stream=stream)
    done = FakeTrial("t_done", "TERMINATED", {"norm.placement": "23", "train.lr": 0.05123})
    stopped = FakeTrial("t_stopped", "TERMINATED", {"norm.placement": "none", "train.lr": 0.2})
    running = FakeTrial("t_running", "RUNNING", {"norm.placement": "all", "train.lr": 0.01})
    pending = FakeTrial("t_pending", "PENDING", {"norm.placement": "3", "train.lr": 0.1})
    for trial, accuracies in ((done, [0.5, 0.7, 0.6]), (stopped, [0.3, 0.2]), (running, [0.4])):
        for epoch, accuracy in enumerate(accuracies, start=1):
            trial.last_result = {"epoch": epoch, "val_acc": accuracy}
            table.on_trial_result(0, [], trial, trial.last_result)
    done.last_result["epoch"] = 8  # reached the full budget
    # A diverged result (the worst value stands in for the metric) is not a best.
    table.on_trial_result(0, [], running, {"epoch": 2, "val_acc": float("-inf"), "diverged": True})

    table.print_table([done, stopped, running, pending])
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("4 trials: 1 completed, 1 pending, 1 running, 1 stopped_early")
    assert lines[1].split() == ["trial", "status", "epoch", "best", "val_acc", "params"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["t_done"] == ["t_done", "completed", "8/8", "0.7000", "placement=23", "lr=0.0512"]
    assert rows["t_stopped"] == ["t_stopped", "stopped_early", "2/8", "0.3000", "placement=none", "lr=0.2"]
    assert rows["t_running"] == ["t_running", "running", "1/8", "0.4000", "placement=all", "lr=0.01"]
    assert rows["t_pending"] == ["t_pending", "pending", "0/8", "-", "placement=3", "lr=0.1"]
