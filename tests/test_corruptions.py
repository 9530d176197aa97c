"""The corruptions against constructed cases and against the libraries `make_cifar_c.py` used (Pillow, scipy's
Gaussian filter behind skimage's, colorsys for skimage's HSV), and the corruption errors and CE definitions."""

from __future__ import annotations

import colorsys
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sbn_study.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from sbn_study.evaluate.inference import Classifier
from sbn_study.evaluate.robustness import (
    CorruptionConfig,
    CorruptionResult,
    corruption_errors,
    versus_reference,
)
from sbn_study.trial.data import Split

NOISES = [name for name, c in CORRUPTIONS.items() if c.random]


def _images(count: int = 8, seed: int = 0, smooth: bool = False) -> torch.Tensor:
    images = torch.randint(0, 256, (count, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
    if smooth:  # natural images are smooth; JPEG and blurs behave differently on white noise
        images = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1, count_include_pad=False).round()
    return images.to(torch.uint8)


def _stream(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_zero_is_the_identity_and_others_keep_shape_and_dtype(name: str) -> None:
    images = _images(4)
    assert corrupt(images, name, 0) is images
    corrupted = corrupt(images, name, 3, _stream(0))
    assert corrupted.dtype == torch.uint8 and corrupted.shape == images.shape
    assert not torch.equal(corrupted, images)


@pytest.mark.parametrize("name", NOISES)
def test_noise_is_a_function_of_the_seed(name: str) -> None:
    images = _images(4)
    first = corrupt(images, name, 5, _stream(7))
    assert torch.equal(first, corrupt(images, name, 5, _stream(7)))
    assert not torch.equal(first, corrupt(images, name, 5, _stream(8)))
    with pytest.raises(ValueError, match="pass a generator"):
        corrupt(images, name, 1)


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "pixelate", "contrast"])
def test_blurs_pixelation_and_contrast_keep_a_constant_image(name: str) -> None:
    images = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    images[1] = 37
    for severity in SEVERITIES:
        assert torch.equal(corrupt(images, name, severity), images)


def test_bad_arguments_are_refused() -> None:
    images = _images(1)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match=r"severity must be 0\.\.5"):
        corrupt(images, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.float(), "contrast", 1)


def test_gaussian_noise_and_shot_noise_have_the_published_spread() -> None:
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    gaussian = (corrupt(grey, "gaussian_noise", 1, _stream(0)).float() - 128) / 255
    assert gaussian.mean().abs() < 0.002 and gaussian.std() == pytest.approx(0.04, rel=0.03)
    photons = CORRUPTIONS["shot_noise"].parameters[4]  # Poisson(c·x)/c has variance x/c
    shot = corrupt(grey, "shot_noise", 5, _stream(0)).float() / 255
    assert shot.mean() == pytest.approx(128 / 255, abs=0.003)
    assert shot.var() == pytest.approx(128 / 255 / photons, rel=0.05)


def test_impulse_noise_salts_and_peppers_the_published_fraction() -> None:
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    noisy = corrupt(grey, "impulse_noise", 5, _stream(0))
    changed = noisy != 128
    assert set(noisy[changed].unique().tolist()) == {0, 255}
    assert changed.float().mean() == pytest.approx(0.07, rel=0.05)
    assert (noisy == 255).float().sum() / changed.float().sum() == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("smooth", [False, True])
def test_pixelate_is_pillows_box_resize_down_and_up(smooth: bool) -> None:
    images = _images(6, smooth=smooth)
    for severity, factor in zip(SEVERITIES, CORRUPTIONS["pixelate"].parameters, strict=True):
        small = (int(32 * factor),) * 2
        expected = torch.stack(
            [_from_pil(_to_pil(i).resize(small, Image.BOX).resize((32, 32), Image.BOX)) for i in images]
        )
        assert torch.equal(corrupt(images, "pixelate", severity), expected)


def test_jpeg_compression_is_pillows_jpeg_at_the_published_quality() -> None:
    images = _images(4, smooth=True)
    for severity, quality in zip(SEVERITIES, CORRUPTIONS["jpeg_compression"].parameters, strict=True):
        expected = []
        for image in images:
            buffer = io.BytesIO()
            _to_pil(image).save(buffer, "JPEG", quality=quality)
            expected.append(_from_pil(Image.open(buffer)))
        assert torch.equal(corrupt(images, "jpeg_compression", severity), torch.stack(expected))


def test_gaussian_blur_is_skimages_gaussian_up_to_rounding() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    images = _images(4)
    for severity, sigma in zip(SEVERITIES, CORRUPTIONS["gaussian_blur"].parameters, strict=True):
        # skimage.filters.gaussian(multichannel=True) is this call: mode "nearest", truncate 4.
        reference = ndimage.gaussian_filter(
            images.numpy() / 255.0, sigma=(0, 0, sigma, sigma), mode="nearest"
        )
        ours = corrupt(images, "gaussian_blur", severity).numpy() / 255.0
        assert np.abs(ours - reference).max() <= 0.5 / 255 + 1e-6


