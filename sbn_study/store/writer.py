"""The one writer of a study's MLflow record: a queue that a background thread sends, in order.

One writer per study keeps sqlite stores safe (no concurrent migrations or locks from trial processes), lets
a resumed trial find and continue its own run, and turns every result into one batched `log_batch` call of
only the meaningful metrics. Tune's event loop only appends to the queue and never waits on MLflow (whose
cost moves to the thread; it does not vanish). A write that fails (a tracking server that went away) stays at
the head of the queue and is retried; whatever is still unsent at the end is saved to a file, never dropped.
Opening a trial's run is one of those writes: while the server is away, a trial starts anyway and its writes
name the run by a stand-in id until the run exists.

A process holds at most one writer per record (`RecordHandle.writer()` hands out the active one), so the
Tune callback and the driver, which both write to the same runs, never send side by side.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbn_study.errors import UserError
from sbn_study.protocol import FEATURE_PREFIX, TrialStatus
from sbn_study.store.runs import PARENT_TAG, STATUS_TAG, TRIAL_ID_TAG, end_if_running, open_client, trial_runs
from sbn_study.store.uri import redact_uri

# The run id of a trial run whose opening is still buffered; its writes are sent under the real id later.
STAND_IN_PREFIX = "pending:"
# Logged at every epoch, diverged or not: its history tells which epochs a run found again already holds.
STEP_METRIC = "epoch_time_s"
# After a failed write the writer waits this long before retrying, rather than hammering a server that is
# away; meanwhile a trial opened gets its stand-in id at once. A `flush` with a deadline retries sooner.
RETRY_PAUSE_S = 5.0
FLUSH_RETRY_S = 1.0
# How long `trial_run` waits for its own opening on a reachable store (behind whatever is queued before it):
# long enough for a backlog of results, short enough that a store that hangs costs Tune's loop little.
OPEN_WAIT_S = 5.0
# How long stopping the writer waits for the write it is in (each request is bounded by the HTTP timeout).
CLOSE_WAIT_S = 30.0


# Credentialed tracking URIs by their redacted form, of the handles this process made.
_credentials: dict[str, str] = {}


def _unpickled_handle(uri: str, experiment_id: str, parent_run_id: str, unsent_path: Path) -> RecordHandle:
    return RecordHandle(_credentials.get(uri, uri), experiment_id, parent_run_id, unsent_path)


@dataclass(frozen=True)
class RecordHandle:
    """Where a study's record is: plain data, pickled into Tune's state with the callback that writes it."""

    uri: str
    experiment_id: str
    parent_run_id: str
    unsent_path: Path  # JSON lines of the writes the store never took

    def __post_init__(self) -> None:
        if (redacted := redact_uri(self.uri)) != self.uri:
            _credentials[redacted] = self.uri

    def __reduce__(self) -> tuple[Any, ...]:
        # Tune's state keeps a pickle of the callback, and so of this handle, in the experiment folder: a
        # database URI's password (its driver reads it from the URI alone) stays out of it. The driver that
        # restores the state has opened the record with its credentialed URI first, and so knows it again.
        return _unpickled_handle, (
            redact_uri(self.uri),
            self.experiment_id,
            self.parent_run_id,
            self.unsent_path,
        )

    def writer(self) -> RunWriter:
        """This process's writer of the record: the active one, else a new one."""
        with _active_lock:
            writer = _active.get(self)
            if writer is None:
                writer = _active[self] = RunWriter(self)
            return writer

    def has_active_writer(self) -> bool:
        with _active_lock:
            return self in _active


_active: dict[RecordHandle, RunWriter] = {}
_active_lock = threading.Lock()


