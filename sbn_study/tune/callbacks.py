"""Ray Tune callbacks of the driver: MLflow bookkeeping (`tune.progress` has what a person reads).

Both are pickled into Tune's experiment state (so `--resume` gets them back); they hold plain data, and the
tracking callback builds its writer in `setup`, where Tune's loop runs (on the head node with Ray Client).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ray.tune import Callback

from sbn_study.protocol import (
    INITIAL_FEATURES_KEY,
    RANKED_STATUSES,
    REPLAY_KEY,
    TrialStatus,
    ended_status,
    result_metrics,
)
from sbn_study.spec import StudySpec
from sbn_study.spec.catalog import arm_label
from sbn_study.spec.config import flatten
from sbn_study.store.ui import NOTE_TAG, TRIALS_FINISHED, best_so_far, experiment_tags, trials_with_status
from sbn_study.store.writer import RecordHandle, RunWriter
from sbn_study.study.overview import study_note
from sbn_study.study.render import short_value

# How long the end of a trial may hold Tune's loop for its writes to reach a store that answers.
FINISH_WAIT_S = 30.0
# How long the end of the experiment waits for the store to take what is queued before saving it to a file.
END_WAIT_S = 30.0
# How a trial can end, in the order the parent run's counts are listed.
ENDED_STATUSES = (TrialStatus.COMPLETED, TrialStatus.STOPPED_EARLY, TrialStatus.DIVERGED, TrialStatus.ERROR)
# MLflow's database column for run names is this wide.
RUN_NAME_MAX_CHARS = 250


class TrackingCallback(Callback):
    """Opens (or, after a resume, finds again) one nested MLflow run per trial and logs each result in one
    batch; describes the study on its parent run and logs its progress there each time a trial ends."""

    def __init__(
        self,
        spec: StudySpec,
        record: RecordHandle,
        earlier: int = 0,
        inputs: Sequence[Mapping[str, Any]] = (),
        earlier_progress: Mapping[str, float] | None = None,
    ) -> None:
        self.spec = spec
        self.record = record
        self.earlier = earlier  # trials of the executions this one extends: the first run is t{earlier + 1}
        # The parent's progress metrics at the end of those executions (`progress_metrics`): this one's add to them.
        self.earlier_progress = dict(earlier_progress or {})
        # The dataset inputs (`trial.inputs`) of the parent run and of every trial run: the trials share the
        # driver's one dataset, and one more queued write per trial costs next to nothing.
        self.inputs = [dict(i) for i in inputs]
        self._writer: RunWriter | None = None
        self._node_tagged: set[str] = set()
        # Last epoch recorded per trial: a trial restarted from its checkpoint may repeat epochs that were
        # already logged before the restart, and MLflow would keep both copies of each.
        self._last_step: dict[str, int] = {}
        # How the trials this process saw end ended: Tune marks a trial terminated only once its actor stopped.
        self._ended: dict[str, TrialStatus] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_writer": None, "_node_tagged": set(), "_last_step": {}, "_ended": {}}

    def setup(
        self,
        stop: Any = None,
        num_samples: int | None = None,
        total_num_samples: int | None = None,
        **info: Any,
    ) -> None:
        self._writer = self.record.writer()
        self._writer.set_experiment_tags(experiment_tags(self.spec))
        self._writer.set_parent_tags({NOTE_TAG: study_note(self.spec, self.record.uri)})
        if self.inputs:
            self._writer.log_inputs(self.inputs)

    @property
    def writer(self) -> RunWriter:
        if self._writer is None:
            raise RuntimeError("TrackingCallback.setup was not called: Tune calls it before the first trial")
        return self._writer

    def _ensure_run(self, trial: Any) -> None:
        import yaml

        if trial.trial_id in self._last_step:
            return
        config = self.spec.trial_config(trial.config).model_dump(mode="json")
        searched = ",".join(sorted(trial.config))
        self.writer.trial_run(
            trial.trial_id,
            run_name=run_name(trial, config["norm"], self.spec.search.num_samples, self.earlier),
            params=flatten(config),
            config_yaml=yaml.safe_dump(config, sort_keys=False),
            tags={"sbn.study": self.spec.name, "sbn.searched": searched},
        )
        if self.inputs:
            self.writer.log_inputs(self.inputs, trial.trial_id)
        self._last_step[trial.trial_id] = self.writer.last_step(trial.trial_id)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ensure_run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._ensure_run(trial)
        for past in result.get(REPLAY_KEY, ()):
            self._log_epoch(trial.trial_id, past)
        self._log_epoch(trial.trial_id, result)
        if trial.trial_id not in self._node_tagged and "node_id" in result:
            self.writer.set_tags(
                trial.trial_id,
                {"sbn.node": str(result["node_id"]), "sbn.host": str(result.get("hostname", ""))},
            )
            self._node_tagged.add(trial.trial_id)

    def _log_epoch(self, trial_id: str, result: dict) -> None:
        """Logs one epoch's result (epoch 0: the statistics at initialization) unless the run has it already."""
        step = int(result["epoch"])
        if step <= self._last_step[trial_id]:
            return
        self._last_step[trial_id] = step
        if INITIAL_FEATURES_KEY in result:
            self.writer.log_metrics(trial_id, result[INITIAL_FEATURES_KEY], step=0)
        metrics = result_metrics(result)
        if result.get("diverged"):
            # The worst-value stand-ins told to the sampler are not measurements.
            metrics = {k: v for k, v in metrics.items() if k not in self.spec.search.metrics}
        self.writer.log_metrics(trial_id, metrics, step=step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial, ended_status(trial.last_result, self.spec.max_budget))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trials, trial, TrialStatus.ERROR)

    def _finish(self, trials: list, trial: Any, status: TrialStatus) -> None:
        trial_id = trial.trial_id
        self.writer.finish_trial(trial_id, status)
        self._ended[trial_id] = status
        self._log_progress({t.trial_id: t for t in [*trials, trial]})
        # A trial that ended is never run again: its writes must be in the store before Tune's saved state
        # says it ended, or a driver killed in between would leave its run open with its last epochs missing.
        # Once per trial, a few ms on a reachable store; none while the store is known to be away.
        self.writer.flush(deadline_s=FINISH_WAIT_S, retry_away=False)

    def _log_progress(self, trials: dict[str, Any]) -> None:
        """The study's progress on its parent run at step = trials finished (`progress_metrics`), so that the
        parent's charts show the study advancing. Trials restored by a resume count by Tune's state."""
        budget, metric, mode = self.spec.max_budget, self.spec.search.metrics[0], self.spec.search.modes[0]
        ended = {i: trial_state(t, budget) for i, t in trials.items() if i not in self._ended} | self._ended
        ended = {i: state for i, state in ended.items() if state in ENDED_STATUSES}
        bests = [
            trial.metric_analysis[metric][mode]
            for i, trial in trials.items()
            if ended.get(i) in RANKED_STATUSES and metric in trial.metric_analysis
        ]
        metrics = progress_metrics(self.spec, ended.values(), bests, self.earlier_progress)
        metrics[TRIALS_FINISHED] = self.earlier + len(ended)
        self.writer.log_parent_metrics(metrics, step=metrics[TRIALS_FINISHED])

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.flush(deadline_s=END_WAIT_S)
        # Stops the writer too, even with nothing to save: the driver then ends the record with its own.
        self.writer.save_unsent()


