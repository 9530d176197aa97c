"""What a study's parent run says in MLflow's UI: a Markdown description (the study's question, its best trials,
how to go on from them, its search space) and, once it ended, its figures.

The description is set when Tune starts (the best trials are then still to come) and again at the end.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from sbn_study.errors import one_line
from sbn_study.spec.catalog import arm_label
from sbn_study.store.ui import best_so_far
from sbn_study.store.uri import redact_uri
from sbn_study.study.render import short_value

if TYPE_CHECKING:
    import pandas as pd

    from sbn_study.spec import StudySpec
    from sbn_study.spec.distributions import Distribution
    from sbn_study.store.record import StudyRecord

# MLflow keeps at most this many characters of a run tag (versions before 3 refuse more); the search space
# comes last, so that a cut loses only its tail.
NOTE_MAX_CHARS = 8000
BEST_SHOWN = 5


def study_note(spec: StudySpec, tracking_uri: str, best: pd.DataFrame | None = None) -> str:
    """The parent run's description. `best`: the best rows of the execution's trials table, best first
    (`results.analysis.best_trials`), or None while the study runs."""
    uri = shlex.quote(redact_uri(tracking_uri))  # the note lives in the store: never its credentials
    name = spec.name
    sections = [
        f"# Study `{name}`",
        f"**Question.** {_question(spec)}",
        "## Best trials",
        _best_table(spec, best),
        "## Next steps",
        "```bash\n"
        f"sbn-study report {name} --tracking-uri {uri}\n"
        f"sbn-study export {name} --top-k 3 --tracking-uri {uri}   # sbn-runs/exports/{name}-top1-<trial>.yaml\n"
        f"sbn-study train sbn-runs/exports/{name}-top1-<trial>.yaml --seeds 0,1,2,3,4 --baseline\n"
        "```",
        "## Search space",
        _space_table(spec),
    ]
    return "\n\n".join(sections)[:NOTE_MAX_CHARS]


def _question(spec: StudySpec) -> str:
    search = spec.search
    goal = " and the ".join(
        f"{'highest' if mode == 'max' else 'lowest'} `{metric}`"
        for metric, mode in zip(search.metrics, search.modes, strict=True)
    )
    return (
        f"Which values of the {len(search.space)} searched settings below give `{spec.model.arch}` the {goal} "
        f"on `{spec.data.dataset}` within {spec.max_budget} epochs? {search.num_samples} trials, sampled by "
        f"{search.sampler.type} and stopped early by {search.scheduler.type}; every other setting as in the "
        f"run's `resolved.yaml` (base norm: `{arm_label(spec.norm.kind, spec.norm.placement)}`)."
    )


def _best_table(spec: StudySpec, best: pd.DataFrame | None) -> str:
    metric = spec.search.metrics[0]
    if best is None:
        return (
            f"The study is running: the chart `{best_so_far(metric)}` follows the best value so far, and this "
            "table is written when it ends."
        )
    if best.empty:
        return "No trial completed or was stopped early: there is nothing to rank."
    searched = [key for key in spec.search.space if key in best]
    header = ["rank", "trial", "arm", "status", "epochs", f"best {metric}", "at epoch", *searched]
    rows = []
    for rank, row in enumerate(best.to_dict("records"), start=1):
        flag = " ⚠" if row["outranks_full_budget"] else ""
        cells = [rank, row["trial_id"], row["arm"], f"{row['status']}{flag}", row["epochs"]]
        cells += [f"{row[f'best_{metric}']:.4f}", row["best_epoch"], *(short_value(row[k]) for k in searched)]
        rows.append(cells)
    lines = [_row(header), _row(["---"] * len(header)), *map(_row, rows)]
    if best["outranks_full_budget"].any():
        lines.append("\n⚠ stopped early, yet above a trial that reached the full budget: retrain it first.")
    return "\n".join(lines)


def _space_table(spec: StudySpec) -> str:
    lines = [_row(["setting", "distribution", "sampled when"]), _row(["---"] * 3)]
    for key, dist in spec.search.space.items():
        when = "; ".join(f"`{k}` in {', '.join(map(str, v))}" for k, v in dist.when.items()) or "always"
        lines.append(_row([f"`{key}`", _distribution(dist), when]))
    return "\n".join(lines)


def _distribution(dist: Distribution) -> str:
    if dist.kind == "choice":
        return "choice of " + ", ".join(map(str, dist.values))
    step = f", step {dist.q:g}" if dist.q is not None else ""
    return f"{dist.kind} [{dist.low:g}, {dist.high:g}{step}]"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def publish_overview(record: StudyRecord, spec: StudySpec, uri: str) -> str:
    """Describes the execution on its parent run with its best trials and logs its figures, reading its
    trials back; returns why it could not ("" when done). The study's results are in the store either way."""
    from sbn_study.protocol import RANKED_STATUSES
    from sbn_study.results.analysis import best_trials, trials
    from sbn_study.results.figures import study_figures

    try:
        table = trials(uri, spec.name, execution=record.handle.parent_run_id)
        score = f"best_{spec.search.metrics[0]}"
        ranked = table.iloc[0:0]
        if score in table:
            ranked = best_trials(table[table["status"].isin(RANKED_STATUSES)], score, k=BEST_SHOWN)
        record.describe(study_note(spec, uri, ranked))
        for name, figure in study_figures(uri, table).items():
            record.log_figure(figure, name)
    except Exception as exc:
        return one_line(exc)
    return ""
