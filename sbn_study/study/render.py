"""What `sbn-study validate` and `sbn-study run` tell a person about a study: the one-line check of its spec,
the line it starts with, the summary of how it ended and the command that continues it.

Pure functions from a spec or a StudyOutcome to text, so that every line can be tested without Ray. No
pydantic, Ray or MLflow at import: `validate` uses it too, and must answer before torch could load.
"""

from __future__ import annotations

import math
import shlex
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study.store.ui import DEFAULT_UI_URL, runs_link, served_ui
from sbn_study.store.uri import redact_uri

if TYPE_CHECKING:
    from sbn_study.spec import StudySpec
    from sbn_study.study.lifecycle import StudyOutcome


@dataclass(frozen=True)
class RunCommand:
    """The parts of a `sbn-study run` invocation that decide which study, store and cluster it continues."""

    spec: str
    overrides: tuple[str, ...] = ()
    output: str | None = None  # None: left at its default, which a resume finds by itself
    tracking_uri: str | None = None
    address: str | None = None


def short_value(value: Any) -> str:
    """A parameter value in a table or a name: floats to 3 significant digits; "-" for a conditional
    parameter that a trial did not sample (NaN in a trials table)."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def status_counts(statuses: Iterable[str]) -> str:
    """How many trials ended each way, by status name ("2 completed, 1 error"); "" for no trials."""
    return ", ".join(f"{n} {status}" for status, n in sorted(Counter(statuses).items()))


def render_valid(spec: StudySpec) -> str:
    search = spec.search
    return (
        f"ok: {spec.name}: {_plural(search.num_samples, 'trial')} over "
        f"{_plural(len(search.space), 'searched parameter')} "
        f"(sampler {search.sampler.type}, scheduler {search.scheduler.type})"
    )


def spec_warnings(spec: StudySpec) -> list[str]:
    return [f"warning: {warning}" for warning in spec.warnings()]


def render_start(spec: StudySpec, resuming: bool) -> str:
    search = spec.search
    return (
        f"sbn-study: {'resuming' if resuming else 'starting'} study '{spec.name}': "
        f"{search.num_samples} trials, {search.sampler.type} + {search.scheduler.type}"
    )


def render_outcome(outcome: StudyOutcome) -> str:
    """How the study ended, its best trial with the parameters that made it, and where to look further.
    Starts with an empty line, to stand apart from the live table above it."""
    lines = [
        "",
        f"study '{outcome.name}' {outcome.status}: " + status_counts(outcome.trial_statuses.values()),
    ]
    best = outcome.best
    if best:
        # Its number and arm, as the progress lines named it; its values follow, one a line.
        label = " ".join(best["run_name"].split()[:2])
        lines.append(
            f"best trial {label} ({best['status']}): {best['metric']} = {best['value']:.4f} "
            f"at epoch {best['epoch']}"
        )
        lines += [f"  {key} = {value}" for key, value in best["params"].items()]
        lines.append(f"  MLflow run {best['run_id']} · Tune trial {best['trial_id']}")
    lines.append(
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.name}'), Tune state {outcome.tune_path}"
    )
    lines += browse_lines(outcome.tracking_uri, outcome.experiment_id)
    return "\n".join(lines)


def browse_lines(tracking_uri: str, experiment_id: str) -> list[str]:
    """Where to see the study's runs: on its tracking server, or through `sbn-study ui` (on its default port)."""
    if served := served_ui(tracking_uri):
        return [f"runs:    {runs_link(served, experiment_id)}"]
    return [
        f"browse:  sbn-study ui --tracking-uri {_single_quoted(tracking_uri)}",
        f"runs:    {runs_link(DEFAULT_UI_URL, experiment_id)}",
    ]


def render_ui(tracking_uri: str, ui_url: str, links: list[tuple[str, str, str]]) -> str:
    """What `sbn-study ui` prints: where it serves which store, and each study's runs and charts there."""
    lines = [f"MLflow UI for {redact_uri(tracking_uri)} at {ui_url} (Ctrl-C to stop)"]
    for name, runs, charts in links:
        lines += [f"  {name}", f"    runs:   {runs}", f"    charts: {charts}"]
    return "\n".join(lines)


def outcome_warnings(outcome: StudyOutcome, output: Path) -> list[str]:
    if not outcome.unsent_writes:
        return []
    saved = output / "studies" / f"{outcome.name}.unsent.jsonl"
    return [
        f"warning: the tracking server did not take {outcome.unsent_writes} writes; they are saved in {saved}"
    ]


def resume_command(command: RunCommand) -> str:
    """The command that continues an interrupted study: the same spec, overrides, store and cluster, since a
    resume that resolved to another spec or store would not find (or would not match) the saved state."""
    words = ["sbn-study", "run", command.spec, "--resume"]
    for override in command.overrides:
        words += ["--set", override]
    if command.output is not None:
        words += ["--output", command.output]
    if command.tracking_uri:
        words += ["--tracking-uri", redact_uri(command.tracking_uri)]  # credentials never reach the screen
    if command.address:
        words += ["--address", command.address]
    return f"resume:  {shlex.join(words)}"


def _single_quoted(text: str) -> str:
    # Quoted even where shlex.quote would leave it bare: users copy this line as it has always looked.
    return "'" + text.replace("'", "'\"'\"'") + "'"
