"""Which searched parameters matter, compared at equal budgets, and how far ASHA's early comparisons hold.

A study pruned by ASHA holds trials of unequal length: set against each other, a 2-epoch accuracy and an
8-epoch one measure the budget, not the parameters. Here trials are compared one epoch at a time: at each
rung (an epoch at which the scheduler compared the trials that got there) and at the full budget. The value
compared is the study's metric *at* that epoch, what ASHA compared, not the best up to it: importance at a
rung then explains what the scheduler decided on, and the fidelity says how well that ranking predicts the
one at the end. Tables in, tables out (from `analysis.trials` and `analysis.curves`): no MLflow here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sbn_study.protocol import RANKED_STATUSES, TrialStatus
from sbn_study.results.stats import MIN_RANK_PAIRS, spearman
from sbn_study.spec import Distribution

if TYPE_CHECKING:
    from sbn_study.spec.schema import SchedulerConfig

# fANOVA fits a random forest: it needs two trials, and says little below FEW_TRIALS, or about a level of a
# categorical parameter that fewer than FEW_PER_LEVEL trials tried.
MIN_TRIALS = 2
FEW_TRIALS = 10
FEW_PER_LEVEL = 2
# Bootstrap refits use a smaller forest than Optuna's 64 trees: five times faster, and the forest's own
# noise (small beside resampling's at tens of trials) can only widen the interval.
_RESAMPLE_TREES = 16
_POINT_TREES = 64
IMPORTANCE_COLUMNS = ["importance", "ci_low", "ci_high", "n", "conditional", "warning"]


@dataclass(frozen=True)
class Bootstrap:
    """The interval of an importance: `resamples` refits on trials drawn with replacement, and the percentile
    interval at `confidence` of what they give; `seed` fixes the draws and the forests."""

    resamples: int = 50
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Rungs:
    """Where a study's trials can be compared: the scheduler's rungs (`epochs`, ascending, below the full
    budget) and the full `budget`, for the study's `metric`."""

    metric: str
    budget: int
    epochs: tuple[int, ...]

    @property
    def compared(self) -> tuple[int, ...]:
        """The rungs, then the full budget."""
        return (*self.epochs, self.budget)


def study_rungs(table: pd.DataFrame, scheduler: SchedulerConfig | None = None) -> Rungs:
    """The rungs of the study whose `trials` table this is. With an ASHA `scheduler` (the spec's
    `search.scheduler`), those Ray's ASHA sets: milestones grace_period · reduction_factor^k, as many as
    Ray's `_Bracket` makes below the budget, each judged at the first epoch that reaches it. Otherwise
    (no spec at hand, hyperband's brackets, the median rule) the epochs at which trials were stopped early.
    """
    metric, budget = table.attrs["metric"], table.attrs["budget"]
    if scheduler is not None and scheduler.type == "asha":
        grace, factor = scheduler.grace_period, scheduler.reduction_factor
        count = int(math.log(budget / grace) / math.log(factor) + 1)
        epochs = {math.ceil(grace * factor**k) for k in range(count)}
    elif "status" in table:
        epochs = set(table.loc[table["status"] == TrialStatus.STOPPED_EARLY.value, "epochs"])
    else:
        epochs = set()
    return Rungs(metric, budget, tuple(sorted(int(e) for e in epochs if e < budget)))


def rung_values(curves: pd.DataFrame, rungs: Rungs) -> pd.DataFrame:
    """The study's metric of each trial at each compared epoch: index trial_id, one column per epoch of
    `rungs.compared`, NaN where the trial did not get there. Only completed and stopped-early trials, whose
    values measure their configuration, and only finite values (not a diverging trial's)."""
    measured = curves[
        (curves["metric"] == rungs.metric)
        & curves["status"].isin(RANKED_STATUSES)
        & curves["epoch"].isin(rungs.compared)
        & np.isfinite(curves["value"].astype(float))
    ]
    # A resumed trial may have logged an epoch twice (replayed after a restart): the later value counts.
    latest = measured.drop_duplicates(["trial_id", "epoch"], keep="last")
    wide = latest.pivot(index="trial_id", columns="epoch", values="value")
    return wide.reindex(columns=list(rungs.compared))


