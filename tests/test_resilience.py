"""A study survives: a killed driver, Ctrl-C, a killed trial worker, diverging trials, bad input.

Every test goes through the real stack (Ray, Optuna, ASHA, MLflow on sqlite). The driver-level tests run
`sbn-study run` in a subprocess of its own process group (it starts its own local Ray), so that killing it
kills exactly what it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sbn_study.cli import main
from tests.conftest import QUICKSTART, run_command, run_small_study

pytestmark = pytest.mark.slow

ENDED = {"completed", "stopped_early", "diverged", "error"}


def cli_command(output: Path, *extra: str) -> list[str]:
    return run_command(output, [], "--num-cpus", "2", *extra)


def study_runs(output: Path, name: str = "e2e-small") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return []
    return [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=1000)
        if "sbn.trial_id" in r.data.tags
    ]


def val_acc_steps(output: Path, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    return [m.step for m in client.get_metric_history(run_id, "val_acc")]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def start_driver(output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        cli_command(output, *extra),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the driver and everything in its process group (its local Ray)."""
    with contextlib.suppress(ProcessLookupError):  # it may have ended by itself
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def assert_study_complete_once(output: Path, expected_trials: int) -> list:
    runs = study_runs(output)
    trial_ids = [r.data.tags["sbn.trial_id"] for r in runs]
    assert len(trial_ids) == expected_trials, trial_ids
    assert len(set(trial_ids)) == expected_trials, "a trial has two runs"
    assert {r.data.tags["sbn.status"] for r in runs} <= ENDED
    assert all(r.info.status != "RUNNING" for r in runs)
    for run in runs:
        steps = val_acc_steps(output, run.info.run_id)
        assert steps == list(range(1, len(steps) + 1)), (run.data.tags["sbn.trial_id"], steps)
    return runs


def test_driver_killed_then_resumed_keeps_finished_trials_and_runs_nothing_twice(tmp_path: Path) -> None:
    driver = start_driver(tmp_path)
    try:
        wait_for(
            lambda: sum(r.data.tags.get("sbn.status") in ENDED for r in study_runs(tmp_path)) >= 2,
            180,
            "two finished trials",
        )
    finally:
        kill_group(driver)
    before = {
        r.data.tags["sbn.trial_id"]: (r.data.tags["sbn.status"], val_acc_steps(tmp_path, r.info.run_id))
        for r in study_runs(tmp_path)
    }
    finished_before = {t: steps for t, (status, steps) in before.items() if status in ENDED}
    assert len(before) < 6 or len(finished_before) < 6, "the study ended before the driver was killed"

    again = subprocess.run(cli_command(tmp_path), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "has an unfinished run" in again.stderr and "--resume" in again.stderr

    resumed = subprocess.run(cli_command(tmp_path, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    runs = assert_study_complete_once(tmp_path, expected_trials=6)
    after = {r.data.tags["sbn.trial_id"]: val_acc_steps(tmp_path, r.info.run_id) for r in runs}
    for trial_id, steps in finished_before.items():
        assert after[trial_id] == steps, f"finished trial {trial_id} ran again"
    # A trial the killed driver started after Tune's last saved state is unknown to the resumed Tune and
    # sampler: its run is dropped and a replacement sampled, so the total stays at the spec's 6.
    dropped = set(before) - set(after)
    if dropped:
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
        kill_group(driver)
    assert driver.returncode == 130, output[-3000:]
    assert "resume:" in output and "--resume" in output
    assert "Traceback" not in output
    runs = study_runs(tmp_path)
    assert runs and all(r.info.status != "RUNNING" for r in runs)
    unfinished = [r for r in runs if r.data.tags["sbn.status"] not in ENDED]
    assert all(r.data.tags["sbn.status"] == "killed" and r.info.status == "KILLED" for r in unfinished)

    resumed = subprocess.run(cli_command(tmp_path, "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_study_complete_once(tmp_path, expected_trials=6)


def test_killed_trial_worker_restarts_from_its_checkpoint(ray_session: None, tmp_path: Path) -> None:
    import psutil

    killed: list[int] = []

    def kill_first_trial_worker() -> None:
        def worker_with_results() -> bool:
            if not any(val_acc_steps(tmp_path, r.info.run_id) for r in study_runs(tmp_path, "e2e-worker")):
                return False
            for process in psutil.process_iter(["cmdline"]):
                # Only a worker of this test session's Ray (its raylet is our child), never another run's.
                ours = any(parent.pid == os.getpid() for parent in process.parents())
                if ours and any("ImplicitFunc" in part for part in process.info["cmdline"] or []):
                    process.kill()
                    killed.append(process.pid)
                    return True
            return False

        wait_for(worker_with_results, 120, "a trial worker with a result")

    killer = threading.Thread(target=kill_first_trial_worker, daemon=True)
    killer.start()
    study = run_small_study(
        tmp_path, ["name=e2e-worker", "search.num_samples=3", "train.epochs=4", "search.scheduler.type=none"]
    )
    killer.join(timeout=5)
    assert killed, "no trial worker was killed"
    assert study.outcome.status == "finished"
    runs = [r for r in study_runs(tmp_path, "e2e-worker")]
    assert len(runs) == 3
    assert {r.data.tags["sbn.status"] for r in runs} == {"completed"}
    for run in runs:
        assert val_acc_steps(tmp_path, run.info.run_id) == [1, 2, 3, 4]


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
            "search.space.train.lr={choice: [0.05, 1.0e+8]}",
            "norm.placement=none",
            "search.space.norm.placement=null",
        ],
    )
    assert study.outcome.status == "finished"
    runs = study_runs(tmp_path, "e2e-diverge")
    by_lr = {float(r.data.params["train.lr"]): r.data.tags["sbn.status"] for r in runs}
    assert len(runs) == 3
    assert by_lr.get(1e8, "diverged") == "diverged"
    assert "diverged" in by_lr.values()
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
    code = main(["run", str(QUICKSTART), "--set", "name=e2e-kept", *args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == message.format(**fill)
    assert "Traceback" not in captured.err + captured.out
    runs = study_runs(kept_study, "e2e-kept")
    assert len(runs) == 1 and runs[0].data.tags["sbn.status"] == "completed"


@pytest.fixture(scope="module")
def kept_study(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An earlier, finished study in the store that bad input must leave untouched."""
    output = tmp_path_factory.mktemp("kept")
    run_small_study(output, ["name=e2e-kept", "search.num_samples=1", "train.epochs=1"])
    return output
