"""Fourier sensitivity: the Fourier heat map of Yin et al. (NeurIPS 2019, "A Fourier Perspective on Model
Robustness in Computer Vision") and the error on low- and high-pass filtered images.

Heat map. For a frequency f = (f_h, f_w) (integer cycles per image, f ∈ [−N/2, N/2)), U_f is the real H×W image
of unit L2 norm whose spectrum is (1 + i)/2 at f and the conjugate (1 − i)/2 at −f (1 alone where f = −f: the
constant and the Nyquist patterns): a sinusoid of phase π/4, as in the authors' reference code
(google-research `frequency_analysis/freq_heatmap.py`). Every image x in [0, 1] pixel units becomes
clip(x + ε·r·U_f, 0, 1), with r = ±1 drawn independently per image and per channel (their `rand_flip`; the same
U_f in every channel), and the heat map holds the top-1 error at f. U_f = U_−f, so f is measured on half the
grid (f_w ≥ 0) and the map filled by symmetry; it is returned centred (`fftshift`: the constant at
(H//2, W//2), as their figures show it). `stride` > 1 measures only frequencies whose f_h and f_w are
multiples of it (NaN elsewhere), and `heat_map_images` takes the first images of the split: the map costs
about H·W/2 / stride² passes over them.

ε = 4 in [0, 1] pixel units per channel: our reading of Yin et al.'s CIFAR-10 setting (15.7 for ImageNet);
in [0, 255] units the perturbation would be 1/64 of a grey level per pixel and change nothing. A unit-norm
32×32 basis image has per-pixel RMS 1/32, so ε = 4 is an RMS of 0.125 (32 grey levels).

Filters. `low_pass/B` keeps the frequencies with max(|f_h|, |f_w|) ≤ B/2, a centred square of the shifted
spectrum (of side B + 1 for even B: symmetric about the constant, so that the filtered image is real, where a
B×B square would keep f = −B/2 but not +B/2); `high_pass/B` keeps the others, so the two add up to the image.
Filtered images are not clipped: a high-pass image has zero mean, and clipping would discard half of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sbn_study.evaluate.inference import BLOCK, Classifier, generator
from sbn_study.trial.data import Split

PREFIX = "fourier"


@dataclass(frozen=True)
class FourierConfig:
    epsilon: float = 4.0
    stride: int = 1
    # 1000 images put the standard error of an entry under 1.6 points; all 10k CIFAR images cost 10×.
    heat_map_images: int | None = 1000
    bandwidths: tuple[int, ...] = (2, 4, 8, 16, 24)
    seed: int = 0


@dataclass(frozen=True)
class FourierResult:
    clean_error: float  # on the whole split, as the filtered errors
    low_pass: dict[int, float]  # bandwidth → error
    high_pass: dict[int, float]
    heat_map: torch.Tensor  # float32 H×W errors, centred, on the CPU; NaN where not measured
    heat_map_clean_error: float  # on the heat map's images, unperturbed

    def to_metrics(self) -> dict[str, float]:
        metrics = {f"{PREFIX}/clean/error": self.clean_error}
        for kind, errors in (("low_pass", self.low_pass), ("high_pass", self.high_pass)):
            metrics.update({f"{PREFIX}/{kind}/{b}/error": error for b, error in errors.items()})
        measured = self.heat_map[~self.heat_map.isnan()]
        if measured.numel():
            metrics[f"{PREFIX}/heat_map/clean_error"] = self.heat_map_clean_error
            metrics[f"{PREFIX}/heat_map/mean_error"] = float(measured.mean())
            metrics[f"{PREFIX}/heat_map/max_error"] = float(measured.max())
        return metrics


def _integer_frequencies(size: int) -> list[int]:
    return [int(f) for f in torch.fft.fftfreq(size, d=1.0 / size).round()]


def half_grid(height: int, width: int, stride: int = 1) -> list[tuple[int, int]]:
    """(f_h, f_w) of one frequency of each ± pair, f_w ≥ 0, both multiples of `stride`."""
    rows = _integer_frequencies(height)
    grid = []
    for kw in range(width // 2 + 1):
        for kh in range(height):
            partner = ((-kw) % width, (-kh) % height)
            if partner[0] <= width // 2 and partner < (kw, kh):
                continue  # its partner, the same basis image, came first
            if rows[kh] % stride == 0 and kw % stride == 0:
                grid.append((rows[kh], kw))
    return grid


def fourier_basis(height: int, width: int, frequency: tuple[int, int]) -> torch.Tensor:
    """U_f: float32 height×width, unit L2 norm, spectrum supported on ±`frequency` (see the module docstring)."""
    kh, kw = frequency[0] % height, frequency[1] % width
    partner = ((-kh) % height, (-kw) % width)
    spectrum = torch.zeros(height, width, dtype=torch.complex128)
    if partner == (kh, kw):
        spectrum[kh, kw] = 1
    else:
        spectrum[kh, kw] = (1 + 1j) / 2
        spectrum[partner] = (1 - 1j) / 2
    basis = torch.fft.ifft2(spectrum).real
    return (basis / basis.norm()).float()


def band_mask(height: int, width: int, bandwidth: int) -> torch.Tensor:
    """bool height×width in `fft2` layout: the frequencies `low_pass` keeps."""
    rows = torch.tensor(_integer_frequencies(height)).abs()
    cols = torch.tensor(_integer_frequencies(width)).abs()
    return torch.maximum(rows[:, None], cols[None, :]) <= bandwidth / 2


def _filtered(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.fft2(images.float())
    return torch.fft.ifft2(spectrum * keep.to(images.device)).real


def low_pass(images: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """`images` (float N×C×H×W) with only the frequencies of `band_mask` kept."""
    return _filtered(images, band_mask(*images.shape[-2:], bandwidth))


def high_pass(images: torch.Tensor, bandwidth: int) -> torch.Tensor:
    """`images` without the frequencies `low_pass` keeps."""
    return _filtered(images, ~band_mask(*images.shape[-2:], bandwidth))


def fourier_sensitivity(classifier: Classifier, split: Split, config: FourierConfig) -> FourierResult:
    """The heat map and the filtered errors of `classifier` on `split` (see the module docstring).

    Signs are drawn on the classifier's device per (seed, frequency, block of images): the same on every run,
    whatever the batch size.
    """
    if (
        config.epsilon < 0
        or config.stride < 1
        or any(b < 1 for b in config.bandwidths)
        or (config.heat_map_images is not None and config.heat_map_images < 1)
    ):
        raise ValueError(f"need epsilon ≥ 0 and stride, bandwidths and heat_map_images ≥ 1, got {config}")
    count = len(split)
    if count == 0:
        raise ValueError("the split has no images")
    device = classifier.device
    clean, low, high = 0, dict.fromkeys(config.bandwidths, 0), dict.fromkeys(config.bandwidths, 0)
    for start in range(0, count, BLOCK):
        images = split.images[start : start + BLOCK].to(device).float() / 255
        labels = split.labels[start : start + BLOCK].to(device)
        clean += classifier.errors(images, labels)
        for bandwidth in config.bandwidths:
            low[bandwidth] += classifier.errors(low_pass(images, bandwidth), labels)
            high[bandwidth] += classifier.errors(high_pass(images, bandwidth), labels)
    heat_map, heat_clean = _heat_map(classifier, split, config)
    return FourierResult(
        clean_error=clean / count,
        low_pass={b: wrong / count for b, wrong in low.items()},
        high_pass={b: wrong / count for b, wrong in high.items()},
        heat_map=heat_map,
        heat_map_clean_error=heat_clean,
    )


def _heat_map(classifier: Classifier, split: Split, config: FourierConfig) -> tuple[torch.Tensor, float]:
    device = classifier.device
    images = split.images[: config.heat_map_images].to(device).float() / 255
    labels = split.labels[: config.heat_map_images].to(device)
    count, channels, height, width = images.shape
    heat = torch.full((height, width), math.nan, dtype=torch.float64)
    for frequency in half_grid(height, width, config.stride):
        basis = fourier_basis(height, width, frequency).to(device)
        wrong = 0
        for block, start in enumerate(range(0, count, BLOCK)):
            part = slice(start, start + BLOCK)
            stream = generator(device, config.seed, "fourier", frequency, block)
            signs = torch.randint(0, 2, (len(labels[part]), channels, 1, 1), generator=stream, device=device)
            perturbed = (images[part] + config.epsilon * (2 * signs - 1) * basis).clamp_(0, 1)
            wrong += classifier.errors(perturbed, labels[part])
        kh, kw = frequency[0] % height, frequency[1] % width
        heat[kh, kw] = heat[(-kh) % height, (-kw) % width] = wrong / count
    return torch.fft.fftshift(heat).float(), classifier.errors(images, labels) / count
