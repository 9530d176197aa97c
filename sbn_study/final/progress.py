"""Final training's progress as the study's (`tune.progress`): on a terminal one view redrawn in place (seeds
ended against all, an ETA, the seeds still training), elsewhere a line per seed as it ends.

A seed is one Ray task that reports only when it ends, so the view counts seeds, not epochs; the ETA assumes
the seeds still to end take as long, on the cluster's free slots, as those that ended did ("~", not a bound).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from sbn_study.final import render
from sbn_study.terminal import LiveDisplay, duration

if TYPE_CHECKING:
    from sbn_study.final.training import SeedResult

# Seeds still training that the terminal view lists; more are counted, not listed.
LISTED = 12


class SeedProgress:
    def __init__(
        self, runs: Sequence[tuple[str, int]], stream: TextIO | None = None, live: bool | None = None
    ) -> None:
        self.waiting = list(runs)  # (arm, seed), in the order they were launched
        self.total = len(self.waiting)
        self.statuses: dict[str, int] = {}
        self.display = LiveDisplay(stream, live)
        self._started = time.monotonic()

    def start(self) -> None:
        self._started = time.monotonic()
        self.display.start()
        self.display.redraw(self.view, force=True)

    def tick(self) -> None:
        self.display.redraw(self.view)

    def ended(self, result: SeedResult) -> None:
        self.waiting.remove((result.arm, result.seed))
        self.statuses[result.status] = self.statuses.get(result.status, 0) + 1
        self.display.line(f"{render.render_seed(result)}  [{self.summary()}]")
        self.display.redraw(self.view, force=True)

    def stop(self) -> None:
        self.display.stop()

    def eta_s(self) -> float | None:
        ended = self.total - len(self.waiting)
        if not ended or not self.waiting:
            return None
        return (time.monotonic() - self._started) / ended * len(self.waiting)

    def summary(self) -> str:
        """`3/10 seeds ended (2 completed, 1 error) · ETA ~ 4m10s`"""
        ended = self.total - len(self.waiting)
        how = ", ".join(f"{n} {status}" for status, n in sorted(self.statuses.items()))
        eta = self.eta_s()
        return f"{ended}/{self.total} seeds ended{f' ({how})' if how else ''}" + (
            "" if eta is None else f" · ETA ~ {duration(eta)}"
        )

    def view(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(self.total, 1), completed=self.total - len(self.waiting), width=40),
            Text(self.summary()),
        )
        parts: list[Any] = [Text("final training", style="bold"), bar]
        if self.waiting:
            waiting = ", ".join(f"{arm} seed {seed}" for arm, seed in self.waiting[:LISTED])
            more = f" and {len(self.waiting) - LISTED} more" if len(self.waiting) > LISTED else ""
            parts.append(Text(f"training or queued: {waiting}{more}"))
        return Group(*parts)
