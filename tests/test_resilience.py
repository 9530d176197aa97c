"""A study survives: a killed driver, Ctrl-C, a killed trial worker, diverging trials, bad input.

Every test goes through the real stack (Ray, Optuna, ASHA, MLflow on sqlite). The driver-level tests run
`sbn-study run` in a subprocess of its own session (it starts its own local Ray), so that killing it and its
descendants (`tests.servers.kill_tree`) kills exactly what it started.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from optuna.trial import TrialState

from sbn_study.cli import main
from sbn_study.protocol import EPOCH_METRICS
from sbn_study.study.state import state_path
from sbn_study.tune.checkpoints import TrialStates
from sbn_study.tune.search import TUNE_TRIAL_ID_ATTR
from tests.conftest import QUICKSTART, TuneTrial, run_command, run_small_study, tune_trials
from tests.servers import kill_tree

T = TypeVar("T")

pytestmark = pytest.mark.slow

ENDED = {"completed", "stopped_early", "diverged", "error"}
# Tune saves its experiment state at most every 10 s by default. Tests that watch that state to choose their
# moment have it saved after every result instead.
SAVE_EVERY_RESULT = {"TUNE_GLOBAL_CHECKPOINT_S": "0"}


def cli_command(output: Path, *extra: str, overrides: Sequence[str] = ()) -> list[str]:
    return run_command(output, list(overrides), "--num-cpus", "2", *extra)


def all_runs(output: Path, name: str = "e2e-small", deleted: bool = False) -> list:
    """Every MLflow run of the study: the parent run and one per trial (and the deleted ones, if asked)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment.experiment_id], max_results=1000, run_view_type=view)


def experiment_exists(output: Path, name: str) -> bool:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{output / 'mlflow.db'}").get_experiment_by_name(name) is not None


def study_runs(output: Path, name: str = "e2e-small") -> list:
    return [r for r in all_runs(output, name) if "sbn.trial_id" in r.data.tags]


def metric_history(output: Path, run_id: str, key: str = "val_acc") -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{output / 'mlflow.db'}").get_metric_history(run_id, key)


def val_acc_steps(output: Path, run_id: str) -> list[int]:
    return [m.step for m in metric_history(output, run_id)]


def wait_for(
    condition: Callable[[], T | None],
    timeout_s: float,
    what: str,
    poll_s: float = 0.5,
    driver: subprocess.Popen | None = None,
) -> T:
    """Polls until `condition` returns something truthy, and returns that; fails at once if `driver` ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            output = driver.stdout.read() if driver.stdout else ""
            raise AssertionError(
                f"the driver ended (exit {driver.returncode}) before {what}:\n{output[-3000:]}"
            )
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def saved_trials(output: Path) -> dict[str, TuneTrial]:
    """Tune's saved trials while a study runs: {} before the first save or while Tune rewrites the file."""
    try:
        return tune_trials(output)
    except json.JSONDecodeError:
        return {}


def study_state(output: Path, name: str = "e2e-small") -> dict[str, Any]:
    return json.loads(state_path(output, name).read_text())


def saved_searcher(output: Path, name: str = "e2e-small") -> dict[str, Any]:
    """The searcher state Tune saved last (StudySearch.save pickles its Optuna study and its running trials)."""
    experiment = study_state(output, name)["tune_path"]
    # Tune restores the newest of these files too (Searcher.restore_from_dir): the session stamp sorts by time.
    newest = max(glob.glob(os.path.join(experiment, "searcher-state-*.pkl")))
    with open(newest, "rb") as file:
        return pickle.load(file)


