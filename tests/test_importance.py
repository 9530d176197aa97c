"""Statistics that hold up, on constructed tables: rungs, ASHA's fidelity, importance at equal budgets with
conditional parameters and bootstrap intervals, t intervals per group, and rankings that flag short runs.
No Ray trials and no MLflow store: every expected number is known by construction or by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import pytest

from sbn_study.results import analysis
from sbn_study.results.importance import (
    Bootstrap,
    Rungs,
    param_importance,
    rung_fidelity,
    rung_importance,
    rung_values,
    study_rungs,
)
from sbn_study.results.report import render_report
from sbn_study.spec.schema import SchedulerConfig
from tests.test_render import URI, trials_table

QUICK = Bootstrap(resamples=8)
SPACE = {
    "train.lr": {"loguniform": [0.01, 0.2]},
    "norm.kind": {"choice": ["sbn", "bn"]},
    "norm.fft_norm": {"choice": ["backward", "ortho", "forward"], "when": {"norm.kind": ["sbn"]}},
    # Sampled for the 2bn control only, which no trial below is.
    "norm.eps": {"loguniform": [1.0e-6, 1.0e-2], "when": {"norm.kind": ["2bn"]}},
}


def curves_table(values: Mapping[str, Sequence[float]], statuses: Mapping[str, str] = {}) -> pd.DataFrame:
    """An `analysis.curves` table of val_acc: trial → its values at epochs 1, 2, ... (completed unless
    `statuses` says otherwise)."""
    rows = [
        (trial, epoch, "val_acc", value, statuses.get(trial, "completed"), f"run-{trial}")
        for trial, history in values.items()
        for epoch, value in enumerate(history, start=1)
    ]
    return pd.DataFrame(rows, columns=["trial_id", "epoch", "metric", "value", "status", "run_id"])


def sbn_and_bn_trials(n: int, searched_column: bool = True) -> pd.DataFrame:
    """`n` completed trials alternating SBN (fft_norm sampled, cycling its levels) and plain BN; val_acc
    is twice the learning rate, so train.lr explains all of it."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        sbn = i % 2 == 0
        lr = 0.01 + 0.015 * i
        row = {
            "trial_id": f"t{i}",
            "status": "completed",
            "epochs": 4,
            "train.lr": lr,
            "norm.kind": "sbn" if sbn else "bn",
            # What trials() holds where fft_norm was not sampled: the base value, or NaN in a made table.
            "norm.fft_norm": ["backward", "ortho", "forward"][i // 2 % 3] if sbn else "backward",
            "norm.eps": 1e-5,
            "val_acc": 2 * lr,
        }
        if searched_column:
            row["searched"] = "norm.kind,train.lr" + (",norm.fft_norm" if sbn else "")
        else:
            row["norm.eps"] = math.nan
            row["norm.fft_norm"] = row["norm.fft_norm"] if sbn else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(metric="val_acc", mode="max", budget=4, space=SPACE)
    return table


# --- rungs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grace", "factor", "budget", "expected"),
    [(1, 3, 3, (1,)), (2, 3, 8, (2, 6)), (10, 3, 200, (10, 30, 90)), (2, 2.5, 20, (2, 5, 13)), (4, 2, 4, ())],
)
def test_asha_rungs_are_the_epochs_at_which_rays_asha_decides(
    grace: int, factor: float, budget: int, expected: tuple[int, ...]
) -> None:
    from ray.tune.schedulers.async_hyperband import _Bracket

    table = pd.DataFrame({"status": [], "epochs": []})
    table.attrs.update(metric="val_acc", budget=budget)
    scheduler = SchedulerConfig(type="asha", grace_period=grace, reduction_factor=factor)
    rungs = study_rungs(table, scheduler)
    assert rungs == Rungs("val_acc", budget, expected)
    assert rungs.compared == (*expected, budget)
    # Ray judges a trial at the first epoch that reaches a milestone; the full budget ends it anyway.
    milestones = [m for m, _ in _Bracket(grace, budget, factor, 0)._rungs]
    assert rungs.epochs == tuple(sorted({math.ceil(m) for m in milestones if m < budget}))


