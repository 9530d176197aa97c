"""The Ray Tune function trainable: one trial = `train()` on the trial's resolved configuration.

The dataset arrives through Ray's object store (`tune.with_parameters`), loaded once by the driver. Every
epoch is one `tune.report` with a checkpoint, so a restarted trial resumes from its last finished epoch; its
first report then carries the epochs the checkpoint holds (`REPLAY_KEY`) for the driver to log any it lacks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sbn_study.protocol import FEATURE_PREFIX, INITIAL_FEATURES_KEY, REPLAY_KEY, worst_values
from sbn_study.spec import StudySpec
from sbn_study.trial.data import ImageDataset

CHECKPOINT_FILE = "state.pt"


def run_trial(sampled: dict[str, Any], *, spec: StudySpec, dataset: ImageDataset) -> None:
    import ray
    import torch
    from ray import tune

    from sbn_study.trial.train import train

    config = spec.trial_config(sampled)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    node_id = ray.get_runtime_context().get_node_id()
    initial_features: dict[str, float] = {}
    replay = list(resume["history"]) if resume is not None else []

    def report(metrics: dict[str, float], make_checkpoint: Any) -> None:
        if make_checkpoint is None:
            initial_features.update((k, v) for k, v in metrics.items() if k.startswith(FEATURE_PREFIX))
            return
        result: dict[str, Any] = {**metrics, "node_id": node_id}
        if initial_features:
            result[INITIAL_FEATURES_KEY] = dict(initial_features)
            initial_features.clear()
        if replay:
            result[REPLAY_KEY] = replay.copy()
            replay.clear()
        if metrics.get("diverged"):
            result.update(worst_values(spec.search.metrics, spec.search.modes))
        with tempfile.TemporaryDirectory() as folder:
            torch.save(make_checkpoint(), Path(folder) / CHECKPOINT_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(folder))

    train(config, dataset=dataset, report=report, resume=resume)
