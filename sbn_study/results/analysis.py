"""A study in MLflow as tidy pandas tables: what `sbn-study report`, `sbn-study export` and the dashboards read.

Everything goes through the MLflow client: one `search_runs` for the trial runs of an execution (a parent
run), the parent's `resolved.yaml` for the study's metric, mode, budget and search space, and one
`get_metric_history` per (run, metric) a table needs. Those are issued a few at a time, because on a
tracking server each one is a round trip. When a study ran several times, the latest execution is read
unless `execution` names another (by parent run id or run name).
"""

from __future__ import annotations

import ast
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from sbn_study.errors import UserError, one_line
from sbn_study.protocol import BETTER, EPOCH_METRICS, FEATURE_PREFIX
from sbn_study.results.stats import CONFIDENCE, t_interval
from sbn_study.spec import StudySpec
from sbn_study.spec.catalog import arm_label
from sbn_study.spec.config import TrialConfig, flatten
from sbn_study.store.runs import open_client, trial_runs
from sbn_study.store.uri import redact_uri

# A composite norm site X (see sbn_study.trial.norms) is measured as X.bn, then X.sbn (SBN) or X.bn2 (2bn control).
_SECOND_NORMS = ("sbn", "bn2")
# Dotted keys whose values are strings even when they look like numbers (norm.placement "34").
_TEXT_KEYS = frozenset(k for k, v in flatten(TrialConfig().model_dump()).items() if isinstance(v, str))
_PARALLEL_READS = 8


@dataclass(frozen=True)
class StudyRuns:
    """One execution of a study as MLflow holds it: the parent run, its trial runs and its resolved spec."""

    client: MlflowClient
    study: str
    experiment_id: str
    parent: Run
    runs: tuple[Run, ...]  # the trial runs, in the order they started
    spec: StudySpec

    @property
    def metric(self) -> str:
        """The metric the study optimized (the first one of a two-objective study)."""
        return self.spec.search.metrics[0]

    @property
    def mode(self) -> str:
        return self.spec.search.modes[0]

    @property
    def budget(self) -> int:
        """The scheduler's full budget in epochs."""
        return self.spec.max_budget


