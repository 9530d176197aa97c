"""The CIFAR-10-C / CIFAR-100-C corruptions that tensor ops can compute, on uint8 N×3×H×W images on any device.

Parameters per severity 1..5 are those of Hendrycks & Dietterich (ICLR 2019), `make_cifar_c.py` in
github.com/hendrycks/robustness (`ImageNet-C/create_c/`), checked against that file; the published pipeline
per image is `np.uint8(corruption(PIL image, severity))`, with the image in [0, 1] as float64 inside.

Computed here (the `make_cifar_c.py` function of the same name is the reference):
- gaussian_noise σ = .04 .06 .08 .09 .10: x + N(0, σ²), clipped.
- shot_noise c = 500 250 100 75 50: Poisson(c·x) / c, clipped.
- impulse_noise amount = .01 .02 .03 .05 .07: skimage's salt & pepper: each value of each channel is replaced
  with probability `amount`, by 1 or 0 with probability ½ each.
- speckle_noise σ = .06 .1 .12 .16 .2: x + x·N(0, σ²), clipped (one of the four extra corruptions).
- gaussian_blur σ = .4 .6 .7 .8 1: skimage's `gaussian` (scipy's `gaussian_filter`: per channel, a separable
  kernel of radius int(4σ + 0.5), edges extended by the nearest pixel). Extra corruption.
- defocus_blur (radius, alias σ) = (.3, .4) (.4, .5) (.5, .6) (1, .2) (1.5, .1): the disk of that radius on a
  17×17 grid, normalized, smoothed by cv2's 3×3 Gaussian of the alias σ, applied per channel as cv2.filter2D
  does (correlation, edges reflected without repeating the edge pixel). At these radii the disk is one pixel
  (severities 1-3), a plus (4) or a 3×3 square (5). Implemented rather than a box-blur stand-in because it is
  exact in tensor ops; the kernel is cropped to its nonzero support, which changes no value.
- contrast c = .75 .5 .4 .3 .15: (x − m)·c + m with m the per-channel mean of the image.
- brightness c = .05 .1 .15 .2 .3: HSV value + c, clipped. With hue and saturation kept, RGB is proportional
  to the value, so the HSV round trip is x·v'/v (a black pixel, v = 0, becomes grey v').
- saturate (a, b) = (.3, 0) (.1, 0) (1.5, 0) (2, .1) (2.5, .2): HSV saturation s·a + b, clipped. With hue and
  value kept, each channel is v·(1 − s·w) with w = (v − x)/(v − min) fixed by the hue; a grey pixel has hue 0
  in skimage (w = (0, 1, 1)), so b > 0 turns it red. Extra corruption.
- pixelate c = .95 .9 .85 .75 .65: Pillow's BOX resize to int(32·c) and back, reproduced exactly (coefficients,
  22-bit fixed point, horizontal pass then vertical, rounding to uint8 after each).
- jpeg_compression quality = 80 65 58 50 40: torchvision.io encode_jpeg/decode_jpeg (libjpeg, as Pillow's JPEG
  save, which gave identical images in our check). The one corruption that runs on the CPU whatever the device,
  image by image, so that every machine gets the same bytes.

Not computed, because their reference is a sequential loop or a library we cannot match in tensor ops: glass blur
(pixel swaps in a Python loop), motion blur and snow (ImageMagick), zoom blur and elastic transform (scipy zoom,
cv2 warps), fog (diamond-square fractal), frost (photographs), spatter (cv2 Canny and distance transforms).

Deviations from the reference, all below one grey level except the noise streams:
- Random draws come from torch generators (seeded, per block of images, on the images' device), not numpy's
  global stream, so no image is corrupted with the published noise sample; the distributions are the same.
- Float32 instead of float64.
- Results are rounded to uint8; `np.uint8` in the reference truncates, which darkens every corrupted value by
  half a level on average and turns a float result of 99.99999 into 99 (the blur of a constant image would not
  be that image).
Severity 0 returns the images unchanged (the same tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Image = torch.Tensor  # uint8 N×C×H×W
Apply = Callable[[Image, Any, torch.Generator | None], Image]
SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Corruption:
    name: str
    parameters: tuple[Any, ...]  # the published parameter of severities 1..5
    apply: Apply
    random: bool  # draws from the generator


def _unit(images: Image) -> torch.Tensor:
    return images.float() / 255


def _uint8(values: torch.Tensor) -> Image:
    return values.clamp(0, 1).mul(255).round().to(torch.uint8)


# -------------------------------------------------------------------------------------------------- noise


def _gaussian_noise(images: Image, sigma: float, generator: torch.Generator | None) -> Image:
    x = _unit(images)
    return _uint8(x + sigma * torch.randn(x.shape, generator=generator, device=x.device))


def _shot_noise(images: Image, photons: float, generator: torch.Generator | None) -> Image:
    return _uint8(torch.poisson(_unit(images) * photons, generator=generator) / photons)


def _impulse_noise(images: Image, amount: float, generator: torch.Generator | None) -> Image:
    x = _unit(images)
    flipped = torch.rand(x.shape, generator=generator, device=x.device) < amount
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return _uint8(torch.where(flipped, salt.float(), x))


def _speckle_noise(images: Image, sigma: float, generator: torch.Generator | None) -> Image:
    x = _unit(images)
    return _uint8(x + x * sigma * torch.randn(x.shape, generator=generator, device=x.device))


# --------------------------------------------------------------------------------------------------- blur


def _per_channel(
    x: torch.Tensor, kernel: torch.Tensor, pad: tuple[int, int, int, int], mode: str
) -> torch.Tensor:
    """Correlates every channel of `x` with the 2-D `kernel`, after padding (left, right, top, bottom)."""
    channels = x.shape[1]
    weight = kernel.to(x).expand(channels, 1, *kernel.shape)
    return F.conv2d(F.pad(x, pad, mode=mode), weight, groups=channels)


def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _gaussian_blur(images: Image, sigma: float, generator: torch.Generator | None) -> Image:
    radius = int(4 * sigma + 0.5)  # scipy's truncate=4.0
    taps = _gaussian_taps(sigma, radius)
    x = _per_channel(_unit(images), taps[None, :], (radius, radius, 0, 0), "replicate")
    return _uint8(_per_channel(x, taps[:, None], (0, 0, radius, radius), "replicate"))


def _defocus_kernel(radius: float, alias_sigma: float) -> torch.Tensor:
    offsets = torch.arange(-8, 9, dtype=torch.float64)  # make_cifar_c's grid for radii up to 8
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    # cv2.GaussianBlur's border cannot matter: the disk is zero two pixels inside the grid's edge.
    taps = _gaussian_taps(alias_sigma, 1)
    smoothed = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), (taps[:, None] * taps[None, :])[None, None])[
        0, 0
    ]
    rows, cols = smoothed.nonzero().unbind(1)
    reach = int(max(rows.max() - 8, 8 - rows.min(), cols.max() - 8, 8 - cols.min()))
    return smoothed[8 - reach : 9 + reach, 8 - reach : 9 + reach]


def _defocus_blur(images: Image, parameters: tuple[float, float], generator: torch.Generator | None) -> Image:
    kernel = _defocus_kernel(*parameters)
    reach = kernel.shape[0] // 2
    # torch's "reflect" is cv2's BORDER_REFLECT_101, filter2D's default.
    return _uint8(_per_channel(_unit(images), kernel, (reach,) * 4, "reflect"))


# ------------------------------------------------------------------------------------ weather and digital


def _contrast(images: Image, factor: float, generator: torch.Generator | None) -> Image:
    x = _unit(images)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return _uint8((x - mean) * factor + mean)


def _brightness(images: Image, shift: float, generator: torch.Generator | None) -> Image:
    x = _unit(images)
    value = x.amax(dim=1, keepdim=True)
    brighter = (value + shift).clamp(0, 1)
    scaled = x * (brighter / value.clamp_min(1e-12))
    return _uint8(torch.where(value > 0, scaled, brighter))


def _saturate(images: Image, parameters: tuple[float, float], generator: torch.Generator | None) -> Image:
    gain, offset = parameters
    x = _unit(images)
    value = x.amax(dim=1, keepdim=True)
    spread = value - x.amin(dim=1, keepdim=True)
    coloured = spread > 0
    saturation = torch.where(coloured, spread / value.clamp_min(1e-12), 0.0)
    saturated = (saturation * gain + offset).clamp(0, 1)
    hue_weight = torch.tensor([0.0, 1.0, 1.0], device=x.device).view(1, 3, 1, 1)  # skimage's hue 0: red
    weight = torch.where(coloured, (value - x) / spread.clamp_min(1e-12), hue_weight)
    return _uint8(value * (1 - saturated * weight))


_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 − 8 − 2


def _pillow_box_weights(in_size: int, out_size: int) -> torch.Tensor:
    """out×in fixed-point weights (integers in float64) of Pillow's BOX resampling of one axis."""
    scale = in_size / out_size
    support = 0.5 * max(scale, 1.0)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        centre = (out + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        # An input pixel counts fully when its centre lies in (centre − support, centre + support].
        inside = [-0.5 < (i - centre + 0.5) / max(scale, 1.0) <= 0.5 for i in range(first, last)]
        row = torch.tensor(inside, dtype=torch.float64)
        weights[out, first:last] = torch.floor(0.5 + row / row.sum() * 2**_PRECISION_BITS)
    return weights


def _pillow_pass(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # Sums of products of bytes and 22-bit integers stay below 2**53: float64 is exact, on any device.
    total = values @ weights.T.to(values.device)
    return torch.floor((total + 2 ** (_PRECISION_BITS - 1)) / 2**_PRECISION_BITS).clamp(0, 255)


def _pillow_box_resize(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    values = _pillow_pass(values, _pillow_box_weights(values.shape[-1], width))
    rows = _pillow_box_weights(values.shape[-2], height)
    return _pillow_pass(values.transpose(-2, -1), rows).transpose(-2, -1)


def _pixelate(images: Image, factor: float, generator: torch.Generator | None) -> Image:
    height, width = images.shape[-2:]
    values = images.double()
    small = _pillow_box_resize(values, int(height * factor), int(width * factor))
    return _pillow_box_resize(small, height, width).to(torch.uint8)


def _jpeg_compression(images: Image, quality: int, generator: torch.Generator | None) -> Image:
    from torchvision.io import decode_jpeg, encode_jpeg  # deferred: only this corruption needs torchvision

    decoded = [decode_jpeg(encode_jpeg(image, quality=quality)) for image in images.cpu()]
    return torch.stack(decoded).to(images.device)


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("gaussian_noise", (0.04, 0.06, 0.08, 0.09, 0.10), _gaussian_noise, random=True),
        Corruption("shot_noise", (500, 250, 100, 75, 50), _shot_noise, random=True),
        Corruption("impulse_noise", (0.01, 0.02, 0.03, 0.05, 0.07), _impulse_noise, random=True),
        Corruption("speckle_noise", (0.06, 0.1, 0.12, 0.16, 0.2), _speckle_noise, random=True),
        Corruption("gaussian_blur", (0.4, 0.6, 0.7, 0.8, 1.0), _gaussian_blur, random=False),
        Corruption(
            "defocus_blur",
            ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
            _defocus_blur,
            random=False,
        ),
        Corruption("brightness", (0.05, 0.1, 0.15, 0.2, 0.3), _brightness, random=False),
        Corruption("contrast", (0.75, 0.5, 0.4, 0.3, 0.15), _contrast, random=False),
        Corruption(
            "saturate", ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)), _saturate, random=False
        ),
        Corruption("pixelate", (0.95, 0.9, 0.85, 0.75, 0.65), _pixelate, random=False),
        Corruption("jpeg_compression", (80, 65, 58, 50, 40), _jpeg_compression, random=False),
    )
}


def corrupt(images: Image, name: str, severity: int, generator: torch.Generator | None = None) -> Image:
    """`images` (uint8 N×3×H×W, any device) under corruption `name` at `severity` 0..5, on the same device.

    The noise corruptions draw from `generator` (on the images' device), which they need; severity 0 is the
    identity and returns `images` itself.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in (0, *SEVERITIES):
        raise ValueError(f"severity must be 0..{SEVERITIES[-1]}, got {severity}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 N×C×H×W, got {images.dtype} {tuple(images.shape)}")
    corruption = CORRUPTIONS[name]
    if severity == 0:
        return images
    if corruption.random and generator is None:
        raise ValueError(f"{name} draws random numbers: pass a generator")
    return corruption.apply(images, corruption.parameters[severity - 1], generator)
