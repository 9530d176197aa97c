"""The spec's search section → an Optuna study that Ray Tune drives through `StudySearch`, and a scheduler.

`StudySearch` is a plain `ray.tune.search.Searcher` that owns its Optuna study and talks to it only through
Optuna's public ask-and-tell interface. It used to subclass Tune's `OptunaSearch` and read and write that
class's private fields (`_ot_study`, `_ot_trials`, `_completed_trials`), which a Ray upgrade can rename or
re-purpose without a word; the two public interfaces it relies on now are Tune's `Searcher` hooks and
Optuna's `Study.ask`/`Study.tell`/`Trial.report`.

What differs from the stock integration, on purpose:
- intermediate values are reported to Optuna at step = epoch (not Tune's iteration counter), and
- a trial that the scheduler stopped before the full budget is told to Optuna as PRUNED (with its
  per-epoch values), not as COMPLETE with its early score. TPE then ranks it by how far it got instead of
  comparing a 10-epoch accuracy with 200-epoch ones; a diverged trial is COMPLETE with the worst value, so
  the sampler learns to avoid its region; a crashed trial is FAIL.

The Optuna study lives in a database (`tracking.optuna_storage`, by default `<output>/optuna.db`), named like
the execution's parent run, so that optuna-dashboard and `optuna.load_study` see it while it runs, a finished
study can be extended with its history (`--resume` with a larger `num_samples`), and a later study can start
from its trials (`search.warm_start`). The database outlives Tune's saved state: a resumed Tune's searcher
reconciles the two (`_reconcile`).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from sbn_study.errors import UserError
from sbn_study.protocol import EPOCH_KEY, TrialStatus, ended_status
from sbn_study.spec import StudySpec, sampling_order
from sbn_study.store.uri import redact_uri

# Seeds are numpy's, so Optuna's: [0, 2**32 - 1].
_SEEDS = 2**32


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> Any:
    """The spec's sampler; `seed_offset` moves its seed, so that trials added to a study do not repeat the
    draws its first ones had (a seeded random or QMC sampler would hand out the same configurations again)."""
    sampler = spec.search.sampler
    seed = None if sampler.seed is None else (sampler.seed + seed_offset) % _SEEDS
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


# The tag on each Optuna trial naming its Tune trial: the study itself then says which trial is which,
# in the searcher's saved state too.
TUNE_TRIAL_ID_ATTR = "tune_trial_id"
# On an enqueued trial: its index in `search.enqueue`. On a trial copied by a warm start: where it came from.
ENQUEUED_ATTR = "sbn.enqueued"
WARM_START_ATTR = "sbn.warm_start"
# The Optuna study's own attributes: the study (the spec's name) it samples for, and what a warm start from
# it must share: the searched space and the objective.
STUDY_ATTR, SPACE_ATTR, OBJECTIVE_ATTR = "sbn.study", "sbn.space", "sbn.objective"


def _space_of(spec: StudySpec) -> dict[str, Any]:
    """The searched space as a warm start compares it: each key's distribution without its `when` (which
    only decides where it is sampled; the sampler models the values it took)."""
    return {key: {dist.kind: dist.args} for key, dist in spec.search.space.items()}


def _objective_of(spec: StudySpec) -> list[list[str]]:
    return [spec.search.metrics, spec.search.modes]


def space_difference(earlier: dict[str, Any], spec: StudySpec) -> str | None:
    """What keeps a study that searched `earlier` (`_space_of` of its spec, read back from JSON) from giving its
    trials to `spec`'s sampler, in a few words naming the parameter; None when nothing does."""
    now = json.loads(json.dumps(_space_of(spec)))  # as the earlier one was stored: lists, not tuples
    for key in sorted(earlier.keys() | now.keys()):
        if key not in now:
            return f"it searched {key}, which this spec does not"
        if key not in earlier:
            return f"it did not search {key}"
        if earlier[key] != now[key]:
            return f"it searched {key} over {_written(earlier[key])}, this spec over {_written(now[key])}"
    return None


