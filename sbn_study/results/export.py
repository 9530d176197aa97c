"""`sbn-study export`: the best trials of a study as standalone final-training configurations.

An exported file is the trial's fully resolved configuration (the TrialConfig sections, from the trial
run's `config.yaml`) plus a `provenance` block that says where it came from and how good it was. Trials
are ranked by the best value of the study's metric they reached, among those whose values measure their
configuration (completed or stopped early by the scheduler); a trial the scheduler stopped before the full
budget can rank high on a short run, so its provenance says `full_budget: false`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sbn_study.errors import UserError
from sbn_study.spec import Mode, load_trial_config
from sbn_study.spec.config import Strict, TrialConfig, multi_domain_refusal
from sbn_study.spec.loader import dump_yaml
from sbn_study.store.uri import redact_uri


class Provenance(Strict):
    """Where an exported configuration came from; final training records it and trains without it."""

    study: str
    execution: str  # the study's parent run id
    trial_id: str
    run_id: str
    tracking_uri: str  # the store that holds `run_id` (without credentials)
    status: str  # the trial's sbn.status
    rank: int
    metric: str
    mode: Mode
    value: float  # the trial's best value of `metric`
    epoch: int  # where it reached `value`
    epochs_run: int
    budget: int  # the study's full budget in epochs
    full_budget: bool  # whether the trial trained to `budget` (a scheduler may have stopped it before)
    # Every `train.seed` the study's trials trained with; final training picks other seeds. None in files
    # exported before it was recorded.
    search_seeds: list[int] | None = None


class FinalConfig(TrialConfig):
    """A final-training configuration: the trial sections and, when exported, their provenance."""

    provenance: Provenance | None = None


def load_final_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> FinalConfig:
    """Reads and checks a final-training configuration like a spec (same `--set` and error lines)."""
    return load_trial_config(path, overrides, FinalConfig)


@dataclass(frozen=True)
class Exported:
    path: Path
    provenance: Provenance
    not_trainable: str | None = None  # why `sbn-study train` refuses the config, if it does


def export_name(study: str, rank: int, ranks: int, trial_id: str) -> str:
    """`<study>-top<rank>-<trial id>.yaml`, the rank padded to the width of the last of `ranks`, so that a
    folder listing keeps the files in rank order."""
    return f"{study}-top{rank:0{len(str(ranks))}d}-{trial_id}.yaml"


def export_best(
    uri: str, study: str, top_k: int, out_dir: Path, *, execution: str | None = None
) -> list[Exported]:
    """Writes the `top_k` best trials of `study` (its latest execution, or `execution`) to `out_dir` as
    `<study>-top<rank>-<trial id>.yaml`. UserError when the study does not exist or has no completed trial.
    """
    from sbn_study.protocol import RANKED_STATUSES
    from sbn_study.results.analysis import best_trials, open_store, trials

    table = trials(uri, study, execution=execution, all_params=True)
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    if not counts.get("completed"):
        found = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no trials"
        raise UserError(f"study '{study}' has no completed trial ({found}): nothing to export")
    metric, mode, budget = table.attrs["metric"], table.attrs["mode"], table.attrs["budget"]
    ranked = best_trials(table[table["status"].isin(RANKED_STATUSES)], f"best_{metric}", mode, top_k)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder {out_dir} ({exc.strerror or exc})") from None
    seeds = search_seeds(table.get("train.seed", ()))
    client = open_store(uri)
    exported = []
    for rank, row in enumerate(ranked.to_dict("records"), start=1):
        provenance = Provenance(
            study=study,
            execution=table.attrs["execution"],
            trial_id=row["trial_id"],
            run_id=row["run_id"],
            tracking_uri=redact_uri(uri),
            status=row["status"],
            rank=rank,
            metric=metric,
            mode=mode,
            value=row[f"best_{metric}"],
            epoch=row["best_epoch"],
            epochs_run=row["epochs"],
            budget=budget,
            full_budget=row["full_budget"],
            search_seeds=seeds,
        )
        with tempfile.TemporaryDirectory() as folder:
            text = Path(client.download_artifacts(row["run_id"], "config.yaml", folder)).read_text()
        config = TrialConfig.model_validate(yaml.safe_load(text))
        path = out_dir / export_name(study, rank, len(ranked), row["trial_id"])
        document = {**config.model_dump(mode="json"), "provenance": provenance.model_dump(mode="json")}
        not_trainable = multi_domain_refusal(config.data, "final training")
        path.write_text(_header(provenance, path, not_trainable) + dump_yaml(document))
        exported.append(Exported(path, provenance, not_trainable))
    return exported


def search_seeds(values: Iterable[Any]) -> list[int]:
    """The distinct seeds among the `train.seed` values of a study's trials (MLflow params as text, or the
    typed values of a trials table), without the missing ones of a run whose params were never logged."""
    return sorted({int(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})


def _header(p: Provenance, path: Path, not_trainable: str | None) -> str:
    lines = [
        f"Final-training configuration: trial {p.trial_id} of study '{p.study}', rank {p.rank} by best "
        f"{p.metric} ({p.value:.4g} at epoch {p.epoch}; the trial ran {p.epochs_run} of {p.budget} epochs).",
        f"Note: {not_trainable}"
        if not_trainable
        else f"Train it at the full budget and test it once:  sbn-study train {path} --baseline",
    ]
    if not p.full_budget:
        lines.append(f"Warning: {budget_warning(p)}")
    return "".join(f"# {line}\n" for line in lines)


def budget_warning(p: Provenance) -> str:
    """The warning that a configuration's score comes from a trial stopped before the full budget."""
    return (
        f"trial {p.trial_id} was stopped by the scheduler after {p.epochs_run} of {p.budget} epochs: its "
        f"{p.metric} is not a full-budget result (full_budget: false)"
    )
