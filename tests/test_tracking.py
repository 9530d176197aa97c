"""A study's MLflow record on a real sqlite store (no Ray): its one writer thread keeps order, never makes the
caller wait on the store, and loses nothing while the store is away; the driver and the Tune callback share it."""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sbn_study import protocol
from sbn_study.errors import UserError
from sbn_study.spec import load_spec
from sbn_study.store import uri as uri_rules
from sbn_study.store import writer as writing
from sbn_study.store.record import StudyRecord
from sbn_study.store.runs import ensure_experiment
from sbn_study.store.writer import STAND_IN_PREFIX, RunWriter
from sbn_study.tune.callbacks import TrackingCallback, progress_metrics
from tests.conftest import QUICKSTART

# Far below what one sqlite write costs, far above what appending to a queue costs.
APPEND_BOUND_S = 0.05


class GatedClient:
    """An MlflowClient whose calls can be held at a gate or made to fail, as a slow or vanished server would."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()  # set by a call that reached the gate
        self.failing = False
        self.failures = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            self.open.wait()
            if self.failing:
                self.failures += 1
                raise ConnectionError("tracking server away")
            return method(*args, **kwargs)

        return call


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One sqlite store for the module (creating one takes seconds); each test has a parent run of its own."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, ensure_experiment(uri, "tracking-test", folder / "artifacts")


def start_record(store: tuple[str, str], tmp_path: Path) -> StudyRecord:
    uri, experiment_id = store
    tags = {"sbn.study": "tracking-test", "sbn.kind": "study"}
    return StudyRecord.start(uri, experiment_id, "parent", tags, tmp_path / "unsent.jsonl")


def open_writer(store: tuple[str, str], tmp_path: Path) -> tuple[RunWriter, GatedClient]:
    """The writer of a new record, its client gated: what the record and a callback set up later use."""
    writer = start_record(store, tmp_path).writer()
    gated = GatedClient(writer.client)
    writer.client = gated
    return writer, gated


def open_trial(writer: RunWriter, trial_id: str) -> str:
    return writer.trial_run(trial_id, trial_id, {"model.arch": "tiny"}, "model: {arch: tiny}\n", {})


def tune_trial(trial_id: str, config: dict[str, Any] | None = None, **runtime: Any) -> SimpleNamespace:
    """What the callback reads of a Tune trial: its id, sampled config, tag (its number first) and results."""
    return SimpleNamespace(
        trial_id=trial_id, config=config or {}, experiment_tag="1_", metric_analysis={}, **runtime
    )


def callback_for(writer: RunWriter) -> TrackingCallback:
    """The Tune callback of the quick-start study on `writer`'s record, set up as Tune sets it up."""
    callback = TrackingCallback(load_spec(QUICKSTART), writer.handle)
    callback.setup()
    return callback


