"""Corruption robustness: a model's error on every corruption and severity of `corruptions`, and the corruption
errors (CE) of the robustness literature.

Definitions (E = top-1 error in [0, 1]; c a corruption, s a severity 1..5; means over the measured ones):
- `robust/<c>/<s>/error` = E(c, s); `robust/clean/error` = E on the clean images.
- `robust/<c>/error` = mean_s E(c, s).
- `robust/mce` = mean over c and s of E(c, s): the unnormalized mean corruption error (the figure AugMix,
  Hendrycks et al. ICLR 2020, reports on CIFAR-10-C).
Against a reference model (here the BN arm, where Hendrycks & Dietterich normalize by AlexNet's errors):
- `robust/<c>/ce_vs_ref` = Σ_s E(c, s) / Σ_s E_ref(c, s); `robust/mce_vs_ref` = mean_c of it (their mCE).
- `robust/<c>/relative_ce_vs_ref` = Σ_s (E(c, s) − E_clean) / Σ_s (E_ref(c, s) − E_ref_clean);
  `robust/relative_mce_vs_ref` = mean_c of it (their relative mCE: the degradation, not the error).
A ratio whose denominator is not positive (the reference made no errors, or corruption did not degrade it) is
NaN, and so is a mean over it. These figures average only the corruptions computed here (11 by default, 8 of the
published 15 and 3 of the extra 4), so they are comparable between arms, not with published CIFAR-C numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from sbn_study.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from sbn_study.evaluate.inference import BLOCK, Classifier, generator
from sbn_study.trial.data import Split

PREFIX = "robust"
_ERROR_KEY = re.compile(rf"{PREFIX}/(\w+)/(\d)/error")


@dataclass(frozen=True)
class CorruptionConfig:
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    seed: int = 0
    max_images: int | None = None  # the first `max_images` of the split; None = all


@dataclass(frozen=True)
class CorruptionResult:
    clean_error: float
    errors: dict[str, dict[int, float]] = field(default_factory=dict)  # corruption → severity → error

    def mean_error(self) -> float:
        values = [error for by_severity in self.errors.values() for error in by_severity.values()]
        return sum(values) / len(values) if values else math.nan

    def to_metrics(self) -> dict[str, float]:
        metrics = {f"{PREFIX}/clean/error": self.clean_error}
        for name, by_severity in self.errors.items():
            for severity, error in by_severity.items():
                metrics[f"{PREFIX}/{name}/{severity}/error"] = error
            metrics[f"{PREFIX}/{name}/error"] = sum(by_severity.values()) / len(by_severity)
        metrics[f"{PREFIX}/mce"] = self.mean_error()
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> CorruptionResult:
        """The result back from `to_metrics` output (e.g. a reference arm's metrics read from MLflow)."""
        errors: dict[str, dict[int, float]] = {}
        for key, value in metrics.items():
            match = _ERROR_KEY.fullmatch(key)
            if match:
                errors.setdefault(match[1], {})[int(match[2])] = float(value)
        return cls(float(metrics[f"{PREFIX}/clean/error"]), errors)


def corruption_errors(classifier: Classifier, split: Split, config: CorruptionConfig) -> CorruptionResult:
    """Top-1 error of `classifier` on `split` under each corruption and severity of `config`.

    Corrupted images are generated on the classifier's device, block by block, each noise corruption of a block
    from its own generator seeded by (seed, corruption, severity, block): the same images on every run,
    whatever the batch size or the corruptions selected (on another device type the noise streams differ).
    """
    unknown = sorted(set(config.corruptions) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
    if not set(config.severities) <= set(SEVERITIES):
        raise ValueError(f"severities must be among {SEVERITIES}, got {config.severities}")
    images, labels = split.images[: config.max_images], split.labels[: config.max_images]
    count = len(labels)
    if count == 0:
        raise ValueError("the split has no images to corrupt")
    device = classifier.device
    clean = 0
    wrong = {(name, severity): 0 for name in config.corruptions for severity in config.severities}
    for block, start in enumerate(range(0, count, BLOCK)):
        block_images = images[start : start + BLOCK].to(device)
        block_labels = labels[start : start + BLOCK].to(device)
        clean += classifier.errors(block_images, block_labels)
        for name, severity in wrong:
            stream = generator(device, config.seed, name, severity, block)
            corrupted = corrupt(block_images, name, severity, stream)
            wrong[name, severity] += classifier.errors(corrupted, block_labels)
    errors: dict[str, dict[int, float]] = {}
    for (name, severity), mistakes in wrong.items():
        errors.setdefault(name, {})[severity] = mistakes / count
    return CorruptionResult(clean / count, errors)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def versus_reference(result: CorruptionResult, reference: CorruptionResult) -> dict[str, float]:
    """The CE and relative CE of `result` against `reference` per corruption, and their means (see above).

    `reference` must cover every corruption and severity of `result`.
    """
    missing = [
        f"{name}/{severity}"
        for name, by_severity in result.errors.items()
        for severity in by_severity
        if severity not in reference.errors.get(name, {})
    ]
    if missing:
        raise ValueError(f"the reference has no error for {', '.join(missing)}")
    metrics: dict[str, float] = {}
    for name, by_severity in result.errors.items():
        ref = reference.errors[name]
        ce = _ratio(sum(by_severity.values()), sum(ref[s] for s in by_severity))
        relative = _ratio(
            sum(error - result.clean_error for error in by_severity.values()),
            sum(ref[s] - reference.clean_error for s in by_severity),
        )
        metrics[f"{PREFIX}/{name}/ce_vs_ref"] = ce
        metrics[f"{PREFIX}/{name}/relative_ce_vs_ref"] = relative
    for kind, mean in (("ce", "mce"), ("relative_ce", "relative_mce")):
        values = [metrics[f"{PREFIX}/{name}/{kind}_vs_ref"] for name in result.errors]
        metrics[f"{PREFIX}/{mean}_vs_ref"] = sum(values) / len(values) if values else math.nan
    return metrics
