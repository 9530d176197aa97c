"""What a person watches while a study or a final training runs: one view redrawn in place on a terminal,
plain appended lines anywhere else (CI logs, `nohup`, a pipe), which a redraw would fill with escape codes.

The caller hands over a rich renderable for the terminal and a line for the rest; `LiveDisplay` decides which
is shown, and how often, so that the study's progress and the seeds of final training look and behave alike.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO

# A terminal redraw faster than this is not read, and every redraw holds Tune's event loop.
REDRAW_S = 0.5

# The views on screen: `stop_all` ends them when their owner may never get to (Ctrl-C in the middle of Tune).
_started: weakref.WeakSet[LiveDisplay] = weakref.WeakSet()


class LiveDisplay:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self._live: Any = None
        self._last_redraw = 0.0

    def start(self) -> None:
        if not self.live or self._live is not None:
            return
        from rich.console import Console
        from rich.live import Live

        # Lines printed meanwhile (warnings, the tool's own lines) go above the view instead of tearing it.
        self._live = Live(console=Console(file=self.stream), auto_refresh=False, redirect_stderr=False)
        self._live.start()
        _started.add(self)

    def redraw(self, make_view: Callable[[], Any], force: bool = False) -> None:
        """Shows the view `make_view` builds on the terminal (at most every REDRAW_S unless `force`); builds
        nothing elsewhere."""
        if self._live is None or (not force and time.monotonic() - self._last_redraw < REDRAW_S):
            return
        self._last_redraw = time.monotonic()
        self._live.update(make_view(), refresh=True)

    def line(self, text: str) -> None:
        """A line that stays: above the view on a terminal, appended elsewhere."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()  # leaves the last view on the screen
            self._live = None


def quiet_libraries() -> None:
    """Before Ray, Tune, Optuna or MLflow build anything: their set-up lines would bury the view (`--verbose`
    leaves them)."""
    # MLflow sets its loggers' level from this when it is imported (its INFO lines on creating a store).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it was imported already
    # Tune's warnings about the missing logger files.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study created and per trial sampled


def stop_all() -> None:
    """Stops every view still on screen, leaving its last state there and the terminal as a shell expects it."""
    for display in list(_started):
        display.stop()


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`: what an ETA needs, no more."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
