"""`run_suites` on the tiny model: the flat metrics of each suite, and suites switched off."""

from __future__ import annotations

import math

import pytest
import torch

from sbn_study.evaluate.fourier import FourierConfig
from sbn_study.evaluate.robustness import CorruptionConfig, versus_reference
from sbn_study.evaluate.suites import SuiteConfig, run_suites
from sbn_study.trial.data import DeviceLoader, ImageDataset, Split
from sbn_study.trial.models import create_model
from sbn_study.trial.train import evaluate

CONFIG = SuiteConfig(
    corruptions=CorruptionConfig(corruptions=("gaussian_noise", "pixelate"), severities=(1, 5)),
    fourier=FourierConfig(stride=16, heat_map_images=16, bandwidths=(8,)),
    batch_size=32,
)


def _split(count: int, generator: torch.Generator) -> Split:
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 10, (count,), generator=generator))


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    train, val, test = (_split(n, generator) for n in (4, 32, 48))
    return ImageDataset("synthetic", 10, train, val, test, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_every_suite_reports_flat_finite_metrics_and_the_heat_map(dataset: ImageDataset) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", 10, width=4)
    result = run_suites(model, dataset, "cpu", config=CONFIG)
    metrics = result.metrics
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    for key in (
        "robust/clean/error",
        "robust/gaussian_noise/5/error",
        "robust/pixelate/error",
        "robust/mce",
        "fourier/clean/error",
        "fourier/low_pass/8/error",
        "fourier/high_pass/8/error",
        "fourier/heat_map/mean_error",
        "calib/ece",
        "calib/ece_ts",
        "calib/temperature",
    ):
        assert key in metrics
    assert not any(key.startswith("robust/gaussian_noise/3") for key in metrics)
    assert metrics["robust/clean/error"] == metrics["fourier/clean/error"]
    loader = DeviceLoader(
        dataset.test,
        CONFIG.batch_size,
        device="cpu",
        train=False,
        augment=False,
        mean=dataset.mean,
        std=dataset.std,
    )
    assert metrics["robust/clean/error"] == pytest.approx(1 - evaluate(model, loader)[1])
    assert result.heat_map is not None and result.heat_map.shape == (32, 32)
    assert model.training, "the model's mode is restored"
    assert result.corruptions is not None
    against_itself = versus_reference(result.corruptions, result.corruptions)
    assert against_itself["robust/mce_vs_ref"] == pytest.approx(1.0)


def test_suites_switch_off(dataset: ImageDataset) -> None:
    model = create_model("tiny", 10, width=4)
    result = run_suites(model, dataset, "cpu", suites=("calibration",), config=CONFIG)
    assert {key.split("/")[0] for key in result.metrics} == {"calib"}
    assert result.heat_map is None and result.corruptions is None
    with pytest.raises(ValueError, match="unknown suite"):
        run_suites(model, dataset, "cpu", suites=("robustness",))