def _written(dist: dict[str, Any]) -> str:
    ((kind, args),) = dist.items()
    return f"{{{kind}: {args}}}"


def warm_start_trials(storage: str, spec: StudySpec) -> list[FrozenTrial]:
    """The finished trials (complete or pruned) of every execution of the study `search.warm_start` names in
    `storage`, as trials to add to a new Optuna study. UserError, in one line, when there is no such study or
    its space or objective differs from `spec`'s: refused before anything of the new study is recorded."""
    name, where = spec.search.warm_start, "search.warm_start"
    found = [
        summary
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if summary.user_attrs.get(STUDY_ATTR) == name
    ]
    if not found:
        raise UserError(f"{where}: no study '{name}' in the Optuna storage {redact_uri(storage)}")
    trials = []
    for summary in found:
        attrs = summary.user_attrs
        if attrs.get(OBJECTIVE_ATTR) != _objective_of(spec):
            metric, mode = attrs.get(OBJECTIVE_ATTR, [[], []])
            raise UserError(
                f"{where}: study '{name}' optimized {', '.join(metric)} ({', '.join(mode)}), this spec "
                f"{', '.join(spec.search.metrics)} ({', '.join(spec.search.modes)}): its values do not compare"
            )
        if difference := space_difference(attrs.get(SPACE_ATTR, {}), spec):
            raise UserError(f"{where}: study '{name}' cannot start this one: {difference}")
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            trials.append(
                optuna.trial.create_trial(
                    state=trial.state,
                    values=trial.values,
                    params=trial.params,
                    distributions=trial.distributions,
                    intermediate_values=trial.intermediate_values,
                    user_attrs={WARM_START_ATTR: f"{summary.study_name}#{trial.number}"},
                )
            )
    return trials


# How a trial that ended by itself or by the scheduler is told to Optuna: the same classification as its
# MLflow `sbn.status`, so that the sampler and the record cannot disagree.
_TOLD_AS = {
    TrialStatus.COMPLETED: TrialState.COMPLETE,
    TrialStatus.DIVERGED: TrialState.COMPLETE,  # with the worst value: the sampler avoids its region
    TrialStatus.STOPPED_EARLY: TrialState.PRUNED,
}