def steps_and_values(writer: RunWriter, trial_id: str, metric: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    run_id = writer.run_id(trial_id)
    assert run_id is not None
    history = MlflowClient(writer.handle.uri).get_metric_history(run_id, metric)
    return sorted((m.step, m.value) for m in history)


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def test_results_arrive_in_order_with_their_steps(store: tuple[str, str], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    writer, _ = open_writer(store, tmp_path)
    assert not open_trial(writer, "a").startswith(STAND_IN_PREFIX)  # a healthy store: sent before returning
    open_trial(writer, "b")
    for step in range(1, 21):
        for trial_id, offset in (("a", 0.0), ("b", 100.0)):
            writer.log_metrics(trial_id, {"val_acc": offset + step, "epoch_time_s": 1.0}, step)
    writer.set_tags("a", {"sbn.node": "n1"})
    writer.finish_trial("a", "completed")
    StudyRecord(writer.handle).finish("FINISHED")

    assert writer.pending == 0
    assert steps_and_values(writer, "a", "val_acc") == [(s, float(s)) for s in range(1, 21)]
    assert steps_and_values(writer, "b", "val_acc") == [(s, 100.0 + s) for s in range(1, 21)]
    client = MlflowClient(writer.handle.uri)
    a, b = (client.get_run(writer.run_id(t) or "") for t in ("a", "b"))
    assert a.data.tags["sbn.node"] == "n1" and a.data.tags["sbn.status"] == "completed"
    assert (a.info.status, b.info.status) == ("FINISHED", "KILLED")  # b was still open when the study ended
    assert client.get_run(writer.handle.parent_run_id).info.status == "FINISHED"
    assert not writer._thread or not writer._thread.is_alive()
    assert not writer.handle.has_active_writer()


def test_a_trial_found_again_knows_its_last_step(store: tuple[str, str], tmp_path: Path) -> None:
    writer, _ = open_writer(store, tmp_path)
    open_trial(writer, "a")
    for step in (1, 2, 3):
        writer.log_metrics("a", {"epoch_time_s": 1.0}, step)
    assert writer.flush(deadline_s=10.0)
    writer.close()

    resumed = writer.handle.writer()
    assert resumed is not writer  # a closed writer is never handed out again
    assert open_trial(resumed, "a") == writer.run_id("a")
    assert resumed.last_step("a") == 3
    resumed.close()


def test_logging_returns_without_waiting_on_the_store(store: tuple[str, str], tmp_path: Path) -> None:
    writer, gated = open_writer(store, tmp_path)
    open_trial(writer, "a")
    gated.open.clear()
    gated.entered.clear()
    writer.log_metrics("a", {"val_acc": 1.0}, 1)
    assert gated.entered.wait(timeout=10), "the writer never started sending"
    # The writer is now held inside the store: the caller's next results only append.
    waits = [
        timed(lambda step=step: writer.log_metrics("a", {"val_acc": float(step)}, step)) for step in (2, 3)
    ]
    assert max(waits) < APPEND_BOUND_S, waits
    assert writer.pending == 3
    assert not writer.flush(deadline_s=0.2)  # still held

    gated.open.set()
    assert writer.flush(deadline_s=10.0)
    assert steps_and_values(writer, "a", "val_acc") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    writer.close()


def test_a_store_that_fails_then_recovers_loses_nothing(store: tuple[str, str], tmp_path: Path) -> None:
    writer, gated = open_writer(store, tmp_path)
    open_trial(writer, "a")
    gated.failing = True
    writer.log_metrics("a", {"val_acc": 1.0}, 1)
    assert not writer.flush(deadline_s=1.5)  # retried meanwhile, and failed
    assert gated.failures >= 2
    # The store is known to be away: a new trial starts at once under a stand-in id, results only queue.
    opened = []
    assert timed(lambda: opened.append(open_trial(writer, "b"))) < APPEND_BOUND_S
    assert opened == [f"{STAND_IN_PREFIX}b"]
    for step in (2, 3):
        assert (
            timed(lambda step=step: writer.log_metrics("a", {"val_acc": float(step)}, step)) < APPEND_BOUND_S
        )
        writer.log_metrics("b", {"val_acc": 10.0 + step}, step)
    assert writer.pending == 6

    gated.failing = False
    assert writer.flush(deadline_s=10.0)
    assert steps_and_values(writer, "a", "val_acc") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert steps_and_values(writer, "b", "val_acc") == [(2, 12.0), (3, 13.0)]
    assert StudyRecord(writer.handle).finish("FINISHED") == 0
    assert not writer.handle.unsent_path.exists()


def test_what_a_store_never_took_is_saved_in_order_and_not_sent_later(
    store: tuple[str, str], tmp_path: Path
) -> None:
    writer, gated = open_writer(store, tmp_path)
    open_trial(writer, "a")
    gated.failing = True
    for step in (1, 2):
        writer.log_metrics("a", {"val_acc": float(step)}, step)
    writer.finish_trial("a", "error")
    assert not writer.flush(deadline_s=0.5)
    assert writer.save_unsent() == 4
    assert writer.pending == 0
    lines = [json.loads(line) for line in writer.handle.unsent_path.read_text().splitlines()]
    assert [(line["operation"], line.get("step")) for line in lines] == [
        ("metrics", 1),
        ("metrics", 2),
        ("tags", None),
        ("end", None),
    ]
    gated.failing = False
    time.sleep(writing.FLUSH_RETRY_S + 0.5)  # past the next retry, had the writer not been stopped
    assert steps_and_values(writer, "a", "val_acc") == []
    assert writer.save_unsent() == 0  # nothing is saved twice
    assert len(writer.handle.unsent_path.read_text().splitlines()) == 4
    assert StudyRecord(writer.handle).unsent_writes() == 4


def test_the_callback_pickles_with_a_live_writer(store: tuple[str, str], tmp_path: Path) -> None:
    writer, _ = open_writer(store, tmp_path)
    callback = callback_for(writer)
    open_trial(callback.writer, "a")
    callback.writer.log_metrics("a", {"val_acc": 1.0}, 1)
    restored = pickle.loads(pickle.dumps(callback))
    assert restored._writer is None and restored.record == writer.handle
    callback.on_experiment_end([])
    assert callback.writer.pending == 0
    writer.close()


def test_a_resumed_trial_replays_what_a_killed_driver_never_logged(
    store: tuple[str, str], tmp_path: Path
) -> None:
    writer, _ = open_writer(store, tmp_path)
    callback = callback_for(writer)
    trial = tune_trial("a", {"train.lr": 0.05})
    history = [{"epoch": 0.0, "fm/bn1/norm": 9.0}] + [
        {"epoch": float(e), "val_acc": e / 10, "epoch_time_s": 1.0} for e in (1, 2, 3)
    ]
    callback.on_trial_start(0, [], trial)
    for entry in history[1:3]:  # epoch 0's statistics travel with epoch 1's result
        result = {**entry, "node_id": "n1"}
        if entry["epoch"] == 1:
            result[protocol.INITIAL_FEATURES_KEY] = history[0]
        callback.on_trial_result(0, [], trial, result)
    callback.on_experiment_end([])
    # Epoch 3 was reported and checkpointed, but the driver was killed before its write was sent.

    resumed = pickle.loads(pickle.dumps(callback))
    resumed.setup()
    resumed.on_trial_start(0, [], trial)
    replayed = {"epoch": 4.0, "val_acc": 0.4, "epoch_time_s": 1.0, protocol.REPLAY_KEY: history}
    resumed.on_trial_result(0, [], trial, replayed)
    resumed.on_experiment_end([])

    assert steps_and_values(resumed.writer, "a", "val_acc") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert steps_and_values(resumed.writer, "a", "fm/bn1/norm") == [(0, 9.0)]
    writer.close()


def test_a_trial_that_ends_is_in_the_store_before_tune_moves_on(
    store: tuple[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    writer, gated = open_writer(store, tmp_path)
    callback = callback_for(writer)
    budget = callback.spec.max_budget
    trial = tune_trial("a", last_result={"epoch": budget, "val_acc": 0.5})
    callback.on_trial_start(0, [], trial)
    # The store answers, slowly: the trial's end holds Tune's loop until it is written (the study is killable
    # right after: Tune then saves the trial as ended, and a resume never runs it again).
    gated.open.clear()
    threading.Timer(0.3, gated.open.set).start()
    assert timed(lambda: callback.on_trial_complete(0, [], trial)) >= 0.3
    run = MlflowClient(writer.handle.uri).get_run(writer.run_id("a") or "")
    assert (run.info.status, run.data.tags["sbn.status"]) == ("FINISHED", "completed")

    # The store is away: the end is queued and the loop goes on.
    other = tune_trial("b", last_result={"epoch": 1, "val_acc": 0.1})
    callback.on_trial_start(0, [], other)
    gated.failing = True
    assert timed(lambda: callback.on_trial_error(0, [], other)) < 2 * writing.FLUSH_RETRY_S
    assert writer.pending > 0
    writer.close()


def test_the_driver_and_the_callback_share_one_writer(store: tuple[str, str], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    record = start_record(store, tmp_path)
    record.log_artifacts({"spec.yaml": "name: x\n"})  # no writer yet: sent directly
    callback = TrackingCallback(load_spec(QUICKSTART), record.handle)
    callback.setup()
    assert record.writer() is callback.writer  # never a second thread on the same runs
    callback.on_trial_start(0, [], tune_trial("a"))
    # While it is active, the driver can only go through it.
    with pytest.raises(RuntimeError, match="writer is active"):
        record.trial_runs()
    with pytest.raises(RuntimeError, match="writer is active"):
        record.log_artifacts({"resolved.yaml": ""})

    callback.on_experiment_end([])  # stops the callback's writer: the driver ends the record with a new one
    assert not record.handle.has_active_writer()
    assert record.finish("KILLED") == 0
    assert record.trial_statuses() == {"a": "killed"}
    client = MlflowClient(record.handle.uri)
    assert client.get_run(callback.writer.run_id("a") or "").info.status == "KILLED"
    assert client.get_run(record.handle.parent_run_id).info.status == "KILLED"

    StudyRecord.resume(record.handle)
    assert client.get_run(record.handle.parent_run_id).info.status == "RUNNING"


def test_the_parent_run_describes_the_study_and_counts_its_trials_as_they_end(
    store: tuple[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from sbn_study.store import ui

    writer, _ = open_writer(store, tmp_path)
    callback = callback_for(writer)
    budget = callback.spec.max_budget

    def ended(trial_id: str, epoch: int, best: float, **result: Any) -> SimpleNamespace:
        trial = tune_trial(trial_id, status="RUNNING", last_result={"epoch": epoch, **result})
        trial.metric_analysis = {"val_acc": {"max": best, "min": 0.0}}
        return trial

    # Ended before a resume: Tune's saved state says so; this process never saw it end.
    restored = ended("restored", budget, 0.9)
    restored.status = "TERMINATED"
    full, short = ended("full", budget, 0.6), ended("short", 2, 0.7)
    diverged = ended("diverged", 1, float("-inf"), diverged=True)
    running = tune_trial("running", status="RUNNING", last_result={"epoch": 1})
    trials = [restored, full, short, diverged, running]
    for trial in trials[1:]:
        callback.on_trial_start(0, trials, trial)
    for trial in (short, full, diverged):
        callback.on_trial_complete(0, trials, trial)
    callback.on_experiment_end(trials)

    client = MlflowClient(writer.handle.uri)
    parent = writer.handle.parent_run_id

    def history(metric: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(parent, metric)]

    assert history(ui.TRIALS_FINISHED) == [(2, 2.0), (3, 3.0), (4, 4.0)]
    assert history(ui.best_so_far("val_acc")) == [(2, 0.9), (3, 0.9), (4, 0.9)]  # diverged: not a value
    assert history(ui.trials_with_status("completed"))[-1] == (4, 2.0)
    assert history(ui.trials_with_status("diverged"))[-1] == (4, 1.0)
    note = client.get_run(parent).data.tags[ui.NOTE_TAG]
    assert note.startswith("# Study `sbn-quickstart`") and "The study is running" in note
    tags = client.get_experiment(writer.handle.experiment_id).tags
    assert tags[ui.EXPERIMENT_KIND_TAG] == ui.MODEL_TRAINING
    assert json.loads(tags[ui.VIEW_TAG])["orderByKey"] == "metrics.`val_acc`"
    writer.close()


@pytest.mark.parametrize("mode", ["max", "min"])
def test_an_extensions_progress_adds_to_the_executions_it_extends(mode: str) -> None:
    from sbn_study.store import ui

    spec = load_spec(QUICKSTART, [f"search.mode={mode}"])
    earlier = progress_metrics(spec, ["completed", "stopped_early", "completed", "error"], [0.4])
    assert earlier[ui.trials_with_status("completed")] == 2 and earlier[ui.trials_with_status("error")] == 1
    now = progress_metrics(spec, ["completed", "diverged"], [0.3, 0.5], earlier)
    expected = {"completed": 3, "stopped_early": 1, "diverged": 1, "error": 1}
    assert {status: now[ui.trials_with_status(status)] for status in expected} == expected
    assert now[ui.best_so_far("val_acc")] == (0.5 if mode == "max" else 0.3)
    # Nothing ranked in this execution yet: the best stays the earlier one.
    assert progress_metrics(spec, ["error"], [], earlier)[ui.best_so_far("val_acc")] == 0.4
    assert ui.best_so_far("val_acc") not in progress_metrics(spec, ["error"], [])


def test_runs_of_trials_a_resume_does_not_know_are_ended_and_deleted(
    store: tuple[str, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    record = start_record(store, tmp_path)
    writer = record.writer()
    for trial_id in ("known", "forgotten"):
        open_trial(writer, trial_id)
    writer.finish_trial("known", "completed")
    assert writer.flush(deadline_s=10.0)
    writer.close()
    forgotten = writer.run_id("forgotten") or ""

    assert record.drop_trials_except({"known"}) == 1
    assert record.trial_statuses() == {"known": "completed"}
    client = MlflowClient(record.handle.uri)
    run = client.get_run(forgotten)
    assert (run.info.lifecycle_stage, run.info.status, run.data.tags["sbn.status"]) == (
        "deleted",
        "KILLED",
        "killed",
    )


@pytest.mark.parametrize("uri", ["./mlruns", "/data/mlruns", "file:///data/mlruns", "C:\\mlruns"])
def test_a_plain_folder_store_is_refused_naming_where_it_came_from(
    uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = (
        "MLflow does not keep runs in a plain folder; give a database (sqlite:///PATH/mlflow.db) or a server "
        f"(http://HOST:5000), got {uri}"
    )
    with pytest.raises(UserError) as caught:
        uri_rules.resolve_tracking_uri(None, uri, tmp_path)
    assert str(caught.value) == f"tracking.uri: {expected}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError) as caught:
        uri_rules.resolve_tracking_uri(None, "sqlite:///ignored.db", tmp_path)
    assert str(caught.value) == f"MLFLOW_TRACKING_URI: {expected}"


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        uri_rules.resolve_tracking_uri(None, None, tmp_path)
        == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    )
    assert uri_rules.resolve_tracking_uri(None, "http://spec:5000", tmp_path) == "http://spec:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert uri_rules.resolve_tracking_uri(None, "http://spec:5000", tmp_path) == "http://env:5000"
    assert (
        uri_rules.resolve_tracking_uri("http://cli:5000", "http://spec:5000", tmp_path) == "http://cli:5000"
    )
