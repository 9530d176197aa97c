"""How the arms of a final training compare: per-arm summaries, paired differences against the reference arm,
Holm's correction across arms, and the table and forest plot a reviewer reads.

Every arm trains on the same seeds, so a seed is a block: the difference arm − reference on one seed removes
the seed-to-seed variance both share. With the 3–10 seeds a final training has, a Student-t interval on those
differences is the honest one (a percentile bootstrap is too narrow below n ≈ 10). A seed that diverged or
failed in either arm has no pair: it is counted in the table, and the interval says how many pairs it rests on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sbn_study.protocol import TrialStatus
from sbn_study.results.stats import CONFIDENCE, holm, paired_t_p_value, t_interval


@dataclass(frozen=True)
class SeedScore:
    """What a comparison needs of one (arm, seed): how it ended and, if it completed, its score."""

    arm: str
    seed: int
    status: str
    value: float


@dataclass(frozen=True)
class ArmSummary:
    """An arm over its seeds: counts by how they ended, and mean ± std with a t interval over the completed."""

    arm: str
    seeds: int
    completed: int
    diverged: int
    failed: int
    mean: float
    std: float  # sample standard deviation; NaN below 2 completed seeds
    low: float
    high: float

    @property
    def n(self) -> int:
        return self.completed


@dataclass(frozen=True)
class PairedDifference:
    """arm − reference over the seeds both completed: mean, t interval, two-sided paired t-test, Holm's p."""

    arm: str
    reference: str
    n: int  # complete pairs
    unpaired: int  # seeds of either arm without a completed partner
    mean: float
    std: float
    low: float
    high: float
    p_value: float
    p_holm: float
    confidence: float = CONFIDENCE


def summarize_arm(arm: str, scores: Sequence[SeedScore], confidence: float = CONFIDENCE) -> ArmSummary:
    mine = [s for s in scores if s.arm == arm]
    values = [s.value for s in mine if s.status == TrialStatus.COMPLETED]
    mean, std, low, high = t_interval(values, confidence)
    return ArmSummary(
        arm=arm,
        seeds=len(mine),
        completed=len(values),
        diverged=sum(s.status == TrialStatus.DIVERGED for s in mine),
        failed=sum(s.status not in (TrialStatus.COMPLETED, TrialStatus.DIVERGED) for s in mine),
        mean=mean,
        std=std,
        low=low,
        high=high,
    )


def compare_arms(
    scores: Sequence[SeedScore], reference: str, confidence: float = CONFIDENCE
) -> tuple[dict[str, ArmSummary], list[PairedDifference]]:
    """Summaries of every arm (in first-seen order) and the paired difference of every other arm against
    `reference`, Holm-corrected across those arms; no differences without a `reference` arm (a batch-size
    sweep has the configuration at every batch size, but no one arm to compare the others with)."""
    arms = list(dict.fromkeys(s.arm for s in scores))
    summaries = {arm: summarize_arm(arm, scores, confidence) for arm in arms}
    if reference not in summaries:
        return summaries, []
    completed = {(s.arm, s.seed): s.value for s in scores if s.status == TrialStatus.COMPLETED}
    seeds = {s.seed for s in scores}
    rows = []
    for arm in arms:
        if arm == reference:
            continue
        pairs = sorted(seed for seed in seeds if (arm, seed) in completed and (reference, seed) in completed)
        differences = [completed[arm, seed] - completed[reference, seed] for seed in pairs]
        mean, std, low, high = t_interval(differences, confidence)
        rows.append(
            (arm, len(pairs), len(seeds) - len(pairs), mean, std, low, high, paired_t_p_value(differences))
        )
    adjusted = holm([row[-1] for row in rows])
    differences = [
        PairedDifference(arm, reference, n, unpaired, mean, std, low, high, p, p_adj, confidence)
        for (arm, n, unpaired, mean, std, low, high, p), p_adj in zip(rows, adjusted, strict=True)
    ]
    return summaries, differences


