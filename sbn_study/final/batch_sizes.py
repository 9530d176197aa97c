"""The small-batch regime (`sbn-study train --batch-sizes`): every arm of a final training at every batch size
on the same seeds, and test accuracy against batch size per arm, the central figure of the papers of BGN, CBN
and MBN (after Wu & He's GN, Fig. 1).

The protocol, the one those papers follow:
- Every (arm, batch size, seed) is one run of `final.training`, so one Ray task on the cluster; one seed gives
  every arm and batch size the same initialization, and the same shuffle of images.
- Learning rate: the linear scaling rule (Goyal et al. 2017), lr × b / B with B the config's
  `train.batch_size`; `--lr-scaling none` keeps the config's lr at every batch size.
- Equal epochs, not equal steps: every run sees each training image `train.epochs` times. At batch size b it
  takes B/b times the steps of B, each at b/B times the lr: under the linear rule, the same expected progress
  per epoch; the schedule (milestones, cosine) is a function of the epoch, so it runs the same course.
- Warm-up: the config's `train.warmup_epochs` at every batch size (0 unless set). Scaling the lr down needs
  none; a batch size above B scales it up, which is what Goyal et al. warm up for (5 of 90 epochs).
- A run that diverges or fails (BN with a lone value per channel at a tiny batch, a norm that needs more
  images than a batch holds) stays in its cell: the mean and t interval are over the seeds that completed,
  and the cell says how many of how many did; the failures are listed under the table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sbn_study.errors import UserError
from sbn_study.final.arms import ArmPlan
from sbn_study.protocol import TrialStatus
from sbn_study.results.stats import CONFIDENCE
from sbn_study.spec.catalog import TRAIN_IMAGES
from sbn_study.spec.config import TrialConfig

if TYPE_CHECKING:
    from sbn_study.final.comparison import ArmSummary
    from sbn_study.final.training import FinalOutcome, Publication, SeedResult

TABLE_MARKDOWN, FIGURE = "batch_sizes.md", "batch_sizes.png"


@dataclass(frozen=True)
class Sweep:
    base: ArmPlan  # the arms, as `train --arms` plans them
    plan: ArmPlan  # one arm per (arm, batch size): what `run_final` trains
    batch_sizes: tuple[int, ...]  # ascending
    lr_scaling: str

    @property
    def reference_batch(self) -> int:
        return self.base.config.train.batch_size

    def cell(self, arm: str, batch_size: int) -> str:
        return _cell_key(arm, batch_size)

    @property
    def note(self) -> str:
        """How the lr, the budget and the warm-up follow the batch size, in a sentence."""
        train = self.base.config.train
        lr = (
            f"lr × b/{self.reference_batch} (linear scaling from the config's batch size)"
            if self.lr_scaling == "linear"
            else "the config's lr at every batch size"
        )
        warm = f"{_epochs(train.warmup_epochs)} of warm-up" if train.warmup_epochs else "no warm-up"
        return f"{lr}; {_epochs(train.epochs)} at every batch size; {warm}"


def _epochs(count: int) -> str:
    return f"{count} epoch{'s' if count != 1 else ''}"


def _cell_key(arm: str, batch_size: int) -> str:
    """The swept plan's arm (and label) of `arm` at `batch_size`."""
    return f"{arm}-b{batch_size}"


def sweep(plan: ArmPlan, batch_sizes: Sequence[int], lr_scaling: str) -> Sweep:
    """Every arm of `plan` at every batch size; UserError when one is larger than the training images."""
    reference = plan.config.train.batch_size
    arms: dict[str, TrialConfig] = {}
    labels: dict[str, str] = {}
    tags: dict[str, dict[str, str]] = {}
    ordered = tuple(sorted(batch_sizes))
    for arm, config in plan.arms.items():
        for b in ordered:
            lr = config.train.lr * b / reference if lr_scaling == "linear" else config.train.lr
            key = _cell_key(arm, b)
            arms[key] = _at_batch_size(config, b, lr)
            labels[key] = _cell_key(plan.labels[arm], b)
            tags[key] = {"sbn.arm": arm, "sbn.batch_size": str(b), "sbn.lr_scaling": lr_scaling}
    swept = dataclasses.replace(plan, arms=arms, labels=labels, run_tags=tags)
    return Sweep(base=plan, plan=swept, batch_sizes=ordered, lr_scaling=lr_scaling)


def _at_batch_size(config: TrialConfig, batch_size: int, lr: float) -> TrialConfig:
    """`config` at `batch_size` and `lr`, refused when an epoch would hold no batch (the parser keeps the
    batch size ≥ 2, the lr stays > 0)."""
    data = config.data
    images = data.synthetic.train_size if data.dataset == "synthetic" else TRAIN_IMAGES.get(data.dataset)
    if images is not None and batch_size > images - data.val_size:
        raise UserError(
            f"--batch-sizes {batch_size}: larger than the {images - data.val_size} training images left "
            "after data.val_size"
        )
    return config.model_copy(
        update={"train": config.train.model_copy(update={"batch_size": batch_size, "lr": lr})}
    )


def warnings(s: Sweep) -> list[str]:
    """Batch sizes whose lr the linear rule raises above the config's while nothing warms it up."""
    above = [b for b in s.batch_sizes if b > s.reference_batch]
    if s.lr_scaling != "linear" or not above or s.base.config.train.warmup_epochs:
        return []
    return [
        f"warning: --batch-sizes {','.join(map(str, above))}: the linear rule raises the lr up to "
        f"×{max(above) / s.reference_batch:g} the config's with no warm-up (Goyal et al. warm up 5 of 90 "
        "epochs): --set train.warmup_epochs=N"
    ]