class StudySearch(Searcher):
    """Tune searcher over an Optuna study it owns: asks it for each trial's parameters, reports each epoch's
    value, and tells it how each trial ended (see the module docstring)."""

    def __init__(
        self,
        spec: StudySpec,
        storage: str | None,
        study_name: str,
        warm_start: Sequence[FrozenTrial] = (),
    ) -> None:
        """The Optuna study `study_name` in `storage` (a database URL; None keeps it in memory): created with the
        spec's queue and the `warm_start` trials, or, when it exists (a finished study extended, or an
        execution started over), loaded with its trials and a sampler seeded past them."""
        self._metrics, self._max_budget = list(spec.search.metrics), spec.max_budget
        single = len(self._metrics) == 1
        super().__init__(
            metric=self._metrics[0] if single else self._metrics,
            mode=spec.search.modes[0] if single else list(spec.search.modes),
        )
        self._space = SearchSpace(spec)
        self._enqueue = [dict(entry) for entry in spec.search.enqueue]
        self._running: dict[str, optuna.Trial] = {}  # Tune trial id → its Optuna trial, until told
        self._last_step: dict[str, int] = {}  # Tune trial id → last epoch reported to its Optuna trial
        # Tune's scheduler decides which trials stop; an Optuna pruner would be a second, unheard opinion.
        settings = {"study_name": study_name, "storage": storage, "pruner": optuna.pruners.NopPruner()}
        directions = ["maximize" if mode == "max" else "minimize" for mode in spec.search.modes]
        try:
            self._study = optuna.create_study(**settings, sampler=make_sampler(spec), directions=directions)
        except optuna.exceptions.DuplicatedStudyError:
            existing = len(optuna.load_study(**settings).get_trials(deepcopy=False))
            self._study = optuna.load_study(**settings, sampler=make_sampler(spec, existing))
            self._reconcile()
            return
        for key, value in (
            (STUDY_ATTR, spec.name),
            (SPACE_ATTR, _space_of(spec)),
            (OBJECTIVE_ATTR, _objective_of(spec)),
        ):
            self._study.set_user_attr(key, value)
        self._study.add_trials(warm_start)
        for index in range(len(self._enqueue)):
            self._queue(index)

    def _queue(self, index: int) -> None:
        self._study.enqueue_trial(self._enqueue[index], user_attrs={ENQUEUED_ATTR: index})

    def _reconcile(self) -> None:
        """Makes the study agree with the Tune trials this searcher knows. The database holds what happened
        after the state Tune restored: trials asked since (their Tune trials are unknown to the resumed Tune)
        end as FAIL, an enqueued one queued again; trials told since are not told twice."""
        trials = {trial.number: trial for trial in self._study.get_trials(deepcopy=False)}
        for trial_id, trial in list(self._running.items()):
            if trials[trial.number].state.is_finished():
                del self._running[trial_id]
                self._last_step.pop(trial_id, None)
        known = {trial.number for trial in self._running.values()}
        for number, trial in trials.items():
            if trial.state == TrialState.RUNNING and number not in known:
                self._study.tell(number, state=TrialState.FAIL)
                if ENQUEUED_ATTR in trial.user_attrs:
                    self._queue(trial.user_attrs[ENQUEUED_ATTR])

    @property
    def study(self) -> optuna.Study:
        """The Optuna study: every trial asked so far, each tagged with its Tune trial id."""
        return self._study

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self._running:
            trial = self._study.ask()
            trial.set_user_attr(TUNE_TRIAL_ID_ATTR, trial_id)
            self._running[trial_id] = trial
        # Asking the space again of the same Optuna trial returns what it sampled the first time.
        return self._space(self._running[trial_id])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._running:
            return  # told already, or sampled after the state a resumed study started from
        # Tune hands the result a scheduler stopped the trial on to this method alone, not to
        # on_trial_result: without it a trial stopped at its first rung would reach Optuna with no value.
        if result and not error:
            self._report(trial_id, result)
        trial = self._running.pop(trial_id)
        self._last_step.pop(trial_id, None)
        values = [result.get(m) for m in self._metrics] if result else [None]
        if error or any(v is None for v in values):
            self._study.tell(trial, state=TrialState.FAIL)
            return
        state = _TOLD_AS[ended_status(result, self._max_budget)]
        if state == TrialState.PRUNED:
            self._study.tell(trial, state=state)  # Optuna takes its last intermediate value as its value
        else:
            self._study.tell(trial, values[0] if len(values) == 1 else values, state=state)

    def _report(self, trial_id: str, result: dict) -> None:
        """Tells the Optuna trial its value at step = epoch, once per epoch (single objective only: Optuna
        keeps intermediate values for those alone)."""
        if len(self._metrics) > 1 or trial_id not in self._running or EPOCH_KEY not in result:
            return
        value, step = result.get(self._metrics[0]), int(result[EPOCH_KEY])
        # A non-finite value is a diverged trial's stand-in, not a measurement; a step seen before is the
        # result Tune hands again when the trial ends.
        if value is not None and math.isfinite(value) and step > self._last_step.get(trial_id, -1):
            self._running[trial_id].report(value, step)
            self._last_step[trial_id] = step

    def get_state(self) -> dict[str, Any]:
        """The study (trials, intermediate values, the sampler with its random state) and the trials not told
        yet, which a resumed Tune continues under the same ids."""
        return {"study": self._study, "running": self._running, "last_step": self._last_step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._study, self._running, self._last_step = state["study"], state["running"], state["last_step"]
        self._reconcile()

    # Tune saves the searcher beside its experiment state through these two (SearchGenerator.save_to_dir),
    # and `Tuner.restore` hands the newest file back: one pickle, so the running trials keep their study.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.get_state(), file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.set_state(pickle.load(file))