def _number(value: float, digits: int = 4) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if math.isnan(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _rows(
    summaries: Mapping[str, ArmSummary], differences: Sequence[PairedDifference], labels: Mapping[str, str]
) -> list[list[str]]:
    by_arm = {d.arm: d for d in differences}
    rows = []
    for arm, s in summaries.items():
        d = by_arm.get(arm)
        rows.append(
            [
                labels.get(arm, arm),
                f"{s.completed}/{s.seeds}",
                str(s.diverged),
                str(s.failed),
                f"{_number(s.mean)} ± {_number(s.std)}",
                "reference" if d is None else f"{d.mean:+.4f}" if not math.isnan(d.mean) else "–",
                "" if d is None else f"[{_number(d.low)}, {_number(d.high)}] (n={d.n})",
                "" if d is None else _p(d.p_value),
                "" if d is None else _p(d.p_holm),
            ]
        )
    return rows


HEADER = ["arm", "completed", "diverged", "failed", "mean ± std", "Δ vs ref", "95 % CI of Δ", "p", "p (Holm)"]


def markdown_table(
    summaries: Mapping[str, ArmSummary],
    differences: Sequence[PairedDifference],
    labels: Mapping[str, str] | None = None,
) -> str:
    rows = _rows(summaries, differences, labels or {})
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def suite_table(
    comparisons: Mapping[str, tuple[Mapping[str, ArmSummary], Sequence[PairedDifference]]],
    figures: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
) -> str:
    """`markdown_table`'s rows for several figures (figure → its comparison) in one table, each named by
    `figures`; Holm's correction is within a figure, across the arms, as for accuracy."""
    lines = ["| figure | " + " | ".join(HEADER) + " |", "|" + "---|" * (len(HEADER) + 1)]
    for figure, (summaries, differences) in comparisons.items():
        for row in _rows(summaries, differences, labels or {}):
            lines.append(f"| {figures.get(figure, figure)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def latex_table(
    summaries: Mapping[str, ArmSummary],
    differences: Sequence[PairedDifference],
    labels: Mapping[str, str] | None = None,
) -> str:
    def escape(text: str) -> str:
        for plain, latex in (
            ("\\", r"\textbackslash{}"),
            ("_", r"\_"),
            ("%", r"\%"),
            ("&", r"\&"),
            ("#", r"\#"),
        ):
            text = text.replace(plain, latex)
        return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--").replace("<", r"$<$")

    rows = _rows(summaries, differences, labels or {})
    body = [" & ".join(escape(cell) for cell in row) + r" \\" for row in rows]
    return (
        "\n".join(
            [
                r"\begin{tabular}{l" + "r" * (len(HEADER) - 1) + "}",
                r"\toprule",
                " & ".join(escape(h) for h in HEADER) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
            ]
        )
        + "\n"
    )


def forest_plot(differences: Sequence[PairedDifference], labels: Mapping[str, str] | None = None) -> Any:
    """Paired differences with their intervals, one row per arm, and the line of no difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    figure, axes = plt.subplots(figsize=(8.0, 0.6 * max(len(differences), 1) + 1.4))
    for row, d in enumerate(differences):
        if not math.isnan(d.low):
            axes.plot([d.low, d.high], [row, row], color="tab:blue", linewidth=2)
        axes.plot([d.mean], [row], "o", color="tab:blue")
    axes.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    axes.set_yticks(range(len(differences)))
    axes.set_yticklabels(
        [f"{labels.get(d.arm, d.arm)} (n={d.n}, p_Holm={_p(d.p_holm)})" for d in differences]
    )
    axes.invert_yaxis()
    reference = differences[0].reference if differences else "reference"
    axes.set_xlabel("paired difference of test accuracy, arm − reference (95 % t CI)")
    axes.set_title(f"Arms against {labels.get(reference, reference)} on the same seeds")
    figure.tight_layout()
    return figure
