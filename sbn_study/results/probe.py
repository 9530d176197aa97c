"""`sbn-study probe`: feature-map statistics of untrained networks, for arms × placements × seeds.

The paper's Fig. 1 evidence — feature-map norms growing with depth after BN and not after SBN, percentile
bands, spectral flatness — is a property of the architecture at initialization as much as of training: it
can be checked in seconds, with an interval over seeds, before a study spends GPU days. Each (arm, placement,
seed) builds the model with that seed, measures the statistics on the same fixed probe batch the trials use
(`trial.train.probe_batch`) with batch statistics, and the seeds are summarized with Student-t intervals.

A norm slot's output is what the next layer sees: for a composite site (BN then SBN, or the 2bn control) that
is its second norm, for a single norm the norm itself (`results.analysis.site_roles`). Slots are compared by
depth, their order in the forward pass, which is the same for every arm of one architecture.

`run_probe` is the command: in-process (no Ray: a tiny model takes seconds), it writes the long table, the
figure and the summary under the output folder and logs them to one MLflow run, with the request as params.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sbn_study.errors import UserError
from sbn_study.results.stats import CONFIDENCE, t_interval
from sbn_study.spec.config import TrialConfig, flatten, multi_domain_refusal

# The files a probe writes, under <output>/probe/<run name>/ and as artifacts of its run.
TABLE, FIGURE, SUMMARY = "probe.csv", "probe.png", "summary.md"

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


@dataclass(frozen=True)
class ProbeSource:
    path: str  # the spec or final-training config probed
    config: TrialConfig  # its (base) trial configuration
    name: str  # the study it belongs to: the experiment is `<name>-probe`
    tracking_uri: str | None  # a spec's tracking.uri


def load_source(path: str, overrides: Sequence[str], final: bool) -> ProbeSource:
    """A study spec, or (`final`) a final-training configuration named after its study, else its file."""
    if final:
        from sbn_study.results.export import load_final_config

        config = load_final_config(path, overrides)
        name = config.provenance.study if config.provenance else Path(path).stem
        return ProbeSource(
            path, TrialConfig.model_validate(config.model_dump(exclude={"provenance"})), name, None
        )
    from sbn_study.spec import load_spec

    spec = load_spec(path, overrides)
    config = spec.base_config()
    if refusal := multi_domain_refusal(config.data, "the probe"):
        raise UserError(refusal)
    return ProbeSource(path, config, spec.name, spec.tracking.uri)


@dataclass(frozen=True)
class ProbeOptions:
    source: ProbeSource
    output: Path
    tracking_uri: str


@dataclass(frozen=True)
class ProbeOutcome:
    summary: str  # the Markdown summary
    models: int  # arms × placements × seeds
    seconds: float  # building and measuring them
    folder: Path  # where the files are
    experiment: str
    run_id: str
    tracking_uri: str  # without credentials


def check_request(request: ProbeRequest) -> None:
    """Every arm × placement must be a configuration a trial could be built from: UserError otherwise."""
    from sbn_study.spec.rules import cross_field_errors

    errors = []
    for arm in request.arms:
        for placement in request.placements:
            flat = flatten(request.config.model_dump()) | {"norm.kind": arm, "norm.placement": placement}
            errors += cross_field_errors(flat, {}, None)[0]
    if errors:
        raise UserError("\n".join(dict.fromkeys(errors)))


def run_probe(request: ProbeRequest, options: ProbeOptions) -> ProbeOutcome:
    """Probes every arm × placement × seed, writes the table, figure and summary, and logs them to one run."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Param

    from sbn_study.store.runs import ensure_experiment, open_client
    from sbn_study.store.uri import check_reachable, redact_uri
    from sbn_study.study.state import prepare_output

    check_request(request)
    output = prepare_output(options.output)
    check_reachable(options.tracking_uri)
    start = time.monotonic()
    table = probe_at_init(request)
    seconds = time.monotonic() - start
    summary = summarize_probe(table)
    experiment = f"{options.source.name}-probe"
    run_name = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = output / "probe" / run_name
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown_summary(summary)
    (folder / SUMMARY).write_text(text)
    table.to_csv(folder / TABLE, index=False)
    figure = probe_figure(summary)
    figure.savefig(folder / FIGURE, dpi=120)
    plt.close(figure)

    uri = options.tracking_uri
    client = open_client(uri)
    experiment_id = ensure_experiment(uri, experiment, output / "artifacts")
    run_id = client.create_run(experiment_id, run_name=run_name, tags={"sbn.kind": "probe"}).info.run_id
    params = [Param(key, value) for key, value in _params(request, options.source).items()]
    for first in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[first : first + 100])
    for name in (TABLE, FIGURE, SUMMARY):
        client.log_artifact(run_id, str(folder / name))
    client.set_terminated(run_id)
    models = len(request.arms) * len(request.placements) * len(request.seeds)
    return ProbeOutcome(text, models, seconds, folder, experiment, run_id, redact_uri(uri))


def _params(request: ProbeRequest, source: ProbeSource) -> dict[str, str]:
    """The request: what was probed, and the configuration every model shares (its norm kind and placement
    are the arms' and placements')."""
    shared = flatten(request.config.model_dump())
    del shared["norm.kind"], shared["norm.placement"]
    return {
        "probe.source": source.path,
        "probe.arms": ",".join(request.arms),
        "probe.placements": ",".join(request.placements),
        "probe.seeds": ",".join(map(str, request.seeds)),
        **{key: str(value) for key, value in shared.items()},
    }


def render_probe(outcome: ProbeOutcome) -> str:
    return "\n".join(
        [
            f"probe: {outcome.models} untrained models in {outcome.seconds:.1f} s; the deepest norm slot, mean "
            "[95 % t interval] over seeds:",
            outcome.summary.rstrip("\n"),
            f"wrote {outcome.folder}/: {TABLE}, {FIGURE}, {SUMMARY}",
            f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.experiment}', run {outcome.run_id})",
        ]
    )
