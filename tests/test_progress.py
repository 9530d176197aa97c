"""What a person watches while a study runs: a line per trial that ends, a summary at an interval where the
output is no terminal, one view redrawn in place where it is, and none of Ray's, Tune's or MLflow's own lines
unless --verbose."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sbn_study.spec import load_spec
from sbn_study.terminal import duration
from sbn_study.tune.progress import StudyProgress, progress_view, summary_line
from tests.conftest import QUICKSTART, run_command

CLOCK = r"\[\d\d:\d\d:\d\d\] "


@dataclass
class FakeTrial:
    trial_id: str
    status: str
    config: dict[str, Any]
    experiment_tag: str
    last_result: dict[str, Any] = field(default_factory=dict)


def trials() -> tuple[StudyProgress, io.StringIO, list[FakeTrial]]:
    """Four of a study's 6 trials (8 epochs each, val_acc maximized): one completed, one stopped by ASHA after
    2 epochs, one running (its second result diverged), one pending; two are not created yet."""
    spec = load_spec(QUICKSTART, ["search.num_samples=6"])
    stream = io.StringIO()
    progress = StudyProgress(spec, interval_s=3600, stream=stream, live=False)
    progress.setup(total_num_samples=6)
    done = FakeTrial("a", "RUNNING", {"norm.placement": "23", "train.lr": 0.05123}, "1_lr=0.05")
    stopped = FakeTrial("b", "RUNNING", {"norm.placement": "none", "train.lr": 0.2}, "2_lr=0.2")
    running = FakeTrial("c", "RUNNING", {"norm.placement": "all", "train.lr": 0.01}, "3_lr=0.01")
    pending = FakeTrial("d", "PENDING", {"norm.placement": "3", "train.lr": 0.1}, "4_lr=0.1")
    every = [done, stopped, running, pending]
    for trial, accuracies in (
        (done, [0.5, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]),
        (stopped, [0.3, 0.2]),
        (running, [0.4]),
    ):
        for epoch, accuracy in enumerate(accuracies, start=1):
            trial.last_result = {"epoch": epoch, "val_acc": accuracy}
            progress.on_trial_result(0, every, trial, trial.last_result)
    # A diverged result (the worst value stands in for the metric) is not a best.
    progress.on_trial_result(0, every, running, {"epoch": 2, "val_acc": float("-inf"), "diverged": True})
    for trial in (done, stopped):
        trial.status = "TERMINATED"
        progress.on_trial_complete(0, every, trial)
    return progress, stream, every


def test_each_trial_that_ends_gets_a_line_with_its_run_name_status_epochs_and_best() -> None:
    _, stream, _ = trials()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        CLOCK + r"t1 sbn23 lr=0\.0512: completed at epoch 8/8, best val_acc 0\.7000", lines[0]
    )
    assert re.fullmatch(CLOCK + r"t2 bn lr=0\.2: stopped_early at epoch 2/8, best val_acc 0\.3000", lines[1])


def test_the_summary_counts_trials_by_status_and_bounds_the_epochs_left() -> None:
    progress, _, every = trials()
    state = progress.progress(every)
    assert state.counts == {"completed": 1, "stopped_early": 1, "running": 1, "pending": 1, "to start": 2}
    # done: 8 + 2 + 2; left at most: the running trial's 6, the pending one's 8 and the two to start, 16
    assert (state.epochs_done, state.epochs_bound) == (12, 12 + 6 + 8 + 16)
    assert state.best == ("t1 sbn23 lr=0.0512", 0.7)
    assert state.running == [("t3 sbn-all lr=0.01", 2, 0.4)]
    assert state.eta_s is not None and state.eta_s > 0
    line = summary_line(state, "val_acc")
    assert re.fullmatch(
        CLOCK + r"2/6 trials ended \(1 completed, 1 stopped_early\); 1 pending, 1 running, 2 to start · "
        r"epochs 12/≤42 · ETA ≤ \S+ · best val_acc 0\.7000 t1 sbn23 lr=0\.0512",
        line,
    ), line


def test_plain_output_appends_a_summary_at_the_interval_only() -> None:
    progress, stream, every = trials()
    before = stream.getvalue()
    progress.on_step_end(0, every)
    assert stream.getvalue() == before  # the interval (an hour) has not passed
    progress.interval_s = 0.0
    progress.on_step_end(0, every)
    added = stream.getvalue()[len(before) :].splitlines()
    assert len(added) == 1 and "2/6 trials ended" in added[0]


def test_the_terminal_view_shows_the_bar_the_best_trial_and_the_running_ones() -> None:
    from rich.console import Console

    progress, _, every = trials()
    console = Console(file=io.StringIO(), width=100, record=True)
    console.print(progress_view("sbn-quickstart", progress.progress(every), "val_acc", 8))
    text = console.export_text()
    assert (
        "sbn-quickstart  2/6 trials ended (1 completed, 1 stopped_early); 1 pending, 1 running, 2 to start"
        in text
    )
    assert re.search(r"━+.* epochs 12/≤42 · ETA ≤ ", text), text
    assert "best val_acc 0.7000  t1 sbn23 lr=0.0512" in text
    assert re.search(r"t3 sbn-all lr=0\.01\s+2/8\s+0\.4000", text), text


def test_durations_read_as_a_person_writes_them() -> None:
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


# ------------------------------------------------------------------------------------------ end to end

NOISE = ("Token authentication", "Configuration for experiment", "View detailed results", "INFO mlflow", "╭")


@pytest.mark.slow
def test_a_run_in_a_terminal_redraws_one_view_and_elsewhere_prints_only_its_own_lines(tmp_path: Path) -> None:
    overrides = ["search.num_samples=3", "train.epochs=2"]
    piped = subprocess.run(
        run_command(tmp_path / "piped", overrides, "--num-cpus", "2"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert not any(noise in piped.stdout + piped.stderr for noise in NOISE), piped.stdout + piped.stderr
    assert "\x1b[" not in piped.stdout  # no escape codes in a log file
    ended = [line for line in piped.stdout.splitlines() if re.match(CLOCK + r"t\d ", line)]
    assert len(ended) == 3 and all(
        ": completed at epoch 2/2" in line or "stopped_early" in line for line in ended
    )
    assert re.search(CLOCK + r"3/3 trials ended .* · epochs \d+/≤\d+ · best val_acc", piped.stdout)

    # The same study in a pseudo-terminal: the view is redrawn in place (cursor up, erase line).
    primary, secondary = pty.openpty()
    command = run_command(tmp_path / "tty", overrides, "--num-cpus", "2")
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    driver = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the driver exited
            break
        if not chunk:
            break
        screen += chunk
    assert driver.wait(timeout=60) == 0, screen.decode(errors="replace")[-3000:]
    os.close(primary)
    text = screen.decode(errors="replace")
    assert "\x1b[1A\x1b[2K" in text  # rich's redraw: the previous view erased line by line
    assert "3/3 trials ended" in text and "study 'e2e-small' finished" in text
    assert not any(noise in text for noise in NOISE), text[-3000:]


@pytest.mark.slow
def test_verbose_shows_the_libraries_lines_again(tmp_path: Path) -> None:
    # A study run in this process (another test's) quieted MLflow through the environment a child inherits.
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_LOGGING_LEVEL"}
    done = subprocess.run(
        run_command(tmp_path, ["search.num_samples=1", "train.epochs=1"], "--num-cpus", "2", "--verbose"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Creating initial MLflow database tables" in done.stderr, done.stderr


# ------------------------------------------------------------------------------------------ final training


def test_final_training_counts_seeds_and_estimates_the_rest_from_those_that_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    from sbn_study.final import progress as final_progress
    from tests.test_final_render import seed

    now = [100.0]
    monkeypatch.setattr(final_progress.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    seeds = final_progress.SeedProgress(
        [("config", 0), ("config", 1), ("bn", 0), ("bn", 1)], stream, live=False
    )
    seeds.start()
    assert seeds.summary() == "0/4 seeds ended"
    now[0] += 30.0
    seeds.ended(seed("bn", 0))
    now[0] += 10.0
    seeds.ended(seed("config", 1, "error", error="worker died"))
    # 2 seeds in 40 s: the 2 left take about 40 s more
    assert seeds.summary() == "2/4 seeds ended (1 completed, 1 error) · ETA ~ 40s"
    assert stream.getvalue().splitlines() == [
        "  bn           seed 0: completed, test_acc 0.8000, test_loss 0.5000 (best val_acc 0.8100 at epoch 2)  "
        "[1/4 seeds ended (1 completed) · ETA ~ 1m30s]",
        "  config       seed 1: error: worker died  [2/4 seeds ended (1 completed, 1 error) · ETA ~ 40s]",
    ]
    console = Console(file=io.StringIO(), width=100, record=True)
    console.print(seeds.view())
    text = console.export_text()
    assert "2/4 seeds ended (1 completed, 1 error) · ETA ~ 40s" in text
    assert "training or queued: config seed 0, bn seed 1" in text
