"""Datasets as uint8 tensors, and a loader that augments whole batches on the training device.

CIFAR is read straight from its published pickles (no torchvision dataset object, no PIL), and the
synthetic dataset is generated in a few vectorised tensor ops, so loading never dominates a short trial.
`DeviceLoader` follows airbench: the split lives on the device, and each epoch's shuffle, random crop
and flip are drawn from a generator seeded by (seed, epoch), so a resumed run replays the same batches.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from sbn_study.errors import UserError, one_line
from sbn_study.spec.config import DataConfig, SyntheticConfig

IMAGE_SHAPE = (3, 32, 32)
CROP_PADDING = 4


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, N×3×32×32, contiguous NCHW, on the CPU
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ImageDataset:
    name: str
    num_classes: int
    train: Split  # the training split minus the validation hold-out
    val: Split  # `val_size` images held out of the training split; empty when `val_size` is 0
    test: Split
    mean: tuple[float, float, float]  # per channel, of `train`, in [0, 1] units
    std: tuple[float, float, float]


def num_classes_of(cfg: DataConfig) -> int:
    """The number of classes of `cfg.dataset`, without loading it (models are built before data arrives)."""
    if cfg.dataset == "synthetic":
        return cfg.synthetic.num_classes
    return _CIFAR[cfg.dataset].num_classes


def load_dataset(cfg: DataConfig) -> ImageDataset:
    if cfg.dataset == "synthetic":
        train_full, test = synthetic_splits(cfg.synthetic)
    else:
        train_full, test = _load_cifar(_CIFAR[cfg.dataset], Path(cfg.root).expanduser(), cfg.download)
    train, val = _hold_out(train_full, cfg.val_size, cfg.split_seed)
    mean, std = _channel_stats(train.images)
    return ImageDataset(
        name=cfg.dataset,
        num_classes=num_classes_of(cfg),
        train=train,
        val=val,
        test=test,
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    files_text: str  # how the error message lists the expected files
    label_key: bytes
    num_classes: int
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


_CIFAR = {
    "cifar10": _CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        files_text="data_batch_1..5, test_batch, batches.meta",
        label_key=b"labels",
        num_classes=10,
        torchvision_class="CIFAR10",
    ),
    "cifar100": _CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        files_text="train, test, meta",
        label_key=b"fine_labels",
        num_classes=100,
        torchvision_class="CIFAR100",
    ),
}


def _load_cifar(layout: _CifarLayout, root: Path, download: bool) -> tuple[Split, Split]:
    folder = root / layout.folder
    if not _complete(layout, folder):
        if not download:
            raise _not_found(layout, folder, "data.download is false")
        _download(layout, root)
    train = _read_batches(layout, folder, layout.train_files)
    test = _read_batches(layout, folder, layout.test_files)
    return train, test


def _complete(layout: _CifarLayout, folder: Path) -> bool:
    return all((folder / name).is_file() for name in layout.files)


def _not_found(layout: _CifarLayout, folder: Path, reason: str) -> UserError:
    return UserError(f"data.root: {layout.title} not found: {folder} needs {layout.files_text} ({reason})")


def _download(layout: _CifarLayout, root: Path) -> None:
    folder = root / layout.folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_found(
            layout, folder, f"cannot create the folder: {one_line(exc, with_type=True, limit=200)}"
        ) from exc
    # Trials sharing a node start together; the lock makes one download while the others wait and reuse it.
    with FileLock(root / f".{layout.folder}.lock"):
        if _complete(layout, folder):
            return
        import torchvision.datasets  # deferred: only a download needs torchvision

        dataset_class = getattr(torchvision.datasets, layout.torchvision_class)
        try:
            # torchvision verifies the archive's md5 before extracting it.
            dataset_class(str(root), train=True, download=True)
        except Exception as exc:
            raise _not_found(
                layout, folder, f"download failed: {one_line(exc, with_type=True, limit=200)}"
            ) from exc
    if not _complete(layout, folder):
        raise _not_found(layout, folder, "the download did not produce them")


def _read_batches(layout: _CifarLayout, folder: Path, names: Sequence[str]) -> Split:
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for name in names:
        path = folder / name
        try:
            with path.open("rb") as file:
                entry = pickle.load(file, encoding="bytes")
            data = np.ascontiguousarray(entry[b"data"], dtype=np.uint8)
            batch_labels = torch.as_tensor(np.asarray(entry[layout.label_key], dtype=np.int64))
        except Exception as exc:
            raise UserError(
                f"data.root: cannot read {path}: {one_line(exc, with_type=True, limit=200)}"
            ) from exc
        if data.ndim != 2 or data.shape[1] != math.prod(IMAGE_SHAPE) or batch_labels.shape != data.shape[:1]:
            raise UserError(f"data.root: {path} is not a {layout.title} batch (data shape {data.shape})")
        if bool(((batch_labels < 0) | (batch_labels >= layout.num_classes)).any()):
            raise UserError(f"data.root: {path} has labels outside 0..{layout.num_classes - 1}")
        # Each 3072-byte row is the R, G and B planes, each 32×32 row-major: exactly one NCHW image.
        images.append(torch.from_numpy(data).reshape(-1, *IMAGE_SHAPE))
        labels.append(batch_labels)
    return Split(images=torch.cat(images), labels=torch.cat(labels))


# ------------------------------------------------------------------------------------------ synthetic

# Tuned against the quick-start setting (TinyNet width 16, SBN at stages 2 and 3, 2,048/512 images, 8 epochs,
# cosine SGD): lr 0.01 → 33 %, 0.05 → 64 %, 0.2 → 75 % validation accuracy, so the learning rate matters and
# nothing saturates. A class's mean colour is the quick cue (it alone classifies 70-90 %, depending on how
# close the seed puts the colours); the rest needs the class's texture, which shares much of its pattern
# with every other class and is blurred by shift, mirroring, contrast, a second class's pattern (at times
# as strong as the image's own) and pixel noise.
_TEMPLATE_CUTOFF = 4.0  # highest spatial frequency of a class pattern, in cycles per image
_SHARED_WEIGHT = 1.2  # pattern common to every class, relative to the class's own pattern
_MAX_SHIFT = 4  # pixels, circular (the patterns are 32-periodic, so no seam appears)
_CONTRAST = (0.6, 1.4)
_CLASS_COLOUR = 2.0  # std of a class's mean colour offset, per channel
_COLOUR_CAST = 0.8  # std of a per-image, per-channel brightness offset
_DISTRACTOR = 1.0  # largest weight of a second class's pattern mixed into an image
_NOISE = 1.5  # std of per-pixel noise
_GREY_LEVELS_PER_UNIT = 22.0  # uint8 levels per unit (a template std), around mid-grey 128: 3-6 % clip
_CHUNK = 4096  # images rendered at a time


def synthetic_splits(cfg: SyntheticConfig) -> tuple[Split, Split]:
    """(train, test) CIFAR-shaped images: the same class patterns, independent sample streams.

    Separate streams keep the test images fixed when only `train_size` changes.
    """
    generator = _generator(cfg.seed, "templates")
    templates = _class_templates(cfg.num_classes, generator)
    colours = torch.randn(cfg.num_classes, IMAGE_SHAPE[0], 1, 1, generator=generator) * _CLASS_COLOUR
    train = _sample_images(templates, colours, cfg.train_size, _generator(cfg.seed, "train"))
    test = _sample_images(templates, colours, cfg.test_size, _generator(cfg.seed, "test"))
    return train, test


def _generator(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_of(*key))


def _seed_of(*key: object) -> int:
    # A hash rather than `seed + k` keeps streams of neighbouring seeds unrelated.
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _class_templates(num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """num_classes×3×32×32 float, zero mean and unit std per channel: low-pass filtered colour noise."""
    size = IMAGE_SHAPE[-1]
    frequency = torch.fft.fftfreq(size, d=1.0 / size)
    radius = torch.hypot(frequency[:, None], frequency[None, :])
    lowpass = (radius > 0) & (radius <= _TEMPLATE_CUTOFF)
    noise = torch.randn(num_classes + 1, *IMAGE_SHAPE, generator=generator)
    patterns = torch.fft.ifft2(torch.fft.fft2(noise) * lowpass).real
    patterns = patterns / patterns.std(dim=(-2, -1), keepdim=True)
    templates = patterns[1:] + _SHARED_WEIGHT * patterns[0]
    return templates / templates.std(dim=(-2, -1), keepdim=True)


def _sample_images(
    templates: torch.Tensor, colours: torch.Tensor, count: int, generator: torch.Generator
) -> Split:
    num_classes = len(templates)
    # Cycling through the classes before shuffling balances them to within one image.
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
    distractors = (labels + torch.randint(1, num_classes, (count,), generator=generator)) % num_classes
    images = torch.empty(count, *IMAGE_SHAPE, dtype=torch.uint8)
    # Chunks bound the float temporaries to tens of MB, where a CIFAR-sized set in one piece needs GBs.
    for start in range(0, count, _CHUNK):
        part = slice(start, start + _CHUNK)
        images[part] = _render(templates, colours, labels[part], distractors[part], generator)
    return Split(images=images, labels=labels)


def _render(
    templates: torch.Tensor,
    colours: torch.Tensor,
    labels: torch.Tensor,
    distractors: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    count = len(labels)
    channels, height, width = IMAGE_SHAPE

    def placed(classes: torch.Tensor) -> torch.Tensor:
        shift = torch.randint(-_MAX_SHIFT, _MAX_SHIFT + 1, (count, 2), generator=generator)
        rows = (torch.arange(height) - shift[:, :1]) % height
        cols = (torch.arange(width) - shift[:, 1:]) % width
        # Mirrored half the time, so that (like CIFAR) a horizontal flip keeps an image in its class.
        mirror = torch.rand(count, 1, generator=generator) < 0.5
        cols = torch.where(mirror, cols.flip(1), cols)
        return templates[
            classes[:, None, None, None],
            torch.arange(channels)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    contrast = torch.empty(count, 1, 1, 1).uniform_(*_CONTRAST, generator=generator)
    distractor_weight = torch.rand(count, 1, 1, 1, generator=generator) * _DISTRACTOR
    cast = torch.randn(count, channels, 1, 1, generator=generator) * _COLOUR_CAST
    signal = placed(labels).add_(placed(distractors).mul_(distractor_weight)).mul_(contrast)
    signal.add_(colours[labels]).add_(cast)
    signal.add_(torch.randn(signal.shape, generator=generator).mul_(_NOISE))
    return signal.mul_(_GREY_LEVELS_PER_UNIT).add_(128.0).round_().clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------ splits, stats


def _hold_out(split: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    count = len(split)
    if val_size >= count:
        raise UserError(f"data.val_size: {val_size} must be smaller than the {count} training images")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    # Sorting keeps both parts in file order, so the hold-out is a set, not a second shuffle.
    val_index = order[:val_size].sort().values
    train_index = order[val_size:].sort().values
    return (
        Split(images=split.images[train_index], labels=split.labels[train_index]),
        Split(images=split.images[val_index], labels=split.labels[val_index]),
    )


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    # Histograms are exact integers, so the statistics do not depend on chunking or summation order,
    # and chunks keep the peak memory small for 45k images.
    counts = torch.zeros(IMAGE_SHAPE[0], 256, dtype=torch.int64)
    for chunk in images.split(4096):
        for channel in range(IMAGE_SHAPE[0]):
            counts[channel] += torch.bincount(chunk[:, channel].reshape(-1), minlength=256)
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum(dim=1, dtype=torch.float64)
    mean = (counts * levels).sum(dim=1) / total
    std = ((counts * (levels[None, :] - mean[:, None]) ** 2).sum(dim=1) / total).sqrt()
    m0, m1, m2 = mean.tolist()
    s0, s1, s2 = std.tolist()
    return (m0, m1, m2), (s0, s1, s2)


# --------------------------------------------------------------------------------------- the loader


@dataclass(frozen=True)
class EpochDraws:
    """The randomness of one training epoch, all drawn up front on the loader's device."""

    order: torch.Tensor  # int64 N: the epoch's permutation of the split
    # int64 N×2: (top, left) of the i-th image's crop in its frame zero-padded by CROP_PADDING on every
    # side, 0..2·CROP_PADDING, as torchvision's RandomCrop(32, padding=4) picks it
    offsets: torch.Tensor
    flips: torch.Tensor  # bool N: mirror the i-th image after cropping


