"""The MLflow record of one study execution (or one final training): a parent run, one nested run per trial,
and the file of writes the store never took.

The driver changes the record directly only while no writer of it is active in its process (before Tune
starts, or once the callback's writer stopped); everything else goes through the record's one writer
(`store.writer`), which the Tune callback gets through the picklable `handle`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sbn_study.store.runs import STATUS_TAG, TRIAL_ID_TAG, end_if_running, open_client, trial_runs
from sbn_study.store.ui import NOTE_TAG
from sbn_study.store.writer import RecordHandle, RunWriter

# How long ending the record waits for the store to take what is queued before saving it to the file.
FINISH_WAIT_S = 30.0


class StudyRecord:
    """A study's parent run and its trial runs: opened, reopened, read back and ended here."""

    def __init__(self, handle: RecordHandle) -> None:
        self.handle = handle

    @classmethod
    def start(
        cls, uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str], unsent_path: Path
    ) -> StudyRecord:
        """Opens a new parent run with `tags` (`sbn.kind` says whether a study or a final training)."""
        run = open_client(uri).create_run(experiment_id, run_name=run_name, tags=dict(tags))
        return cls(RecordHandle(uri, experiment_id, run.info.run_id, unsent_path))

    @classmethod
    def resume(cls, handle: RecordHandle) -> StudyRecord:
        """Reopens the parent run of an interrupted study."""
        record = cls(handle)
        record._client().update_run(handle.parent_run_id, status="RUNNING")
        return record

    def log_artifacts(self, files: Mapping[str, str]) -> None:
        """Text files of the parent run, sent at once."""
        client = self._client()
        for name, text in files.items():
            client.log_text(self.handle.parent_run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure of the parent run (its format from `name`'s extension), sent at once."""
        self._client().log_figure(self.handle.parent_run_id, figure, name)

    def describe(self, note: str) -> None:
        """The parent run's Markdown description in MLflow's UI, sent at once."""
        self._client().set_tag(self.handle.parent_run_id, NOTE_TAG, note)

    def drop_trials_except(self, known: set[str]) -> int:
        """Ends as killed and deletes the runs of trials not in `known`; returns how many.

        (MLflow deletes softly: the runs stay recoverable from the store's deleted runs, ended as killed
        rather than running forever.)
        """
        client = self._client()
        forgotten = [run for run in self.trial_runs() if run.data.tags[TRIAL_ID_TAG] not in known]
        for run in forgotten:
            end_if_running(client, run)
            client.delete_run(run.info.run_id)
        return len(forgotten)

    def writer(self) -> RunWriter:
        return self.handle.writer()

    def finish(self, status: str) -> int:
        """Ends every trial run still open as killed and the parent run with `status`, through the record's
        writer; what the store did not take within `FINISH_WAIT_S` goes to the unsent-writes file and the
        writer stops. Returns how many writes were saved there now."""
        writer = self.writer()
        writer.end_parent(status)
        writer.flush(deadline_s=FINISH_WAIT_S)
        return writer.save_unsent()

    def parent_metrics(self) -> dict[str, float]:
        """The parent run's metrics, each at its latest step."""
        return dict(self._client().get_run(self.handle.parent_run_id).data.metrics)

    def trial_runs(self) -> list[Any]:
        return trial_runs(self._client(), self.handle.experiment_id, self.handle.parent_run_id)

    def trial_statuses(self) -> dict[str, str]:
        """trial id → its `sbn.status`."""
        return {run.data.tags[TRIAL_ID_TAG]: run.data.tags.get(STATUS_TAG, "?") for run in self.trial_runs()}

    def unsent_writes(self) -> int:
        """The writes in the unsent-writes file, from this execution and any before it."""
        path = self.handle.unsent_path
        return len(path.read_text().splitlines()) if path.exists() else 0

    def _client(self) -> Any:
        # A client beside an active writer would contend with it for a sqlite store and could overtake its
        # queued writes to the same runs.
        if self.handle.has_active_writer():
            raise RuntimeError("the study's record is read or changed directly while its writer is active")
        return open_client(self.handle.uri)
