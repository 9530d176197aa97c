"""Hostile input and a hostile machine: credentials in odd places, a full disk, a damaged state file, a changed
spec on resume, a store that stops taking writes, a second driver, SIGTERM, an unreachable server, numbers
outside their domain. Each ends in one line that says what to do, or in the right behaviour. None needs Ray:
tests/test_hostile_driver.py runs a real driver through SIGTERM, a full disk and credentials.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sbn_study import cli
from sbn_study.errors import UserError
from sbn_study.spec import load_spec
from sbn_study.store.uri import check_reachable, redact_uri, resolve_tracking_uri
from sbn_study.study.lifecycle import RunOptions, Study, study_artifacts
from sbn_study.study.state import StudyState, state_path, unsent_path
from tests.conftest import QUICKSTART, REPO, SMALL_STUDY_OVERRIDES
from tests.servers import free_port

# A password with every character that ends a URI's user info for a parser: `/`, `?`, `#` and `@`.
SECRET = "s3cr/et?x#y@z"
NAME = "e2e-small"


def sbn_study(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sbn_study.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def assert_one_error_line(stderr: str, *parts: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(part in lines[0] for part in parts), (parts, lines[0])


# --- credentials ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("password", [SECRET, "p@ss", "a/b+c", "q?r", "h#i", "pct%2Fencoded", "x:y:z"])
def test_redaction_drops_passwords_whatever_they_hold(password: str) -> None:
    text = f"tracking:\n  uri: 'http://alice:{password}@mlflow.example.com:5000/x'\nstorage: s3://KEY:{password}@b/sbn\n"
    redacted = redact_uri(text)
    assert password not in redacted and "alice" not in redacted, redacted
    assert "'http://mlflow.example.com:5000/x'" in redacted and "s3://b/sbn" in redacted, redacted


def test_credentials_in_the_spec_reach_neither_artifacts_nor_what_tune_pickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)  # restored after the test: the study sets them
    with health_server(("alice", SECRET)) as port:
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
        spec = load_spec(QUICKSTART, [f"tracking.uri={uri}"])
        study = Study(spec, f"tracking: {{uri: '{uri}'}}\n", RunOptions(output=tmp_path))
    # The trials' parameters and the callbacks carry the spec, the callbacks the store's URI.
    pickled = pickle.dumps((study.spec, study.uri))
    assert SECRET.encode() not in pickled and b"alice" not in pickled
    assert study.uri == f"http://127.0.0.1:{port}"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "alice",
        SECRET,
    )
    assert all(SECRET not in text for text in study_artifacts(study.spec, study.spec_text).values())


def test_a_database_uri_password_stays_out_of_tunes_pickle_and_the_restored_callback_writes_with_it(
    tmp_path: Path,
) -> None:
    from sbn_study.store.writer import RecordHandle
    from sbn_study.tune.callbacks import TrackingCallback

    uri = f"postgresql://alice:{SECRET.replace('/', '%2F')}@db.example.com:5432/mlflow"
    spec = load_spec(QUICKSTART)
    # The driver reopens the record with its credentialed URI before Tune restores its pickled callbacks.
    handle = RecordHandle(uri, "1", "parent", tmp_path / "unsent.jsonl")
    pickled = pickle.dumps(TrackingCallback(spec, handle))
    assert b"alice" not in pickled and b"s3cr" not in pickled
    restored = pickle.loads(pickled).record
    assert restored == handle and restored.uri == uri  # the same record, so the same (one) writer
    # In a process that never saw the credentials the handle names the store without them.
    child = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).record.uri)"],
        input=pickled,
        capture_output=True,
        check=True,
    )
    assert child.stdout.decode().strip() == "postgresql://db.example.com:5432/mlflow"


@contextlib.contextmanager
def health_server(credentials: tuple[str, str]) -> Iterator[int]:
    """An HTTP server on loopback whose /health answers 200 to these basic-auth credentials alone (any request
    without them: 401); yields its port."""
    expected = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/health" and self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def test_the_health_check_sends_the_credentials_mlflow_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    with health_server(("alice", SECRET)) as port:
        check_reachable(f"http://alice:{SECRET}@127.0.0.1:{port}")
        check_reachable(f"http://alice:s3cr%2Fet%3Fx%23y%40z@127.0.0.1:{port}/")  # percent-encoded: the same
        with pytest.raises(
            UserError, match=r"cannot reach the MLflow server at http://127.0.0.1:\d+ \(Unauth"
        ):
            check_reachable(f"http://alice:wrong@127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
        check_reachable(f"http://127.0.0.1:{port}")


def test_ui_hands_the_store_to_mlflow_through_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: calls.append((command, env)) or 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cli.main(["ui", "--tracking-uri", uri]) == 0
    [(command, env)] = calls
    assert not any(uri in word for word in command), command  # a database password would show in `ps`
    assert env["MLFLOW_BACKEND_STORE_URI"] == uri


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "spec.yaml", "--num-cpus", "0"],
        ["run", "spec.yaml", "--num-cpus", "-2"],
        ["ui", "--port", "0"],
        ["ui", "--port", "70000"],
        ["report", "s", "--top", "-1"],
        ["report", "s", "--top", "0"],
        ["export", "s", "--top-k", "0"],
        ["train", "c.yaml", "--seeds", "0,-1"],
        ["train", "c.yaml", "--seeds", "4294967296"],
        ["train", "c.yaml", "--cpus-per-seed", "inf"],
        ["train", "c.yaml", "--cpus-per-seed", "0"],
        ["train", "c.yaml", "--cpus-per-seed", "nan"],
        ["train", "c.yaml", "--gpus-per-seed", "-0.5"],
        ["train", "c.yaml", "--gpus-per-seed", "inf"],
    ],
)
def test_numbers_outside_their_domain_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(argv)
    assert caught.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    option = next(word for word in argv if word.startswith("--"))
    assert f"error: argument {option}: expected " in last, last


@pytest.mark.parametrize("uri", ["foo://x", "s3://bucket/mlflow", "mysqlx://h/db"])
def test_a_tracking_uri_of_no_store_is_refused_listing_those_there_are(uri: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        resolve_tracking_uri(uri, None, tmp_path)
    assert str(caught.value).startswith(f"--tracking-uri: MLflow keeps no runs at {uri}: a tracking URI is")
    assert "sqlite, postgresql, mysql, mssql" in str(caught.value) and "http, https" in str(caught.value)
    done = sbn_study("report", "s", "--tracking-uri", uri, "--output", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert_one_error_line(done.stderr, "MLflow keeps no runs at")


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server); yields the port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("command", ["report", "export"])
def test_report_and_export_refuse_a_server_that_does_not_answer_in_seconds(
    command: str, tmp_path: Path
) -> None:
    with silent_server() as hung:
        for port in (hung, free_port()):  # hung, then nothing listening
            start = time.monotonic()
            done = sbn_study(command, "s", "--tracking-uri", f"http://127.0.0.1:{port}", timeout=60)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
            assert_one_error_line(done.stderr, f"cannot reach the MLflow server at http://127.0.0.1:{port}")
            assert time.monotonic() - start < 30


# --- the study's state file -------------------------------------------------------------------------------


def started_state(output: Path, spec: Any) -> StudyState:
    """The state a study of `spec` in `output` saved when it started, as `Study` makes it."""
    study = Study(spec, "", RunOptions(output=output))
    state = StudyState("interrupted", "parent", "0", str(output / "ray" / "x"), redact_uri(study.uri))
    state.spec = study.trials_spec
    state.save(state_path(study.output, spec.name))
    return state


@pytest.mark.parametrize(
    "content", ['{"status": "running", "parent_run_id": "ab', "", "[1, 2]", '{"status": "paused"}', "\udcff"]
)
def test_a_damaged_state_file_is_one_line_that_says_what_to_do(
    content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = state_path(tmp_path, NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode(errors="surrogateescape"))
    for resume in ([], ["--resume"]):
        code = cli.main(["run", str(QUICKSTART), "--set", f"name={NAME}", "--output", str(tmp_path), *resume])
        err = capsys.readouterr().err
        assert code == 2, err
        assert_one_error_line(err, f"the study's state file {path} is damaged (", "--resume", "delete it")


def test_resume_refuses_a_spec_that_defines_other_trials_naming_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    started = started_state(tmp_path, load_spec(QUICKSTART, SMALL_STUDY_OVERRIDES))
    same = Study(load_spec(QUICKSTART, SMALL_STUDY_OVERRIDES), "", RunOptions(output=tmp_path, resume=True))
    assert same.previous == started
    changed = [
        "model.width=4",
        "search.space.train.lr={loguniform: [0.001, 0.01]}",
        "search.num_samples=60",
        "storage=/elsewhere",  # where Tune's state is: the state's own folder decides
    ]
    with pytest.raises(UserError) as caught:
        Study(
            load_spec(QUICKSTART, SMALL_STUDY_OVERRIDES + changed),
            "",
            RunOptions(output=tmp_path, resume=True),
        )
    assert str(caught.value) == (
        f"--resume: the spec differs from the one study '{NAME}' started with in model.width, "
        "search.num_samples, search.space.train.lr; resume with the same spec and --set overrides, or run the "
        "new one as another study (its own name), search.num_samples included"
    )
    with pytest.raises(UserError, match=r"--resume: study 'e2e-small' is recorded in sqlite:///.*, not in"):
        Study(
            load_spec(QUICKSTART, SMALL_STUDY_OVERRIDES),
            "",
            RunOptions(output=tmp_path, resume=True, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}"),
        )


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder`: a real file system that fills up, where writes fail with ENOSPC
    as on a full disk."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            "mount -t tmpfs is not permitted on this machine (the full-disk case needs a small real file system): "
            + mounted.stderr.decode().strip()
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "full", "1m") as folder:
        yield folder


def fill(folder: Path, leave: int = 0) -> None:
    """Fills `folder`'s file system with one file until at most `leave` bytes are free (0: a write fails)."""
    with (folder / "filler").open("ab", buffering=0) as file:
        for size in (2**16, 2**10, 1):
            with contextlib.suppress(OSError):
                while shutil.disk_usage(folder).free > leave:
                    file.write(b"\0" * size)


