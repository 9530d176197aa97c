"""ECE, NLL and Brier score on constructed predictors with known answers, and temperature scaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sbn_study.evaluate.calibration import (
    TEMPERATURE_RANGE,
    brier_score,
    calibration,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from sbn_study.evaluate.inference import Classifier
from sbn_study.trial.data import Split


def _sampled_labels(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn from softmax(logits): a predictor that is calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)


def _logits(count: int, classes: int, scale: float, seed: int) -> torch.Tensor:
    return (
        torch.randn(count, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        * scale
    )


def test_a_calibrated_predictor_has_an_ece_near_zero() -> None:
    logits = _logits(100_000, 10, 2.0, seed=0)
    labels = _sampled_labels(logits, seed=1)
    # Sampling noise alone: about Σ_b sqrt(n_b·acc_b(1 − acc_b))/N ≈ 0.004 here.
    assert expected_calibration_error(logits, labels) < 0.01
    # An overconfident copy of the same predictor is far off.
    assert expected_calibration_error(logits * 3, labels) > 0.1


# Confidences away from the bin edges b/15: 0.9 in (13/15, 14/15], 0.55 in (8/15, 9/15], 0.38 in (5/15, 6/15].
TABLE = torch.tensor(
    [
        [0.9, 0.05, 0.05],  # label 0: right
        [0.9, 0.05, 0.05],  # label 1: wrong
        [0.1, 0.55, 0.35],  # label 1: right
        [0.55, 0.35, 0.1],  # label 0: right
        [0.38, 0.34, 0.28],  # label 2: wrong
    ],
    dtype=torch.float64,
)
TABLE_LABELS = torch.tensor([0, 1, 1, 0, 2])


def test_ece_nll_and_brier_of_a_miscalibrated_table_match_a_hand_computation() -> None:
    logits = TABLE.log()  # softmax(log p) = p
    # Bins: {0.9, 0.9} acc 1/2, {0.55, 0.55} acc 1, {0.38} acc 0, each weighted by its 1/5 per sample.
    ece = 2 / 5 * abs(0.5 - 0.9) + 2 / 5 * abs(1.0 - 0.55) + 1 / 5 * abs(0.0 - 0.38)
    assert expected_calibration_error(logits, TABLE_LABELS) == pytest.approx(ece) == pytest.approx(0.416)
    nll = -(math.log(0.9) + math.log(0.05) + 2 * math.log(0.55) + math.log(0.28)) / 5
    assert negative_log_likelihood(logits, TABLE_LABELS) == pytest.approx(nll)
    # Σ_c (p_c − y_c)² per row: 0.015, 1.715, 0.335, 0.335, 0.7784.
    assert brier_score(logits, TABLE_LABELS) == pytest.approx((0.015 + 1.715 + 0.335 + 0.335 + 0.7784) / 5)


def test_ece_bins_are_closed_above() -> None:
    # With 2 bins the edge is 0.5, and logits (0, 0, −∞) give a confidence of exactly 0.5: it joins the 0.4
    # below it in (0, 0.5], so the bins hold {0.5 right, 0.4 wrong} and {0.7 wrong}.
    logits = torch.tensor([[0.0, 0.0, -math.inf], [0.4, 0.3, 0.3], [0.7, 0.2, 0.1]], dtype=torch.float64)
    logits[1:] = logits[1:].log()
    labels = torch.tensor([0, 1, 1])
    expected = (abs(1 - (0.5 + 0.4)) + abs(0 - 0.7)) / 3
    assert expected_calibration_error(logits, labels, bins=2) == pytest.approx(expected)


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_the_temperature_the_labels_were_drawn_at(temperature: float) -> None:
    logits = _logits(10_000, 10, 3.0, seed=2)
    labels = _sampled_labels(logits / temperature, seed=3)
    # The estimate's spread over seeds at this size is about ±3 %.
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=0.05)


def test_temperature_is_deterministic_and_the_lower_end_when_every_prediction_is_right() -> None:
    logits = _logits(100, 5, 1.0, seed=4)
    assert fit_temperature(logits, logits.argmax(1)) == pytest.approx(TEMPERATURE_RANGE[0])
    labels = _sampled_labels(logits, seed=5)
    assert fit_temperature(logits, labels) == fit_temperature(logits.clone(), labels.clone())


class _Fixed(nn.Module):
    """Logits that are a fixed linear function of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3 * 4 * 4, generator=torch.Generator().manual_seed(5)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_calibration_fits_the_temperature_on_the_validation_split() -> None:
    model = _Fixed()
    classifier = Classifier(model, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    generator = torch.Generator().manual_seed(6)
    splits = []
    for seed in (7, 8):
        images = torch.randint(0, 256, (4000, 3, 4, 4), dtype=torch.uint8, generator=generator)
        labels = _sampled_labels(classifier.logits(images) / 3.0, seed)  # the model is 3× overconfident
        splits.append(Split(images, labels))
    val, test = splits
    result = calibration(classifier, test, val)
    assert result.temperature == pytest.approx(3.0, rel=0.1)
    assert result.ece_ts < 0.03 < result.ece
    assert result.nll_ts < result.nll and result.brier_ts < result.brier
    assert set(result.to_metrics()) == {
        f"calib/{name}"
        for name in ("accuracy", "ece", "nll", "brier", "temperature", "ece_ts", "nll_ts", "brier_ts")
    }
    without_val = calibration(classifier, test, Split(val.images[:0], val.labels[:0]))
    assert without_val.temperature is None
    assert set(without_val.to_metrics()) == {"calib/accuracy", "calib/ece", "calib/nll", "calib/brier"}