def progress_metrics(
    spec: StudySpec,
    statuses: Iterable[str],
    bests: Iterable[float],
    earlier: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The parent run's progress metrics: how many trials ended each way (`statuses`) and the best value of the
    study's metric among them (`bests`: each ranked trial's best epoch, as `export` ranks them), together with
    the `earlier` ones of the executions a larger `num_samples` extends."""
    earlier = earlier or {}
    metric, mode = spec.search.metrics[0], spec.search.modes[0]
    statuses = list(statuses)
    metrics = {
        trials_with_status(s): earlier.get(trials_with_status(s), 0) + sum(state == s for state in statuses)
        for s in ENDED_STATUSES
    }
    bests = [*bests, *([earlier[best_so_far(metric)]] if best_so_far(metric) in earlier else [])]
    if bests:
        metrics[best_so_far(metric)] = max(bests) if mode == "max" else min(bests)
    return metrics


def trial_state(trial: Any, max_budget: int) -> str:
    """A Tune trial's state in the study's words: how it ended (a `TrialStatus`), else Tune's status."""
    if trial.status == "TERMINATED" and trial.last_result:
        return str(ended_status(trial.last_result, max_budget))
    return trial.status.lower()


def sampled_values(config: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """What the sampler chose for a trial, short: `lr=0.0512 placement=23` (the last part of each key)."""
    return " ".join(
        f"{k.split('.')[-1]}={short_value(v)}" for k, v in sorted(config.items()) if k not in skip
    )


def run_name(trial: Any, norm: dict[str, Any], num_samples: int, earlier: int = 0) -> str:
    """A trial run's name: its number in the study (Tune's tag starts with its number in the Tune experiment,
    which follows the `earlier` trials of the executions it extends), its arm in the paper's notation and the
    values sampled for it, e.g. `t07 sbn23 lr=0.107 momentum=0.125`."""
    number = str(int(trial.experiment_tag.split("_", 1)[0]) + earlier)
    arm = arm_label(norm["kind"], norm["placement"])
    values = sampled_values(trial.config, skip=("norm.kind", "norm.placement"))
    name = f"t{number.zfill(len(str(num_samples)))} {arm} {values}".rstrip()
    return name[:RUN_NAME_MAX_CHARS]
