"""What a trial and the driver say to each other, and the words both use for how a trial ended.

Imported by the trial worker (`tune.trainable`), the driver (`tune.callbacks`, `tune.search`, `store`), and
the readers of results (`results`, `final`): one place for result keys, statuses and metric directions.
No torch, Ray or MLflow here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

# Which way each per-epoch metric improves; `lr` is recorded but has no better direction.
METRICS: dict[str, str | None] = {
    "train_loss": "min",
    "train_acc": "max",
    "val_loss": "min",
    "val_acc": "max",
    "lr": None,
    "epoch_time_s": "min",
    "images_per_s": "max",
}
EPOCH_METRICS: tuple[str, ...] = tuple(METRICS)
BETTER: dict[str, str] = {name: mode for name, mode in METRICS.items() if mode is not None}

# Result keys. Feature statistics are `fm/<site>/<stat>`.
EPOCH_KEY = "epoch"
DIVERGED_KEY = "diverged"
NODE_KEY = "node_id"
FEATURE_PREFIX = "fm/"
# What an epoch cost the machine (`sbn_study.trial.system`): `system/cpu_percent`, `system/rss_mb`, ...
SYSTEM_PREFIX = "system/"
# Feature statistics of the untrained network travel inside the first epoch's result under this key and are
# logged at step 0 (Tune requires the searched metric in every result, so epoch 0 cannot be its own result).
INITIAL_FEATURES_KEY = "fm_init"
# The first result of a trial resumed from a checkpoint carries, under this key, every epoch the checkpoint
# holds: writes still queued when a driver was killed would otherwise be lost for good, since the trial does
# not train those epochs again. The driver logs those the trial's run does not have yet.
REPLAY_KEY = "replay"
# What a domain-generalization trial measures on its held-out target domains (`sbn_study.trial.domain_train`):
# `target_acc`, `target_loss`, per domain `target_acc/<domain>`, BNE's `target_w2/...` and `target_weight/...`.
# Logged, never a search metric nor ranked: no choice a study makes may see the target.
TARGET_PREFIX = "target_"


class TrialStatus(str, Enum):
    """A trial run's `sbn.status` tag: how it ended, or that it has not."""

    RUNNING = "running"
    COMPLETED = "completed"  # trained to the full budget
    STOPPED_EARLY = "stopped_early"  # a scheduler (ASHA) stopped it
    DIVERGED = "diverged"  # non-finite training loss
    ERROR = "error"  # failed more than max_failures times
    KILLED = "killed"  # the study was interrupted; --resume continues it

    def __str__(self) -> str:
        return self.value

    @property
    def mlflow_status(self) -> str:
        """The MLflow run status a trial run ends with."""
        return {TrialStatus.ERROR: "FAILED", TrialStatus.KILLED: "KILLED"}.get(self, "FINISHED")


# Trials whose metric values are measurements of a configuration (a diverged, crashed or killed trial's are not).
RANKED_STATUSES: tuple[str, ...] = (TrialStatus.COMPLETED.value, TrialStatus.STOPPED_EARLY.value)


def reached_full_budget(epoch: float, max_budget: int) -> bool:
    return epoch >= max_budget


def ended_status(result: Mapping[str, Any] | None, max_budget: int) -> TrialStatus:
    """How a trial that Tune ended (not one that errored) ended, from its last result."""
    result = result or {}
    if result.get(DIVERGED_KEY):
        return TrialStatus.DIVERGED
    if reached_full_budget(result.get(EPOCH_KEY, 0), max_budget):
        return TrialStatus.COMPLETED
    return TrialStatus.STOPPED_EARLY


def worst_values(metrics: Sequence[str], modes: Sequence[str]) -> dict[str, float]:
    """What a diverged trial reports for the searched metrics: the worst possible value of each."""
    return {
        m: float("-inf") if mode == "max" else float("inf") for m, mode in zip(metrics, modes, strict=True)
    }


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a result worth recording: the per-epoch metrics, the feature statistics, the target
    domains' measurements and what the epoch cost the machine."""
    metrics = {k: float(result[k]) for k in EPOCH_METRICS if k in result}
    prefixes = (FEATURE_PREFIX, TARGET_PREFIX, SYSTEM_PREFIX)
    metrics.update((k, float(v)) for k, v in result.items() if k.startswith(prefixes))
    return metrics