def test_without_an_asha_spec_the_rungs_are_where_trials_were_stopped() -> None:
    table = pd.DataFrame(
        {"status": ["completed", "stopped_early", "stopped_early", "stopped_early", "diverged"]}
        | {"epochs": [9, 1, 3, 1, 2]}
    )
    table.attrs.update(metric="val_acc", budget=9)
    assert study_rungs(table).epochs == (1, 3)
    assert study_rungs(table, SchedulerConfig(type="median")).epochs == (1, 3)
    assert study_rungs(table, SchedulerConfig(type="none")).epochs == (1, 3)


def test_rung_values_are_the_metric_at_each_compared_epoch_of_measured_trials() -> None:
    curves = curves_table(
        {"a": [0.1, 0.2, 0.3], "b": [0.4], "c": [0.5, math.nan], "d": [0.9, 0.9, 0.9]},
        {"b": "stopped_early", "c": "diverged", "d": "error"},
    )
    curves = pd.concat([curves, curves_table({"a": [0.15]})])  # a replayed epoch: the later value counts
    values = rung_values(curves, Rungs("val_acc", 3, (1,)))
    assert list(values.columns) == [1, 3]
    assert values.fillna(-1.0).to_dict("index") == {"a": {1: 0.15, 3: 0.3}, "b": {1: 0.4, 3: -1.0}}


# --- fidelity -----------------------------------------------------------------------------------------


def test_fidelity_is_one_when_the_rungs_rank_the_trials_as_the_end_does_and_minus_one_reversed() -> None:
    finals = [0.5, 0.6, 0.7, 0.8, 0.9]
    stopped = {"s1": [0.05], "s2": [0.01]}  # stopped at rung 1: no pair, no effect
    statuses = dict.fromkeys(stopped, "stopped_early")
    agreeing = {f"t{i}": [f - 0.4, f - 0.3, f - 0.1, 0.0, f] for i, f in enumerate(finals)}
    rungs = Rungs("val_acc", 5, (1, 3))
    fidelity = rung_fidelity(curves_table(agreeing | stopped, statuses), rungs)
    assert fidelity.to_dict("records") == [
        {"rung": 1, "against": 5, "n": 5, "rho": pytest.approx(1.0)},
        {"rung": 3, "against": 5, "n": 5, "rho": pytest.approx(1.0)},
    ]
    reversed_ = {f"t{i}": [1 - f, 0.0, 1 - f, 0.0, f] for i, f in enumerate(finals)}
    fidelity = rung_fidelity(curves_table(reversed_ | stopped, statuses), rungs)
    assert list(fidelity["rho"]) == pytest.approx([-1.0, -1.0]) and list(fidelity["n"]) == [5, 5]


def test_fidelity_compares_with_the_next_rung_when_too_few_trials_reached_the_end() -> None:
    curves = curves_table(
        {
            "a": [0.1, 0.0, 0.4, 0.0, 0.6],
            "b": [0.2, 0.0, 0.5, 0.0, 0.7],
            "c": [0.3, 0.0, 0.1],
            "d": [0.4, 0.0, 0.2],
            "e": [0.5],
        },
        {"c": "stopped_early", "d": "stopped_early", "e": "stopped_early"},
    )
    fidelity = rung_fidelity(curves, Rungs("val_acc", 5, (1, 3)))
    # Rung 1 against rung 3 (a, b, c, d: ranks 1 2 3 4 against 3 4 1 2): ρ = 1 − 6·Σd²/(n(n²−1)) = −0.6.
    # Rung 3 has no later rung and only 2 trials at the end: no ρ.
    assert fidelity["rung"].tolist() == [1, 3] and fidelity["against"].tolist() == [3, 5]
    assert fidelity["n"].tolist() == [4, 2]
    assert math.isclose(fidelity["rho"][0], -0.6) and math.isnan(fidelity["rho"][1])


def test_a_study_without_rungs_has_no_fidelity() -> None:
    fidelity = rung_fidelity(curves_table({"a": [0.1, 0.2]}), Rungs("val_acc", 2, ()))
    assert fidelity.empty and list(fidelity.columns) == ["rung", "against", "n", "rho"]


# --- importance ---------------------------------------------------------------------------------------


