"""A trial's own checkpoint file (`sbn_study.tune.checkpoints`): written whole or not at all, found again by
the trial id, refused on a node that does not share the storage; Tune's saved state made ready for a resume."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import pytest
import torch

from sbn_study.tune import checkpoints
from sbn_study.tune.checkpoints import MARKER, PAUSE_AT_ENV, PAUSE_FILE_ENV, TrialStates, ready_tune_path

STATE = {"epoch": 2, "model": {"w": torch.arange(6.0)}, "history": [{"epoch": 1.0}, {"epoch": 2.0}]}


def test_a_trial_finds_its_state_again_by_its_id(tmp_path: Path) -> None:
    states = TrialStates(str(tmp_path))
    states.prepare(keep=())
    assert states.load("t1") is None  # a trial that never reported
    states.save("t1", STATE)
    states.save("t1", {**STATE, "epoch": 3})
    # Another TrialStates, as in a restarted worker on another node: only the path and the id are shared.
    back = TrialStates(f"file://{tmp_path}").load("t1")
    assert back is not None and back["epoch"] == 3 and torch.equal(back["model"]["w"], STATE["model"]["w"])
    assert back["history"] == STATE["history"]
    # Replaced, not appended beside: no temporary file stays, and other users of the storage can read it.
    folder = tmp_path / checkpoints.FOLDER
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "t1.pt"]
    assert (folder / "t1.pt").stat().st_mode & 0o777 == 0o644


def test_a_write_that_fails_midway_leaves_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = TrialStates(str(tmp_path))
    states.prepare(keep=())
    states.save("t1", STATE)

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        states.save("t1", {**STATE, "epoch": 3})
    monkeypatch.undo()
    assert states.load("t1")["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / checkpoints.FOLDER).iterdir()) == [MARKER, "t1.pt"]


def test_a_node_that_does_not_share_the_storage_is_refused_rather_than_starting_over(tmp_path: Path) -> None:
    # The driver made the folder on its own disk; this "node" sees another one at the same path.
    with pytest.raises(RuntimeError, match=r"is not the study's storage on this node .* every node"):
        TrialStates(str(tmp_path / "elsewhere")).load("t1")


def test_the_driver_keeps_only_the_files_of_the_trials_tune_knows(tmp_path: Path) -> None:
    states = TrialStates(str(tmp_path))
    states.prepare(keep=())
    for trial_id in ("known", "forgotten"):
        states.save(trial_id, STATE)
    folder = tmp_path / checkpoints.FOLDER
    (folder / ".known.pt.abc123.tmp").write_bytes(b"half a write")
    states.prepare(keep={"known"})
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "known.pt"]


def test_an_object_store_uri_goes_through_pyarrow(tmp_path: Path) -> None:
    # pyarrow's in-memory file system stands in for s3:// (a new one per URI: one TrialStates here).
    states = TrialStates("mock:///bucket/study")
    states.prepare(keep=())
    assert states.load("t1") is None
    states.save("t1", STATE)
    states.save("t2", STATE)
    assert states.load("t1")["epoch"] == 2
    states.prepare(keep={"t2"})
    assert states.load("t1") is None and states.load("t2") is not None


def session_files(folder: Path, session: str, cut_short: bool = False) -> None:
    """One session of Tune's state files: an experiment state without trials, and its searcher's files."""
    state = json.dumps({"trial_data": [], "runner_data": {}, "stats": {}}).encode()
    searcher = pickle.dumps({"study": None})
    for name, data in (
        (f"experiment_state-{session}.json", state),
        (f"search_gen_state-{session}.json", searcher),  # a pickle, whatever its name says
        (f"searcher-state-{session}.pkl", searcher),
    ):
        (folder / name).write_bytes(data[: len(data) // 2] if cut_short else data)


def test_a_resume_restores_the_newest_state_tune_saved_whole(tmp_path: Path) -> None:
    experiment = tmp_path / "study-20260101-000000"
    assert ready_tune_path(str(experiment)) is None  # a new study
    assert (experiment / checkpoints.FOLDER / MARKER).exists()

    # Tune writes tuner.pkl before its first state: killed in between, there is nothing to restore.
    (experiment / "tuner.pkl").write_bytes(b"")
    assert ready_tune_path(str(experiment)) is None

    session_files(experiment, "2026-01-01_00-00-00")
    session_files(experiment, "2026-01-01_00-10-00", cut_short=True)
    assert ready_tune_path(str(experiment)) == set()
    set_aside = sorted(p.name for p in experiment.glob("*.unreadable"))
    assert set_aside == [
        "experiment_state-2026-01-01_00-10-00.json.unreadable",
        "search_gen_state-2026-01-01_00-10-00.json.unreadable",
        "searcher-state-2026-01-01_00-10-00.pkl.unreadable",
    ]
    assert (experiment / "experiment_state-2026-01-01_00-00-00.json").exists()


def test_pause_point_pauses_the_first_process_once_and_only_at_its_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pause_file = tmp_path / "paused"
    monkeypatch.setenv(PAUSE_AT_ENV, "checkpoint-written")
    monkeypatch.setenv(PAUSE_FILE_ENV, str(pause_file))
    monkeypatch.setattr(checkpoints, "PAUSE_S", 5.0)
    checkpoints.pause_point("reported")
    assert not pause_file.exists()

    paused = threading.Thread(target=checkpoints.pause_point, args=("checkpoint-written",), daemon=True)
    paused.start()
    deadline = time.monotonic() + 10
    while not pause_file.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pause_file.exists() and paused.is_alive()
    # Anyone else at the point goes on: the pause file is taken.
    started = time.monotonic()
    checkpoints.pause_point("checkpoint-written")
    assert time.monotonic() - started < 1
