"""What stops a study early besides Ctrl-C: a SIGTERM (what batch schedulers and `kill` send) and a disk that
runs out of space under the study. Both take Ctrl-C's way, Tune's graceful stop (Tune's state saved, the
record closed, unfinished trials resumable), which a signal handler or a thread can only reach by sending
this process SIGINT; the reason is kept for the command's last line and exit code. The embedded Ray ending
under the study leaves Tune no graceful way: the study's own record and state are closed without it.

No Ray, Tune or MLflow here: the CLI installs the SIGTERM handler before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

EXIT_TERMINATED = 128 + signal.SIGTERM  # what shells report for a process that SIGTERM ended
EXIT_NO_SPACE = 2  # the user's to fix, as bad input is

# What a study keeps free on every disk it writes to, beside room for its checkpoints: the last save of
# Tune's state, the record's end and the state file must fit after the stop. At most a share of a small disk.
MIN_FREE_BYTES = 64 * 2**20
MIN_FREE_SHARE = 0.05
POLL_S = 1.0


@dataclass(frozen=True)
class Stop:
    message: str  # the command's last line on stderr
    exit_code: int


TERMINATED = Stop("sbn-study: terminated (SIGTERM); stopped as after Ctrl-C", EXIT_TERMINATED)

_requested: list[Stop] = []


def request_stop(stop: Stop) -> None:
    """Stops the command as Ctrl-C would, keeping the first reason asked; every request is one more Ctrl-C
    (Tune takes the first for a graceful stop and the second for an immediate one)."""
    if not _requested:
        _requested.append(stop)
    os.kill(os.getpid(), signal.SIGINT)


def note_stop(stop: Stop) -> None:
    """Keeps `stop` as the reason, unless another came first, without stopping anything."""
    if not _requested:
        _requested.append(stop)


def requested() -> Stop | None:
    """Why the command was asked to stop, if it was by anything but Ctrl-C."""
    return _requested[0] if _requested else None


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """While it lasts, SIGTERM is a Ctrl-C that remembers it was a SIGTERM (a process that is not the main
    thread cannot set handlers: there it changes nothing)."""
    _requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(*_: object) -> None:
    # One stop, however often it comes: `timeout` and process-group kills send it to the driver twice (its
    # pid and its group), and a second Ctrl-C would make Tune's stop immediate, without its saved state.
    if not _requested:
        request_stop(TERMINATED)


@dataclass(frozen=True)
class Disk:
    """Where a study writes (its output folder, Tune's local storage, a local MLflow store) and what it must
    keep free there: the floor, and room for `copies` files as large as the largest of Tune's experiment
    folder (the trials' checkpoints, written while others still exist)."""

    folders: tuple[Path, ...]
    experiment: Path | None = None
    copies: int = 0

    def shortage(self) -> str | None:
        """What lacks room, in one line naming the folder; None while every disk has what it needs."""
        need_for_files = self.copies * _largest_file(self.experiment) if self.experiment else 0
        for folder in self.folders:
            usage = shutil.disk_usage(_existing(folder))
            need = min(MIN_FREE_BYTES, int(MIN_FREE_SHARE * usage.total)) + need_for_files
            if usage.free < need:
                return (
                    f"--output: no space left on the device of {folder}: {_mb(usage.free)} free, under the "
                    f"{_mb(need)} a study keeps free to save its state and checkpoints"
                )
        return None


def stop_when_space_runs_out(disk: Disk, poll_s: float = POLL_S) -> contextlib.AbstractContextManager[None]:
    """While it lasts, a thread looks at `disk` every `poll_s` and stops the study (once) when it runs short,
    before a write fails: a write that fails midway leaves Tune's state file cut short, which no resume reads."""

    def stop_if_short() -> bool:
        if shortage := disk.shortage():
            message = f"error: {shortage}: the study stopped; free space and continue it with --resume"
            request_stop(Stop(message, EXIT_NO_SPACE))
            return True
        return False

    return _watching("sbn-study-space", poll_s, stop_if_short)


def close_when_ray_is_lost(
    processes: Mapping[str, int],
    close: Callable[[], None],
    work: str = "study",
    then: str = "continue the study with --resume",
    poll_s: float = POLL_S,
) -> contextlib.AbstractContextManager[None]:
    """While it lasts, a thread watches the embedded Ray's `processes` (name → pid: its GCS and raylet). When
    one ends under the `work` (the OOM killer, a scheduler that signals every process of the job, `ray stop`),
    nothing can be stopped through Ray any more, and Ray's core worker ends this process a minute later with its
    runs left open: `close` is called at once (the reason kept, as `requested()`, saying what to do `then`) to
    close them itself and end the command. Nothing to watch (Ray not started here): nothing happens."""
    if not processes:
        return contextlib.nullcontext()
    import psutil

    watched = {name: psutil.Process(pid) for name, pid in processes.items()}

    def ended() -> str | None:
        for name, process in watched.items():
            try:
                # An ended child stays a zombie until Ray's shutdown reaps it.
                if process.status() == psutil.STATUS_ZOMBIE:
                    return name
            except psutil.NoSuchProcess:
                return name
        return None

    def close_if_lost() -> bool:
        if name := ended():
            message = f"error: the embedded Ray's {name} process ended under the {work}: every run is closed; {then}"
            note_stop(Stop(message, 1))
            close()
            return True
        return False

    return _watching("sbn-study-ray", poll_s, close_if_lost)


@contextlib.contextmanager
def _watching(name: str, poll_s: float, act: Callable[[], bool]) -> Iterator[None]:
    """While it lasts, a thread (`name`) calls `act` every `poll_s` until it acts (returns True)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if act():
                return

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _existing(folder: Path) -> Path:
    """The folder, or its nearest ancestor that exists (a folder the study has not made yet is on its disk)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _largest_file(folder: Path) -> int:
    sizes = [0]
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a checkpoint replaced meanwhile
                sizes.append(os.stat(os.path.join(root, name)).st_size)
    return max(sizes)


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
