"""The MLflow calls every part of a study's record shares: the client, the store and experiment, the one
query of a parent run's trial runs and the one way a trial run left open is ended.

Synchronous and stateless: `store.record` calls them while no writer is active, the writer thread of
`store.writer` while it sends, and `results.analysis` to read a study back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sbn_study.protocol import TrialStatus
from sbn_study.store.ui import EXPERIMENT_KIND_TAG, MODEL_TRAINING
from sbn_study.store.uri import is_remote_store

TRIAL_ID_TAG = "sbn.trial_id"
STATUS_TAG = "sbn.status"
KIND_TAG = "sbn.kind"  # "study" or "final" on a parent run
# On a study's parent run: the state file that `--resume` reads, so that a parent run whose driver died
# before it saved that file is found again by it.
STATE_FILE_TAG = "sbn.state_file"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's ceiling for one search.
MAX_RUNS = 50000


def open_client(uri: str) -> Any:
    # The writer retries failed writes itself (buffered, in order); MLflow's own HTTP retries with backoff
    # would otherwise stall the whole study for minutes inside one call.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow draws a progress bar on stderr for every artifact download; the small files read back need none.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def create_store(uri: str) -> None:
    """Opens the store, creating a fresh sqlite one (MLflow's migrations) in the driver before any trial."""
    open_client(uri).search_experiments(max_results=1)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    """Creates the store and the study's experiment (in the driver, before any trial exists) and returns its id."""
    client = open_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (
        None if artifact_root is None or is_remote_store(uri) else (artifact_root / name).resolve().as_uri()
    )
    # Every experiment here records model training: MLflow's UI would otherwise guess, or show GenAI pages.
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    )


def trial_runs(client: Any, experiment_id: str, parent_run_id: str, trial_id: str | None = None) -> list[Any]:
    """The trial runs nested under `parent_run_id` (only `trial_id`'s, if given), oldest first."""
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
    runs = client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=MAX_RUNS
    )
    return [run for run in runs if TRIAL_ID_TAG in run.data.tags]


def running_study_runs(uri: str, experiment_name: str, state_file: str) -> list[Any]:
    """The parent runs of study executions kept in `state_file` that are still RUNNING, newest first."""
    client = open_client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{KIND_TAG}` = 'study' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=MAX_RUNS,
    )
    # Compared here, not in the filter: a path may hold quotes that the filter grammar cannot.
    return [run for run in runs if run.data.tags.get(STATE_FILE_TAG) == state_file]


def end_if_running(client: Any, run: Any) -> None:
    """Ends a trial run still open as killed: its trial was interrupted, and `--resume` reopens the run."""
    if run.info.status == "RUNNING":
        client.set_tag(run.info.run_id, STATUS_TAG, TrialStatus.KILLED.value)
        client.set_terminated(run.info.run_id, status=TrialStatus.KILLED.mlflow_status)
