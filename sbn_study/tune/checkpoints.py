"""A trial's own checkpoint: one file per trial in the study's storage, replaced atomically every epoch.

`<tune_path>/trials/<trial_id>.pt` holds what `train()` needs to go on (model, optimizer, RNG, epoch, best
values; the learning rate is a function of the epoch) and everything the trial reported, and is found again
by the trial id alone: when Tune restarts a trial whose worker died, restores an unfinished one on `--resume`,
or runs it on another node (which reads it through `storage:`).

Tune's own checkpointing is not used: trials report results without checkpoints. Tune deletes a trial's
previous checkpoint when it registers the next one, a moment before its saved experiment state names the
next one; a driver killed in between left the trial with a state that named a deleted checkpoint, which Tune
cannot restore (the trial ended as `error`). A pointer checkpoint would keep that window (Tune refuses to
restore from a checkpoint folder that is gone) and say nothing the trial id does not. Without checkpoints,
Tune's saved state only says which trials exist and which ended; each trial's progress is its file, written
before the result it goes with is reported, so a trial that finds no file has never reported. The driver
writes `trials/.study` before Tune starts: a trial that does not see it runs on a node that does not share the
storage, and fails rather than start over. Only the driver removes files (`ready_tune_path`, before Tune
starts): those of trials that Tune's saved state does not know, which are sampled again under new ids.

Local and shared file systems (plain paths, `file://`): the file is written under a temporary name in the
same folder, flushed and fsynced, moved over the old one with `os.replace` and the folder fsynced, so a reader
on any node sees the old file or the new one, never a mix, and the new one survives a crash of the machine
once `save` returns. Other URIs (`s3://`, `gs://`, ...) go through pyarrow's file system for the URI, the one
Ray's storage uses: the object is uploaded in one piece, which an object store makes visible whole when the
upload completes; there is no rename or folder to fsync there.

`pause_point` is a test hook: it lets a test stop a process at a named instant and kill it there.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import pickle
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sbn_study.durable import replace_file

FOLDER = "trials"
MARKER = ".study"
SUFFIX = ".pt"
# Tune's state files of one session (an execution of the study), by its session stamp.
EXPERIMENT_STATE = "experiment_state-{}.json"
TUNE_SESSION_FILES = (EXPERIMENT_STATE, "search_gen_state-{}.json", "searcher-state-{}.pkl")

PAUSE_AT_ENV = "SBN_STUDY_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "SBN_STUDY_TEST_PAUSE_FILE"
# Long enough for a test to see the pause file and kill the process; a process nobody kills then goes on.
PAUSE_S = 120.0


def pause_point(point: str) -> None:
    """Test hook: when `SBN_STUDY_TEST_PAUSE_AT` names `point`, the first process to get here creates the file
    `SBN_STUDY_TEST_PAUSE_FILE` and sleeps, so that a test can kill it at exactly this instant.

    Points: `parent-run-open` (the study's parent run exists, its state file not yet), `checkpoint-writing`
    (a trial's new file is written under its temporary name), `checkpoint-written` (the file is in place, the
    epoch not yet reported), `reported` (the driver took the epoch's result; Tune's saved state may not have
    it), `study-trained` (Tune ended every trial; the record is not closed yet).
    """
    if os.environ.get(PAUSE_AT_ENV) != point:
        return
    try:  # O_EXCL: only one process pauses, once, however many reach the point
        os.close(os.open(os.environ[PAUSE_FILE_ENV], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    time.sleep(PAUSE_S)


class TrialStates:
    """The folder of a study's trial files, `<tune_path>/trials`, on a local path or a storage URI."""

    def __init__(self, tune_path: str) -> None:
        self.folder = f"{tune_path.rstrip('/')}/{FOLDER}"
        self._local = local_path(self.folder)
        if self._local is None:
            import pyarrow.fs

            self._fs, self._path = pyarrow.fs.FileSystem.from_uri(self.folder)

    def prepare(self, keep: Iterable[str]) -> None:
        """The driver, before Tune starts: the folder and its marker made, and every file removed but those
        of the trials in `keep` (a trial Tune does not know runs again under a new id; a temporary file is
        what a write that was killed left)."""
        kept = {f"{trial_id}{SUFFIX}" for trial_id in keep} | {MARKER}
        note = "Written by the sbn-study driver: trials that cannot see this file do not share its storage.\n"
        if self._local is not None:
            self._local.mkdir(parents=True, exist_ok=True)
            for path in self._local.iterdir():
                if path.name not in kept:
                    path.unlink()
            (self._local / MARKER).write_text(note)
            return
        import pyarrow.fs

        self._fs.create_dir(self._path)
        for info in self._fs.get_file_info(pyarrow.fs.FileSelector(self._path)):
            if info.base_name not in kept:
                self._fs.delete_file(info.path)
        with self._fs.open_output_stream(f"{self._path}/{MARKER}") as file:
            file.write(note.encode())

    def save(self, trial_id: str, state: dict[str, Any]) -> None:
        """Replaces the trial's file with `state` (see the module docstring for what makes it atomic)."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        if self._local is not None:
            replace_file(
                self._local / f"{trial_id}{SUFFIX}",
                buffer.getbuffer(),
                lambda: pause_point("checkpoint-writing"),
            )
            return
        pause_point("checkpoint-writing")
        with self._fs.open_output_stream(f"{self._path}/{trial_id}{SUFFIX}") as file:
            file.write(buffer.getbuffer())

    def load(self, trial_id: str) -> dict[str, Any] | None:
        """The trial's last saved state, on the CPU; None when it has none, that is, it never reported.

        Raises RuntimeError when this node does not see the study's storage: the trial could not tell a
        file that is missing from one it cannot see, and must not start over in its place.
        """
        import torch

        if self._read(MARKER) is None:
            raise RuntimeError(
                f"{self.folder} is not the study's storage on this node (the driver's {MARKER} is missing): "
                "a trial cannot find its state again here; set `storage:` to a file system or URI that "
                "every node of the cluster shares"
            )
        data = self._read(f"{trial_id}{SUFFIX}")
        if data is None:
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def _read(self, name: str) -> bytes | None:
        try:
            if self._local is not None:
                return (self._local / name).read_bytes()
            with self._fs.open_input_stream(f"{self._path}/{name}") as file:
                return file.read()
        except FileNotFoundError:
            return None


def ready_tune_path(tune_path: str) -> set[str] | None:
    """Before Tune starts on `tune_path` (where Tune runs): the trials of Tune's saved experiment state, None
    when it saved none (a new study, or one killed before Tune's first save), and the trials' folder made
    ready for those alone.

    Tune writes its state files in place, one set per session (an execution of the study), and copies them
    to storage the same way: a driver killed meanwhile leaves the newest cut short, which Tune cannot restore.
    On a local or shared path such a session is set aside (`*.unreadable`) and Tune restores the newest one
    it saved whole; an object store shows an object only once its upload completed.
    """
    from ray import tune

    folder = local_path(tune_path)
    if folder is not None:
        _set_aside_cut_short(folder)
    saved = None
    # `can_restore` looks for tuner.pkl alone, which Tune writes before its first experiment state.
    if tune.Tuner.can_restore(tune_path) and _has_experiment_state(tune_path):
        saved = {trial.trial_id for trial in tune.ExperimentAnalysis(tune_path).trials}
    TrialStates(tune_path).prepare(keep=saved or ())
    return saved


def _set_aside_cut_short(folder: Path) -> None:
    prefix, suffix = EXPERIMENT_STATE.split("{}")
    for state in sorted(folder.glob(EXPERIMENT_STATE.format("*")), reverse=True):
        session = state.name.removeprefix(prefix).removesuffix(suffix)
        files = [folder / name.format(session) for name in TUNE_SESSION_FILES]
        files = [path for path in files if path.exists()]
        if all(_reads_back(path) for path in files):
            return
        for path in files:
            path.rename(path.with_name(f"{path.name}.unreadable"))


def _reads_back(path: Path) -> bool:
    data = path.read_bytes()
    # By content, not by name: Tune's search_gen_state-*.json is a pickle.
    for load in (json.loads, pickle.loads):
        try:
            load(data)
        except Exception:  # whatever a file cut short raises on the way back
            continue
        return True
    return False


def _has_experiment_state(tune_path: str) -> bool:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(tune_path if "://" in tune_path else os.path.abspath(tune_path))
    found = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return any(fnmatch.fnmatch(info.base_name, EXPERIMENT_STATE.format("*")) for info in found)


def local_path(location: str) -> Path | None:
    """The path of a location on a local (or mounted, shared) file system; None for any other URI."""
    if "://" not in location:
        return Path(location)
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    return Path(path) if isinstance(fs, pyarrow.fs.LocalFileSystem) else None
