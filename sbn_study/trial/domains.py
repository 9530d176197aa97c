"""Multi-domain image data for domain generalization: one `Split` per domain, classes shared by all domains.

Image folders are decoded once per node (PIL, shorter side resized to the resolution, then the centre
square cropped: no aspect distortion, at the cost of the borders of non-square images) and cached as uint8
tensors under the root; the synthetic set renders `synthetic_splits`' classes in several domain styles.
`leave_one_domain_out` turns a `DomainDataset` into the `ImageDataset` that training already consumes, plus
the source-domain index of every training and validation image (what domain-specific BN needs).

Layouts accepted under `root` (`<image>`: .jpg, .jpeg, .png or .bmp; hidden files and folders ignored):
- `pacs`: `PACS/<domain>/<class>/<image>` (also the official archive's `PACS/kfold/...`): art_painting,
  cartoon, photo, sketch; 7 classes.
- `office31`: `office31/<domain>/images/<class>/<image>` as the published archive extracts (or without the
  `images/` level): amazon, dslr, webcam; 31 classes.
- `office_caltech_10`: `office_caltech_10/<domain>/<class>/<image>`: amazon, caltech, dslr, webcam; the 10
  classes Office-31 and Caltech-256 share, under one name in every domain (rename Caltech-256's numbered
  folders such as `003.backpack` to the Office name `back_pack`).
- `domains`: `<root>/<domain>/<class>/<image>`, every folder under `root` a domain (at least 2).
- `synthetic_domains`: rendered in memory, no files.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image, ImageOps

from sbn_study.errors import UserError, one_line
from sbn_study.spec.config import DOMAINS, SyntheticDomainsConfig
from sbn_study.trial.data import (
    _CLASS_COLOUR,
    _GREY_LEVELS_PER_UNIT,
    IMAGE_SHAPE,
    ImageDataset,
    Split,
    _channel_stats,
    _class_templates,
    _generator,
    _hold_out,
    _sample_images,
    _seed_of,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
CACHE_FOLDER = ".sbn-study-cache"
# Part of every cache key: bump it when decoding changes, so that old caches are not reused.
_DECODE_VERSION = "fit-bicubic-1"


@dataclass(frozen=True)
class DomainDataset:
    name: str
    classes: tuple[str, ...]  # label i is classes[i] in every domain
    domains: Mapping[str, Split]  # in the layout's domain order; uint8 N×3×resolution×resolution images
    resolution: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(self.domains)


@dataclass(frozen=True)
class DomainLayout:
    title: str
    folders: tuple[str, ...]  # candidate dataset folders under the root, tried in order; "" is the root
    domains: tuple[str, ...]  # empty: every folder of the dataset folder is a domain
    num_classes: int | None
    class_parent: str = ""  # an optional level between a domain folder and its class folders

    @property
    def expected(self) -> str:
        inner = f"{self.class_parent}/<class>/<image>" if self.class_parent else "<class>/<image>"
        if not self.domains:
            return f"<domain>/{inner} (at least 2 domains)"
        return f"<domain>/{inner} for domains {', '.join(self.domains)}; {self.num_classes} classes"


LAYOUTS: Mapping[str, DomainLayout] = {
    "pacs": DomainLayout("PACS", ("PACS", "PACS/kfold"), DOMAINS["pacs"], 7),
    "office31": DomainLayout("Office-31", ("office31",), DOMAINS["office31"], 31, "images"),
    "office_caltech_10": DomainLayout(
        "Office-Caltech-10", ("office_caltech_10",), DOMAINS["office_caltech_10"], 10
    ),
    "domains": DomainLayout("domain folders", ("",), DOMAINS["domains"], None),
}
DATASET_NAMES = tuple(DOMAINS)


def load_domains(
    name: str,
    root: str | Path,
    resolution: int,
    synthetic: SyntheticDomainsConfig | None = None,
) -> DomainDataset:
    """Every domain of `name` (one of `DATASET_NAMES`) at `resolution`×`resolution` pixels; `root` (`~`
    expanded) is ignored for `synthetic_domains`, configured by `synthetic` (default `SyntheticDomainsConfig()`)."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if name == "synthetic_domains":
        return synthetic_domains(synthetic or SyntheticDomainsConfig(), resolution)
    root = Path(root).expanduser()
    classes, files = _scan(_layout(name), root)
    images, labels = _decoded(name, root, files, resolution)
    splits, start = {}, 0
    for domain, entries in files.items():
        part = slice(start, start + len(entries))
        splits[domain] = Split(images=images[part], labels=labels[part])
        start += len(entries)
    return DomainDataset(name=name, classes=classes, domains=splits, resolution=resolution)


