"""The Ray Tune function trainable: one trial = `train()` on the trial's resolved configuration.

The dataset arrives through Ray's object store (`tune.with_parameters`), loaded once by the driver. Every
epoch the trial replaces its own checkpoint file (`tune.checkpoints`) and then reports the epoch's result to
Tune, without a Tune checkpoint. A trial that Tune restarts or restores finds its file by its trial id and goes
on after the last epoch the file holds; its first report then carries every epoch the file holds
(`REPLAY_KEY`) for the driver to log any it lacks, since the file may be ahead of what the driver received.
A trial whose file says it ended (its last epoch or a divergence, saved just before a driver was killed)
reports that last result again, which is what Tune needs to end it.
"""

from __future__ import annotations

from typing import Any

from sbn_study.protocol import FEATURE_PREFIX, INITIAL_FEATURES_KEY, REPLAY_KEY, worst_values
from sbn_study.spec import StudySpec
from sbn_study.trial.data import ImageDataset
from sbn_study.trial.domains import DomainDataset
from sbn_study.tune.checkpoints import TrialStates, pause_point


def run_trial(
    sampled: dict[str, Any], *, spec: StudySpec, dataset: ImageDataset | DomainDataset, tune_path: str
) -> None:
    import ray
    from ray import tune

    from sbn_study.trial.domain_train import train_domains
    from sbn_study.trial.train import train

    config = spec.trial_config(sampled)
    states = TrialStates(tune_path)
    trial_id = tune.get_context().get_trial_id()
    resume = states.load(trial_id)
    node_id = ray.get_runtime_context().get_node_id()
    initial_features: dict[str, float] = {}
    replay = list(resume["history"]) if resume is not None else []

    def result_of(metrics: dict[str, float]) -> dict[str, Any]:
        # Tune's iteration counter restarts with every worker that runs the trial (it has no checkpoint to
        # take it from): the epoch keeps `training_iteration` the trial's own count.
        result: dict[str, Any] = {**metrics, "node_id": node_id, "training_iteration": int(metrics["epoch"])}
        if initial_features:
            result[INITIAL_FEATURES_KEY] = dict(initial_features)
            initial_features.clear()
        if replay:
            result[REPLAY_KEY] = replay.copy()
            replay.clear()
        if metrics.get("diverged"):
            result.update(worst_values(spec.search.metrics, spec.search.modes))
        return result

    def report(metrics: dict[str, float], make_checkpoint: Any) -> None:
        if make_checkpoint is None:
            initial_features.update((k, v) for k, v in metrics.items() if k.startswith(FEATURE_PREFIX))
            return
        # The file first: an epoch the driver received is then always in the file, and a trial without a
        # file never reported anything.
        states.save(trial_id, make_checkpoint())
        pause_point("checkpoint-written")
        tune.report(result_of(metrics))
        pause_point("reported")

    last = resume["history"][-1] if resume is not None else {}
    if resume is not None and (resume["epoch"] >= config.train.epochs or last.get("diverged")):
        tune.report(result_of(last))
        return
    # A multi-domain dataset: a leave-one-domain-out trial.
    fit = train_domains if isinstance(dataset, DomainDataset) else train
    fit(config, dataset=dataset, report=report, resume=resume)