def render_start(path: str, s: Sweep, seeds: Sequence[int], experiment: str) -> str:
    runs = len(s.plan.arms) * len(seeds)
    return (
        f"sbn-study: batch sizes {','.join(map(str, s.batch_sizes))} × {', '.join(s.base.names.values())} × "
        f"seeds {','.join(map(str, seeds))} of {path} ({runs} runs), experiment '{experiment}'\n"
        f"protocol: {s.note}"
    )


def _cell(summary: ArmSummary) -> str:
    if summary.completed == 0:
        value = "–"
    elif math.isnan(summary.low):  # one completed seed: no interval
        value = f"{summary.mean:.3f}"
    else:
        value = f"{summary.mean:.3f} [{summary.low:.3f}, {summary.high:.3f}]"
    return f"{value} ({summary.completed}/{summary.seeds})"


def table(s: Sweep, summaries: Mapping[str, ArmSummary]) -> str:
    """One row per arm, one column per batch size: mean test accuracy [t interval] (completed/seeds)."""
    lines = [
        "| arm | " + " | ".join(f"b={b}" for b in s.batch_sizes) + " |",
        "|---|" + "---|" * len(s.batch_sizes),
    ]
    for arm, name in s.base.names.items():
        cells = [_cell(summaries[s.cell(arm, b)]) for b in s.batch_sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _explanation(s: Sweep) -> str:
    return (
        "Test accuracy of each seed's best-validation checkpoint: the mean over the seeds that completed, "
        f"its {CONFIDENCE:.0%} Student-t interval, and (completed/seeds): a seed that diverged or failed is "
        f"counted, not dropped. Protocol: {s.note}."
    )


def _failures(results: Sequence[SeedResult]) -> list[str]:
    return [
        f"- {r.arm}, seed {r.seed}: {r.status}" + (f": {r.error}" if r.error else "")
        for r in results
        if r.status != TrialStatus.COMPLETED
    ]


def markdown(s: Sweep, results: Sequence[SeedResult], summaries: Mapping[str, ArmSummary]) -> str:
    """`batch_sizes.md`: the table, what it says, and every run that did not complete."""
    text = f"# Test accuracy against batch size: {', '.join(s.base.names.values())}\n\n"
    text += f"{_explanation(s)}\n\n{table(s, summaries)}"
    failures = _failures(results)
    if failures:
        text += "\nRuns that did not complete:\n\n" + "\n".join(failures) + "\n"
    return text


def figure(s: Sweep, summaries: Mapping[str, ArmSummary]) -> Any:
    """Accuracy against batch size (log axis), one line per arm, with its t intervals; a point that rests on
    fewer seeds than were trained is labelled with its completed/seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(7.0, 4.5))
    for arm, name in s.base.names.items():
        cells = [summaries[s.cell(arm, b)] for b in s.batch_sizes]
        drawn = [(b, c) for b, c in zip(s.batch_sizes, cells, strict=True) if c.completed]
        xs = [b for b, _ in drawn]
        means = [c.mean for _, c in drawn]
        # A point without an interval (one seed) gets no bar rather than a NaN one.
        below = [0.0 if math.isnan(c.low) else c.mean - c.low for _, c in drawn]
        above = [0.0 if math.isnan(c.high) else c.high - c.mean for _, c in drawn]
        line = axes.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=name)
        for b, c in zip(s.batch_sizes, cells, strict=True):
            if c.completed < c.seeds:
                y = c.mean if c.completed else 0.0
                axes.annotate(
                    f"{c.completed}/{c.seeds}", (b, y), textcoords="offset points", xytext=(4, -10),
                    fontsize=8, color=line[0].get_color(),
                )  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_xticks(s.batch_sizes, [str(b) for b in s.batch_sizes])
    axes.set_xlabel(
        f"batch size (lr × b/{s.reference_batch})" if s.lr_scaling == "linear" else "batch size (same lr)"
    )
    axes.set_ylabel(f"test accuracy (mean, {CONFIDENCE:.0%} t interval over seeds)")
    axes.set_title("Test accuracy against batch size")
    axes.grid(alpha=0.3)
    axes.legend()
    fig.tight_layout()
    return fig


def publication(s: Sweep, results: Sequence[SeedResult], summaries: dict[str, ArmSummary]) -> Publication:
    """What the sweep publishes (`run_final`'s `publish`): its table and figure, and each cell's figures as
    metrics of the parent run, `<arm>/b<batch size>/test_acc_mean` and so on."""
    from sbn_study.final.training import Publication

    metrics: dict[str, float] = {}
    for arm in s.base.arms:
        for b in s.batch_sizes:
            c = summaries[s.cell(arm, b)]
            prefix = f"{arm}/b{b}/"
            values = {"test_acc_mean": c.mean, "test_acc_low": c.low, "test_acc_high": c.high}
            values |= {"completed": c.completed, "diverged": c.diverged, "failed": c.failed}
            metrics |= {prefix + k: float(v) for k, v in values.items() if math.isfinite(v)}
    return Publication(
        metrics, {TABLE_MARKDOWN: markdown(s, results, summaries)}, {FIGURE: figure(s, summaries)}
    )


def render_summary(s: Sweep, outcome: FinalOutcome) -> str:
    """The table, where its files are, and where the runs are."""
    lines = [
        _explanation(s),
        table(s, outcome.arms).rstrip("\n"),
        *_failures(outcome.results),
        f"wrote {outcome.folder}/: {', '.join(outcome.files)}",
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.experiment}', run "
        f"{outcome.parent_run_id}; group the runs by the tags sbn.arm and sbn.batch_size)",
    ]
    return "\n".join(lines)
