"""A study on a real 2-node Ray cluster tracked on a real `mlflow server`; a node and the server go away.

Both nodes run on this machine (`ray start` subprocesses with their own temp dirs and ports, token
authentication on) and `sbn-study run` runs as a subprocess that joins them with --address (HOST:PORT, or
ray:// through the head's Ray Client server), exactly as on a real cluster; the test process itself never
joins a cluster (the session Ray of the other tests stays untouched) and reads the results back over HTTP
with MlflowClient. See tests/servers.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_command, tune_trial_state
from tests.servers import (
    REQUIRE_POSTGRES_ENV,
    MlflowServer,
    PostgresServer,
    PostgresUnavailable,
    RayCluster,
    cluster_env,
    kill_tree,
    mlflow_server,
    postgres,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OK_STATUSES = {"completed", "stopped_early"}


def driver_command(output: Path, name: str, overrides: list[str], *extra: str) -> list[str]:
    return run_command(output, [f"name={name}", *overrides], *extra)


def start_driver(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_driver(driver: subprocess.Popen, log: Path, timeout_s: float) -> tuple[int, str]:
    try:
        driver.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(driver)
        raise AssertionError(
            f"the study did not end within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}"
        ) from None
    return driver.returncode, log.read_text()


def run_to_the_end(
    cluster: RayCluster, address: str, output: Path, name: str, overrides: list[str], uri: str
) -> str:
    """`sbn-study run` of study `name` on `address`, tracked on the server `uri`: it must finish; its output."""
    command = driver_command(output, name, overrides, "--address", address, "--tracking-uri", uri)
    log = output.parent / f"{name}.log"
    code, text = wait_driver(start_driver(command, cluster.env, log), log, timeout_s=150)
    assert code == 0, text[-4000:]
    assert f"study '{name}' finished" in text
    return text


def wait_for(
    condition: Callable[[], Any],
    timeout_s: float,
    what: str,
    driver: subprocess.Popen | None = None,
    log: Path | None = None,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            output = log.read_text()[-4000:] if log is not None else ""
            raise AssertionError(f"the driver ended (exit {driver.returncode}) before {what}:\n{output}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def trial_runs(uri: str, experiment: str) -> list:
    """The trial runs of a study; [] while the server is unreachable or the experiment does not exist yet."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        runs = client.search_runs([found.experiment_id], max_results=1000)
    except Exception:
        return []
    return [r for r in runs if "sbn.trial_id" in r.data.tags]


def assert_one_ended_run_per_trial(uri: str, experiment: str, trials: int, epochs: int | None = None) -> list:
    """Exactly one run per trial, every run ended, and each val_acc history is 1..n with nothing missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = trial_runs(uri, experiment)
    trial_ids = [r.data.tags["sbn.trial_id"] for r in runs]
    assert len(trial_ids) == trials, trial_ids
    assert len(set(trial_ids)) == trials, f"a trial has two runs: {sorted(trial_ids)}"
    for run in runs:
        trial = run.data.tags["sbn.trial_id"]
        assert run.info.status == "FINISHED", (trial, run.info.status)
        assert run.data.tags["sbn.status"] in OK_STATUSES, (trial, run.data.tags["sbn.status"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, len(steps) + 1)), (trial, steps)
        if epochs is not None and run.data.tags["sbn.status"] == "completed":
            assert steps == list(range(1, epochs + 1)), (trial, steps)
    return runs


@pytest.fixture
def database() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL, the production setup's database server; skipped where none can start, but
    not where it must (CI sets SBN_REQUIRE_POSTGRES)."""
    try:
        with postgres() as server:
            yield server
    except PostgresUnavailable as exc:
        if os.environ.get(REQUIRE_POSTGRES_ENV):
            raise
        pytest.skip(f"no PostgreSQL for the cluster test's MLflow server: {exc}")


def assert_optuna_agrees(storage: str, name: str, runs: list) -> None:
    """The study's Optuna study in `storage` holds one finished trial per MLflow trial run, with its values."""
    import optuna

    from sbn_study.tune.search import STUDY_ATTR, TUNE_TRIAL_ID_ATTR

    (summary,) = [s for s in optuna.get_all_study_summaries(storage) if s.user_attrs.get(STUDY_ATTR) == name]
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    by_run = {r.data.tags["sbn.trial_id"]: r for r in runs}
    assert sorted(t.user_attrs[TUNE_TRIAL_ID_ATTR] for t in trials) == sorted(by_run)
    for trial in trials:
        run = by_run[trial.user_attrs[TUNE_TRIAL_ID_ATTR]]
        assert trial.state.is_finished() and trial.intermediate_values, trial
        assert trial.params == {k: type(v)(run.data.params[k]) for k, v in trial.params.items()}


