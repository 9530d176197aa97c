"""`sbn-study probe`: feature-map statistics of untrained networks, for arms × placements × seeds.

The paper's Fig. 1 evidence — feature-map norms growing with depth after BN and not after SBN, percentile
bands, spectral flatness — is a property of the architecture at initialization as much as of training: it
can be checked in seconds, with an interval over seeds, before a study spends GPU days. Each (arm, placement,
seed) builds the model with that seed, measures the statistics on the same fixed probe batch the trials use
(`trial.train.probe_batch`) with batch statistics, and the seeds are summarized with Student-t intervals.

A norm slot's output is what the next layer sees: for a composite site (BN then SBN, or the 2bn control) that
is its second norm, for a single norm the norm itself (`results.analysis.site_roles`). Slots are compared by
depth, their order in the forward pass, which is the same for every arm of one architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sbn_study.results.stats import CONFIDENCE, t_interval
from sbn_study.spec.config import TrialConfig

# What a probe reports per slot by default: the paper's three kinds of evidence.
DEFAULT_STATS = ("norm", "max", "p7", "p50", "p93", "flatness")


@dataclass(frozen=True)
class ProbeRequest:
    config: TrialConfig  # the architecture, data and norm settings every arm shares
    arms: tuple[str, ...]  # norm kinds
    placements: tuple[str, ...]
    seeds: tuple[int, ...]


def slot_outputs(sites: Sequence[str]) -> dict[str, str]:
    """site → the norm slot it is the output of, for the sites that are a slot's output, in forward order."""
    from sbn_study.results.analysis import site_roles

    roles = site_roles(sites)
    return {site: roles[site][1] for site in sites if roles[site][0] != "bn"}


def probe_at_init(request: ProbeRequest) -> pd.DataFrame:
    """Long table: arm, placement, seed, depth, slot, stat, value (every statistic of every slot, and the
    rescale and additive share of the spectral ones)."""
    import torch

    from sbn_study.trial.data import load_dataset
    from sbn_study.trial.featstats import measure_feature_stats
    from sbn_study.trial.models import create_model_from_config
    from sbn_study.trial.norms import norm_sites
    from sbn_study.trial.train import probe_batch

    dataset = load_dataset(request.config.data)
    probe = probe_batch(dataset, request.config, torch.device("cpu"))
    rows = []
    for arm in request.arms:
        for placement in request.placements:
            norm = request.config.norm.model_copy(update={"kind": arm, "placement": placement})
            for seed in request.seeds:
                torch.manual_seed(seed)
                model = create_model_from_config(request.config.model, norm, dataset.num_classes)
                outputs = slot_outputs(norm_sites(model))
                stats = measure_feature_stats(model, probe, sites=list(outputs))
                for depth, (site, slot) in enumerate(outputs.items()):
                    prefix = f"fm/{site}/"
                    rows += [
                        (arm, placement, seed, depth, slot, key.removeprefix(prefix), value)
                        for key, value in stats.items()
                        if key.startswith(prefix)
                    ]
    return pd.DataFrame(rows, columns=["arm", "placement", "seed", "depth", "slot", "stat", "value"])


def summarize_probe(table: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per arm, placement, depth and statistic: n seeds, mean, and the t interval over seeds."""
    rows = []
    keys = ["arm", "placement", "depth", "slot", "stat"]
    for key, group in table.groupby(keys, sort=False):
        mean, std, low, high = t_interval(group["value"].tolist(), confidence)
        rows.append((*key, len(group), mean, std, low, high))
    return pd.DataFrame(rows, columns=[*keys, "n", "mean", "std", "low", "high"])


def probe_figure(summary: pd.DataFrame) -> Any:
    """Three panels over depth, one line per arm × placement with its interval: feature-map norm (log), the
    p7–p93 band's width, and spectral flatness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    means = summary.pivot_table(
        index=["arm", "placement", "depth"], columns="stat", values="mean", sort=False
    )
    for number, ((arm, placement), group) in enumerate(summary.groupby(["arm", "placement"], sort=False)):
        style = {"color": f"C{number}", "marker": ".", "label": f"{arm} @ {placement}"}
        for ax, stat in ((axes[0], "norm"), (axes[2], "flatness")):
            rows = group[group["stat"] == stat]
            ax.plot(rows["depth"], rows["mean"], **style)
            ax.fill_between(rows["depth"], rows["low"], rows["high"], color=style["color"], alpha=0.2)
        band = means.loc[(arm, placement)]
        axes[1].plot(band.index, band["p93"] - band["p7"], **style)
    labels = (
        "feature-map norm (mean over samples)",
        "p93 − p7 of the values (mean over seeds)",
        "spectral flatness",
    )
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel("norm slot (depth, forward order)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(
        "Feature maps at initialization (probe batch, batch statistics), mean and t interval over seeds"
    )
    figure.tight_layout()
    return figure


def markdown_summary(summary: pd.DataFrame, stats: Sequence[str] = ("norm", "flatness")) -> str:
    """The deepest slot's statistics per arm × placement: the one-glance version of the figure."""
    deepest = summary[summary["depth"] == summary.groupby(["arm", "placement"])["depth"].transform("max")]
    lines = ["| arm | placement | slot | " + " | ".join(stats) + " |", "|---|---|---|" + "---|" * len(stats)]
    for (arm, placement, slot), group in deepest.groupby(["arm", "placement", "slot"], sort=False):
        by_stat = group.set_index("stat")
        cells = [
            f"{by_stat.at[s, 'mean']:.4g} [{by_stat.at[s, 'low']:.4g}, {by_stat.at[s, 'high']:.4g}]"
            for s in stats
        ]
        lines.append(f"| {arm} | {placement} | {slot} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
