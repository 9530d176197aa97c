"""What `sbn-study report` and `sbn-study export` tell a person about a study read back from MLflow.

Pure functions from a `trials` table or the exported configs to text (plus the one writer of the table
files), so that every line can be tested on a constructed table. No pandas or MLflow at import: the
CLI imports this module only once a command runs, but tests and notebooks may import it on its own.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study.errors import UserError
from sbn_study.protocol import TrialStatus
from sbn_study.store.uri import redact_uri
from sbn_study.study.render import status_counts

if TYPE_CHECKING:
    import pandas as pd

    from sbn_study.results.export import Exported


def render_report(table: pd.DataFrame, uri: str, top: int, fidelity: pd.DataFrame | None = None) -> str:
    """The study and execution read, its trials by status and how many the scheduler stopped, the compute
    they took, and its `top` best trials by the best value of the study's metric with what was searched,
    a warning for each of those that outranks a full-budget trial on a shorter run, and a line per rung
    of the scheduler's `fidelity` (from `importance.rung_fidelity`), when given."""
    from sbn_study.results.analysis import best_trials

    attrs = table.attrs
    metric, mode, budget = attrs["metric"], attrs["mode"], attrs["budget"]
    statuses = list(table["status"]) if len(table) else []
    lines = [
        f"study '{attrs['study']}' (execution {attrs['execution']}) in {redact_uri(uri)}",
        f"{len(table)} trials: {status_counts(statuses) or 'none'}; "
        f"{statuses.count(TrialStatus.STOPPED_EARLY.value)} of {len(table)} stopped early by the scheduler",
    ]
    if len(table):
        lines.append(
            f"compute: {table['compute_s'].sum():.1f} s of training over {int(table['epochs'].sum())} "
            f"trial-epochs (Σ epoch_time_s); metric {metric} ({mode}), full budget {budget} epochs"
        )
        # The trial's number, as its MLflow run and the progress lines name it.
        best = best_trials(table, f"best_{metric}", mode, top).assign(
            trial=lambda t: t["run_name"].str.split().str[0]
        )
        shown = [
            "trial",
            "trial_id",
            "status",
            "epochs",
            f"best_{metric}",
            "best_epoch",
            "arm",
            *attrs["searched"],
        ]
        lines.append(f"best trials by best {metric}:")
        lines.append(best[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        lines.extend(
            f"warning: trial {row['trial']} ranks above full-budget trials with a {metric} from "
            f"{row['epochs']} of {budget} epochs (outranks_full_budget): not a comparable score"
            for row in best[best["outranks_full_budget"]].to_dict("records")
        )
        if fidelity is not None:
            lines.extend(_fidelity_line(row, budget) for row in fidelity.to_dict("records"))
    return "\n".join(lines)


def _fidelity_line(row: Mapping[str, Any], budget: int) -> str:
    against = "final" if row["against"] == budget else f"rung {row['against']}"
    rho = "n/a" if math.isnan(row["rho"]) else f"{row['rho']:.2f}"
    return f"fidelity: rung {row['rung']} → {against}: Spearman ρ = {rho} (n = {row['n']})"


def write_table(table: pd.DataFrame, path: str, fmt: str) -> str:
    """Writes the trials table as `fmt` (csv or parquet) to `path`, making its folder; the line saying so.
    UserError, in the words of the flag that asked for it (--csv, --parquet), when it cannot be written."""
    # Mapping-valued parameters (norm.options) have no parquet type: they are written as their text.
    mappings = [c for c in table.columns if table[c].map(lambda v: isinstance(v, dict)).any()]
    table = table.astype({c: str for c in mappings})
    writers = {"csv": table.to_csv, "parquet": table.to_parquet}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        writers[fmt](path, index=False)
    except OSError as exc:
        raise UserError(f"--{fmt}: cannot write {path} ({exc.strerror or exc})") from None
    return f"wrote the trials table ({len(table)} rows) to {path}"


def render_exported(exported: Sequence[Exported]) -> str:
    """One line per written config (its rank, trial and score), then the command that trains the best one (or
    why `train` refuses it)."""
    lines = [
        f"wrote {item.path}: rank {p.rank}, trial {p.trial_id} ({p.status}), best {p.metric} "
        f"{p.value:.4g} at epoch {p.epoch} of {p.budget}"
        for item in exported
        for p in (item.provenance,)
    ]
    best = exported[0]
    if best.not_trainable:
        lines.append(f"note: {best.not_trainable}")
    else:
        lines.append(f"next: sbn-study train {shlex.quote(str(best.path))} --baseline")
    return "\n".join(lines)


def export_warnings(exported: Sequence[Exported], top_k: int) -> list[str]:
    """A warning per config whose score is no full-budget result, and a note when fewer than asked were ranked."""
    from sbn_study.results.export import budget_warning

    lines = [
        f"warning: {item.path.name}: {budget_warning(item.provenance)}"
        for item in exported
        if not item.provenance.full_budget
    ]
    if len(exported) < top_k:
        lines.append(f"note: only {len(exported)} trials have a {exported[0].provenance.metric} to rank")
    return lines
