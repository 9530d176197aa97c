"""The study's progress as a person follows it: trials by status, epochs done against the budget with an ETA,
the best trial so far, and the running trials; a line each time a trial ends.

On a terminal it is one view redrawn in place; elsewhere (CI, `nohup`, a Ray Client driver, whose Tune loop
prints through the head's worker log) a summary line every `interval_s` (`terminal.LiveDisplay`). ASHA stops
trials before their budget, so the epochs still to run are an upper bound, and so is the ETA ("≤").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TextIO

from ray.tune import Callback

from sbn_study.protocol import RANKED_STATUSES, TrialStatus, ended_status
from sbn_study.spec import StudySpec
from sbn_study.terminal import LiveDisplay, duration
from sbn_study.tune.callbacks import run_name, trial_state

# Running trials the terminal view lists; more are counted, not listed.
LISTED_RUNNING = 12


@dataclass(frozen=True)
class Progress:
    counts: dict[
        str, int
    ]  # status → trials, every trial of this execution (those not created yet: "to start")
    epochs_done: int
    epochs_bound: int  # epochs done + at most what the trials not ended still run
    eta_s: float | None  # None until an epoch was timed
    best: tuple[str, float] | None  # (trial name, best value) among the trials that ended and are ranked
    running: list[tuple[str, int, float | None]]  # (trial name, epoch, best value so far)


class StudyProgress(Callback):
    def __init__(
        self,
        spec: StudySpec,
        interval_s: float = 30.0,
        earlier: int = 0,
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec
        self.metric, self.mode = spec.search.metrics[0], spec.search.modes[0]
        self.max_budget = spec.max_budget
        self.interval_s = interval_s
        self.earlier = earlier
        self.stream, self.live = stream, live
        self.total = spec.search.num_samples - earlier
        self._best: dict[str, float] = {}
        self._epochs: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self._display: LiveDisplay | None = None
        self._clock: tuple[float, int] | None = None  # (when this process saw its first epoch, epochs then)
        self._last_line = 0.0

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into its state: the terminal and the clock belong to one process.
        return {**self.__dict__, "stream": None, "_display": None, "_clock": None}

    def setup(self, total_num_samples: int | None = None, **info: Any) -> None:
        if total_num_samples is not None:
            self.total = total_num_samples
        self._display = LiveDisplay(self.stream, self.live)
        self._display.start()
        self._last_line = time.monotonic()

    @property
    def display(self) -> LiveDisplay:
        if self._display is None:  # a callback used without Tune's setup (a test)
            self.setup()
        assert self._display is not None
        return self._display

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        trial_id = trial.trial_id
        self._epochs[trial_id] = int(result.get("epoch", 0))
        if self._clock is None:
            self._clock = (time.monotonic(), self.epochs_done())
        value = result.get(self.metric)
        if (
            value is not None
            and not result.get("diverged")
            and _better(value, self._best.get(trial_id), self.mode)
        ):
            self._best[trial_id] = value
        self.display.redraw(lambda: self.view(trials))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, ended_status(trial.last_result, self.max_budget))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial, TrialStatus.ERROR)

    def _ended(self, trials: list, trial: Any, status: TrialStatus) -> None:
        best = self._best.get(trial.trial_id)
        score = "" if best is None else f", best {self.metric} {best:.4f}"
        epoch = self._epochs.get(trial.trial_id, 0)
        self.display.line(
            f"[{time.strftime('%H:%M:%S')}] {self.trial_name(trial)}: {status} at epoch {epoch}/{self.max_budget}"
            f"{score}"
        )
        self.display.redraw(lambda: self.view(trials), force=True)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.display.live:
            self.display.redraw(lambda: self.view(trials))  # the ETA and the clock move between results too
        elif time.monotonic() - self._last_line >= self.interval_s:
            self._last_line = time.monotonic()
            self.display.line(summary_line(self.progress(trials), self.metric))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.display.live:
            self.display.redraw(lambda: self.view(trials), force=True)
        else:
            self.display.line(summary_line(self.progress(trials), self.metric))
        self.display.stop()

    def trial_name(self, trial: Any) -> str:
        """The trial's MLflow run name (`t07 sbn23 lr=0.107 …`), so the screen and the UI name it alike."""
        name = self._names.get(trial.trial_id)
        if name is None:
            norm = self.spec.trial_config(trial.config).norm.model_dump(mode="json")
            name = self._names[trial.trial_id] = run_name(
                trial, norm, self.spec.search.num_samples, self.earlier
            )
        return name

    def epochs_done(self) -> int:
        return sum(self._epochs.values())

    def progress(self, trials: list) -> Progress:
        counts: dict[str, int] = {}
        bound, best, running = 0, None, []
        for trial in trials:
            state = trial_state(trial, self.max_budget)
            counts[state] = counts.get(state, 0) + 1
            epoch = self._epochs.get(trial.trial_id, 0)
            value = self._best.get(trial.trial_id)
            bound += epoch if state in ENDED else self.max_budget
            if state in RANKED_STATUSES and value is not None and _better(value, best and best[1], self.mode):
                best = (self.trial_name(trial), value)
            if state == "running":
                running.append((self.trial_name(trial), epoch, value))
        if (to_start := self.total - len(trials)) > 0:
            counts["to start"] = to_start
            bound += to_start * self.max_budget
        done = self.epochs_done()
        eta = None
        if self._clock is not None and done > self._clock[1]:
            rate = (done - self._clock[1]) / (time.monotonic() - self._clock[0])
            eta = (bound - done) / rate
        return Progress(counts, done, bound, eta, best, running)

    def view(self, trials: list) -> Any:
        return progress_view(self.name, self.progress(trials), self.metric, self.max_budget)