def rung_fidelity(curves: pd.DataFrame, rungs: Rungs) -> pd.DataFrame:
    """How well each rung's ranking predicted the final one: per rung, Spearman's ρ between the metric at the
    rung and at the full budget over the trials that reached both (the trials ASHA promoted at that rung).
    When fewer than 3 trials reached the full budget, against the next rung instead (`against` says which
    epoch). Columns rung, against, n, rho; rho NaN below 3 pairs or when either side does not vary.
    """
    values = rung_values(curves, rungs)
    rows = []
    for following, rung in zip(rungs.compared[1:], rungs.epochs, strict=True):
        against = rungs.budget
        pairs = values[[rung, against]].dropna()
        if len(pairs) < MIN_RANK_PAIRS:
            against = following
            pairs = values[[rung, against]].dropna()
        rho = spearman(list(pairs[rung]), list(pairs[against]))
        rows.append({"rung": rung, "against": against, "n": len(pairs), "rho": rho})
    return pd.DataFrame(rows, columns=["rung", "against", "n", "rho"])


def rung_importance(
    curves: pd.DataFrame, table: pd.DataFrame, rungs: Rungs, *, bootstrap: Bootstrap = Bootstrap()
) -> pd.DataFrame:
    """`param_importance` at each epoch of `rungs.compared` (the rungs, then the full budget), of the metric
    at that epoch, over the trials (completed or stopped early) that reached it; the parameters come from
    the `trials` table `table`. Long form: epoch, parameter, then `param_importance`'s columns. An epoch
    that fewer than 2 trials reached keeps its rows, with NaN importances and a warning.
    """
    values = rung_values(curves, rungs)
    parameters = table.set_index("trial_id")
    parts = []
    for epoch in rungs.compared:
        column = f"{rungs.metric} at epoch {epoch}"
        reached = parameters.join(values[epoch].dropna().rename(column), how="inner").reset_index()
        rated = param_importance(
            reached, column, statuses=RANKED_STATUSES, space=table.attrs.get("space"), bootstrap=bootstrap
        )
        parts.append(rated.reset_index().assign(epoch=epoch))
    return pd.concat(parts, ignore_index=True)[["epoch", "parameter", *IMPORTANCE_COLUMNS]]


def param_importance(
    table: pd.DataFrame,
    metric: str,
    *,
    statuses: Sequence[str] = (TrialStatus.COMPLETED.value,),
    space: Mapping[str, Any] | None = None,
    bootstrap: Bootstrap = Bootstrap(),
) -> pd.DataFrame:
    """fANOVA importance (Optuna's evaluator, share of the variance) of each searched parameter for the
    column `metric`, over the trials with one of `statuses` and a finite `metric` (by default those that
    reached the full budget, so that values are comparable). One row per parameter of the search space
    (`space`: dotted key → distribution as a spec writes it; default: the table's `attrs`), index
    `parameter`, most important first: importance, ci_low, ci_high, n (the trials it rests on),
    conditional (the spec samples it only `when` a condition holds), warning ("" when none).

    Conditional parameters are rated within the trials that sampled them. fANOVA needs every trial to have
    every parameter, so the parameters every trial has are rated together over all trials, and each other
    one over the trials that sampled it, together with the parameters all of those have. Its importance is
    then its share of the variance *among those `n` trials*: 0.6 for norm.fft_norm over the SBN trials
    says that fft_norm explains most of what varies between SBN trials, not between all trials. A trial
    sampled what its `searched` column (from `trials`) lists, or, where that is empty, what it has a value of.

    The interval: `bootstrap.resamples` refits on the same trials drawn with replacement, and their
    percentile interval. `warning` notes fewer than 10 trials, a level of a categorical parameter tried by
    fewer than 2, a parameter never sampled or with one value throughout, and a metric without variance;
    the importance is NaN where fANOVA cannot rate it (fewer than 2 trials, nothing varies). ValueError
    without a search space.
    """
    import optuna

    written = space if space is not None else table.attrs.get("space")
    if not written:
        raise ValueError("param_importance needs the search space: pass space= or a table from trials()")
    distributions = {
        key: dist if isinstance(dist, Distribution) else Distribution.model_validate(dist)
        for key, dist in written.items()
    }
    usable = table["status"].isin(statuses) & np.isfinite(table[metric].astype(float))
    records = table[usable].to_dict("records")
    sampled = [_sampled(record, distributions) for record in records]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line per fit
    try:
        forest = _Forest(metric, _declared(distributions), bootstrap)
        together = [key for key in distributions if all(key in s for s in sampled)]
        rated = forest.rate(records, together) if together else {}
        for key in distributions:
            if key not in together:
                subset = [i for i, s in enumerate(sampled) if key in s]
                shared = [k for k in distributions if all(k in sampled[i] for i in subset)]
                rated[key] = forest.rate([records[i] for i in subset], shared)[key]
    finally:
        optuna.logging.set_verbosity(verbosity)
    rows = []
    for key, dist in distributions.items():
        among = [r for r, s in zip(records, sampled, strict=True) if key in s]
        importance, low, high = rated[key]
        rows.append(
            {
                "parameter": key,
                "importance": importance,
                "ci_low": low,
                "ci_high": high,
                "n": len(among),
                "conditional": bool(dist.when),
                "warning": "; ".join(_warnings(key, dist, among, metric))
                if records
                else f"no trial with a {metric}",
            }
        )
    ranked = pd.DataFrame(rows, columns=["parameter", *IMPORTANCE_COLUMNS]).set_index("parameter")
    ranked = ranked.sort_values("importance", ascending=False, na_position="last", kind="stable")
    ranked.attrs.update(metric=metric)
    return ranked


