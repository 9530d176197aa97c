"""MLflow bookkeeping of a study, done by the driver alone.

One writer per study keeps sqlite stores safe (no concurrent migrations or locks from trial processes), lets
a resumed trial find and continue its own run, and turns every result into one batched `log_batch` call of
only the meaningful metrics. Writes that fail (a tracking server that went away) are kept in order and
retried before the next write; whatever is still unsent at the end is saved to a file, never dropped.
Opening a trial's run is one of those writes: while the server is away, a trial starts anyway and its
writes name the run by a stand-in id until the run exists.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sbn_study.errors import UserError

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s")
FEATURE_PREFIX = "fm/"
# Feature statistics of the untrained network travel inside the first epoch's result under this key and are
# logged at step 0 (Tune requires the searched metric in every result, so epoch 0 cannot be its own result).
INITIAL_FEATURES_KEY = "fm_init"


# The run id of a trial run whose opening is still buffered; its writes are sent under the real id later.
STAND_IN_PREFIX = "pending:"
# Logged at every epoch, diverged or not: its history tells which epochs a run found again already holds.
STEP_METRIC = "epoch_time_s"
# After a failed write, writes only queue up for this long instead of each waiting on an unreachable server
# (up to MLFLOW_HTTP_REQUEST_TIMEOUT apiece) inside Tune's event loop. Flushes with a deadline still retry.
RETRY_PAUSE_S = 5.0


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None, output: Path) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the spec's tracking.uri, then sqlite under the output."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or spec_uri or default_tracking_uri(output)


def redact_uri(uri: str) -> str:
    """Drops user:password@ from a URI so credentials never reach logged params, tags or artifacts."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def is_remote_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fails before anything starts when an HTTP tracking server does not answer."""
    if not is_remote_store(uri) or uri.startswith("databricks"):
        return
    import urllib.request

    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"tracking.uri: cannot reach the MLflow server at {redact_uri(uri)} ({reason})"
        ) from None


def _client(uri: str) -> Any:
    # The driver retries failed writes itself (buffered, in order); MLflow's own HTTP retries with backoff
    # would otherwise stall the whole study for minutes inside one call.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a Tune result worth recording: the per-epoch metrics and the feature statistics."""
    metrics = {k: float(result[k]) for k in EPOCH_METRICS if k in result}
    metrics.update((k, float(v)) for k, v in result.items() if k.startswith(FEATURE_PREFIX))
    return metrics


class StudyTracker:
    """Owns the MLflow runs of one study execution: the parent run and one nested run per trial."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, unsent_path: Path) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.unsent_path = unsent_path
        self._runs: dict[str, str] = {}  # trial id → run id, or its stand-in until the run exists
        self._stand_ins: dict[str, str] = {}  # stand-in → run id
        self._last_step: dict[str, int] = {}  # trial id → highest step logged to or found in its run
        self._pending: list[tuple[str, str, dict[str, Any]]] = []  # (operation, run_id, arguments)
        self._retry_at = 0.0

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

        Opening it is a buffered write like the others, so a trial never waits for (or fails on) an
        unreachable server. Returns the run id, or while the opening is still unsent a stand-in id
        (`pending:<trial_id>`) that every later write of the trial resolves when it is sent.
        """
        if trial_id in self._runs:
            return self._runs[trial_id]
        stand_in = f"{STAND_IN_PREFIX}{trial_id}"
        self._runs[trial_id] = stand_in
        arguments = {
            "trial_id": trial_id,
            "run_name": run_name,
            "params": {k: str(v)[:6000] for k, v in params.items()},
            "config_yaml": config_yaml,
            "tags": dict(tags),
        }
        self._write("open_run", stand_in, arguments)
        return self._runs[trial_id]

    def run_id(self, trial_id: str) -> str | None:
        """The MLflow run id of `trial_id` once its run exists (None while its opening is unsent)."""
        run_id = self._runs.get(trial_id)
        return None if run_id is None or run_id.startswith(STAND_IN_PREFIX) else run_id

    def last_step(self, trial_id: str) -> int:
        """The highest step logged for `trial_id` so far, including what its run held when found again.

        -1 when none is known; a run found again by a resume while the server was away counts as known
        only once its opening was sent.
        """
        return self._last_step.get(trial_id, -1)

    def log_metrics(self, trial_id: str, metrics: Mapping[str, float], step: int) -> None:
        # The timestamp is taken now, not when sent: a retried write is the same point, never a second one.
        timestamp = int(time.time() * 1000)
        self._last_step[trial_id] = max(step, self._last_step.get(trial_id, -1))
        self._write(
            "metrics", self._runs[trial_id], {"metrics": dict(metrics), "step": step, "timestamp": timestamp}
        )

    def set_tags(self, trial_id: str, tags: Mapping[str, str]) -> None:
        self._write("tags", self._runs[trial_id], {"tags": dict(tags)})

    def finish_trial(self, trial_id: str, status: str) -> None:
        run_id = self._runs.get(trial_id)
        if run_id is None:
            return
        mlflow_status = {"error": "FAILED", "killed": "KILLED"}.get(status, "FINISHED")
        self._write("tags", run_id, {"tags": {"sbn.status": status}})
        self._write("end", run_id, {"status": mlflow_status})

    def finish_study(self, status: str) -> None:
        """Ends the parent run, marks trials still open as killed, and flushes or saves what is unsent."""
        for trial_id in list(self._runs):
            self._write("end_if_running", self._runs[trial_id], {})
        self._write("end", self.parent_run_id, {"status": status})
        self.flush(deadline_s=30.0)

    def flush(self, deadline_s: float = 0.0) -> bool:
        """Sends buffered writes in order; retries until `deadline_s` passes. True when nothing is left."""
        now = time.monotonic()
        if deadline_s <= 0 and now < self._retry_at:
            return not self._pending
        give_up = now + deadline_s
        while self._pending:
            operation, run_id, arguments = self._pending[0]
            try:
                self._send(operation, run_id, arguments)
            except Exception:
                self._retry_at = time.monotonic() + RETRY_PAUSE_S
                if time.monotonic() >= give_up:
                    break
                time.sleep(1.0)
                continue
            self._pending.pop(0)
        return not self._pending

    def save_unsent(self) -> int:
        """Writes what could not be sent to a JSON-lines file (replayable) and returns how many writes.

        A run whose opening was never sent is named by its stand-in id; its `open_run` line comes first.
        """
        if not self._pending:
            return 0
        self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
        with self.unsent_path.open("a") as f:
            for operation, run_id, arguments in self._pending:
                f.write(json.dumps({"operation": operation, "run_id": run_id, **arguments}) + "\n")
        return len(self._pending)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _write(self, operation: str, run_id: str, arguments: dict[str, Any]) -> None:
        self._pending.append((operation, run_id, arguments))
        self.flush()

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
        if self._runs.get(trial_id) == stand_in:
            self._runs[trial_id] = run_id
        self._last_step[trial_id] = max(arguments["found_step"], self._last_step.get(trial_id, -1))
