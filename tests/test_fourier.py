"""Fourier basis images, filters and the heat map, against a model that provably ignores high frequencies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sbn_study.evaluate.fourier import (
    FourierConfig,
    band_mask,
    fourier_basis,
    fourier_sensitivity,
    half_grid,
    high_pass,
    low_pass,
)
from sbn_study.evaluate.inference import Classifier
from sbn_study.trial.data import Split

SIZE = 32
# The heat-map tests use 16×16 images (a quarter of the frequencies and of the pixels), with ε = 2 so that a
# basis image moves a pixel by 2·√2/16 = 0.18 at most, as ε = 4 does at 32×32.
SMALL = 16
EPSILON = 2.0
MODEL_BAND = 8  # the model sees max(|f_h|, |f_w|) ≤ 4 only
# The frequencies its decision depends on: inside its band, outside low_pass/2's.
CUES = ((2, 1), (0, 3), (-3, 3))


def _support(image: torch.Tensor) -> set[tuple[int, int]]:
    spectrum = torch.fft.fft2(image.double()).abs()
    return {tuple(index) for index in (spectrum > 1e-5 * spectrum.max()).nonzero().tolist()}


@pytest.mark.parametrize(
    "frequency", [(0, 0), (0, 16), (-16, 0), (-16, 16), (1, 0), (0, 5), (3, 7), (-9, 2), (-16, 3), (5, 16)]
)
def test_basis_images_have_unit_norm_and_the_one_frequency_they_claim(frequency: tuple[int, int]) -> None:
    basis = fourier_basis(SIZE, SIZE, frequency)
    assert basis.dtype == torch.float32
    assert float(basis.double().norm()) == pytest.approx(1.0, abs=1e-6)
    index = (frequency[0] % SIZE, frequency[1] % SIZE)
    partner = ((-index[0]) % SIZE, (-index[1]) % SIZE)
    assert _support(basis) == {index, partner}


def test_the_half_grid_holds_one_frequency_of_every_pair() -> None:
    grid = half_grid(SIZE, SIZE)
    assert len(grid) == len(set(grid)) == (SIZE * SIZE + 4) // 2  # 4 frequencies are their own partner
    both = {(h % SIZE, w % SIZE) for h, w in grid} | {(-h % SIZE, -w % SIZE) for h, w in grid}
    assert len(both) == SIZE * SIZE
    assert all(w >= 0 and h % 4 == 0 and w % 4 == 0 for h, w in half_grid(SIZE, SIZE, stride=4))


def test_low_and_high_pass_split_the_spectrum_at_the_bandwidth() -> None:
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mask = band_mask(SIZE, SIZE, 8)
    assert int(mask.sum()) == 9 * 9  # |f| ≤ 4 on both axes
    assert torch.equal(mask, mask.flip(0, 1).roll((1, 1), (0, 1)))  # f kept ⇔ −f kept: real output
    low, high = low_pass(images, 8), high_pass(images, 8)
    torch.testing.assert_close(low + high, images, atol=1e-6, rtol=0)
    assert float(torch.fft.fft2(low)[..., ~mask].abs().max()) < 1e-4
    assert float(torch.fft.fft2(high)[..., mask].abs().max()) < 1e-4
    torch.testing.assert_close(low_pass(images, SIZE), images, atol=1e-6, rtol=0)


class _LowPassLinear(nn.Module):
    """A fixed linear classifier of the low-pass filtered input: exactly blind above its band."""

    def __init__(self) -> None:
        super().__init__()
        cue = sum(fourier_basis(SMALL, SMALL, f) for f in CUES)
        self.weight = nn.Parameter(torch.stack([cue, -cue]).unsqueeze(1).expand(2, 3, SMALL, SMALL) * 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (low_pass(x, MODEL_BAND).unsqueeze(1) * self.weight).sum(dim=(-3, -2, -1))


def _case(batch_size: int = 500) -> tuple[Classifier, Split]:
    # Images in [0.3, 0.7]: a perturbation moves a pixel by 0.18 at most, so nothing is clipped and the
    # perturbed input is exactly the clean one plus the perturbation.
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(32, 3, SMALL, SMALL, generator=generator) * 102 + 77).round().to(torch.uint8)
    classifier = Classifier(_LowPassLinear(), (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), batch_size)
    labels = classifier.logits(images).argmax(1)  # the model's own predictions: clean error 0
    return classifier, Split(images, labels)


def test_a_model_blind_to_high_frequencies_gains_no_error_from_them() -> None:
    classifier, split = _case()
    images = split.images.float() / 255
    classifier.logits(images)
    assert torch.equal(images, split.images.float() / 255), "the classifier normalizes out of place"
    result = fourier_sensitivity(classifier, split, FourierConfig(epsilon=EPSILON, bandwidths=(2, 8, 16)))
    assert result.clean_error == result.heat_map_clean_error == 0.0
    heat = result.heat_map
    assert heat.shape == (SMALL, SMALL) and not heat.isnan().any()
    frequency = torch.arange(-SMALL // 2, SMALL // 2)  # the centred layout's frequency per row / column
    beyond = torch.maximum(frequency[:, None].abs(), frequency[None, :].abs()) > MODEL_BAND / 2
    assert float(heat[beyond].abs().max()) == 0.0
    for f_h, f_w in CUES:
        for h, w in ((f_h, f_w), (-f_h, -f_w)):
            assert heat[h + SMALL // 2, w + SMALL // 2] > 0.2
    assert result.low_pass[8] == result.low_pass[16] == 0.0  # it keeps every frequency the model sees
    assert result.low_pass[2] > 0.2  # it removes the cues
    metrics = result.to_metrics()
    assert metrics["fourier/low_pass/8/error"] == 0.0
    assert metrics["fourier/heat_map/mean_error"] == pytest.approx(float(heat.mean()))
    assert metrics["fourier/heat_map/max_error"] == float(heat.max())


def test_the_heat_map_is_deterministic_and_subsampled_by_the_stride() -> None:
    classifier, split = _case()
    config = FourierConfig(epsilon=EPSILON, stride=4, bandwidths=(4,), seed=5)
    result = fourier_sensitivity(classifier, split, config)
    again = fourier_sensitivity(_case(batch_size=5)[0], split, config)
    torch.testing.assert_close(result.heat_map, again.heat_map, equal_nan=True, rtol=0, atol=0)
    measured = ~result.heat_map.isnan()
    assert int(measured.sum()) == (SMALL // 4) ** 2
    assert bool(measured[SMALL // 2, SMALL // 2 + 4]) and not bool(measured[SMALL // 2, SMALL // 2 + 2])
    with pytest.raises(ValueError, match="stride"):
        fourier_sensitivity(classifier, split, FourierConfig(stride=0))