def _sampled(record: Mapping[str, Any], distributions: Mapping[str, Distribution]) -> set[str]:
    # The `searched` tag is the sampler's record; a conditional parameter's column holds the base value
    # where it was not sampled, so a value alone says nothing for a table from trials().
    if searched := record.get("searched"):
        return {key for key in searched.split(",") if key in distributions}
    return {key for key in distributions if key in record and not pd.isna(record[key])}


def _declared(distributions: Mapping[str, Distribution]) -> dict[str, Any]:
    """The Optuna distributions of the spec's, exactly as the study's sampler declared them."""
    import optuna

    from sbn_study.tune.search import suggest

    trial = optuna.create_study().ask()
    for key, dist in distributions.items():
        suggest(trial, key, dist)
    return trial.distributions


def _warnings(key: str, dist: Distribution, among: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    n = len(among)
    if n == 0:
        return ["never sampled"]
    found = []
    if n < FEW_TRIALS:
        found.append(f"only {n} trial{'s' if n > 1 else ''} (fewer than {FEW_TRIALS})")
    if dist.kind == "choice":
        counts = {str(level): sum(r[key] == level for r in among) for level in dist.args}
        few = [f"{level} ({count})" for level, count in counts.items() if count < FEW_PER_LEVEL]
        if few:
            found.append(f"levels tried by fewer than {FEW_PER_LEVEL} trials: {', '.join(few)}")
    if n >= MIN_TRIALS and len({r[key] for r in among}) < 2:
        found.append("one value in all of these trials")
    if n >= MIN_TRIALS and len({r[metric] for r in among}) < 2:
        found.append(f"{metric} does not vary over these trials")
    return found


@dataclass(frozen=True)
class _Forest:
    """fANOVA of one column of trial records, and its bootstrap interval."""

    metric: str
    declared: Mapping[str, Any]  # dotted key → Optuna distribution
    bootstrap: Bootstrap

    def rate(self, records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, tuple[float, ...]]:
        """key → (importance, ci_low, ci_high) over `records`, rated together on `keys`."""
        point = self._fit(records, keys, _POINT_TREES, self.bootstrap.seed)
        # Every rating draws from the same seed: it does not depend on which others were made before it.
        rng = np.random.default_rng(self.bootstrap.seed)
        refits = [
            self._fit(
                [records[i] for i in rng.integers(len(records), size=len(records))],
                keys,
                _RESAMPLE_TREES,
                int(rng.integers(2**31)),
            )
            for _ in range(self.bootstrap.resamples if point else 0)
        ]
        tail = (1 - self.bootstrap.confidence) / 2 * 100
        rated = {}
        for key in keys:
            drawn = [refit[key] for refit in refits if refit]
            low, high = np.percentile(drawn, [tail, 100 - tail]) if drawn else (math.nan, math.nan)
            rated[key] = (point[key] if point else math.nan, float(low), float(high))
        return rated

    def _fit(
        self, records: Sequence[Mapping[str, Any]], keys: Sequence[str], trees: int, seed: int
    ) -> dict[str, float] | None:
        import optuna

        if len(records) < MIN_TRIALS:
            return None
        study = optuna.create_study()  # its direction does not matter: fANOVA decomposes the variance
        study.add_trials(
            optuna.trial.create_trial(
                params={k: record[k] for k in keys},
                distributions={k: self.declared[k] for k in keys},
                value=float(record[self.metric]),
            )
            for record in records
        )
        evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=trees, seed=seed)
        try:
            return optuna.importance.get_param_importances(study, evaluator=evaluator)
        except RuntimeError:  # no tree of the forest found variance: identical trials, or values
            return None
