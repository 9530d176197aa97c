"""MLflow bookkeeping of a study, done by the driver alone.

One writer per study keeps sqlite stores safe (no concurrent migrations or locks from trial processes), lets
a resumed trial find and continue its own run, and turns every result into one batched `log_batch` call of
only the meaningful metrics. The writes are queued and sent, in order, by a background thread of the driver,
so that Tune's event loop only appends and never waits on MLflow (whose cost moves to that thread; it does not
vanish). A write that fails (a tracking server that went away) stays at the head of the queue and is retried;
whatever is still unsent at the end is saved to a file, never dropped. Opening a trial's run is one of those
writes: while the server is away, a trial starts anyway and its writes name the run by a stand-in id until
the run exists.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sbn_study.protocol import TrialStatus
from sbn_study.store.uri import is_remote_store

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


def _client(uri: str) -> Any:
    # The driver retries failed writes itself (buffered, in order); MLflow's own HTTP retries with backoff
    # would otherwise stall the whole study for minutes inside one call.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def create_store(uri: str) -> None:
    """Opens the store, creating a fresh sqlite one (MLflow's migrations) in the driver before any trial."""
    _client(uri).search_experiments(max_results=1)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """Creates the store and the study's experiment (in the driver, before any trial exists) and returns its id."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (
        None if artifact_root is None or is_remote_store(uri) else (artifact_root / name).resolve().as_uri()
    )
    return client.create_experiment(name, artifact_location=location)


def _save_when_exiting(tracker_ref: weakref.ref[StudyTracker]) -> None:
    tracker = tracker_ref()
    if tracker is not None and tracker.pending:
        tracker.flush(deadline_s=10.0)
        tracker.save_unsent()


class StudyTracker:
    """Owns the MLflow runs of one study execution: the parent run and one nested run per trial.

    Writes are queued and sent, in order, by one background thread: the caller (Tune's event loop) only
    appends. The MlflowClient is the writer's alone while writes are queued: read through `client` only while
    nothing is (before the first write, after `flush` returned True, or after `finish_study`).
    """

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, unsent_path: Path) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.unsent_path = unsent_path
        # Guards everything below that both the caller and the writer touch, and wakes either side.
        self._changed = threading.Condition()
        self._runs: dict[str, str] = {}  # trial id → run id, or its stand-in until the run exists
        self._last_step: dict[str, int] = {}  # trial id → highest step logged to or found in its run
        self._pending: deque[tuple[str, str, dict[str, Any]]] = deque()  # (operation, run_id, arguments)
        self._retry_at = 0.0  # while in the future, the store is away and the writer waits to retry
        self._flush_until = 0.0  # while in the future, someone waits in `flush`: retry sooner
        self._writer: threading.Thread | None = None
        self._closed = False
        self._stand_ins: dict[str, str] = {}  # stand-in → run id; the writer's alone

    @classmethod
    def start(
        cls,
        uri: str,
        experiment_id: str,
        study: str,
        run_name: str,
        unsent_path: Path,
        parent_run_id: str | None = None,
    ) -> StudyTracker:
        """Opens a new parent run, or reopens `parent_run_id` when a study is resumed."""
        client = _client(uri)
        if parent_run_id is None:
            tags = {"sbn.study": study, "sbn.kind": "study"}
            parent_run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        else:
            client.update_run(parent_run_id, status="RUNNING")
        return cls(uri, experiment_id, parent_run_id, unsent_path)

    def log_study_artifacts(self, files: Mapping[str, str]) -> None:
        """Sent at once, not queued: called before any write is queued, so it never races the writer."""
        for name, text in files.items():
            self.client.log_text(self.parent_run_id, text, name)

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

    def log_study_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics of the parent run (a final training's summary), queued behind the trials' writes."""
        arguments = {"metrics": dict(metrics), "step": 0, "timestamp": int(time.time() * 1000)}
        with self._changed:
            self._queue("metrics", self.parent_run_id, arguments)

    def set_tags(self, trial_id: str, tags: Mapping[str, str]) -> None:
        with self._changed:
            self._queue("tags", self._runs[trial_id], {"tags": dict(tags)})

    def finish_trial(self, trial_id: str, status: TrialStatus | str) -> None:
        status = TrialStatus(status)
        mlflow_status = status.mlflow_status
        with self._changed:
            run_id = self._runs.get(trial_id)
            if run_id is None:
                return
            self._queue("tags", run_id, {"tags": {"sbn.status": status.value}})
            self._queue("end", run_id, {"status": mlflow_status})

    def finish_study(self, status: str) -> None:
        """Ends the parent run, marks trials still open as killed, sends what it can within 30 s and stops
        the writer; what is still unsent is left for `save_unsent`."""
        with self._changed:
            for run_id in list(self._runs.values()):
                self._queue("end_if_running", run_id, {})
            self._queue("end", self.parent_run_id, {"status": status})
        self.flush(deadline_s=30.0)
        self.close()

    def flush(self, deadline_s: float = 0.0, retry_away: bool = True) -> bool:
        """Waits up to `deadline_s` for the writer to send everything queued, retrying a store that is away
        every `FLUSH_RETRY_S` meanwhile; with `retry_away=False` it stops waiting as soon as the store is known
        to be away. True when nothing is left unsent."""
        with self._changed:
            if deadline_s > 0 and self._writer is not None and not self._closed:
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
        """Stops the writer once its current write is done (queued writes stay queued, for `save_unsent`).

        Waits at most `CLOSE_WAIT_S` for that write: one stuck past it may be both sent and saved, which a
        replay turns into a duplicate point, never a lost one.
        """
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            writer = self._writer
        if writer is not None:
            writer.join(timeout=CLOSE_WAIT_S)

    def save_unsent(self) -> int:
        """Stops the writer and writes what it could not send to a JSON-lines file (replayable); returns how
        many writes. Stopping first means a saved write is never also sent.

        A run whose opening was never sent is named by its stand-in id; its `open_run` line comes first.
        """
        self.close()
        with self._changed:
            unsent = list(self._pending)
            # Saved is no longer pending: a second call (the exit hook) must not save them again.
            self._pending.clear()
        if not unsent:
            return 0
        self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
        with self.unsent_path.open("a") as f:
            for operation, run_id, arguments in unsent:
                f.write(json.dumps({"operation": operation, "run_id": run_id, **arguments}) + "\n")
        return len(unsent)

    @property
    def pending(self) -> int:
        """Writes not yet sent, the one being sent included."""
        with self._changed:
            return len(self._pending)

    def _store_away(self) -> bool:
        return time.monotonic() < self._retry_at

    def _queue(self, operation: str, run_id: str, arguments: dict[str, Any]) -> None:
        """Appends a write for the writer; the caller holds `_changed`. After `close` writes only queue."""
        self._pending.append((operation, run_id, arguments))
        if self._closed:
            return
        if self._writer is None:
            # Started on the first write: a tracker that only reads (or a callback that saw no trial) has none.
            self._writer = threading.Thread(
                target=self._write_loop, name="sbn-study-mlflow-writer", daemon=True
            )
            self._writer.start()
            # A daemon writer dies with the interpreter: a process that ends without `save_unsent` (a second
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
        elif operation == "end_if_running":
            run = self.client.get_run(run_id)
            if run.info.status == "RUNNING":
                self.client.set_tag(run_id, "sbn.status", "killed")
                self.client.set_terminated(run_id, status="KILLED")
        else:
            raise ValueError(f"unknown tracking operation {operation!r}")

    def _open_run(self, stand_in: str, arguments: dict[str, Any]) -> None:
        """Finds or creates the trial's run; safe to retry after a failure at any point.

        What is done is recorded in `arguments`, so a retry never creates a second run, and a run whose
        creation succeeded although its answer was lost is found (by its tags) instead of created again.
        """
        from mlflow.entities import Param

        trial_id = arguments["trial_id"]
        if "run_id" not in arguments:
            found = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`sbn.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                max_results=1,
            )
            if found:
                run_id = found[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                history = self.client.get_metric_history(run_id, STEP_METRIC)
                arguments["found_step"] = max((m.step for m in history), default=-1)
                arguments["params_logged"] = bool(found[0].data.params)
            else:
                all_tags = {
                    "mlflow.parentRunId": self.parent_run_id,
                    "sbn.trial_id": trial_id,
                    "sbn.status": "running",
                    **arguments["tags"],
                }
                run_id = self.client.create_run(
                    self.experiment_id, run_name=arguments["run_name"], tags=all_tags
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