def start_driver(
    output: Path, *extra: str, overrides: Sequence[str] = (), env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(output, *extra, overrides=overrides),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def assert_study_complete_once(output: Path, expected_trials: int, statuses: set[str] = ENDED) -> list:
    """One ended run per trial, and every epoch metric of each at steps 1..n: none missing, none twice."""
    runs = study_runs(output)
    trial_ids = [r.data.tags["sbn.trial_id"] for r in runs]
    assert len(trial_ids) == expected_trials, trial_ids
    assert len(set(trial_ids)) == expected_trials, "a trial has two runs"
    assert {r.data.tags["sbn.status"] for r in runs} <= statuses, [r.data.tags["sbn.status"] for r in runs]
    assert all(r.info.status != "RUNNING" for r in runs)
    for run in runs:
        steps = val_acc_steps(output, run.info.run_id)
        trial = run.data.tags["sbn.trial_id"]
        assert steps == list(range(1, len(steps) + 1)), (trial, steps)
        for key in EPOCH_METRICS:
            assert [m.step for m in metric_history(output, run.info.run_id, key)] == steps, (trial, key)
    return runs


# Every trial runs all its epochs (no early stopping), so that a trial is always somewhere mid-way for a
# while: the kill below waits for one that has reported and has epochs left.
RESUME_EPOCHS = 5
# Feature statistics only at the end: they make up most of each result, and Tune rewrites its whole state
# file after every result here (SAVE_EVERY_RESULT), so small results keep the window in which the file is
# read whole wide.
RESUME_OVERRIDES = (
    "search.scheduler.type=none",
    f"train.epochs={RESUME_EPOCHS}",
    f"features.interval={RESUME_EPOCHS}",
)


def finished_and_midway(output: Path) -> dict[str, TuneTrial] | None:
    """Tune's saved trials once they hold two finished trials and one that reported and has epochs left."""
    trials = saved_trials(output)
    finished = [t for t in trials.values() if t.status == "TERMINATED"]
    midway = [t for t in trials.values() if t.status == "RUNNING" and 1 <= t.iteration < RESUME_EPOCHS]
    return trials if len(finished) >= 2 and midway else None


def test_driver_killed_then_resumed_keeps_finished_trials_and_runs_nothing_twice(tmp_path: Path) -> None:
    driver = start_driver(tmp_path, overrides=RESUME_OVERRIDES, env=SAVE_EVERY_RESULT)
    try:
        # Tune's own saved state, not MLflow, decides the moment: it is what `--resume` starts from. Tune
        # saves it after every result here, so the kill has to follow the observation closely.
        wait_for(
            lambda: finished_and_midway(tmp_path), 180, "two finished trials and one mid-way", 0.1, driver
        )
    finally:
        kill_tree(driver)
    # Tune may have saved once more between the look and the kill: what counts is what is on disk now.
    at_kill = finished_and_midway(tmp_path)
    assert at_kill, f"the saved state changed before the kill: {saved_trials(tmp_path)}"
    finished = {t for t, trial in at_kill.items() if trial.status == "TERMINATED"}
    # The epoch each unfinished trial's own file holds: at least what Tune saved of it, and more when the trial
    # wrote its next epoch before the kill (one that never reported starts over, unchecked here).
    states = TrialStates(study_state(tmp_path)["tune_path"])
    midway = {}
    for trial_id, trial in at_kill.items():
        saved = states.load(trial_id) if trial_id not in finished and trial.iteration else None
        if saved is not None:
            assert saved["epoch"] >= trial.iteration, (trial_id, saved["epoch"], trial.iteration)
            midway[trial_id] = saved["epoch"]
    runs_before = {r.data.tags["sbn.trial_id"]: r for r in study_runs(tmp_path)}
    assert finished <= set(runs_before), "a finished trial has no MLflow run"
    # What a re-run would change: the run's end and the time every epoch was logged.
    record_before = {
        t: (
            runs_before[t].info.run_id,
            runs_before[t].info.end_time,
            [(m.step, m.timestamp) for m in metric_history(tmp_path, runs_before[t].info.run_id)],
            at_kill[t].runtime["last_result"]["timestamp"],
        )
        for t in finished
    }

    again = subprocess.run(
        cli_command(tmp_path, overrides=RESUME_OVERRIDES), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 2
    assert "has an unfinished run" in again.stderr and "--resume" in again.stderr

    resumed = subprocess.run(
        cli_command(tmp_path, "--resume", overrides=RESUME_OVERRIDES),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert study_state(tmp_path)["status"] == "finished"
    after = tune_trials(tmp_path)
    assert len(after) == 6 and {t.status for t in after.values()} == {"TERMINATED"}, after

    # The finished trials did not run again: neither Tune nor MLflow has anything newer for them.
    runs_after = {r.data.tags["sbn.trial_id"]: r for r in study_runs(tmp_path)}
    for trial_id, (run_id, end_time, history, tune_stamp) in record_before.items():
        run = runs_after[trial_id]
        assert run.info.run_id == run_id and run.info.end_time == end_time, (
            f"finished trial {trial_id} ran again"
        )
        assert [(m.step, m.timestamp) for m in metric_history(tmp_path, run_id)] == history, trial_id
        assert after[trial_id].runtime["last_result"]["timestamp"] == tune_stamp, trial_id

    # The mid-way trials went on from their own file: a new worker ran only the epochs after it.
    for trial_id, epoch in midway.items():
        last = after[trial_id].runtime["last_result"]
        assert last["training_iteration"] == RESUME_EPOCHS, (trial_id, last["training_iteration"])
        assert last["iterations_since_restore"] == RESUME_EPOCHS - epoch, (trial_id, epoch, last)

    # The sampler's history came back with the searcher: its Optuna study holds the trials sampled before the
    # kill, with the same parameters and numbers, and the resumed study only added trials up to num_samples.
    searcher = saved_searcher(tmp_path)
    study = searcher["study"]
    numbers = {t.user_attrs[TUNE_TRIAL_ID_ATTR]: t.number for t in study.trials}
    assert set(at_kill) <= set(numbers), f"the sampler forgot {set(at_kill) - set(numbers)}"
    assert sorted(numbers[t] for t in at_kill) == list(range(len(at_kill))), numbers
    for trial_id, trial in at_kill.items():
        assert study.trials[numbers[trial_id]].params == trial.config, trial_id
    # A trial asked after Tune's last saved state (the replaced one below) stays in the sampler's database,
    # ended as FAIL: never told a value, so nothing of it reaches the sampler's model.
    failed = {tune_id for tune_id, number in numbers.items() if study.trials[number].state == TrialState.FAIL}
    assert set(numbers) - failed == set(after) and not failed & set(after), (numbers, failed)
    assert len(study.trials) == 6 + len(failed), (len(study.trials), numbers)
    assert all(t.state.is_finished() for t in study.trials), [t.state for t in study.trials]

    # Last, MLflow's record: one run per trial, each epoch once and none missing (also across the kill).
    assert_study_complete_once(tmp_path, expected_trials=6)

    # A trial the killed driver started after Tune's last saved state is unknown to the resumed Tune and
    # sampler: its run is dropped and a replacement sampled, so the total stays at the spec's 6.
    if set(runs_before) - set(runs_after):
        assert "will be sampled again" in resumed.stdout


def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path: Path) -> None:
    driver = start_driver(tmp_path)
    try:
        wait_for(
            lambda: any(val_acc_steps(tmp_path, r.info.run_id) for r in study_runs(tmp_path)),
            180,
            "a first reported epoch",
        )
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=120)
    finally:
        kill_tree(driver)
    assert driver.returncode == 130, output[-3000:]
    assert "resume:" in output and "--resume" in output
    assert "Traceback" not in output
    assert study_state(tmp_path)["status"] == "interrupted"
    runs = study_runs(tmp_path)
    assert runs and all(r.info.status != "RUNNING" for r in all_runs(tmp_path))
    unfinished = [r for r in runs if r.data.tags["sbn.status"] not in ENDED]
    assert all(r.data.tags["sbn.status"] == "killed" and r.info.status == "KILLED" for r in unfinished)

    resumed = subprocess.run(cli_command(tmp_path, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert study_state(tmp_path)["status"] == "finished"
    assert_study_complete_once(tmp_path, expected_trials=6)
    # The parent run too: reopened by the resume, ended with it.
    assert [r.info.status for r in all_runs(tmp_path) if r.info.status == "RUNNING"] == []


def test_a_driver_killed_before_tunes_first_save_starts_over_on_resume(tmp_path: Path) -> None:
    overrides = ["search.num_samples=2", "train.epochs=2", "search.scheduler.type=none"]
    driver = start_driver(tmp_path, overrides=overrides)
    try:
        wait_for(lambda: state_path(tmp_path, "e2e-small").exists(), 180, "the study's state file")
    finally:
        kill_tree(driver)
    # Whatever Tune managed to write before the kill, the resume must cope with none of it: a kill can come
    # before Tune's first save.
    state = study_state(tmp_path)
    shutil.rmtree(state["tune_path"], ignore_errors=True)

    resumed = subprocess.run(
        cli_command(tmp_path, "--resume", overrides=overrides), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "the study stopped before Tune saved its first state; it starts over" in resumed.stdout
    assert study_state(tmp_path)["parent_run_id"] == state["parent_run_id"]
    assert study_state(tmp_path)["status"] == "finished"
    assert_study_complete_once(tmp_path, expected_trials=2)
    assert not [r for r in all_runs(tmp_path, deleted=True) if r.info.status == "RUNNING"]


def is_our_trial_worker(pid: int) -> bool:
    """A Tune trial actor of this test session's Ray (its raylet is our child), never another run's."""
    import psutil

    try:
        process = psutil.Process(pid)
        ours = any(parent.pid == os.getpid() for parent in process.parents())
        return ours and any("ImplicitFunc" in part for part in process.cmdline())
    except psutil.NoSuchProcess:
        return False


def kill_a_midway_trial(output: Path, epochs: int, killed: list[str]) -> None:
    """Kills the worker process of a trial that has reported and has at least two epochs left.

    Two epochs left: with actors reused, the worker of a trial about to end may already run the next trial
    by the time it is killed. The trial's id goes into `killed`.
    """

    def midway_worker() -> bool:
        for trial_id, trial in saved_trials(output).items():
            pid = trial.runtime["last_result"].get("pid")
            if trial.status == "RUNNING" and 1 <= trial.iteration <= epochs - 2 and is_our_trial_worker(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(trial_id)
                return True
        return False

    wait_for(midway_worker, 120, "a trial worker that reported and has epochs left", 0.1)


@pytest.fixture
def save_every_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAVE_EVERY_RESULT for a study run in this process (Tune reads it when the study starts)."""
    for key, value in SAVE_EVERY_RESULT.items():
        monkeypatch.setenv(key, value)


def test_killed_trial_worker_restarts_from_its_checkpoint(
    ray_session: None, save_every_result: None, tmp_path: Path
) -> None:
    killed: list[str] = []
    killer = threading.Thread(target=kill_a_midway_trial, args=(tmp_path, 4, killed), daemon=True)
    killer.start()
    study = run_small_study(
        tmp_path, ["name=e2e-worker", "search.num_samples=3", "train.epochs=4", "search.scheduler.type=none"]
    )
    killer.join(timeout=5)
    assert killed, "no trial worker was killed"
    assert study.outcome.status == "finished"
    runs = study_runs(tmp_path, "e2e-worker")
    assert len(runs) == 3
    assert {r.data.tags["sbn.status"] for r in runs} == {"completed"}
    for run in runs:
        assert val_acc_steps(tmp_path, run.info.run_id) == [1, 2, 3, 4]
    # Tune saw the worker die and restarted the trial, which went on from its own file instead of starting over.
    (trial_id,) = killed
    state = tune_trials(tmp_path)[trial_id].runtime
    assert state["num_failures"] >= 1, state["num_failures"]
    last = state["last_result"]
    assert last["training_iteration"] == 4
    assert last["iterations_since_restore"] < last["training_iteration"], last


def test_killed_trial_worker_without_retries_fails_only_that_trial(
    ray_session: None, save_every_result: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    killed: list[str] = []
    killer = threading.Thread(target=kill_a_midway_trial, args=(tmp_path, 4, killed), daemon=True)
    killer.start()
    overrides = [
        "name=e2e-no-retry",
        "search.num_samples=3",
        "train.epochs=4",
        "search.scheduler.type=none",
        "search.max_failures=0",
    ]
    sets = [arg for override in overrides for arg in ("--set", override)]
    # Through the CLI's entry point (on the session's Ray): the exit code is part of the claim.
    code = main(["run", str(QUICKSTART), *sets, "--output", str(tmp_path)])
    output = capsys.readouterr().out
    killer.join(timeout=5)
    assert killed, "no trial worker was killed"
    assert code == 0, output[-3000:]
    assert study_state(tmp_path, "e2e-no-retry")["status"] == "finished"
    assert "study 'e2e-no-retry' finished: 2 completed, 1 error" in output, output[-3000:]
    runs = {r.data.tags["sbn.trial_id"]: r for r in study_runs(tmp_path, "e2e-no-retry")}
    (trial_id,) = killed
    statuses = {t: r.data.tags["sbn.status"] for t, r in runs.items()}
    assert statuses == {**dict.fromkeys(runs, "completed"), trial_id: "error"}, statuses
    assert len(statuses) == 3
    assert all(r.info.status != "RUNNING" for r in all_runs(tmp_path, "e2e-no-retry"))
    # No retry: the failed trial's record stops at the epoch its worker died in.
    steps = val_acc_steps(tmp_path, runs[trial_id].info.run_id)
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < 4, steps
    # (Tune's saved state is no witness here: Ray 2.60 does not re-save a trial whose actor died, so its
    # experiment state file still lists the trial as RUNNING.)


def test_diverging_trial_is_recorded_as_diverged_and_the_study_goes_on(
    ray_session: None, tmp_path: Path
) -> None:
    study = run_small_study(
        tmp_path,
        [
            "name=e2e-diverge",
            "search.num_samples=3",
            "search.scheduler.type=none",
            "train.schedule=constant",
            # Only lr is searched: the quick-start's norm settings would otherwise be sampled.
            "search.space={train.lr: {choice: [0.05, 1.0e+8]}}",
            # The sampler's first draws with this seed: lr 1e8, then 0.05 twice.
            "search.sampler.seed=8",
        ],
    )
    assert study.outcome.status == "finished"
    runs = study_runs(tmp_path, "e2e-diverge")
    by_lr: dict[float, set[str]] = {}
    for run in runs:
        by_lr.setdefault(float(run.data.params["train.lr"]), set()).add(run.data.tags["sbn.status"])
    assert len(runs) == 3
    # Both learning rates were sampled (the sampler's seed is fixed), and only the huge one diverged.
    assert by_lr == {0.05: {"completed"}, 1e8: {"diverged"}}, by_lr
    diverged = [r for r in runs if r.data.tags["sbn.status"] == "diverged"]
    assert all("val_acc" not in r.data.metrics for r in diverged)  # the sampler's stand-in is not logged


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "search.num_samples=0"], "error: search.num_samples: must be >= 1, got 0"),
        (
            ["--set", "resources.gpu=1"],
            "error: resources: no node of the cluster has the GPUs one trial needs (1 CPU, 1 GPU; "
            "the largest node has 2 CPUs, 0 GPUs)",
        ),
        (
            ["--set", "resources.cpu=64"],
            "error: resources: no node of the cluster has the resources one trial needs (64 CPUs, 0 GPUs; "
            "the largest node has 2 CPUs, 0 GPUs)",
        ),
        (
            ["--tracking-uri", "http://127.0.0.1:9"],
            "error: tracking.uri: cannot reach the MLflow server at http://127.0.0.1:9 ([Errno 111] Connection refused)",
        ),
        (
            ["--set", "data.dataset=cifar10", "--set", "data.root={root}", "--set", "data.download=false"],
            "error: data.root: CIFAR-10 not found: {root}/cifar-10-batches-py needs data_batch_1..5, test_batch, "
            "batches.meta (data.download is false)",
        ),
        (["--output", "{file}/out"], "error: --output: cannot write to {file}/out (Not a directory)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_recorded_is_lost(
    kept_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    fill = {"root": str(tmp_path / "empty"), "file": str(a_file)}
    args = [arg.format(**fill) for arg in extra]
    if "--output" not in args:
        args += ["--output", str(kept_study)]
    # Refused for a study the store holds already, and for a new one, which must leave no trace behind.
    for name in ("e2e-kept", "e2e-refused"):
        code = main(["run", str(QUICKSTART), "--set", f"name={name}", *args])
        captured = capsys.readouterr()
        assert code == 2
        assert captured.err.strip() == message.format(**fill)
        assert "Traceback" not in captured.err + captured.out
    runs = study_runs(kept_study, "e2e-kept")
    assert len(runs) == 1 and runs[0].data.tags["sbn.status"] == "completed"
    assert not experiment_exists(kept_study, "e2e-refused")
    assert (
        not list(kept_study.glob("ray/e2e-refused-*")) and not state_path(kept_study, "e2e-refused").exists()
    )


@pytest.fixture(scope="module")
def kept_study(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An earlier, finished study in the store that bad input must leave untouched."""
    output = tmp_path_factory.mktemp("kept")
    run_small_study(output, ["name=e2e-kept", "search.num_samples=1", "train.epochs=1"])
    return output
