"""The statistics of a multi-arm final training, on constructed tables with numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from sbn_study.final.comparison import (
    SeedScore,
    compare_arms,
    forest_plot,
    latex_table,
    markdown_table,
)
from sbn_study.results.stats import holm, paired_t_p_value, t_interval


def scores(arm: str, values: dict[int, float | str]) -> list[SeedScore]:
    """A float is a completed seed's score; a string is how a seed that did not complete ended."""
    return [
        SeedScore(arm, seed, "completed", v) if isinstance(v, float) else SeedScore(arm, seed, v, math.nan)
        for seed, v in values.items()
    ]


def test_t_interval_uses_student_t_with_n_minus_1_df():
    mean, std, low, high = t_interval([0.01, 0.02, 0.03])
    assert mean == pytest.approx(0.02) and std == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t_{0.975, 2} from a printed table
    assert (low, high) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-9)
    assert math.isnan(t_interval([0.5])[2]) and t_interval([0.5])[0] == 0.5


def test_paired_p_value_matches_scipy_ttest_rel():
    a, b = [0.71, 0.73, 0.70, 0.74, 0.72], [0.70, 0.71, 0.70, 0.72, 0.70]
    expected = stats.ttest_rel(a, b).pvalue
    assert paired_t_p_value([x - y for x, y in zip(a, b, strict=True)]) == pytest.approx(expected, rel=1e-10)
    assert math.isnan(paired_t_p_value([0.1]))
    assert paired_t_p_value([0.01, 0.01, 0.01]) == 0.0 and paired_t_p_value([0.0, 0.0]) == 1.0


def test_holm_steps_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, math.nan, 0.04])
    assert (
        adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    )


def test_arms_are_paired_on_common_completed_seeds_and_failures_are_counted():
    table = [
        *scores("sbn", {1: 0.70, 2: 0.72, 3: 0.71, 4: 0.73}),
        *scores("bn", {1: 0.69, 2: 0.70, 3: "diverged", 4: 0.71}),
        *scores("scale", {1: 0.70, 2: 0.71, 3: 0.70, 4: "error"}),
    ]
    summaries, differences = compare_arms(table, reference="sbn")
    assert [s.arm for s in summaries.values()] == ["sbn", "bn", "scale"]
    bn, scale = summaries["bn"], summaries["scale"]
    assert (bn.seeds, bn.completed, bn.diverged, bn.failed) == (4, 3, 1, 0)
    assert (scale.seeds, scale.completed, scale.diverged, scale.failed) == (4, 3, 0, 1)
    assert bn.mean == pytest.approx(0.70)

    by_arm = {d.arm: d for d in differences}
    # bn − sbn on seeds 1, 2, 4: −0.01, −0.02, −0.02
    assert (by_arm["bn"].n, by_arm["bn"].unpaired) == (3, 1)
    assert by_arm["bn"].mean == pytest.approx(-0.05 / 3)
    assert by_arm["bn"].p_value == pytest.approx(
        stats.ttest_rel([0.69, 0.70, 0.71], [0.70, 0.72, 0.73]).pvalue, rel=1e-10
    )
    # scale − sbn on seeds 1, 2, 3: 0.0, −0.01, −0.01
    assert by_arm["scale"].mean == pytest.approx(-0.02 / 3)
    raw = [by_arm["bn"].p_value, by_arm["scale"].p_value]
    assert [by_arm["bn"].p_holm, by_arm["scale"].p_holm] == pytest.approx(holm(raw))
    assert all(d.p_holm >= d.p_value for d in differences)


def test_tables_show_counts_pairs_and_corrected_p():
    table = [*scores("sbn", {1: 0.70, 2: 0.72, 3: 0.71}), *scores("bn", {1: 0.69, 2: 0.70, 3: "error"})]
    summaries, differences = compare_arms(table, reference="sbn")
    markdown = markdown_table(summaries, differences, labels={"sbn": "SBN34", "bn": "BN"})
    bn_row = next(line for line in markdown.splitlines() if line.startswith("| BN "))
    assert "2/3" in bn_row and "(n=2)" in bn_row and "-0.0150" in bn_row
    assert "reference" in next(line for line in markdown.splitlines() if line.startswith("| SBN34 "))
    latex = latex_table(summaries, differences, labels={"sbn": "SBN34", "bn": "BN"})
    assert latex.startswith(r"\begin{tabular}") and r"$\pm$" in latex and "BN &" in latex


def test_forest_plot_draws_one_row_per_compared_arm():
    table = [
        *scores("sbn", {1: 0.70, 2: 0.72}),
        *scores("bn", {1: 0.69, 2: 0.70}),
        *scores("2bn", {1: 0.7, 2: 0.7}),
    ]
    _, differences = compare_arms(table, reference="sbn")
    figure = forest_plot(differences)
    axes = figure.axes[0]
    assert [t.get_text().split(" ")[0] for t in axes.get_yticklabels()] == ["bn", "2bn"]
    assert "paired difference" in axes.get_xlabel()