def open_store(uri: str) -> MlflowClient:
    """A client of an existing store; UserError instead of MLflow quietly creating an empty sqlite file."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"tracking store {redact_uri(uri)} does not exist (run a study first, or pass --tracking-uri)"
        )
    # With HTTP retries and timeouts bounded: a server that stops answering fails a read in seconds, not minutes.
    return open_client(uri)


def executions(uri: str, study: str) -> pd.DataFrame:
    """The executions (parent runs) of a study, newest first: run_id, name, started, status."""
    client = open_store(uri)
    rows = [
        {
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "started": pd.Timestamp(run.info.start_time, unit="ms"),
            "status": run.info.status,
        }
        for run in _parent_runs(client, _experiment_id(client, uri, study))
    ]
    return pd.DataFrame(rows, columns=["run_id", "name", "started", "status"])


def load_study(uri: str, study: str, execution: str | None = None) -> StudyRuns:
    """The runs of one execution of `study`: the latest, or the one whose parent run id or name is `execution`."""
    client = open_store(uri)
    experiment_id = _experiment_id(client, uri, study)
    parents = _parent_runs(client, experiment_id)
    if not parents:
        raise UserError(f"study '{study}' has no executions in {redact_uri(uri)}")
    if execution is None:
        parent = parents[0]
    else:
        matches = [p for p in parents if execution in (p.info.run_id, p.info.run_name)]
        if not matches:
            known = ", ".join(p.info.run_name for p in parents)
            raise UserError(f"study '{study}' has no execution '{execution}' (executions: {known})")
        parent = matches[0]
    runs = tuple(trial_runs(client, experiment_id, parent.info.run_id))
    return StudyRuns(client, study, experiment_id, parent, runs, _resolved_spec(client, study, parent))


def _experiment_id(client: MlflowClient, uri: str, study: str) -> str:
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        raise UserError(f"study '{study}' not found in {redact_uri(uri)}")
    return experiment.experiment_id


def _parent_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    return list(
        client.search_runs(
            [experiment_id],
            filter_string="tags.`sbn.kind` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
    )


def _resolved_spec(client: MlflowClient, study: str, parent: Run) -> StudySpec:
    # The spec was validated before the study ran, so the schema check alone is enough here (and keeps the
    # architecture registry, and torch, out of a reader).
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(parent.info.run_id, "resolved.yaml", folder)
            return StudySpec.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except Exception as exc:
        raise UserError(
            f"study '{study}': execution {parent.info.run_name} has no readable resolved.yaml "
            f"({one_line(exc)})"
        ) from None


def _histories(
    client: MlflowClient, wanted: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], list[Metric]]:
    """(run id, metric) → its history sorted by step."""
    with ThreadPoolExecutor(max_workers=_PARALLEL_READS) as pool:
        found = pool.map(lambda key: client.get_metric_history(*key), wanted)
        return {
            key: sorted(history, key=lambda m: m.step) for key, history in zip(wanted, found, strict=True)
        }


def _param_value(key: str, text: str) -> Any:
    """An MLflow param (a string) back as the value the trial config held."""
    if key in _TEXT_KEYS:
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def trials(uri: str, study: str, *, execution: str | None = None, all_params: bool = False) -> pd.DataFrame:
    """One row per trial, in start order: trial_id, run_id, run_name (as the UI lists it), status, arm, epochs
    (reached), full_budget, best_epoch (of the study's metric), compute_s (Σ epoch_time_s), node, started,
    searched (what the sampler chose for this trial), then the final value `<m>` and best value `best_<m>` of
    every epoch metric, then the parameters (dotted keys, typed): the searched ones, norm.kind and
    norm.placement, or all with `all_params`.

    `attrs` carries study, execution, metric, mode, budget, searched and space (the spec's distributions), which
    `param_importance` and `best_trials` use.
    """
    source = load_study(uri, study, execution)
    wanted = [(run.info.run_id, m) for run in source.runs for m in EPOCH_METRICS if m in run.data.metrics]
    histories = _histories(source.client, wanted)
    searched = list(source.spec.search.space)
    shown = [*searched, *(k for k in ("norm.kind", "norm.placement") if k not in searched)]
    rows = []
    for run in source.runs:
        tags, params, run_id = run.data.tags, run.data.params, run.info.run_id
        row: dict[str, Any] = {
            "trial_id": tags["sbn.trial_id"],
            "run_id": run_id,
            "run_name": run.info.run_name,
            "status": tags.get("sbn.status", "?"),
            "arm": arm_label(params.get("norm.kind", "?"), params.get("norm.placement", "?")),
        }
        curves = {m: histories.get((run_id, m), []) for m in EPOCH_METRICS}
        row["epochs"] = max((h[-1].step for h in curves.values() if h), default=0)
        row["full_budget"] = row["epochs"] >= source.budget
        row["best_epoch"] = _best_step(curves[source.metric], source.mode)
        row["compute_s"] = sum(m.value for m in curves["epoch_time_s"] if math.isfinite(m.value))
        row["node"] = tags.get("sbn.node", "")
        row["started"] = pd.Timestamp(run.info.start_time, unit="ms")
        row["searched"] = tags.get("sbn.searched", "")
        for name, history in curves.items():
            row[name] = history[-1].value if history else math.nan
        for name, history in curves.items():
            if name in BETTER:
                step = _best_step(history, BETTER[name])
                row[f"best_{name}"] = next((m.value for m in history if m.step == step), math.nan)
        keys = list(params) if all_params else shown
        row.update((key, _param_value(key, params[key])) for key in keys if key in params)
        rows.append(row)
    table = pd.DataFrame(rows)
    if all_params and rows:
        order = [*shown, *(k for k in flatten(TrialConfig().model_dump()) if k not in shown)]
        fixed = [c for c in table.columns if c not in order]
        table = table[fixed + [k for k in order if k in table.columns]]
    table.attrs.update(
        study=study,
        execution=source.parent.info.run_id,
        metric=source.metric,
        mode=source.mode,
        budget=source.budget,
        searched=searched,
        space={key: dist.model_dump() for key, dist in source.spec.search.space.items()},
    )
    return table


def _best_step(history: Sequence[Metric], mode: str) -> int:
    """The first epoch at which `history` reached its best finite value; 0 when it has none."""
    finite = [m for m in history if math.isfinite(m.value)]
    if not finite:
        return 0
    sign = 1.0 if mode == "max" else -1.0
    return max(finite, key=lambda m: (sign * m.value, -m.step)).step


def curves(
    uri: str, study: str, metrics: Sequence[str] = EPOCH_METRICS, *, execution: str | None = None
) -> pd.DataFrame:
    """Per-epoch values, long form: trial_id, epoch, metric, value, status, run_id."""
    source = load_study(uri, study, execution)
    wanted = [(run.info.run_id, m) for run in source.runs for m in metrics if m in run.data.metrics]
    histories = _histories(source.client, wanted)
    by_id = {run.info.run_id: run.data.tags for run in source.runs}
    rows = [
        (by_id[run_id]["sbn.trial_id"], m.step, metric, m.value, by_id[run_id].get("sbn.status", "?"), run_id)
        for (run_id, metric), history in histories.items()
        for m in history
    ]
    return pd.DataFrame(rows, columns=["trial_id", "epoch", "metric", "value", "status", "run_id"])


def site_roles(sites: Iterable[str]) -> dict[str, tuple[str, str]]:
    """site → (role, base site) for the sites of one model: `bn`, `sbn` or `bn2` inside a composite site
    (base = the composite's name), `norm` for a single normalization layer (base = the site itself).

    The role cannot be read off a name alone: `layer3.1.bn2` is the plain second BN of a ResNet block, while
    `layer3.1.bn1.bn2` is the 2bn control's second BN; a site is composite when its `.bn` part has a sibling.
    """
    sites = set(sites)
    composites = {
        base
        for base, _, leaf in (site.rpartition(".") for site in sites)
        if leaf in _SECOND_NORMS and f"{base}.bn" in sites
    }
    roles = {}
    for site in sites:
        base, _, leaf = site.rpartition(".")
        roles[site] = (
            (leaf, base) if base in composites and leaf in ("bn", *_SECOND_NORMS) else ("norm", site)
        )
    return roles


def feature_stats(
    uri: str,
    study: str,
    *,
    execution: str | None = None,
    sites: Sequence[str] | None = None,
    stats: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Feature-map statistics, long form: trial_id, epoch (0 = initialization), site, role (bn / sbn / bn2 /
    norm, see `site_roles`), base_site, stat, value, status, run_id. `sites` and `stats` restrict what is read
    (a ResNet-18 study has ~40 sites × 12 statistics per trial)."""
    source = load_study(uri, study, execution)
    parsed: dict[tuple[str, str], tuple[str, str, str, str]] = {}
    for run in source.runs:
        keys = [k for k in run.data.metrics if k.startswith(FEATURE_PREFIX)]
        split = {k: k.removeprefix(FEATURE_PREFIX).rsplit("/", 1) for k in keys}
        roles = site_roles(site for site, _ in split.values())
        for key, (site, stat) in split.items():
            if (sites is None or site in sites) and (stats is None or stat in stats):
                parsed[run.info.run_id, key] = (site, *roles[site], stat)
    histories = _histories(source.client, list(parsed))
    tags = {run.info.run_id: run.data.tags for run in source.runs}
    rows = [
        (
            tags[run_id]["sbn.trial_id"],
            m.step,
            *parsed[run_id, key],
            m.value,
            tags[run_id].get("sbn.status", "?"),
            run_id,
        )
        for (run_id, key), history in histories.items()
        for m in history
    ]
    columns = ["trial_id", "epoch", "site", "role", "base_site", "stat", "value", "status", "run_id"]
    return pd.DataFrame(rows, columns=columns).sort_values(
        ["trial_id", "site", "stat", "epoch"], ignore_index=True
    )


def best_trials(
    table: pd.DataFrame, metric: str | None = None, mode: str | None = None, k: int = 5
) -> pd.DataFrame:
    """The `k` best rows of a `trials` table by the column `metric` (default: `best_<study metric>`; the plain
    name is the final value), in `mode` (default: the study's); rows without a value are left out.

    Rows keep the order of their scores, full budget or not: the order `sbn-study export` writes, which
    warns of each config whose trial did not reach the full budget. The column `outranks_full_budget` flags
    the rows that matter: a trial stopped before the full budget (epochs below the table's budget) ranked
    above one that reached it, i.e. a score of a shorter run placed above a full-budget one.
    """
    metric = metric or f"best_{table.attrs['metric']}"
    mode = mode or table.attrs["mode"]
    scored = table[table[metric].notna()]
    ranked = scored.sort_values(metric, ascending=mode == "min", kind="stable")
    short = (ranked["epochs"] < table.attrs["budget"]).to_numpy()
    full_below = (~short)[::-1].cumsum()[::-1] > 0  # whether a full-budget trial ranks here or lower
    return ranked.assign(outranks_full_budget=short & full_below).head(k)


def group_summary(
    table: pd.DataFrame, by: str | Sequence[str], value: str, *, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Per group of `by`: n, mean, std (ddof 1) and the Student-t `confidence` interval of the mean of
    `value` (ci_low, ci_high; n − 1 degrees of freedom, NaN for a group of one), rows without a value left
    out. A t interval, not a bootstrap: a group holds a handful of trials, where a percentile bootstrap of
    the mean is too narrow."""
    rows = []
    for key, group in table[table[value].notna()].groupby(by, sort=True):
        values = group[value].to_list()
        mean, std, low, high = t_interval(values, confidence)
        rows.append(
            {"group": key, "n": len(values), "mean": mean, "std": std, "ci_low": low, "ci_high": high}
        )
    return pd.DataFrame(rows, columns=["group", "n", "mean", "std", "ci_low", "ci_high"]).set_index("group")


def dashboard_source(tracking_uri: str, study: str) -> tuple[str, str]:
    """The store and study a dashboard reads: $MLFLOW_TRACKING_URI and $SBN_STUDY when set, else the
    notebook's parameters. A relative sqlite path resolves against the repository root (the nearest folder
    above the working directory with a pyproject.toml), where `sbn-study run` writes `sbn-runs/` by default.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    study = os.environ.get("SBN_STUDY") or study
    relative = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(relative).is_absolute():
        here = Path.cwd().resolve()
        root = next((p for p in (here, *here.parents) if (p / "pyproject.toml").is_file()), here)
        uri = f"sqlite:///{root / relative}"
    return uri, study
