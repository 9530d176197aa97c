"""A seed's tested weights as an MLflow model: `model/` in the seed run's artifacts, loaded back with
`mlflow.pyfunc.load_model(f"runs:/{run_id}/model")`.

The folder holds the seed's `checkpoint.pt` (`final.evaluation`: the weights with their resolved
configuration and epoch; the only copy of the weights in the store, which `sbn-study evaluate` reads too)
and an `MLmodel` file that names this module as the loader (`python_function` with `loader_module`): the
model is rebuilt from the configuration and its weights loaded, so no class is pickled and an MLmodel
stays loadable as long as the configuration is. What the configuration does not say (the number of
classes, the image size, the training split's channel statistics) is in the flavor's `model_config`.

The loaded model's `predict` takes uint8 N×3×H×W images, as the datasets hold them, and returns float32
N×classes logits; its `get_raw_model()` is the `evaluate.inference.Classifier` (the torch module in
`.model`, on the CPU, in eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study.final.evaluation import (
    CHECKPOINT,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

if TYPE_CHECKING:
    import numpy as np

    from sbn_study.evaluate.inference import Classifier
    from sbn_study.trial.data import ImageDataset

MLMODEL = "MLmodel"  # MLflow's name for a model's description


def save_model(
    folder: Path, config: Mapping[str, Any], state: Mapping[str, Any], epoch: int, dataset: ImageDataset
) -> tuple[Path, Path]:
    """Writes the checkpoint and the MLmodel file that describes it into `folder`; returns both paths."""
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types import Schema, TensorSpec

    save_checkpoint(folder / CHECKPOINT, config, state, epoch)
    images = dataset.test.images
    description = {
        "num_classes": dataset.num_classes,
        "input_size": list(images.shape[-2:]),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
    mlmodel = Model(
        signature=ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *images.shape[1:]))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dataset.num_classes))]),
        )
    )
    add_to_model(mlmodel, loader_module=__name__, data=CHECKPOINT, model_config=description)
    mlmodel.save(str(folder / MLMODEL))
    return folder / MLMODEL, folder / CHECKPOINT


class _Model:
    """What `mlflow.pyfunc.load_model` wraps."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    def predict(self, images: np.ndarray, params: Mapping[str, Any] | None = None) -> np.ndarray:
        import torch

        return self.classifier.logits(torch.from_numpy(images)).cpu().numpy()

    def get_raw_model(self) -> Classifier:
        return self.classifier


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any]) -> _Model:
    """MLflow's entry point (`loader_module`): `data_path` is the checkpoint."""
    import torch

    from sbn_study.evaluate.inference import Classifier

    config, state, _ = load_checkpoint(Path(data_path))
    num_classes, (height, width) = model_config["num_classes"], model_config["input_size"]
    device = torch.device("cpu")
    model = model_from_checkpoint(config, state, num_classes, (height, width), device).eval()
    return _Model(Classifier(model, model_config["mean"], model_config["std"], device))
