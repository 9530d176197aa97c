"""A study whose driver is killed at any instant is continued by `--resume`, with nothing lost or logged twice.

One small study is killed again and again, each time with every process its driver started (Ray, the trial
workers), each time at another instant, and resumed after each kill: during Ray's start (nothing recorded
yet), and then at the test hook points of `sbn_study.tune.checkpoints.pause_point` (the process that reaches the
point sleeps there, and the test kills everything then): the parent run open without its state file, a
trial's file half-written, a trial's file ahead of what the driver received, an epoch the driver took but
Tune's saved state may not have, every trial ended but the record still open. Once it was also killed while
Tune copied its state (simulated: its newest state file cut short). The last `--resume` runs to the end.

The parent run that a driver killed before its state file left is found again by its tags; the fast tests
below check that lookup on its own, without Ray.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import pytest

from sbn_study.errors import UserError
from sbn_study.spec import load_spec
from sbn_study.store.record import StudyRecord
from sbn_study.store.runs import KIND_TAG, STATE_FILE_TAG, ensure_experiment
from sbn_study.study.lifecycle import RunOptions, Study
from sbn_study.study.state import StudyState, state_path
from sbn_study.tune.checkpoints import EXPERIMENT_STATE, FOLDER, PAUSE_AT_ENV, PAUSE_FILE_ENV, TrialStates
from tests.conftest import QUICKSTART, SMALL_STUDY_OVERRIDES, tune_trials
from tests.servers import kill_tree
from tests.test_resilience import (
    all_runs,
    assert_study_complete_once,
    cli_command,
    metric_history,
    start_driver,
    study_runs,
    study_state,
    val_acc_steps,
    wait_for,
)

TRIALS, EPOCHS = 4, 3
OVERRIDES = (f"search.num_samples={TRIALS}", f"train.epochs={EPOCHS}")
ENDED_WELL = {"completed", "stopped_early", "diverged"}


def parent_runs(output: Path) -> list:
    return [r for r in all_runs(output, deleted=True) if r.data.tags.get("sbn.kind") == "study"]


def kill_at(output: Path, point: str) -> None:
    """`--resume` until the driver or one of its trials pauses at `point`; then everything is killed."""
    pause_file = output.parent / f"paused-at-{point}"
    env = {PAUSE_AT_ENV: point, PAUSE_FILE_ENV: str(pause_file)}
    driver = start_driver(output, "--resume", overrides=OVERRIDES, env=env)
    try:
        wait_for(pause_file.exists, 240, f"a pause at {point}", 0.05, driver)
    finally:
        kill_tree(driver)


def files_ahead_of_the_record(output: Path) -> list[str]:
    """The trials whose own file holds an epoch their MLflow run does not."""
    states = TrialStates(study_state(output)["tune_path"])
    ahead = []
    for run in study_runs(output):
        trial_id = run.data.tags["sbn.trial_id"]
        saved = states.load(trial_id)
        if saved is not None and saved["epoch"] > max(val_acc_steps(output, run.info.run_id), default=0):
            ahead.append(trial_id)
    return ahead


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_study_killed_at_every_instant_ends_with_each_trial_once(tmp_path: Path) -> None:
    output = tmp_path / "out"

    # During Ray's start: nothing is recorded yet, and `--resume` starts the study.
    driver = start_driver(output, overrides=OVERRIDES)
    try:

        def ray_starting() -> bool:
            return any(p.name() == "raylet" for p in psutil.Process(driver.pid).children(recursive=True))

        wait_for(ray_starting, 120, "Ray's start", 0.05, driver)
    finally:
        kill_tree(driver)
    assert not state_path(output, "e2e-small").exists() and not parent_runs(output)

    # The parent run is open, the state file not written: `--resume` finds the run again by its tags.
    kill_at(output, "parent-run-open")
    assert not state_path(output, "e2e-small").exists()
    (parent,) = parent_runs(output)
    assert parent.info.status == "RUNNING"

    kill_at(output, "checkpoint-writing")
    trials_folder = Path(study_state(output)["tune_path"]) / FOLDER
    assert list(trials_folder.glob(".*.tmp")), "no trial file was half-written at the kill"

    kill_at(output, "checkpoint-written")
    assert not list(trials_folder.glob(".*.tmp")), "the half-written file of the kill before is still there"
    assert files_ahead_of_the_record(output), "no trial had saved an epoch the driver did not receive"

    kill_at(output, "reported")
    # Killed while Tune copied its state to storage: the newest state file cut short.
    newest = max(Path(study_state(output)["tune_path"]).glob(EXPERIMENT_STATE.format("*")))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    kill_at(output, "study-trained")

    resumed = subprocess.run(
        cli_command(output, "--resume", overrides=OVERRIDES), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert study_state(output)["status"] == "finished"

    # One parent run, the first one, through all seven executions; no run of any kind left open.
    assert [r.info.run_id for r in parent_runs(output)] == [parent.info.run_id]
    assert not [r for r in all_runs(output, deleted=True) if r.info.status == "RUNNING"]
    runs = assert_study_complete_once(output, TRIALS, statuses=ENDED_WELL)
    saved = tune_trials(output)
    assert len(saved) == TRIALS and {t.status for t in saved.values()} == {"TERMINATED"}, saved
    for run in runs:
        trial_id = run.data.tags["sbn.trial_id"]
        steps = val_acc_steps(output, run.info.run_id)
        if run.data.tags["sbn.status"] == "completed":
            assert steps == list(range(1, EPOCHS + 1)), (trial_id, steps)
        assert saved[trial_id].iteration == len(steps), (trial_id, saved[trial_id].iteration, steps)
        # Feature statistics at initialization (step 0) too: they travel with the first epoch, or in a replay.
        features = [key for key in run.data.metrics if key.startswith("fm/")]
        assert features, trial_id
        for key in features:
            assert [m.step for m in metric_history(output, run.info.run_id, key)] == [0, *steps], (
                trial_id,
                key,
            )


def study(output: Path, resume: bool) -> Study:
    spec = load_spec(QUICKSTART, SMALL_STUDY_OVERRIDES)
    return Study(spec, QUICKSTART.read_text(), RunOptions(output=output, resume=resume))


def open_parent_run(output: Path, state_file: Path, run_name: str = "e2e-small-20260101-120000") -> str:
    """A parent run as `Study` opens it, for the state file `state_file`, left RUNNING as a killed driver does."""
    uri = f"sqlite:///{output / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "e2e-small", output / "artifacts")
    tags = {"sbn.study": "e2e-small", KIND_TAG: "study", STATE_FILE_TAG: str(state_file)}
    return StudyRecord.start(uri, experiment_id, run_name, tags, output / "unsent.jsonl").handle.parent_run_id


def test_resume_finds_the_parent_run_a_driver_killed_before_its_state_file(tmp_path: Path) -> None:
    output = tmp_path.resolve()
    # Another output's execution of the same study, tracked in the same store, is not this one's.
    open_parent_run(output, state_path(output / "elsewhere", "e2e-small"))
    run_id = open_parent_run(output, state_path(output, "e2e-small"))

    with pytest.raises(UserError, match=r"has an unfinished run in .* before its state was saved.*--resume"):
        study(output, resume=False)._killed_before_its_state()
    found = study(output, resume=True)._killed_before_its_state()
    assert found is not None and found.parent_run_id == run_id
    assert found.tune_path == str(output / "ray" / "e2e-small-20260101-120000")


def test_resume_with_nothing_recorded_starts_and_after_a_finished_execution_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path.resolve()
    assert study(output, resume=True)._killed_before_its_state() is None
    assert "nothing of study 'e2e-small' was recorded" in capsys.readouterr().out

    # A finished execution of the same spec: `--resume` has nothing to continue (a larger num_samples would
    # extend it, tests/test_search.py).
    same = study(output, resume=False)
    finished = StudyState(
        "finished", "0123abcd", "1", str(output / "ray" / "x"), same.uri, spec=same.trials_spec
    )
    finished.save(state_path(output, "e2e-small"))
    with pytest.raises(UserError, match="--resume: study 'e2e-small' has no unfinished run"):
        study(output, resume=True)._killed_before_its_state()