def test_defocus_blur_at_severity_5_is_a_3x3_mean() -> None:
    # Radius 1.5 covers the 3×3 square; the alias blur of σ = 0.1 moves e^-50 of the weight.
    images = _images(2)
    padded = torch.nn.functional.pad(images.double(), (1, 1, 1, 1), mode="reflect")
    expected = torch.nn.functional.avg_pool2d(padded, 3, 1).round()
    assert torch.equal(corrupt(images, "defocus_blur", 5).double(), expected)


def _hsv_reference(images: torch.Tensor, change) -> np.ndarray:
    values = images.numpy() / 255.0
    out = np.empty_like(values)
    for n, row, col in np.ndindex(values.shape[0], *values.shape[2:]):
        hue, saturation, value = colorsys.rgb_to_hsv(*values[n, :, row, col])
        out[n, :, row, col] = colorsys.hsv_to_rgb(*change(hue, saturation, value))
    return np.clip(out, 0, 1) * 255


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_and_saturate_are_the_hsv_changes_of_the_reference(severity: int) -> None:
    images = _images(2)[:, :, :8]
    images[0, :, 0] = 0  # black: brightness turns it grey
    images[0, :, 1] = 90  # grey: skimage's hue 0 turns it red when saturation is added
    shift = CORRUPTIONS["brightness"].parameters[severity - 1]
    gain, offset = CORRUPTIONS["saturate"].parameters[severity - 1]
    brighter = _hsv_reference(images, lambda h, s, v: (h, s, min(v + shift, 1.0)))
    saturated = _hsv_reference(images, lambda h, s, v: (h, min(max(s * gain + offset, 0.0), 1.0), v))
    assert np.abs(corrupt(images, "brightness", severity).numpy() - brighter).max() <= 0.5 + 1e-6
    assert np.abs(corrupt(images, "saturate", severity).numpy() - saturated).max() <= 0.5 + 1e-6


def test_contrast_pulls_each_channel_towards_its_mean() -> None:
    images = torch.tensor([0, 100, 200, 100], dtype=torch.uint8).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    expected = torch.tensor([[25, 100], [175, 100]], dtype=torch.uint8)  # (x − 100)·0.75 + 100
    assert torch.equal(corrupt(images.contiguous(), "contrast", 1)[0, 0], expected)


class _Brightest(nn.Module):
    """Predicts the brightest of the 3 channels: a rule the corruptions change in known ways."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


def _classifier(batch_size: int = 500) -> Classifier:
    return Classifier(_Brightest(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), batch_size)


def test_corruption_errors_are_deterministic_and_do_not_depend_on_the_batch_size() -> None:
    # Mid-grey texture (no clipping under contrast) plus channel offsets of a few grey levels.
    texture = _images(40, smooth=True).float() * 0.3 + 90
    offsets = torch.rand(40, 3, 1, 1, generator=_stream(1)) * 16
    images = (texture + offsets).round().to(torch.uint8)
    split = Split(images, images.float().mean(dim=(-2, -1)).argmax(1))
    config = CorruptionConfig(corruptions=("gaussian_noise", "contrast", "jpeg_compression"), seed=3)
    result = corruption_errors(_classifier(), split, config)
    assert result.clean_error == 0.0
    assert result == corruption_errors(_classifier(batch_size=7), split, config)
    assert result.errors["contrast"] == dict.fromkeys(SEVERITIES, 0.0)  # channel means are kept
    assert 0 < result.errors["gaussian_noise"][5] < 1
    metrics = result.to_metrics()
    assert metrics["robust/mce"] == pytest.approx(result.mean_error())
    assert metrics["robust/gaussian_noise/error"] == pytest.approx(
        sum(result.errors["gaussian_noise"].values()) / 5
    )
    assert CorruptionResult.from_metrics(metrics) == result
    with pytest.raises(ValueError, match="unknown corruption"):
        corruption_errors(_classifier(), split, CorruptionConfig(corruptions=("fog",)))


def test_ce_against_a_reference_follows_the_definitions() -> None:
    arm = CorruptionResult(0.1, {"a": {1: 0.2, 2: 0.4}, "b": {1: 0.3, 2: 0.3}})
    ref = CorruptionResult(0.2, {"a": {1: 0.3, 2: 0.5}, "b": {1: 0.2, 2: 0.2}})
    metrics = versus_reference(arm, ref)
    assert metrics["robust/a/ce_vs_ref"] == pytest.approx(0.6 / 0.8)
    assert metrics["robust/b/ce_vs_ref"] == pytest.approx(0.6 / 0.4)
    assert metrics["robust/mce_vs_ref"] == pytest.approx((0.75 + 1.5) / 2)
    assert metrics["robust/a/relative_ce_vs_ref"] == pytest.approx((0.1 + 0.3) / (0.1 + 0.3))
    # The reference was not degraded by b: its relative CE, and so the mean, are undefined.
    assert math.isnan(metrics["robust/b/relative_ce_vs_ref"])
    assert math.isnan(metrics["robust/relative_mce_vs_ref"])
    with pytest.raises(ValueError, match="no error for a/3"):
        versus_reference(CorruptionResult(0.1, {"a": {3: 0.5}}), ref)