def test_a_full_disk_never_leaves_a_broken_state_or_unsent_file(full_disk: Path) -> None:
    from sbn_study.store.writer import RecordHandle, RunWriter

    saved = '{"operation": "end", "run_id": "parent", "status": "KILLED"}\n'
    handle = RecordHandle("sqlite:////nonexistent/mlflow.db", "0", "parent", unsent_path(full_disk, NAME))
    handle.unsent_path.parent.mkdir()
    handle.unsent_path.write_text(saved)
    writer = RunWriter(handle)
    writer.client = unreachable_client()
    writer.log_parent_metrics({f"metric{i}": float(i) for i in range(20000)})  # one line of about 500 KB
    fill(full_disk, leave=2**17)
    with pytest.raises(
        UserError, match=r"--output: cannot save 1 MLflow writes .* \(No space left on device\)"
    ):
        writer.save_unsent()
    assert handle.unsent_path.read_text() == saved  # not a line cut short, which no replay reads

    path = state_path(full_disk, NAME)
    before = StudyState("running", "parent", "0", "/ray/x", "sqlite:////x.db")
    before.save(path)
    fill(full_disk)
    with pytest.raises(
        UserError, match=r"--output: cannot save the study's state to .* \(No space left on dev"
    ):
        StudyState("finished", "parent", "0", "/ray/x", "sqlite:////x.db").save(path)
    assert StudyState.load(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{NAME}.json", f"{NAME}.unsent.jsonl"]


def unreachable_client() -> Any:
    class Away:
        def __getattr__(self, name: str) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                raise ConnectionError("tracking server away")

            return call

    return Away()


# --- saved writes, the lock -------------------------------------------------------------------------------


def test_saved_writes_are_sent_in_order_and_sending_them_twice_does_no_harm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from sbn_study.store.record import StudyRecord
    from sbn_study.store.runs import ensure_experiment

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, NAME, tmp_path / "artifacts")
    record = StudyRecord.start(
        uri, experiment_id, "parent", {"sbn.kind": "study"}, unsent_path(tmp_path, NAME)
    )
    state = StudyState("finished", record.handle.parent_run_id, experiment_id, str(tmp_path / "ray"), uri)
    state.save(state_path(tmp_path, NAME))
    # The store stops taking writes mid-study: a trial opened then, its epochs, its end and the study's end.
    writer = record.writer()
    writer.client = unreachable_client()
    writer.trial_run("t1", "t1", {"model.arch": "tiny"}, "model: {arch: tiny}\n", {})
    for epoch in (1, 2, 3):
        writer.log_metrics("t1", {"val_acc": epoch / 10}, epoch)
    writer.finish_trial("t1", "completed")
    writer.end_parent("FINISHED")
    assert writer.save_unsent() == 8
    saved = record.handle.unsent_path.read_text()

    client = MlflowClient(uri)
    assert client.get_run(record.handle.parent_run_id).info.status == "RUNNING"
    for attempt in range(2):  # the second: as after a replay cut short, every line again
        record.handle.unsent_path.write_text(saved)
        assert cli.main(["replay", NAME, "--output", str(tmp_path)]) == 0
        assert capsys.readouterr().out == f"sent 8 saved MLflow writes of study '{NAME}' to {uri}\n", attempt
        assert not record.handle.unsent_path.exists()
        [run] = [r for r in client.search_runs([experiment_id]) if "sbn.trial_id" in r.data.tags]
        assert (run.info.status, run.data.tags["sbn.status"]) == ("FINISHED", "completed")
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc")] == [
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
        ]
        assert client.get_run(record.handle.parent_run_id).info.status == "FINISHED"
    assert cli.main(["replay", NAME, "--output", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"study '{NAME}' has no saved MLflow writes in {tmp_path.resolve()}\n"


HOLD = """
import sys, time
from pathlib import Path
from sbn_study.study.state import hold_study
with hold_study(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_driver_of_a_study_that_runs_is_refused_naming_the_pid(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), NAME], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        # An unreachable store too: what a driver that took no lock would stop at first.
        for args in (
            ["run", str(QUICKSTART), "--set", f"name={NAME}", "--tracking-uri", "http://127.0.0.1:9"],
            ["run", str(QUICKSTART), "--set", f"name={NAME}", "--resume"],
            ["replay", NAME],
        ):
            done = sbn_study(*args, "--output", str(tmp_path))
            assert done.returncode == 2, done.stderr
            assert_one_error_line(
                done.stderr, f"study '{NAME}' is running in {tmp_path.resolve()} (pid {holder.pid})"
            )
    finally:
        holder.kill()
        holder.wait()


# --- SIGTERM ----------------------------------------------------------------------------------------------

TERMINATE_DURING = """
import os, signal, sys, time
import sbn_study.spec
def load_spec(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
sbn_study.spec.load_spec = load_spec
from sbn_study import cli
sys.exit(cli.main(["validate", "spec.yaml"]))
"""


def test_sigterm_stops_a_command_as_ctrl_c_does_with_exit_143() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TERMINATE_DURING], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert (done.returncode, done.stderr) == (
        143,
        "sbn-study: terminated (SIGTERM); stopped as after Ctrl-C\n",
    )


def test_a_sigterm_sent_again_is_the_same_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # `timeout` and a process-group kill send it to the driver twice; two requests would be two Ctrl-Cs.
    from sbn_study.study import stopping

    interrupts: list[int] = []
    monkeypatch.setattr(stopping.os, "kill", lambda pid, sig: interrupts.append(sig))
    with stopping.sigterm_stops_like_ctrl_c():
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)
        assert interrupts == [signal.SIGINT] and stopping.requested() == stopping.TERMINATED


def test_a_watched_ray_process_that_ends_closes_the_study_once_with_the_reason() -> None:
    import threading

    from sbn_study.study import stopping

    raylet = subprocess.Popen(["sleep", "60"])  # not reaped: an ended child stays a zombie, as Ray's do
    closed = threading.Event()
    with stopping.sigterm_stops_like_ctrl_c():  # a fresh reason
        with stopping.close_when_ray_is_lost({"raylet": raylet.pid}, closed.set, poll_s=0.05):
            time.sleep(0.3)
            assert not closed.is_set()
            os.kill(raylet.pid, signal.SIGKILL)
            assert closed.wait(10)
        assert stopping.requested() == stopping.Stop(
            "error: the embedded Ray's raylet process ended under the study: every run is closed; continue "
            "the study with --resume",
            1,
        )
    raylet.wait()


def test_starting_ray_keeps_the_callers_sigterm_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from sbn_study.study.cluster import ClusterTarget, start_ray

    def ray_init(**kwargs: Any) -> None:  # what ray.init does to SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)

    def handler(*_: Any) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert start_ray(ClusterTarget(num_cpus=1))
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
