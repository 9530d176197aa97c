"""Calibration on the clean test split, before and after temperature scaling (Guo et al., ICML 2017).

Definitions (p = softmax of the logits; N samples; y the label):
- ECE: confidence = max_c p_c, prediction = argmax_c p_c; 15 equal-width bins (b/15, (b+1)/15];
  ECE = Σ_b (n_b / N)·|acc_b − conf_b|, acc_b and conf_b the accuracy and mean confidence of bin b.
- NLL: mean of −ln p_y.
- Brier score: mean over samples of Σ_c (p_c − [c = y])², the multi-class form (0 best, 2 worst).
- Temperature scaling: the logits divided by one T > 0 that minimizes the NLL on the validation split. The NLL
  is convex in β = 1/T (a log-sum-exp of β·z minus β·z_y), so its minimum is where dNLL/dβ = mean(E_p[z] − z_y),
  increasing in β, crosses zero: found by bisection in ln T over [1e-2, 1e2], 48 halvings in float64 (T to a
  relative 1e-13), which is deterministic. A minimum outside the range returns the nearer end (T = 1e-2
  when every validation prediction is right: the NLL then falls as T → 0).
Metrics: `calib/ece`, `calib/nll`, `calib/brier`, `calib/accuracy`; with a non-empty validation split also
`calib/temperature` and `calib/ece_ts`, `calib/nll_ts`, `calib/brier_ts` of the scaled logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sbn_study.evaluate.inference import Classifier
from sbn_study.trial.data import Split

PREFIX = "calib"
ECE_BINS = 15
TEMPERATURE_RANGE = (1e-2, 1e2)
_HALVINGS = 48


def reliability(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """float64 bins×3 on the logits' device: per ECE bin, its count, Σ correct and Σ confidence (what a
    reliability diagram draws: accuracy Σ correct / count against confidence Σ confidence / count)."""
    probabilities = logits.double().softmax(1)
    confidence, prediction = probabilities.max(1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=logits.device)[1:-1]
    # right=False puts a confidence equal to an edge in the bin below: bins are (lower, upper].
    bin_of = torch.bucketize(confidence, edges, right=False)
    sums = torch.zeros(bins, 3, dtype=torch.float64, device=logits.device)
    sums.index_add_(0, bin_of, torch.stack([torch.ones_like(correct), correct, confidence], 1))
    return sums


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    _, correct, confidence = reliability(logits, labels, bins).unbind(1)
    # n_b/N · |acc_b − conf_b| = |Σ_b correct − Σ_b confidence| / N.
    return float((correct - confidence).abs().sum() / len(labels))


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.double(), labels))


def brier_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    probabilities = logits.double().softmax(1)
    one_hot = F.one_hot(labels, probabilities.shape[1]).double()
    return float(((probabilities - one_hot) ** 2).sum(1).mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the NLL of `logits` / T on `labels` (bisection; see the module docstring)."""
    z = logits.double()
    z_true = z.gather(1, labels[:, None]).squeeze(1)

    def slope(log_t: float) -> float:  # dNLL/dβ at β = 1/T
        p = (z * math.exp(-log_t)).softmax(1)
        return float(((p * z).sum(1) - z_true).mean())

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    for _ in range(_HALVINGS):
        middle = (low + high) / 2
        # A positive slope in β means β is past the minimum: T must grow.
        low, high = (middle, high) if slope(middle) > 0 else (low, middle)
    return math.exp((low + high) / 2)


@dataclass(frozen=True)
class CalibrationResult:
    accuracy: float
    ece: float
    nll: float
    brier: float
    temperature: float | None = None  # None without a validation split, and so are the scaled figures
    ece_ts: float | None = None
    nll_ts: float | None = None
    brier_ts: float | None = None

    def to_metrics(self) -> dict[str, float]:
        names = ("accuracy", "ece", "nll", "brier", "temperature", "ece_ts", "nll_ts", "brier_ts")
        return {f"{PREFIX}/{n}": getattr(self, n) for n in names if getattr(self, n) is not None}


def calibration(
    classifier: Classifier, test: Split, val: Split | None, bins: int = ECE_BINS
) -> CalibrationResult:
    """Calibration of `classifier` on `test`, and after temperature scaling fitted on `val` if it has images."""
    if len(test) == 0:
        raise ValueError("the test split has no images")
    logits = classifier.logits(test.images).double()
    labels = test.labels.to(logits.device)
    result = CalibrationResult(
        accuracy=float((logits.argmax(1) == labels).double().mean()),
        ece=expected_calibration_error(logits, labels, bins),
        nll=negative_log_likelihood(logits, labels),
        brier=brier_score(logits, labels),
    )
    if val is None or len(val) == 0:
        return result
    val_logits = classifier.logits(val.images)
    temperature = fit_temperature(val_logits, val.labels.to(val_logits.device))
    scaled = logits / temperature
    return replace(
        result,
        temperature=temperature,
        ece_ts=expected_calibration_error(scaled, labels, bins),
        nll_ts=negative_log_likelihood(scaled, labels),
        brier_ts=brier_score(scaled, labels),
    )
