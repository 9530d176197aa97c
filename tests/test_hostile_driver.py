"""A hostile machine under a real driver: `sbn-study run` as a subprocess in its own process group, its own
local Ray, and SIGTERM, a disk that fills up, credentials in its store's URI. See also tests/test_hostile.py."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sbn_study.study.state import state_path
from tests.conftest import run_command
from tests.servers import kill_tree, mlflow_server
from tests.test_hostile import NAME, SECRET, fill, small_disk
from tests.test_train import tiny_config

pytestmark = pytest.mark.slow


def runs(output: Path) -> list[Any]:
    """Every MLflow run of the study in `output`'s store: its parent run and one per trial."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def an_epoch_logged(output: Path) -> bool:
    with contextlib.suppress(Exception):  # the store may not exist yet
        return any("val_acc" in run.data.metrics for run in runs(output))
    return False


def wait_for(condition: Callable[[], bool], driver: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert driver.poll() is None, f"the driver ended (exit {driver.returncode}) first"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def start_driver(output: Path, overrides: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        run_command(output, overrides, "--num-cpus", "2", *extra),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_stopped_cleanly(output: Path, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err[-3000:]
    assert json.loads(state_path(output, NAME).read_text())["status"] == "interrupted"
    assert runs(output) and all(run.info.status != "RUNNING" for run in runs(output))
    # What --resume starts from: Tune's saved state, whole.
    for saved in output.glob("ray/*/experiment_state-*.json"):
        json.loads(saved.read_text())


def assert_finished(output: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert json.loads(state_path(output, NAME).read_text())["status"] == "finished"
    assert all(run.info.status != "RUNNING" for run in runs(output))


def listening_addresses(pid: int) -> set[str]:
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            found |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    return found


def test_the_embedded_ray_listens_on_loopback_and_sigterm_stops_a_study_resumably(tmp_path: Path) -> None:
    lr = "search.space.train.lr={loguniform: [0.01, 0.2]}"  # an override the resume hint must quote
    # As a batch script runs it: under `timeout`, whose process group the driver is in without leading it.
    # SIGTERM then comes as `timeout` (or `kill -- -PGID`) sends it: to the whole group, the driver twice.
    driver = subprocess.Popen(
        ["timeout", "900", *run_command(tmp_path, [lr], "--num-cpus", "2")],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: an_epoch_logged(tmp_path), driver)
        # GCS, raylet, object manager, workers: nothing a machine on the network can reach.
        assert listening_addresses(driver.pid) <= {"127.0.0.1", "::ffff:127.0.0.1"}
        os.killpg(driver.pid, signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        kill_tree(driver)
    assert driver.returncode == 143, err[-3000:]
    assert_stopped_cleanly(tmp_path, out, err)
    assert "sbn-study: terminated (SIGTERM); stopped as after Ctrl-C" in err
    # The printed command resumes it: the same overrides, quoted for the shell.
    [hint] = [line.removeprefix("resume:  ") for line in out.splitlines() if line.startswith("resume:  ")]
    words = shlex.split(hint)
    assert words[:2] == ["sbn-study", "run"] and lr in words and "--resume" in words
    resumed = subprocess.run(
        [sys.executable, "-m", "sbn_study.cli", *words[1:]], capture_output=True, text=True, timeout=300
    )
    assert_finished(tmp_path, resumed)


def test_ray_ending_under_a_study_closes_it_at_once_and_resumably(tmp_path: Path) -> None:
    import psutil

    # What the OOM killer, `ray stop` or a scheduler that signals every process of the job do to the study.
    driver = start_driver(tmp_path, [])
    try:
        wait_for(lambda: an_epoch_logged(tmp_path), driver)
        (gcs,) = [p for p in psutil.Process(driver.pid).children() if p.name() == "gcs_server"]
        gcs.kill()
        # Closed by the study itself, well before Ray's core worker would end the driver (after 60 s).
        out, err = driver.communicate(timeout=45)
    finally:
        kill_tree(driver)
    assert driver.returncode == 1, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert (
        "error: the embedded Ray's gcs_server process ended under the study: every run is closed; continue the "
        "study with --resume"
    ) in err.splitlines()
    assert "resume:  sbn-study run " in out
    assert json.loads(state_path(tmp_path, NAME).read_text())["status"] == "interrupted"
    assert runs(tmp_path) and all(run.info.status != "RUNNING" for run in runs(tmp_path))
    resumed = subprocess.run(
        run_command(tmp_path, [], "--resume"), capture_output=True, text=True, timeout=300
    )
    assert_finished(tmp_path, resumed)


def test_ray_ending_under_a_final_training_ends_its_runs_at_once(tmp_path: Path) -> None:
    import psutil
    import yaml
    from mlflow.tracking import MlflowClient

    config = tmp_path / "final.yaml"
    document = tiny_config(epochs=100).model_dump(mode="json")
    config.write_text(yaml.safe_dump(document))
    command = [sys.executable, "-m", "sbn_study.cli", "train", str(config), "--seeds", "0,1"]
    driver = subprocess.Popen(
        [*command, "--output", str(tmp_path), "--experiment", "lost"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def seeds_training() -> bool:
        with contextlib.suppress(Exception):  # the store may not exist yet
            experiment = client.get_experiment_by_name("lost")
            return len(client.search_runs([experiment.experiment_id])) == 3  # the parent and two seeds
        return False

    try:
        wait_for(seeds_training, driver)
        (gcs,) = [p for p in psutil.Process(driver.pid).children() if p.name() == "gcs_server"]
        gcs.kill()
        _, err = driver.communicate(timeout=45)
    finally:
        kill_tree(driver)
    assert driver.returncode == 1, err[-3000:]
    assert err.splitlines()[-1] == (
        "error: the embedded Ray's gcs_server process ended under the final training: every run is closed; "
        "train again"
    )
    experiment = client.get_experiment_by_name("lost")
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["KILLED"] * 3


def test_a_disk_that_fills_up_stops_the_study_cleanly_and_resumably(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "64m") as disk:
        output = disk / "out"
        driver = start_driver(output, [])
        try:
            wait_for(lambda: an_epoch_logged(output), driver)
            fill(disk, leave=2 * 2**20)  # less than a study keeps free, more than its clean stop takes
            out, err = driver.communicate(timeout=180)
        finally:
            kill_tree(driver)
        assert driver.returncode == 2, err[-3000:]
        assert f"error: --output: no space left on the device of {output}: " in err
        assert_stopped_cleanly(output, out, err)

        (disk / "filler").unlink()
        resumed = subprocess.run(
            run_command(output, [], "--resume"), capture_output=True, text=True, timeout=300
        )
        assert_finished(output, resumed)


def test_a_server_uri_with_credentials_runs_a_study_and_leaves_them_nowhere(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING")}
    with mlflow_server(tmp_path / "server") as server:
        uri = f"http://alice:{SECRET}@127.0.0.1:{server.port}"
        overrides = [f"tracking.uri={uri}", "search.num_samples=2", "train.epochs=1"]
        done = subprocess.run(
            run_command(tmp_path / "out", overrides, "--num-cpus", "2"),
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "tuner.pkl" for path in files)  # Tune's pickle of the trainable and callbacks
    assert [path for path in files if SECRET.encode() in path.read_bytes()] == []