def test_a_conditional_parameter_is_rated_within_the_trials_that_sampled_it() -> None:
    rated = param_importance(sbn_and_bn_trials(12), "val_acc", bootstrap=QUICK)
    assert list(rated.columns) == ["importance", "ci_low", "ci_high", "n", "conditional", "warning"]
    assert rated.index[0] == "train.lr" and rated.loc["train.lr", "importance"] > 0.5
    assert rated["n"].to_dict() == {"train.lr": 12, "norm.kind": 12, "norm.fft_norm": 6, "norm.eps": 0}
    assert rated["conditional"].to_dict() == {
        "train.lr": False,
        "norm.kind": False,
        "norm.fft_norm": True,
        "norm.eps": True,
    }
    assert rated["warning"].to_dict() == {
        "train.lr": "",
        "norm.kind": "",
        "norm.fft_norm": "only 6 trials (fewer than 10)",
        "norm.eps": "never sampled",
    }
    assert rated.index[-1] == "norm.eps" and math.isnan(rated.loc["norm.eps", "importance"])
    sampled = rated.drop("norm.eps")
    assert ((sampled.ci_low <= sampled.ci_high) & sampled.importance.between(0, 1)).all()
    # The same rating when the table says what was sampled by missing values instead of a searched column.
    by_values = param_importance(sbn_and_bn_trials(12, searched_column=False), "val_acc", bootstrap=QUICK)
    pd.testing.assert_frame_equal(by_values, rated)


def test_importance_is_seeded_and_its_interval_narrows_with_confidence() -> None:
    table = sbn_and_bn_trials(12)
    first = param_importance(table, "val_acc", bootstrap=QUICK)
    pd.testing.assert_frame_equal(first, param_importance(table, "val_acc", bootstrap=QUICK))
    narrower = param_importance(table, "val_acc", bootstrap=Bootstrap(resamples=8, confidence=0.5))
    assert (narrower.ci_high - narrower.ci_low <= first.ci_high - first.ci_low).drop("norm.eps").all()


def test_importance_warns_of_few_trials_and_thin_levels_and_rates_nothing_below_two() -> None:
    few = param_importance(sbn_and_bn_trials(3), "val_acc", bootstrap=QUICK)
    assert few["n"].to_dict() == {"train.lr": 3, "norm.kind": 3, "norm.fft_norm": 2, "norm.eps": 0}
    assert few.loc["norm.kind", "warning"] == (
        "only 3 trials (fewer than 10); levels tried by fewer than 2 trials: bn (1)"
    )
    assert few.loc["norm.fft_norm", "warning"] == (
        "only 2 trials (fewer than 10); levels tried by fewer than 2 trials: backward (1), ortho (1), "
        "forward (0)"
    )
    one = param_importance(sbn_and_bn_trials(1), "val_acc", bootstrap=QUICK)
    assert one[["importance", "ci_low", "ci_high"]].isna().all().all()
    assert one.loc["train.lr", "warning"] == "only 1 trial (fewer than 10)"
    flat = sbn_and_bn_trials(4).assign(val_acc=0.5)
    rated = param_importance(flat, "val_acc", bootstrap=QUICK)
    assert rated["importance"].isna().all()
    assert rated.loc["train.lr", "warning"].endswith("; val_acc does not vary over these trials")
    with pytest.raises(ValueError, match="needs the search space"):
        param_importance(flat.assign(), "val_acc", space={})


def test_importance_at_each_rung_rests_on_the_trials_that_reached_it() -> None:
    table = sbn_and_bn_trials(12)
    promoted = {f"t{i}" for i in range(0, 12, 2)}  # the SBN trials went on to the end
    curves = curves_table(
        {
            t: [lr, lr, 2 * lr, 2 * lr] if t in promoted else [lr]
            for t, lr in zip(table.trial_id, table["train.lr"], strict=True)
        },
        {t: "stopped_early" for t in table.trial_id if t not in promoted},
    )
    rated = rung_importance(curves, table, Rungs("val_acc", 4, (1, 2)), bootstrap=QUICK)
    assert list(rated.columns) == ["epoch", "parameter", *param_importance(table, "val_acc", bootstrap=QUICK)]
    n = rated.pivot(index="parameter", columns="epoch", values="n")
    assert n.to_dict("index") == {
        "norm.eps": {1: 0, 2: 0, 4: 0},
        "norm.fft_norm": {1: 6, 2: 6, 4: 6},
        "norm.kind": {1: 12, 2: 6, 4: 6},
        "train.lr": {1: 12, 2: 6, 4: 6},
    }
    at_end = rated[rated.epoch == 4].set_index("parameter")
    assert at_end.index[0] == "train.lr" and at_end.loc["norm.kind", "warning"] == (
        "only 6 trials (fewer than 10); levels tried by fewer than 2 trials: bn (0); "
        "one value in all of these trials"
    )
    lonely = curves_table({"t0": [0.1, 0.2, 0.3, 0.4], "t1": [0.1]}, {"t1": "stopped_early"})
    at_end = rung_importance(lonely, table, Rungs("val_acc", 4, (1,)), bootstrap=QUICK)
    assert at_end[at_end.epoch == 4]["importance"].isna().all()
    unreached = rung_importance(lonely, table, Rungs("val_acc", 5, (4,)), bootstrap=QUICK)
    assert set(unreached.loc[unreached.epoch == 5, "warning"]) == {"no trial with a val_acc at epoch 5"}


