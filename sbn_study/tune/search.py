"""The spec's search section → an Optuna sampler driven through Ray Tune's `OptunaSearch`, and a scheduler.

Two things differ from the stock integration, on purpose:
- intermediate values are reported to Optuna at step = epoch (not Tune's iteration counter), and
- a trial that the scheduler stopped before the full budget is told to Optuna as PRUNED (with its
  per-epoch values), not as COMPLETE with its early score. TPE then ranks it by how far it got instead of
  comparing a 10-epoch accuracy with 200-epoch ones; a diverged trial is COMPLETE with the worst value, so
  the sampler learns to avoid its region; a crashed trial is FAIL.
"""

from __future__ import annotations

import math
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from sbn_study.spec import StudySpec, sampling_order


def make_sampler(spec: StudySpec) -> Any:
    import optuna

    sampler = spec.search.sampler
    seed = sampler.seed
    if sampler.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sampler.n_startup_trials)
    if sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sampler.type == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=sampler.n_startup_trials, warn_independent_sampling=False
        )
    if sampler.type == "gp":
        return optuna.samplers.GPSampler(
            seed=seed, n_startup_trials=sampler.n_startup_trials, warn_independent_sampling=False
        )
    if sampler.type == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if sampler.type == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {sampler.type!r}")  # the spec schema makes this unreachable


def make_scheduler(spec: StudySpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    scheduler = spec.search.scheduler
    metric, mode = spec.search.metrics[0], spec.search.modes[0]
    if scheduler.type == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            metric=metric,
            mode=mode,
            max_t=spec.max_budget,
            grace_period=scheduler.grace_period,
            reduction_factor=scheduler.reduction_factor,
        )
    if scheduler.type == "hyperband":
        return HyperBandScheduler(
            time_attr="epoch",
            metric=metric,
            mode=mode,
            max_t=spec.max_budget,
            reduction_factor=scheduler.reduction_factor,
        )
    if scheduler.type == "median":
        return MedianStoppingRule(
            time_attr="epoch", metric=metric, mode=mode, grace_period=scheduler.grace_period
        )
    return FIFOScheduler()


class SearchSpace:
    """Optuna define-by-run space (a class, so that Tune can pickle the searcher into its experiment state).

    Conditional parameters are only asked for when their `when` holds on what was sampled so far, or on the
    base configuration for keys that are not searched.
    """

    def __init__(self, spec: StudySpec) -> None:
        self.space = spec.search.space
        self.order = sampling_order(self.space)
        self.base = spec.base_config()

    def current(self, sampled: dict[str, Any], key: str) -> Any:
        if key in sampled:
            return sampled[key]
        node: Any = self.base
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def __call__(self, trial: Any) -> dict[str, Any]:
        sampled: dict[str, Any] = {}
        for key in self.order:
            dist = self.space[key]
            if all(self.current(sampled, k) in values for k, values in dist.when.items()):
                sampled[key] = suggest(trial, key, dist)
        return sampled


def suggest(trial: Any, key: str, dist: Any) -> Any:
    kind, args = dist.kind, dist.args
    if kind == "choice":
        return trial.suggest_categorical(key, args)
    if kind == "uniform":
        return trial.suggest_float(key, args[0], args[1])
    if kind == "loguniform":
        return trial.suggest_float(key, args[0], args[1], log=True)
    if kind == "quniform":
        return trial.suggest_float(key, args[0], args[1], step=args[2])
    if kind == "int":
        return trial.suggest_int(key, args[0], args[1])
    if kind == "logint":
        return trial.suggest_int(key, args[0], args[1], log=True)
    raise ValueError(f"unknown distribution {kind!r}")  # the spec schema makes this unreachable


class StudySearch(OptunaSearch):
    """OptunaSearch that reports per-epoch values and tells scheduler-stopped trials as PRUNED."""

    def __init__(self, spec: StudySpec) -> None:
        self.objectives = spec.search.metrics
        self.max_budget = spec.max_budget
        self._reported_steps: dict[str, int] = {}  # trial id → last epoch told to its Optuna trial
        single = len(self.objectives) == 1
        super().__init__(
            space=SearchSpace(spec),
            metric=self.objectives[0] if single else self.objectives,
            mode=spec.search.modes[0] if single else spec.search.modes,
            sampler=make_sampler(spec),
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict) -> None:
        """Tells the Optuna trial its value at step = epoch, once per epoch (single objective only: Optuna
        keeps intermediate values for those alone)."""
        if len(self.objectives) > 1 or self.objectives[0] not in result or trial_id not in self._ot_trials:
            return
        value, step = result[self.objectives[0]], int(result["epoch"])
        if math.isfinite(value) and step > self._reported_steps.get(trial_id, -1):
            self._ot_trials[trial_id].report(value, step)
            self._reported_steps[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        # Tune hands the result a scheduler stopped the trial on to this method alone, not to
        # on_trial_result: without it a trial stopped at its first rung would reach Optuna with no value.
        if result and not error:
            self._report(trial_id, result)
        ot_trial = self._ot_trials[trial_id]
        values = [result.get(m) for m in self.objectives] if result else [None]
        if error or any(v is None for v in values):
            self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
        elif not result.get("diverged") and result.get("epoch", 0) < self.max_budget:
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(
                ot_trial, values[0] if len(values) == 1 else values, state=TrialState.COMPLETE
            )
        self._completed_trials.add(trial_id)
