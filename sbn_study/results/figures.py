"""The figures a study's parent run carries in MLflow: learning curves by status, feature-map norms by site, and
the study's metric by placement, drawn from the tables of `results.analysis`.

Plain `matplotlib.figure.Figure`s, drawn by Agg when saved and never through pyplot: no window and no global
backend switch, so the driver and a notebook alike can make them.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sbn_study.protocol import RANKED_STATUSES
from sbn_study.results.analysis import curves, feature_stats, group_summary

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

STATUS_COLORS = {
    "completed": "tab:blue",
    "stopped_early": "tab:orange",
    "diverged": "tab:red",
    "error": "tab:gray",
    "killed": "tab:purple",
}
ROLE_COLORS = {"norm": "tab:blue", "bn": "tab:green", "sbn": "tab:red", "bn2": "tab:purple"}


def study_figures(uri: str, table: pd.DataFrame) -> dict[str, Figure]:
    """Artifact path → figure for the execution whose trials table (`results.analysis.trials`) is `table`;
    none for an execution without trials, and only those its recorded metrics and statistics allow."""
    from sbn_study.trial.featstats import LOGIT_NORM

    if table.empty:
        return {}
    study, execution, metric = (table.attrs[key] for key in ("study", "execution", "metric"))
    shown = list(dict.fromkeys([metric, "val_acc", "val_loss"]))[:2]
    history = curves(uri, study, shown, execution=execution)
    figures = {"figures/learning_curves.png": learning_curves(history, shown)}
    if f"best_{metric}" in table:
        figures["figures/accuracy_by_placement.png"] = by_placement(table)
    norms = feature_stats(uri, study, execution=execution, stats=["norm"])
    # The logits' norm travels as a feature statistic of a site of its own; it is no feature map.
    norms = norms[norms["site"] != LOGIT_NORM.split("/")[1]]
    if not norms.empty:
        figures["figures/feature_map_norms.png"] = feature_map_norms(norms)
    return figures


def learning_curves(history: pd.DataFrame, metrics: list[str]) -> Figure:
    """One panel per metric, one line per trial coloured by how it ended; × where the scheduler stopped it."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(6 * len(metrics), 4.2), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for (_, status), group in history[history["metric"] == metric].groupby(["trial_id", "status"]):
            color = STATUS_COLORS.get(status, "black")
            ax.plot(group["epoch"], group["value"], color=color, marker=".", alpha=0.75)
            if status == "stopped_early":
                ax.plot(group["epoch"].iloc[-1], group["value"].iloc[-1], "x", color=color, markersize=9)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    seen = set(history["status"])
    handles = [Line2D([], [], color=c, marker=".", label=s) for s, c in STATUS_COLORS.items() if s in seen]
    handles.append(Line2D([], [], color="black", marker="x", ls="", label="stopped by the scheduler"))
    axes[-1].legend(handles=handles, fontsize=8)
    figure.suptitle(f"Learning curves of {history['trial_id'].nunique()} trials, coloured by status")
    return figure


def by_placement(table: pd.DataFrame) -> Figure:
    """The best value of the study's metric of each trial by arm (placement in the paper's notation), with the
    mean and 95 % t interval of the trials that reached the full budget: only they compare at equal budgets."""
    import numpy as np
    from matplotlib.figure import Figure

    score = f"best_{table.attrs['metric']}"
    ranked = table[table["status"].isin(RANKED_STATUSES)]
    arms = sorted(table["arm"].unique(), key=lambda arm: (arm != "bn", arm))
    x = {arm: i for i, arm in enumerate(arms)}
    figure = Figure(figsize=(max(6.0, 1.3 * len(arms)), 4.5), layout="constrained")
    ax = figure.subplots()
    jitter = np.random.default_rng(0)
    for status, group in ranked.groupby("status"):
        xs = group["arm"].map(x) + jitter.uniform(-0.12, 0.12, len(group))
        ax.plot(xs, group[score], "o", color=STATUS_COLORS[status], alpha=0.6, label=f"trial ({status})")
    full = group_summary(ranked[ranked["full_budget"]], "arm", score).dropna(subset=["ci_low"])
    if not full.empty:
        positions = [x[arm] + 0.25 for arm in full.index]
        ax.errorbar(
            positions,
            full["mean"],
            yerr=[full["mean"] - full["ci_low"], full["ci_high"] - full["mean"]],
            fmt="s",
            color="black",
            capsize=5,
            label="mean, 95 % t interval (full budget)",
        )
    ax.set_xticks(range(len(arms)), arms)
    ax.set(xlabel="arm (placement, paper notation)", ylabel=score)
    ax.set_title(f"{score} by placement")
    if not ranked.empty:
        ax.legend(fontsize=8)
    return figure


def feature_map_norms(norms: pd.DataFrame) -> Figure:
    """Per site (forward order): the feature-map norm at initialization and at each trial's last measured
    epoch, median and range over the trials that have the site, coloured by where it is measured."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    last = norms[norms["epoch"] == norms.groupby("trial_id")["epoch"].transform("max")]
    sites = sorted(norms["site"].unique(), key=_natural)
    figure = Figure(figsize=(max(7.0, 0.45 * len(sites) + 2), 4.5), layout="constrained")
    ax = figure.subplots()
    initial = norms[norms["epoch"] == 0].groupby("site")["value"].median()
    ax.plot([sites.index(s) for s in initial.index], initial, "o", mfc="none", color="0.4")
    at_end = last.groupby(["site", "role"])["value"].agg(["median", "min", "max"]).reset_index()
    for row in at_end.itertuples(index=False):
        color = ROLE_COLORS.get(row.role, "black")
        position = sites.index(row.site)
        ax.vlines(position, row.min, row.max, color=color, alpha=0.5)
        ax.plot(position, row.median, "o", color=color)
    ax.set_xticks(range(len(sites)), sites, rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set(xlabel="site", ylabel="feature-map norm (mean per-sample L2, log scale)")
    ax.set_title("Feature-map norms by site")
    roles = [Line2D([], [], color="0.4", marker="o", mfc="none", ls="", label="at initialization (median)")]
    roles += [
        Line2D([], [], color=c, marker="o", label=f"last epoch, {role} (median, range)")
        for role, c in ROLE_COLORS.items()
        if role in set(at_end["role"])
    ]
    ax.legend(handles=roles, fontsize=8)
    return figure


def _natural(name: str) -> list[int | str]:
    # layer10 after layer9: sites in forward order.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