def num_domain_classes(name: str, root: str | Path, synthetic: SyntheticDomainsConfig | None = None) -> int:
    """The number of classes of `load_domains(name, root, ...)` without decoding an image (models are built
    before data arrives); only the generic `domains` layout needs to list its folders for it."""
    if name == "synthetic_domains":
        return (synthetic or SyntheticDomainsConfig()).num_classes
    layout = _layout(name)
    return layout.num_classes or len(_scan(layout, Path(root).expanduser())[0])


def _layout(name: str) -> DomainLayout:
    if name not in LAYOUTS:
        raise UserError(
            f"data.dataset: unknown multi-domain dataset {name!r}; known: {', '.join(DATASET_NAMES)}"
        )
    return LAYOUTS[name]


# ------------------------------------------------------------------------------------- image folders

Files = dict[str, list[tuple[Path, int]]]  # domain → (image, label), in domain, class, file-name order


def _visible(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _scan(layout: DomainLayout, root: Path) -> tuple[tuple[str, ...], Files]:
    folder = _dataset_folder(layout, root)
    domains = layout.domains or tuple(entry.name for entry in _visible(folder) if entry.is_dir())
    if len(domains) < 2:
        raise UserError(f"data.root: {folder} needs {layout.expected}; found {len(domains)} domain folder(s)")
    classes_of: dict[str, list[Path]] = {}
    for domain in domains:
        domain_folder = folder / domain
        if layout.class_parent and (domain_folder / layout.class_parent).is_dir():
            domain_folder = domain_folder / layout.class_parent
        class_folders = [entry for entry in _visible(domain_folder) if entry.is_dir()]
        if not class_folders:
            raise UserError(
                f"data.root: {domain_folder} has no class folders; {folder} needs {layout.expected}"
            )
        classes_of[domain] = class_folders
    classes = _shared_classes(layout, folder, {d: [c.name for c in cs] for d, cs in classes_of.items()})
    files: Files = {}
    for domain, class_folders in classes_of.items():
        files[domain] = []
        for label, class_folder in enumerate(class_folders):
            images = [p for p in _visible(class_folder) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            if not images:
                raise UserError(
                    f"data.root: {class_folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files[domain].extend((image, label) for image in images)
    return classes, files


def _dataset_folder(layout: DomainLayout, root: Path) -> Path:
    for candidate in layout.folders:
        folder = root / candidate
        if folder.is_dir() and all((folder / domain).is_dir() for domain in layout.domains):
            return folder
    folder = root / layout.folders[0]
    if not folder.is_dir():
        reason = "no such folder"
    else:
        reason = "missing " + ", ".join(d for d in layout.domains if not (folder / d).is_dir())
    raise UserError(f"data.root: {layout.title} not found: {folder} needs {layout.expected} ({reason})")


def _shared_classes(layout: DomainLayout, folder: Path, names: dict[str, list[str]]) -> tuple[str, ...]:
    first, *others = names
    reference = set(names[first])
    differences = []
    for domain in others:
        lacks, extra = sorted(reference - set(names[domain])), sorted(set(names[domain]) - reference)
        if lacks:
            differences.append(f"{domain} lacks {', '.join(lacks)}")
        if extra:
            differences.append(f"{domain} has extra {', '.join(extra)}")
    if differences:
        raise UserError(
            f"data.root: the domains in {folder} have different classes ({'; '.join(differences)}; vs {first})"
        )
    classes = tuple(names[first])
    if layout.num_classes is not None and len(classes) != layout.num_classes:
        raise UserError(
            f"data.root: {folder} has {len(classes)} class folders per domain; {layout.title} has "
            f"{layout.num_classes} ({layout.expected})"
        )
    return classes


def _decoded(name: str, root: Path, files: Files, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N×3×R×R images, int64 labels) of every file in `files` order, from the node's cache if built."""
    entries = [entry for domain_entries in files.values() for entry in domain_entries]
    key = hashlib.blake2b(repr((_DECODE_VERSION, resolution)).encode(), digest_size=16)
    for path, label in entries:
        stat = path.stat()
        key.update(f"{path.relative_to(root)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cache = root / CACHE_FOLDER / f"{name}-{resolution}px-{key.hexdigest()}.pt"
    paths = [path for path, _ in entries]
    labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
    try:
        cache.parent.mkdir(exist_ok=True)
        lock = FileLock(cache.with_suffix(".lock"))
        lock.acquire()
    except OSError:
        # A read-only dataset folder (a shared mount) still loads, decoding in every trial.
        return _decode_all(paths, resolution), labels
    # Trials sharing a node start together: one decodes while the others wait and then read its cache.
    try:
        images = _read_cache(cache, len(paths), resolution)
        if images is None:
            images = _decode_all(paths, resolution)
            _write_cache(cache, images)
    finally:
        lock.release()
    return images, labels


def _write_cache(cache: Path, images: torch.Tensor) -> None:
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        torch.save(images, partial)
        os.replace(partial, cache)  # atomic: a killed trial leaves no truncated cache behind
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk costs the next trial a decode, not this one its data
        return
    # A cache of the same dataset and resolution under another key is of a file list that no longer exists;
    # each is a copy of the whole dataset. (A reader that has it open keeps reading: unlinking is safe.)
    prefix = cache.name[: cache.name.rindex("-") + 1]
    for stale in cache.parent.glob(f"{prefix}*.pt"):
        if stale != cache:
            stale.unlink(missing_ok=True)


def _read_cache(cache: Path, count: int, resolution: int) -> torch.Tensor | None:
    if not cache.is_file():
        return None
    try:
        images = torch.load(cache, weights_only=True)
    except Exception:
        return None  # unreadable (another torch, a damaged disk): decoding again rewrites it
    if not isinstance(images, torch.Tensor) or images.shape != (count, 3, resolution, resolution):
        return None
    return images


def _decode_all(paths: list[Path], resolution: int) -> torch.Tensor:
    images = torch.empty(len(paths), 3, resolution, resolution, dtype=torch.uint8)
    # PIL releases the GIL while it decodes and resamples, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for index, image in enumerate(pool.map(lambda path: _decode(path, resolution), paths)):
            images[index] = image
    return images


def _decode(path: Path, resolution: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            square = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
    except Exception as exc:
        raise UserError(f"data.root: cannot read {path}: {one_line(exc, with_type=True, limit=200)}") from exc
    return torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------ synthetic


@dataclass(frozen=True)
class DomainStyle:
    """How a domain renders the shared classes (template units: a class pattern has std 1 per channel)."""

    hue: float  # degrees, rotation of every colour about the grey axis (class colours included)
    saturation: float  # 1 keeps colours, 0 renders grey
    brightness: float  # added to every channel
    contrast: float  # std of the class pattern
    pattern_band: tuple[float, float]  # spatial frequencies of the class pattern kept, cycles per image
    texture_band: tuple[float, float]  # frequencies of the domain's own texture, the same in all its images
    texture: float  # std of that texture
    noise: float  # std of extra per-pixel noise


# Each domain differs from the others in colour, brightness, contrast, detail and texture at once, as
# PACS's domains do, and, as there, not every domain is as far from the rest: `plain` lies between the
# hues of `tinted` and `faded` and is the easy target (a linear probe trained on the other three loses
# nothing on it), while one trained without `tinted` (the farthest hue), `faded` (blurred, noisy) or `grey`
# (no colour, fine detail only) loses 23-39 points of accuracy on it (tests/test_domains.py, seed 0).
SYNTHETIC_STYLES: Mapping[str, DomainStyle] = {
    "plain": DomainStyle(0.0, 1.0, 0.0, 1.0, (0, 4), (0, 0), 0.0, 0.0),
    "tinted": DomainStyle(60.0, 1.0, 0.8, 1.3, (0, 4), (5, 8), 0.8, 0.0),
    "faded": DomainStyle(-60.0, 0.5, -0.5, 0.7, (0, 2.5), (0, 0), 0.0, 0.8),
    "grey": DomainStyle(0.0, 0.0, 0.0, 1.4, (1.5, 4), (10, 16), 1.0, 0.4),
}


def synthetic_domains(cfg: SyntheticDomainsConfig, resolution: int = IMAGE_SHAPE[-1]) -> DomainDataset:
    """`cfg.images_per_domain` images per style of `SYNTHETIC_STYLES`, the same classes in every domain;
    deterministic in `cfg.seed`. Rendered at 32×32 and resized (bilinear, antialiased) to `resolution`."""
    generator = _generator(cfg.seed, "templates")
    templates = _class_templates(cfg.num_classes, generator)
    colours = torch.randn(cfg.num_classes, IMAGE_SHAPE[0], 1, 1, generator=generator) * _CLASS_COLOUR
    splits = {}
    for name, style in SYNTHETIC_STYLES.items():
        generator = _generator(cfg.seed, "domain", name)
        pattern = _band_pass(templates, style.pattern_band) * style.contrast
        if style.texture:
            texture = torch.randn(IMAGE_SHAPE, generator=generator)
            pattern = pattern + _band_pass(texture, style.texture_band) * style.texture
        split = _sample_images(pattern, colours, cfg.images_per_domain, generator)
        # Colour and brightness act on the rendered image, noise and colour casts included, as a camera's
        # or a painter's palette would: a grey domain is grey throughout.
        units = (split.images.float() - 128.0) / _GREY_LEVELS_PER_UNIT
        units += torch.randn(units.shape, generator=generator) * style.noise
        units = _mixed(_colour_matrix(style), units) + style.brightness
        if resolution != IMAGE_SHAPE[-1]:
            units = F.interpolate(units, size=resolution, mode="bilinear", antialias=True)
        images = units.mul_(_GREY_LEVELS_PER_UNIT).add_(128.0).round_().clamp_(0, 255).to(torch.uint8)
        splits[name] = Split(images=images, labels=split.labels)
    classes = tuple(f"class_{k}" for k in range(cfg.num_classes))
    return DomainDataset(name="synthetic_domains", classes=classes, domains=splits, resolution=resolution)


def _colour_matrix(style: DomainStyle) -> torch.Tensor:
    """3×3: rotation by `hue` about the grey axis (Rodrigues), then `saturation` towards the grey axis."""
    axis = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    grey = torch.outer(axis, axis)
    angle = math.radians(style.hue)
    rotation = math.cos(angle) * torch.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * grey
    return (grey + style.saturation * (torch.eye(3) - grey)) @ rotation


def _mixed(matrix: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", matrix, images)


def _band_pass(maps: torch.Tensor, band: tuple[float, float]) -> torch.Tensor:
    """`maps` (…×32×32) keeping only spatial frequencies in `band` (cycles per image), std 1 per map."""
    size = IMAGE_SHAPE[-1]
    frequency = torch.fft.fftfreq(size, d=1.0 / size)
    radius = torch.hypot(frequency[:, None], frequency[None, :])
    mask = (radius > band[0]) & (radius <= band[1])
    filtered = torch.fft.ifft2(torch.fft.fft2(maps) * mask).real
    return filtered / filtered.std(dim=(-2, -1), keepdim=True)


# ------------------------------------------------------------------------------ leave one domain out


@dataclass(frozen=True)
class DomainSplit:
    """A leave-one-domain-out task: `data` trains and validates on the sources and tests on the target."""

    data: ImageDataset  # train and val: source images only (val per source); test: the whole target domain
    sources: tuple[str, ...]
    target: str
    train_domains: torch.Tensor  # int64, per training image: its source, an index into `sources`
    val_domains: torch.Tensor

    def source_train(self, index: int) -> Split:
        """The training images of `sources[index]` (a loader per source gives single-domain batches)."""
        keep = self.train_domains == index
        return Split(images=self.data.train.images[keep], labels=self.data.train.labels[keep])


def leave_one_domain_out(
    dataset: DomainDataset, target: str, val_fraction: float = 0.1, seed: int = 0
) -> DomainSplit:
    """Train on every domain but `target`, holding out `val_fraction` of each source (a seeded random
    subset, the same fraction per source so every source is validated), and test on all of `target`, in a
    seeded random order."""
    if target not in dataset.domains:
        raise UserError(
            f"data.target: {target!r} is not a domain of {dataset.name}: {', '.join(dataset.domains)}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sources = tuple(name for name in dataset.domains if name != target)
    parts = []
    for name in sources:
        split = dataset.domains[name]
        # Capped so that every source keeps a training image.
        val_size = min(round(val_fraction * len(split)), len(split) - 1)
        parts.append(_hold_out(split, val_size, _seed_of(seed, name)))
    trains, vals = [train for train, _ in parts], [val for _, val in parts]
    train, val = _concat(trains), _concat(vals)
    mean, std = _channel_stats(train.images)
    data = ImageDataset(
        name=f"{dataset.name}:{target}",
        num_classes=dataset.num_classes,
        train=train,
        val=val,
        # Image files come in class order: shuffled, a test batch is a sample of the domain rather than of a
        # few of its classes, and batch statistics (AdaBN's, BNE's per-batch placement) measure the domain.
        test=_shuffled(dataset.domains[target], _seed_of(seed, target, "order")),
        mean=mean,
        std=std,
    )
    return DomainSplit(
        data=data,
        sources=sources,
        target=target,
        train_domains=_domain_index(trains),
        val_domains=_domain_index(vals),
    )


def _shuffled(split: Split, seed: int) -> Split:
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return Split(images=split.images[order], labels=split.labels[order])


def _concat(splits: list[Split]) -> Split:
    return Split(images=torch.cat([s.images for s in splits]), labels=torch.cat([s.labels for s in splits]))


def _domain_index(splits: list[Split]) -> torch.Tensor:
    return torch.cat([torch.full((len(s),), i, dtype=torch.int64) for i, s in enumerate(splits)])