ENDED = {str(status) for status in TrialStatus if status != TrialStatus.RUNNING}


def _better(value: float, than: float | None, mode: str) -> bool:
    return than is None or (value > than if mode == "max" else value < than)


def _counts(progress: Progress) -> tuple[int, str, str]:
    ended = {s: n for s, n in progress.counts.items() if s in ENDED}
    others = {s: n for s, n in progress.counts.items() if s not in ENDED}
    how = ", ".join(f"{n} {s}" for s, n in sorted(ended.items()))
    rest = ", ".join(f"{n} {s}" for s, n in sorted(others.items()))
    return sum(ended.values()), how, rest


def _epochs(progress: Progress) -> str:
    remaining = progress.epochs_bound > progress.epochs_done
    eta = f" · ETA ≤ {duration(progress.eta_s)}" if progress.eta_s is not None and remaining else ""
    return f"epochs {progress.epochs_done}/≤{progress.epochs_bound}{eta}"


def summary_line(progress: Progress, metric: str) -> str:
    """`[10:27:07] 5/12 trials ended (3 completed, 2 stopped_early); 2 running, 5 to start · epochs 34/≤72 ·
    ETA ≤ 3m05s · best val_acc 0.5123 t03 sbn23 lr=0.107`"""
    ended, how, rest = _counts(progress)
    total = sum(progress.counts.values())
    best = "" if progress.best is None else f" · best {metric} {progress.best[1]:.4f} {progress.best[0]}"
    return (
        f"[{time.strftime('%H:%M:%S')}] {ended}/{total} trials ended{f' ({how})' if how else ''}"
        f"{f'; {rest}' if rest else ''} · {_epochs(progress)}{best}"
    )


def progress_view(name: str, progress: Progress, metric: str, max_budget: int) -> Any:
    """The terminal view: a header, the epoch bar with the ETA, the best trial, the running trials."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    ended, how, rest = _counts(progress)
    total = sum(progress.counts.values())
    header = Text.assemble(
        (f"{name}  ", "bold"),
        f"{ended}/{total} trials ended",
        f" ({how})" if how else "",
        f"; {rest}" if rest else "",
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(progress.epochs_bound, 1), completed=progress.epochs_done, width=40),
        Text(_epochs(progress)),
    )
    best = Text(
        "best: none ended yet"
        if progress.best is None
        else f"best {metric} {progress.best[1]:.4f}  {progress.best[0]}"
    )
    parts: list[Any] = [header, bar, best]
    if progress.running:
        table = Table(box=None, padding=(0, 2), show_edge=False)
        table.add_column("running")
        table.add_column("epoch", justify="right")
        table.add_column(f"best {metric}", justify="right")
        for trial, epoch, value in progress.running[:LISTED_RUNNING]:
            table.add_row(trial, f"{epoch}/{max_budget}", "-" if value is None else f"{value:.4f}")
        if len(progress.running) > LISTED_RUNNING:
            table.add_row(f"… {len(progress.running) - LISTED_RUNNING} more", "", "")
        parts.append(table)
    return Group(*parts)