class DeviceLoader:
    """Batches of one split, normalized float32 on `device`, shuffled and augmented there.

    `train`: shuffle each epoch, augment if `augment` (evaluation never augments), and drop the last
    partial batch unless `drop_last` says otherwise, so BN/SBN batch statistics never see a lone image.
    Evaluation keeps file order and the partial batch.

    With augmentation the split is kept zero-padded and also mirrored (3.1× the uint8 images: 0.43 GB for
    45k CIFAR images): a crop + flip is then one window of one of the two copies, so a batch is a single
    gather indexed by four per-image vectors, ~7× faster on CPU than indexing every pixel.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: torch.device | str,
        train: bool,
        augment: bool,
        mean: Sequence[float],
        std: Sequence[float],
        channels_last: bool = False,
        drop_last: bool | None = None,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.channels_last = channels_last
        self.drop_last = train if drop_last is None else drop_last
        self.seed = seed
        self.labels = split.labels.to(self.device)
        images = split.images.to(self.device)
        if self.augment:
            self._windows = _crop_windows(images)
        else:
            self._images = images
        mean_ = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_ = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        # (x/255 − mean)/std folded into one multiply and one subtract per pixel.
        self._scale = (1.0 / (255.0 * std_)).to(self.device, torch.float32)
        self._shift = (mean_ / std_).to(self.device, torch.float32)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_images // self.batch_size
        return math.ceil(self.num_images / self.batch_size)

    def draws(self, epoch: int) -> EpochDraws:
        """The shuffle and augmentation of training epoch `epoch`: a pure function of (seed, epoch)."""
        generator = torch.Generator(self.device).manual_seed(_seed_of(self.seed, epoch))
        count, device = self.num_images, self.device
        # Drawn even without augmentation, so that switching it off keeps the same order of images.
        return EpochDraws(
            order=torch.randperm(count, generator=generator, device=device),
            offsets=torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=generator, device=device),
            flips=torch.randint(0, 2, (count,), generator=generator, device=device).bool(),
        )

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch`; a resumed run replays them exactly, without saved RNG state."""
        if not self.train:
            for batch in range(len(self)):
                part = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
                yield self._normalize(self._images[part]), self.labels[part]
            return
        # Drawn up front on the device: iterating never waits for the host nor makes it wait.
        draws = self.draws(epoch)
        for batch in range(len(self)):
            part = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            index = draws.order[part]
            if self.augment:
                flips, (top, left) = draws.flips[part], draws.offsets[part].unbind(1)
                # Cropping at `left` and then mirroring is the window at 2·padding − left of the mirror.
                left = torch.where(flips, 2 * CROP_PADDING - left, left)
                images = self._windows[flips.long(), index, top, left]
            else:
                images = self._images[index]
            yield self._normalize(images), self.labels[index]

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # `float()` keeps the memory format, and the in-place ops keep it too.
        return images.float().mul_(self._scale).sub_(self._shift)


def _crop_windows(images: torch.Tensor) -> torch.Tensor:
    """A view of every crop of `images`: [mirrored, image, top, left] → the C×H×W crop (no copy per crop)."""
    count, channels, height, width = images.shape
    pad = CROP_PADDING
    frames = images.new_zeros(2, count, channels, height + 2 * pad, width + 2 * pad)
    frames[0, :, :, pad:-pad, pad:-pad] = images
    frames[1] = frames[0].flip(-1)
    positions = 2 * pad + 1
    mirror_stride, image_stride, channel_stride, row_stride, col_stride = frames.stride()
    return frames.as_strided(
        (2, count, positions, positions, channels, height, width),
        (mirror_stride, image_stride, row_stride, col_stride, channel_stride, row_stride, col_stride),
    )