# --- intervals and rankings ---------------------------------------------------------------------------


def test_group_summary_is_a_student_t_interval() -> None:
    table = pd.DataFrame(
        {"arm": ["sbn23", "sbn23", "sbn23", "bn", "2bn23"], "acc": [0.5, 0.6, 0.7, 0.9, None]}
    )
    summary = analysis.group_summary(table, "arm", "acc")
    assert list(summary.index) == ["bn", "sbn23"] and list(summary.n) == [1, 3]
    half = 4.302652729749462 * 0.1 / math.sqrt(3)  # t(0.975, 2 df) · s / √n
    row = summary.loc["sbn23"]
    assert math.isclose(row["mean"], 0.6) and math.isclose(row["std"], 0.1)
    assert math.isclose(row["ci_low"], 0.6 - half) and math.isclose(row["ci_high"], 0.6 + half)
    assert summary.loc["bn", ["std", "ci_low", "ci_high"]].isna().all()
    wider = analysis.group_summary(table, "arm", "acc", confidence=0.99).loc["sbn23"]
    assert wider["ci_low"] < row["ci_low"] and wider["ci_high"] > row["ci_high"]


def test_a_short_run_above_a_full_budget_trial_is_never_ranked_without_its_flag() -> None:
    table = trials_table(
        [
            ("full", "completed", 4, 0.8),
            ("short-best", "stopped_early", 1, 0.9),
            ("short-worst", "stopped_early", 1, 0.3),
            ("full-worse", "completed", 4, 0.5),
        ]
    )
    best = analysis.best_trials(table, k=4)
    assert list(best.trial_id) == ["short-best", "full", "full-worse", "short-worst"]
    assert list(best.outranks_full_budget) == [True, False, False, False]
    assert list(analysis.best_trials(table, k=1).outranks_full_budget) == [True]
    stopped_only = analysis.best_trials(table[table.status == "stopped_early"], k=2)
    assert not stopped_only.outranks_full_budget.any()  # nothing at the full budget to outrank
    by_loss = analysis.best_trials(table.assign(loss=[0.3, 0.1, 0.9, 0.5]), "loss", "min", k=4)
    assert list(by_loss.trial_id) == ["short-best", "full", "full-worse", "short-worst"]
    assert list(by_loss.outranks_full_budget) == [True, False, False, False]


def test_report_warns_of_a_short_run_on_top_and_gives_the_fidelity_of_each_rung() -> None:
    table = trials_table([("a", "completed", 4, 0.8), ("b", "stopped_early", 1, 0.9)])
    fidelity = pd.DataFrame(
        {"rung": [1, 2], "against": [4, 4], "n": [5, 2], "rho": [0.8333, math.nan]}
    ).astype({"n": int})
    lines = render_report(table, URI, top=2, fidelity=fidelity).splitlines()
    assert lines[-3:] == [
        "warning: trial t2 ranks above full-budget trials with a val_acc from 1 of 4 epochs "
        "(outranks_full_budget): not a comparable score",
        "fidelity: rung 1 → final: Spearman ρ = 0.83 (n = 5)",
        "fidelity: rung 2 → final: Spearman ρ = n/a (n = 2)",
    ]
    next_rung = fidelity.assign(against=[2, 4])
    assert render_report(table, URI, top=2, fidelity=next_rung).splitlines()[-2] == (
        "fidelity: rung 1 → rung 2: Spearman ρ = 0.83 (n = 5)"
    )
