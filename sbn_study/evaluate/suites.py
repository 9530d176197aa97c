"""`run_suites`: the evaluation suites of one trained model, as one flat dict of metrics for MLflow, plus the
Fourier heat map as a tensor for an image artifact.

Suites: "corruptions" (`robust/...`, see `robustness`), "fourier" (`fourier/...`, see `fourier`), "calibration"
(`calib/...`, see `calibration`). Figures against a reference arm need both arms' results: pass
`SuiteResult.corruptions` (or `CorruptionResult.from_metrics` of logged metrics) to
`robustness.versus_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sbn_study.evaluate.calibration import ECE_BINS, calibration
from sbn_study.evaluate.fourier import FourierConfig, fourier_sensitivity
from sbn_study.evaluate.inference import Classifier
from sbn_study.evaluate.robustness import CorruptionConfig, CorruptionResult, corruption_errors
from sbn_study.trial.data import ImageDataset

SUITES = ("corruptions", "fourier", "calibration")


@dataclass(frozen=True)
class SuiteConfig:
    corruptions: CorruptionConfig = field(default_factory=CorruptionConfig)
    fourier: FourierConfig = field(default_factory=FourierConfig)
    ece_bins: int = ECE_BINS
    batch_size: int = 500  # images per forward pass; memory only, since the model runs in eval mode


@dataclass(frozen=True)
class SuiteResult:
    metrics: dict[str, float]
    heat_map: torch.Tensor | None  # float32 H×W, centred (see `fourier`); None without the fourier suite
    corruptions: CorruptionResult | None  # None without the corruptions suite


def run_suites(
    model: nn.Module,
    dataset: ImageDataset,
    device: torch.device | str,
    suites: Sequence[str] = SUITES,
    config: SuiteConfig | None = None,
) -> SuiteResult:
    """Runs `suites` for `model` (already on `device`) on `dataset.test`; calibration also fits a temperature
    on `dataset.val` when it has images.
    """
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITES)}")
    config = config or SuiteConfig()
    classifier = Classifier(model, dataset.mean, dataset.std, torch.device(device), config.batch_size)
    metrics: dict[str, float] = {}
    heat_map = robust = None
    if "corruptions" in suites:
        robust = corruption_errors(classifier, dataset.test, config.corruptions)
        metrics.update(robust.to_metrics())
    if "fourier" in suites:
        fourier = fourier_sensitivity(classifier, dataset.test, config.fourier)
        metrics.update(fourier.to_metrics())
        heat_map = fourier.heat_map
    if "calibration" in suites:
        metrics.update(calibration(classifier, dataset.test, dataset.val, config.ece_bins).to_metrics())
    return SuiteResult(metrics, heat_map, robust)