def start_servers(tmp_path: Path, database: PostgresServer | None = None) -> tuple[MlflowServer, RayCluster]:
    """Starts the MLflow server's slow import while the Ray nodes come up. With `database`, the server keeps
    its runs there and every node's environment holds its password (the sampler runs on the head under
    ray://)."""
    if database is None:
        server = MlflowServer(tmp_path / "mlflow")
    else:
        server = MlflowServer(tmp_path / "mlflow", backend_uri=database.url("mlflow"), env=database.env)
    cluster = RayCluster(tmp_path / "ray")
    if database is not None:
        cluster.env.update(database.env)
    try:
        server.start(wait=False)
        cluster.start_head()
        cluster.add_node()
        server.wait_healthy()
    except BaseException:
        cluster.shutdown()
        server.stop()
        raise
    return server, cluster


def test_two_nodes_run_one_study_tracked_on_an_mlflow_server(
    tmp_path: Path, database: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, cluster = start_servers(tmp_path, database)
    try:
        nodes = cluster.nodes(2)
        # Both nodes write results that only the driver sees; a sqlite file on the head is refused up front.
        started = time.monotonic()
        refused = subprocess.run(
            driver_command(tmp_path / "local-store", "cluster-sqlite", [], "--address", cluster.address),
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "a cluster of 2 nodes needs an MLflow server" in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        assert time.monotonic() - started < 60
        assert not list((tmp_path / "local-store").glob("ray/*")), "trials started before the refusal"

        overrides = [
            "search.num_samples=4",
            "train.epochs=2",
            "resources.cpu=1",
            "search.max_concurrent=2",
            # The sampler's study in the same database server as MLflow's runs.
            f"tracking.optuna_storage={database.url('optuna')}",
        ]
        run_to_the_end(cluster, cluster.address, tmp_path / "out", "cluster-e2e", overrides, server.uri)
        runs = assert_one_ended_run_per_trial(server.uri, "cluster-e2e", trials=4, epochs=2)
        monkeypatch.setenv("PGPASSWORD", database.password)
        assert_optuna_agrees(database.url("optuna"), "cluster-e2e", runs)
        # Each node has 1 CPU and a trial takes 1: the two concurrent trials ran on different nodes.
        assert {r.data.tags["sbn.node"] for r in runs} == {n["node_id"] for n in nodes}

        # The same study through Ray Client: Tune's loop runs on the head, which cannot write to this machine's
        # sqlite store or default storage; both are refused before anything starts.
        client_output = tmp_path / "client-out"
        for name, extra, error in [
            ("client-sqlite", [], "error: tracking.uri: --address ray://"),
            ("client-storage", ["--tracking-uri", server.uri], "error: storage: --address ray://"),
        ]:
            command = driver_command(client_output, name, [], "--address", cluster.client_address, *extra)
            refused = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=60)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert error in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        storage = tmp_path / "client-storage"
        output = run_to_the_end(
            cluster,
            cluster.client_address,
            client_output,
            "client-e2e",
            [*overrides, f"storage={storage}"],
            server.uri,
        )
        # The progress lines printed on the head (no terminal there) reach this one.
        assert "4/4 trials ended" in output, output[-4000:]
        runs = assert_one_ended_run_per_trial(server.uri, "client-e2e", trials=4, epochs=2)
        assert {r.data.tags["sbn.node"] for r in runs} == {n["node_id"] for n in nodes}
        assert_optuna_agrees(database.url("optuna"), "client-e2e", runs)
        assert all("val_loss" in r.data.metrics and "train_loss" in r.data.metrics for r in runs)
        assert list(storage.glob("client-e2e-*/experiment_state-*.json"))
        # Tune's settings reached the head: its CSV/JSON loggers stayed off.
        assert not list(storage.rglob("progress.csv"))
    finally:
        cluster.shutdown()
        server.stop()


def test_a_node_leaves_and_its_trial_moves_on_from_its_checkpoint(tmp_path: Path) -> None:
    server, cluster = start_servers(tmp_path)
    driver = None
    try:
        worker_id = next(n["node_id"] for n in cluster.nodes(2) if not n["head"])
        # Every trial runs all 5 epochs (no early stopping), so the lost trial has epochs left to move.
        overrides = [
            "search.num_samples=3",
            "train.epochs=5",
            "search.scheduler.type=none",
            "resources.cpu=1",
        ]
        output = tmp_path / "out"
        command = driver_command(
            output, "node-leaves", overrides, "--address", cluster.address, "--tracking-uri", server.uri
        )
        log = tmp_path / "driver.log"
        driver = start_driver(command, cluster.env, log)

        def running_on_worker() -> list:
            runs = trial_runs(server.uri, "node-leaves")
            return [
                r
                for r in runs
                if r.data.tags.get("sbn.node") == worker_id and r.data.tags.get("sbn.status") == "running"
            ]

        moved = wait_for(running_on_worker, 120, "a result from a trial on the worker node", driver, log)[0]
        moved_trial = moved.data.tags["sbn.trial_id"]
        cluster.kill_node(cluster.workers[0])

        code, text = wait_driver(driver, log, timeout_s=180)
        assert code == 0, text[-4000:]
        runs = assert_one_ended_run_per_trial(server.uri, "node-leaves", trials=3, epochs=5)
        assert {r.data.tags["sbn.status"] for r in runs} == {"completed"}
        # Tune saw the trial fail with its node, and restored it from a checkpoint instead of starting over.
        state = tune_trial_state(output, moved_trial)
        assert state["num_failures"] >= 1, state["num_failures"]
        last = state["last_result"]
        assert last["iterations_since_restore"] < last["training_iteration"], last
    finally:
        if driver is not None:
            kill_tree(driver)
        cluster.shutdown()
        server.stop()


def test_ray_client_study_stopped_with_ctrl_c_resumes_on_the_cluster(tmp_path: Path) -> None:
    server, cluster = start_servers(tmp_path)
    driver = None
    try:
        # One trial per node, each stopped midway and continued by --resume from its own file in `storage:`.
        overrides = [
            "search.num_samples=2",
            "train.epochs=3",
            "search.scheduler.type=none",
            "resources.cpu=1",
            f"storage={tmp_path / 'storage'}",
        ]
        command = driver_command(
            tmp_path / "out",
            "client-resume",
            overrides,
            "--address",
            cluster.client_address,
            "--tracking-uri",
            server.uri,
        )
        log = tmp_path / "driver.log"
        driver = start_driver(command, cluster.env, log)

        def a_result() -> bool:
            return any("val_acc" in r.data.metrics for r in trial_runs(server.uri, "client-resume"))

        wait_for(a_result, 120, "a first trial result", driver, log)
        # Ctrl-C reaches only this machine; ending the Ray Client session ends Tune's loop on the head as a
        # killed driver would end it, at whatever instant it was in.
        driver.send_signal(signal.SIGINT)
        code, output = wait_driver(driver, log, timeout_s=60)
        assert code == 130, output[-4000:]
        assert "study 'client-resume' interrupted" in output

        # Tune restores on the head, from the storage only the cluster is meant to read.
        log = tmp_path / "resume.log"
        driver = start_driver([*command, "--resume"], cluster.env, log)
        code, output = wait_driver(driver, log, timeout_s=150)
        assert code == 0, output[-4000:]
        assert "study 'client-resume' finished: 2 completed" in output
        assert "Traceback" not in output
        assert_one_ended_run_per_trial(server.uri, "client-resume", trials=2, epochs=3)
    finally:
        if driver is not None:
            kill_tree(driver)
        cluster.shutdown()
        server.stop()


def test_tracking_server_outage_mid_study_loses_no_metric(tmp_path: Path) -> None:
    # The embedded local Ray of the driver is enough here: what goes away is the tracking server.
    env = cluster_env("outage-test-token")
    overrides = ["search.num_samples=4", "train.epochs=5", "search.scheduler.type=none"]
    output = tmp_path / "out"
    log = tmp_path / "driver.log"
    driver = None
    with mlflow_server(tmp_path / "mlflow") as server:
        try:
            command = driver_command(
                output, "outage", overrides, "--num-cpus", "2", "--tracking-uri", server.uri
            )
            driver = start_driver(command, env, log)

            def a_result() -> bool:
                return any("val_acc" in r.data.metrics for r in trial_runs(server.uri, "outage"))

            wait_for(a_result, 120, "a first trial result", driver, log)
            server.stop(signal.SIGKILL)  # a crash: no goodbye to open connections
            down = time.time()
            time.sleep(10)
            # Still running (training, or flushing its buffered writes at the end): not crashed.
            assert driver.poll() is None, (
                f"the driver ended while the server was away:\n{log.read_text()[-4000:]}"
            )
            up = time.time()
            server.start()

            code, text = wait_driver(driver, log, timeout_s=150)
        finally:
            if driver is not None:
                kill_tree(driver)
        assert code == 0, text[-4000:]
        assert "Traceback" not in text
        runs = assert_one_ended_run_per_trial(server.uri, "outage", trials=4, epochs=5)
        assert {r.data.tags["sbn.status"] for r in runs} == {"completed"}

        # Results that arrived while the server was away were buffered and written later (a metric's timestamp
        # is taken when the driver receives the result).
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        stamps = [
            m.timestamp / 1000 for r in runs for m in client.get_metric_history(r.info.run_id, "val_acc")
        ]
        assert any(down <= stamp <= up for stamp in stamps), "no result arrived during the outage"
    assert not list((output / "studies").glob("*.unsent.jsonl"))
    state = json.loads((output / "studies" / "outage.json").read_text())
    assert state["status"] == "finished" and state["unsent_writes"] == 0
