"""Replacing a file so that a kill or a power cut at any instant leaves the old file or the new one, whole."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_file(
    path: Path, data: memoryview | bytes, before_rename: Callable[[], None] = lambda: None
) -> None:
    """Puts `data` at `path` in one step, durably: temporary file, fsync, rename, fsync of the folder.
    `before_rename` runs between the fsync and the rename (where the kill tests pause)."""
    # A unique temporary name in the same folder (a rename cannot cross file systems): a second writer of the
    # same path (a trial worker that outlived its node's heartbeat) never writes into this one's file.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's owner-only mode would hide the file from a node that runs Ray as another user.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the rename must not reach the disk before the data does
        before_rename()
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # makes the rename itself durable
    finally:
        os.close(folder)