def _append_whole(path: Path, data: bytes) -> None:
    """Appends `data` to `path`, or nothing: a write cut short (a full disk) is cut off again, so that the file
    stays whole lines that a replay can read."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _replace_whole(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` in one step (temporary file, rename): never a file cut short."""
    temporary = path.with_name(f"{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def _dataset_input(described: Mapping[str, Any]) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    fields = {k: described[k] for k in ("name", "digest", "source_type", "source", "profile")}
    return DatasetInput(Dataset(**fields), [InputTag(MLFLOW_DATASET_CONTEXT, described["context"])])


def _save_when_exiting(writer_ref: weakref.ref[RunWriter]) -> None:
    writer = writer_ref()
    if writer is not None and writer.pending:
        writer.flush(deadline_s=10.0)
        writer.save_unsent()


class RunWriter:
    """Queues the writes to a study's runs and sends them, in order, from one background thread.

    Get it from `RecordHandle.writer()`. Its MlflowClient is the thread's alone while writes are queued: read
    through `client` only while nothing is (before the first write, or after `flush` returned True).
    """

    def __init__(self, handle: RecordHandle) -> None:
        self.handle = handle
        self.client = open_client(handle.uri)
        # Guards everything below that both the caller and the thread touch, and wakes either side.
        self._changed = threading.Condition()
        self._runs: dict[str, str] = {}  # trial id → run id, or its stand-in until the run exists
        self._last_step: dict[str, int] = {}  # trial id → highest step logged to or found in its run
        self._pending: deque[tuple[str, str, dict[str, Any]]] = deque()  # (operation, run_id, arguments)
        self._retry_at = 0.0  # while in the future, the store is away and the thread waits to retry
        self._flush_until = 0.0  # while in the future, someone waits in `flush`: retry sooner
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stand_ins: dict[str, str] = {}  # stand-in → run id; the thread's alone

    def trial_run(
        self,
        trial_id: str,
        run_name: str,
        params: Mapping[str, Any],
        config_yaml: str,
        tags: Mapping[str, str],
    ) -> str:
        """The run of `trial_id`: found again by its tag after a resume, else created with its params.

        Opening it is a queued write like the others. On a reachable store this waits (at most
        `OPEN_WAIT_S`) until it is sent, so that `last_step` knows what a run found again already holds; while
        the store is away it returns at once a stand-in id (`pending:<trial_id>`) that every later write of
        the trial resolves when it is sent, so a trial never waits for (or fails on) an unreachable server.
        """
        stand_in = f"{STAND_IN_PREFIX}{trial_id}"
        arguments = {
            "trial_id": trial_id,
            "run_name": run_name,
            "params": {k: str(v)[:6000] for k, v in params.items()},
            "config_yaml": config_yaml,
            "tags": dict(tags),
        }
        with self._changed:
            if trial_id in self._runs:
                return self._runs[trial_id]
            self._runs[trial_id] = stand_in
            self._queue("open_run", stand_in, arguments)
            self._changed.wait_for(
                lambda: self._runs[trial_id] != stand_in or self._store_away() or self._closed,
                timeout=OPEN_WAIT_S,
            )
            return self._runs[trial_id]

    def run_id(self, trial_id: str) -> str | None:
        """The MLflow run id of `trial_id` once its run exists (None while its opening is unsent)."""
        with self._changed:
            run_id = self._runs.get(trial_id)
        return None if run_id is None or run_id.startswith(STAND_IN_PREFIX) else run_id

    def last_step(self, trial_id: str) -> int:
        """The highest step logged for `trial_id` so far, including what its run held when found again.

        -1 when none is known; a run found again by a resume while the server was away counts as known
        only once its opening was sent.
        """
        with self._changed:
            return self._last_step.get(trial_id, -1)

    def log_metrics(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None:
        # The timestamp is taken now, not when sent: a retried write is the same point, never a second one.
        timestamp = int(time.time() * 1000)
        arguments = {"metrics": dict(metrics), "step": step, "timestamp": timestamp}
        with self._changed:
            self._last_step[trial_id] = max(step, self._last_step.get(trial_id, -1))
            self._queue("metrics", self._runs[trial_id], arguments)

    def log_parent_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Metrics of the parent run (a final training's summary, a study's progress), queued behind the
        trials' writes."""
        arguments = {"metrics": dict(metrics), "step": step, "timestamp": int(time.time() * 1000)}
        with self._changed:
            self._queue("metrics", self.handle.parent_run_id, arguments)

    def set_parent_tags(self, tags: Mapping[str, str]) -> None:
        with self._changed:
            self._queue("tags", self.handle.parent_run_id, {"tags": dict(tags)})

    def set_experiment_tags(self, tags: Mapping[str, str]) -> None:
        """Tags of the record's experiment (how MLflow's UI shows it), queued like the runs' writes."""
        with self._changed:
            self._queue("experiment_tags", self.handle.parent_run_id, {"tags": dict(tags)})

    def set_tags(self, trial_id: str, tags: Mapping[str, str]) -> None:
        with self._changed:
            self._queue("tags", self._runs[trial_id], {"tags": dict(tags)})

    def log_artifact(self, trial_id: str, path: Path, folder: str | None = None) -> None:
        """A file of the trial's run (under `folder` in its artifacts), queued like its metrics: the file must
        stay where it is until sent, and a saved write names it by its path."""
        with self._changed:
            self._queue("artifact", self._runs[trial_id], {"path": str(path), "folder": folder})

    def log_inputs(self, inputs: Sequence[Mapping[str, Any]], trial_id: str | None = None) -> None:
        """Dataset inputs (`trial.inputs.dataset_inputs`) of the trial's run, or of the parent run without a
        trial; sending them again does no harm (MLflow keeps one per dataset and run)."""
        with self._changed:
            run_id = self.handle.parent_run_id if trial_id is None else self._runs[trial_id]
            self._queue("inputs", run_id, {"inputs": [dict(i) for i in inputs]})

    def finish_trial(self, trial_id: str, status: TrialStatus | str) -> None:
        status = TrialStatus(status)
        with self._changed:
            run_id = self._runs.get(trial_id)
            if run_id is None:
                return
            self._queue("tags", run_id, {"tags": {STATUS_TAG: status.value}})
            self._queue("end", run_id, {"status": status.mlflow_status})

    def end_parent(self, status: str) -> None:
        """Queues the end of the record: every trial run still open ends as killed, then the parent run."""
        with self._changed:
            self._queue("end_open_trial_runs", self.handle.parent_run_id, {})
            self._queue("end", self.handle.parent_run_id, {"status": status})

    def flush(self, deadline_s: float = 0.0, retry_away: bool = True) -> bool:
        """Waits up to `deadline_s` for the thread to send everything queued, retrying a store that is away
        every `FLUSH_RETRY_S` meanwhile; with `retry_away=False` it stops waiting as soon as the store is known
        to be away. True when nothing is left unsent."""
        with self._changed:
            if deadline_s > 0 and self._thread is not None and not self._closed:
                if retry_away:
                    now = time.monotonic()
                    self._flush_until = max(self._flush_until, now + deadline_s)
                    self._retry_at = min(self._retry_at, now)  # retry now, not after the rest of a pause
                    self._changed.notify_all()
                self._changed.wait_for(
                    lambda: not self._pending or self._closed or (not retry_away and self._store_away()),
                    timeout=deadline_s,
                )
            return not self._pending

    def close(self) -> None:
        """Stops the thread once its current write is done (queued writes stay queued, for `save_unsent`);
        the record's next `writer()` is a new writer.

        Waits at most `CLOSE_WAIT_S` for that write: one stuck past it may be both sent and saved, which a
        replay turns into a duplicate point, never a lost one.
        """
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=CLOSE_WAIT_S)
        with _active_lock:
            if _active.get(self.handle) is self:
                del _active[self.handle]

    def save_unsent(self) -> int:
        """Stops the writer and appends what it could not send to the record's unsent-writes file (JSON
        lines, replayable); returns how many writes. Stopping first means a saved write is never also sent.

        A run whose opening was never sent is named by its stand-in id; its `open_run` line comes first.
        """
        self.close()
        with self._changed:
            unsent = list(self._pending)
            # Saved is no longer pending: a second call (the exit hook) must not save them again.
            self._pending.clear()
        if not unsent:
            return 0
        path = self.handle.unsent_path
        # `run_id` last: an opening cut short keeps the run it made in its arguments' own `run_id`, while
        # later lines name the run by the stand-in (the replay finds the run again by its tags).
        text = "".join(
            json.dumps({**arguments, "operation": operation, "run_id": run_id}) + "\n"
            for operation, run_id, arguments in unsent
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _append_whole(path, text.encode())
        except OSError as exc:
            raise UserError(
                f"--output: cannot save {len(unsent)} MLflow writes the store did not take to {path} "
                f"({exc.strerror or exc}); they are lost: free space (or make it writable) and continue with "
                "--resume, whose trials log again what their checkpoints hold"
            ) from None
        return len(unsent)

    def send_saved(self) -> int:
        """Sends the writes of the record's unsent-writes file, in order, as the thread sends them, and removes
        the file; returns how many. Only on a writer that has nothing queued.

        Sending one again does no harm (a trial run opened again is found by its tags, a metric point sent
        twice is stored once, tags and ends are set to the same values), so a replay cut short is simply run
        again: what the store did not take stays in the file, its runs named by their ids where the replay
        opened them, and the store's error is raised.
        """
        path = self.handle.unsent_path
        if not path.exists():
            return 0
        writes = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for sent, write in enumerate(writes):
            arguments = dict(write)
            try:
                self._send(arguments.pop("operation"), arguments.pop("run_id"), arguments)
            except Exception:
                left = [{**w, "run_id": self._stand_ins.get(w["run_id"], w["run_id"])} for w in writes[sent:]]
                _replace_whole(path, "".join(json.dumps(w) + "\n" for w in left).encode())
                raise
        path.unlink()
        return len(writes)

    @property
    def pending(self) -> int:
        """Writes not yet sent, the one being sent included."""
        with self._changed:
            return len(self._pending)

    def _store_away(self) -> bool:
        return time.monotonic() < self._retry_at

    def _queue(self, operation: str, run_id: str, arguments: dict[str, Any]) -> None:
        """Appends a write for the thread; the caller holds `_changed`. After `close` writes only queue."""
        self._pending.append((operation, run_id, arguments))
        if self._closed:
            return
        if self._thread is None:
            # Started on the first write: a writer that saw no trial (a callback of an empty run) has none.
            self._thread = threading.Thread(
                target=self._write_loop, name="sbn-study-mlflow-writer", daemon=True
            )
            self._thread.start()
            # A daemon thread dies with the interpreter: a process that ends without `save_unsent` (a second
            # Ctrl-C inside Tune) still gets its queued writes sent or saved.
            atexit.register(_save_when_exiting, weakref.ref(self))
        self._changed.notify_all()

    def _write_loop(self) -> None:
        """Sends the queue's head until it succeeds, then the next; a write leaves the queue only once sent."""
        while True:
            with self._changed:
                while not self._closed and (not self._pending or self._store_away()):
                    pause = self._retry_at - time.monotonic() if self._pending else None
                    self._changed.wait(pause)
                if self._closed:
                    return
                operation, run_id, arguments = self._pending[0]
            try:
                self._send(operation, run_id, arguments)
            except Exception:
                with self._changed:
                    now = time.monotonic()
                    self._retry_at = now + (FLUSH_RETRY_S if now < self._flush_until else RETRY_PAUSE_S)
                    self._changed.notify_all()  # a trial_run waiting on its opening gets its stand-in now
                continue
            with self._changed:
                self._pending.popleft()
                self._retry_at = 0.0
                self._changed.notify_all()

    def _send(self, operation: str, run_id: str, arguments: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        if operation == "open_run":
            self._open_run(run_id, arguments)
            return
        run_id = self._stand_ins.get(run_id, run_id)
        if operation == "metrics":
            step, timestamp = arguments["step"], arguments["timestamp"]
            metrics = [Metric(k, v, timestamp, step) for k, v in arguments["metrics"].items()]
            for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
        elif operation == "tags":
            self.client.log_batch(
                run_id, tags=[RunTag(k, v) for k, v in arguments["tags"].items()], synchronous=True
            )
        elif operation == "end":
            self.client.set_terminated(run_id, status=arguments["status"])
        elif operation == "artifact":
            self.client.log_artifact(run_id, arguments["path"], arguments["folder"])
        elif operation == "inputs":
            self.client.log_inputs(run_id, datasets=[_dataset_input(i) for i in arguments["inputs"]])
        elif operation == "experiment_tags":
            for key, value in arguments["tags"].items():
                self.client.set_experiment_tag(self.handle.experiment_id, key, value)
        elif operation == "end_open_trial_runs":
            for run in trial_runs(self.client, self.handle.experiment_id, run_id):
                end_if_running(self.client, run)
        else:
            raise ValueError(f"unknown tracking operation {operation!r}")

    def _open_run(self, stand_in: str, arguments: dict[str, Any]) -> None:
        """Finds or creates the trial's run; safe to retry after a failure at any point.

        What is done is recorded in `arguments`, so a retry never creates a second run, and a run whose
        creation succeeded although its answer was lost is found (by its tags) instead of created again.
        """
        from mlflow.entities import Param

        trial_id = arguments["trial_id"]
        handle = self.handle
        if "run_id" not in arguments:
            found = trial_runs(self.client, handle.experiment_id, handle.parent_run_id, trial_id)
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                history = self.client.get_metric_history(run_id, STEP_METRIC)
                # A kill between the step-0 feature statistics and epoch 1 leaves a run with step 0 alone:
                # it holds step 0 then, or a resume would log the initial statistics twice.
                initial = 0 if any(k.startswith(FEATURE_PREFIX) for k in found[0].data.metrics) else -1
                arguments["found_step"] = max((m.step for m in history), default=initial)
                arguments["params_logged"] = bool(found[0].data.params)
            else:
                all_tags = {
                    PARENT_TAG: handle.parent_run_id,
                    TRIAL_ID_TAG: trial_id,
                    STATUS_TAG: TrialStatus.RUNNING.value,
                    **arguments["tags"],
                }
                run_id = self.client.create_run(
                    handle.experiment_id, run_name=arguments["run_name"], tags=all_tags
                ).info.run_id
                arguments["found_step"] = -1
                arguments["params_logged"] = False
            arguments["run_id"] = run_id
        run_id = arguments["run_id"]
        if not arguments["params_logged"]:
            items = [Param(k, v) for k, v in arguments["params"].items()]
            for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=items[start : start + 100])
            self.client.log_text(run_id, arguments["config_yaml"], "config.yaml")
            arguments["params_logged"] = True
        self._stand_ins[stand_in] = run_id
        with self._changed:
            if self._runs.get(trial_id) == stand_in:
                self._runs[trial_id] = run_id
            self._last_step[trial_id] = max(arguments["found_step"], self._last_step.get(trial_id, -1))
