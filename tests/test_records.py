"""The records a researcher relies on, through the real stack: what each epoch cost the machine (`system/...`),
the dataset inputs of every run, and a final-training seed's model loaded back from MLflow in one call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sbn_study import cli
from sbn_study.spec.loader import load_spec
from tests import test_tracking
from tests.conftest import QUICKSTART, FinishedStudy
from tests.test_tracking import open_trial, open_writer

store = test_tracking.store  # the fixture: a sqlite store with an experiment

# Measured in every trial process, CUDA or not.
HOST_METRICS = (
    "system/cpu_percent",
    "system/host_cpu_percent",
    "system/rss_mb",
    "system/host_memory_percent",
)


def inputs_of(client, run_id: str) -> dict[str, tuple[str, dict]]:
    """context → (digest, profile) of a run's dataset inputs."""
    found = {}
    for dataset_input in client.get_run(run_id).inputs.dataset_inputs:
        (context,) = [tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context"]
        found[context] = (dataset_input.dataset.digest, json.loads(dataset_input.dataset.profile))
        assert dataset_input.dataset.name == "synthetic"
        assert json.loads(dataset_input.dataset.source)["seed"] == 0  # the synthetic generator's seed
    return found


def test_trial_runs_carry_system_metrics_per_epoch_and_every_run_the_dataset(
    small_study: FinishedStudy,
) -> None:
    from mlflow.tracking import MlflowClient

    from sbn_study.trial.data import load_dataset
    from sbn_study.trial.inputs import dataset_inputs

    client = MlflowClient(small_study.tracking_uri)
    parent = small_study.outcome.parent_run_id
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(runs) == small_study.spec.search.num_samples
    # Loaded again here: the same content has the same digest, whoever loads it.
    loaded = load_dataset(small_study.spec.base_config().data)
    expected = {
        d["context"]: d["digest"] for d in dataset_inputs(loaded, small_study.spec.base_config().data)
    }
    # SMALL_STUDY_OVERRIDES: 1024 training images of which 256 held out, 256 test images.
    sizes = {"train": 768, "validation": 256, "test": 256}
    for run_id in (parent, *(r.info.run_id for r in runs)):
        recorded = inputs_of(client, run_id)
        assert {c: digest for c, (digest, _) in recorded.items()} == expected
        assert {c: profile["num_rows"] for c, (_, profile) in recorded.items()} == sizes
    assert len(set(expected.values())) == 3

    for run in runs:
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        for name in HOST_METRICS:
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == epochs, name
            assert all(m.value >= 0 for m in history), name
        rss = [m.value for m in client.get_metric_history(run.info.run_id, "system/rss_mb")]
        assert min(rss) > 50  # a process that imported torch and holds a model and its data
        # No GPU in this study: no GPU figures rather than zeros.
        assert not any(k.startswith("system/gpu") for k in run.data.metrics)


@pytest.mark.slow
def test_a_seed_model_loads_back_in_one_call_and_gives_the_checkpoint_s_logits(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from sbn_study.final.evaluation import load_checkpoint
    from sbn_study.trial.data import DeviceLoader, load_dataset
    from sbn_study.trial.models import create_model_from_config

    small = ["data.val_size=128", "data.synthetic.train_size=512", "data.synthetic.test_size=96"]
    config = tmp_path / "quickstart.yaml"
    config.write_text(yaml.safe_dump(load_spec(QUICKSTART, small).base_config().model_dump(mode="json")))
    output = tmp_path / "out"
    args = ["train", str(config), "--set", "train.epochs=2", "--seeds", "0", "--suites", "none"]
    assert cli.main([*args, "--output", str(output)]) == 0
    uri = f"sqlite:///{output / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart-final")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if "sbn.seed" in r.data.tags]
    run_id = run.info.run_id
    # The weights are stored once: in the model, which `sbn-study evaluate` reads as well.
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "model"}
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {
        "model/MLmodel",
        "model/checkpoint.pt",
    }

    # As the README's `mlflow.set_tracking_uri` would, without leaving the store in this process's
    # environment for the drivers the tests after this one start (mlflow.set_tracking_uri exports it).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # the README's one call
    (checkpoint,) = (output / "final").glob("*/config-seed0/checkpoint.pt")
    saved, state, epoch = load_checkpoint(checkpoint)
    assert str(epoch) == run.data.tags["sbn.best_epoch"]
    dataset = load_dataset(saved.data)
    logits = model.predict(dataset.test.images.numpy())

    # The checkpoint's network, fed as training's test pass feeds it (DeviceLoader's normalization).
    network = create_model_from_config(saved.model, saved.norm, dataset.num_classes, (32, 32))
    network.load_state_dict(state)
    network.eval()
    test = DeviceLoader(
        dataset.test,
        32,
        device=torch.device("cpu"),
        train=False,
        augment=False,
        mean=dataset.mean,
        std=dataset.std,
    )
    with torch.no_grad():
        expected = torch.cat([network(images) for images, _ in test.epoch(0)]).numpy()
    assert logits.dtype == np.float32 and logits.shape == (96, dataset.num_classes)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    accuracy = float((logits.argmax(1) == dataset.test.labels.numpy()).mean())
    assert accuracy == pytest.approx(run.data.metrics["test_acc"])
    assert model.get_raw_model().model.training is False

    # The seed run and its parent record the dataset and what each epoch cost.
    assert set(inputs_of(client, run_id)) == {"train", "validation", "test"}
    assert set(inputs_of(client, run.data.tags["mlflow.parentRunId"])) == {"train", "validation", "test"}
    for name in HOST_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name


def test_dataset_inputs_the_store_never_took_are_saved_and_sent_once_by_the_replay(
    store: tuple[str, str], tmp_path: Path
) -> None:
    from sbn_study.spec.config import DataConfig
    from sbn_study.trial.data import load_dataset
    from sbn_study.trial.inputs import dataset_inputs

    data = DataConfig(val_size=64, synthetic={"train_size": 256, "test_size": 32})
    inputs = dataset_inputs(load_dataset(data), data)
    writer, gated = open_writer(store, tmp_path)
    run_id = open_trial(writer, "a")
    gated.failing = True
    writer.log_inputs(inputs)
    writer.log_inputs(inputs, "a")
    assert not writer.flush(deadline_s=0.5)
    assert writer.save_unsent() == 2
    gated.failing = False
    replay = writer.handle.writer()
    assert replay.send_saved() == 2
    # Sent again, as a resumed study's callback does for a trial it opens: still one input per split.
    assert open_trial(replay, "a") == run_id
    replay.log_inputs(inputs, "a")
    assert replay.flush(deadline_s=10.0)
    for run in (writer.handle.parent_run_id, run_id):
        assert {c: p["num_rows"] for c, (_, p) in inputs_of(replay.client, run).items()} == {
            "train": 192,
            "validation": 64,
            "test": 32,
        }
        assert len(replay.client.get_run(run).inputs.dataset_inputs) == 3
    replay.close()
