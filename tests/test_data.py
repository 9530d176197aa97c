"""Datasets (CIFAR's published pickles, the synthetic set, the hold-out) and the device loader.

CIFAR files are written here in the exact published layout, so nothing is ever downloaded; the one
download test replaces torchvision's dataset class.
"""

from __future__ import annotations

import pickle
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from torchvision.transforms.v2 import functional as TF

from sbn_study.errors import UserError
from sbn_study.spec.config import DataConfig, SyntheticConfig
from sbn_study.trial.data import DeviceLoader, Split, load_dataset, num_classes_of

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)


# ---------------------------------------------------------------------------------------- CIFAR files


def _dump(path: Path, entry: dict[bytes, object]) -> None:
    with path.open("wb") as file:
        pickle.dump(entry, file)


def _rows(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8)


def _write_cifar10(
    root: Path, per_batch: int = 6, test_count: int = 7
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(train rows, train labels, test rows) written as cifar-10-batches-py under `root`."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = _rows(rng, per_batch)
        labels = rng.integers(0, 10, per_batch).tolist()
        names = [f"img_{i}_{j}.png".encode() for j in range(per_batch)]
        _dump(
            folder / f"data_batch_{i}",
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": labels,
                b"data": rows,
                b"filenames": names,
            },
        )
        train_rows.append(rows)
        train_labels += labels
    test_rows = _rows(rng, test_count)
    test_labels = rng.integers(0, 10, test_count).tolist()
    _dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels,
            b"data": test_rows,
            b"filenames": [],
        },
    )
    _dump(
        folder / "batches.meta",
        {b"num_cases_per_batch": per_batch, b"label_names": [b"class"] * 10, b"num_vis": 3072},
    )
    return np.concatenate(train_rows), train_labels, test_rows


def _write_cifar100(root: Path, train_count: int = 40, test_count: int = 9) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(100)
    written = {}
    for name, count in (("train", train_count), ("test", test_count)):
        rows = _rows(rng, count)
        fine = rng.integers(0, 100, count).tolist()
        coarse = [label // 5 for label in fine]
        _dump(
            folder / name,
            {
                b"filenames": [],
                b"batch_label": name.encode(),
                b"fine_labels": fine,
                b"coarse_labels": coarse,
                b"data": rows,
            },
        )
        written[name] = (rows, fine)
    _dump(folder / "meta", {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20})
    return written["test"][0], written["test"][1]


def _identities(split: Split) -> list[bytes]:
    return [image.numpy().tobytes() for image in split.images]


def _cifar10(root: Path, **kwargs: object) -> DataConfig:
    return DataConfig(dataset="cifar10", root=str(root), download=False, **kwargs)


def test_cifar10_pixels_are_the_published_layout(tmp_path: Path) -> None:
    train_rows, train_labels, test_rows = _write_cifar10(tmp_path)
    dataset = load_dataset(_cifar10(tmp_path, val_size=0))

    image, row = dataset.train.images[3], train_rows[3]
    # R plane, then G plane, then B plane, each 32×32 row-major.
    assert image[0, 0, 1] == row[1] and image[0, 1, 0] == row[32] and image[0, 31, 31] == row[1023]
    assert image[1, 0, 0] == row[1024] and image[2, 0, 0] == row[2048] and image[2, 31, 31] == row[3071]
    assert torch.equal(dataset.train.images, torch.from_numpy(train_rows).reshape(-1, 3, 32, 32))
    assert dataset.train.labels.tolist() == train_labels
    assert torch.equal(dataset.test.images.reshape(-1, 3072), torch.from_numpy(test_rows))
    for split in (dataset.train, dataset.val, dataset.test):
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert split.labels.dtype == torch.int64
    assert (dataset.name, dataset.num_classes, len(dataset.val)) == ("cifar10", 10, 0)


def test_cifar10_hold_out(tmp_path: Path) -> None:
    train_rows, train_labels, _ = _write_cifar10(tmp_path)
    written = {row.tobytes(): label for row, label in zip(train_rows, train_labels, strict=True)}

    dataset = load_dataset(_cifar10(tmp_path, val_size=10, split_seed=0))
    train, val = _identities(dataset.train), _identities(dataset.val)
    assert (len(train), len(val)) == (20, 10)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(written)
    for split, identities in ((dataset.train, train), (dataset.val, val)):
        assert split.labels.tolist() == [written[identity] for identity in identities]

    again = load_dataset(_cifar10(tmp_path, val_size=10, split_seed=0))
    other = load_dataset(_cifar10(tmp_path, val_size=10, split_seed=1))
    assert _identities(again.val) == val
    assert set(_identities(other.val)) != set(val)

    pixels = dataset.train.images.double() / 255
    assert dataset.mean == pytest.approx(pixels.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert dataset.std == pytest.approx(pixels.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-12)


def test_cifar100_reads_fine_labels_and_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test_rows, test_labels = _write_cifar100(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path))

    dataset = load_dataset(DataConfig(dataset="cifar100", root="~/data", val_size=5, download=False))

    assert (dataset.num_classes, len(dataset.train), len(dataset.val)) == (100, 35, 5)
    assert torch.equal(dataset.test.images.reshape(-1, 3072), torch.from_numpy(test_rows))
    assert dataset.test.labels.tolist() == test_labels


def test_missing_files_without_download(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        load_dataset(_cifar10(tmp_path))
    assert str(error.value) == (
        f"data.root: CIFAR-10 not found: {tmp_path}/cifar-10-batches-py needs data_batch_1..5, test_batch, "
        "batches.meta (data.download is false)"
    )

    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(UserError, match="CIFAR-10 not found"):
        load_dataset(_cifar10(tmp_path))


def test_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    root = tmp_path / "new"
    with pytest.raises(UserError) as error:
        load_dataset(DataConfig(dataset="cifar100", root=str(root), download=True))
    assert str(error.value) == (
        f"data.root: CIFAR-100 not found: {root}/cifar-100-python needs train, test, meta "
        "(download failed: URLError: <urlopen error no network>)"
    )


def test_download_goes_through_torchvision_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_cifar10(root: str, *, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        _write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    config = DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3, download=True)

    assert len(load_dataset(config).train) == 27
    assert len(load_dataset(config).train) == 27
    assert calls == [(str(tmp_path), True, True)]


def test_trials_starting_together_download_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow_fake_cifar10(root: str, *, train: bool, download: bool) -> None:
        calls.append(root)
        time.sleep(0.5)  # a download takes a while: the other trial arrives meanwhile
        _write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", slow_fake_cifar10)
    config = DataConfig(dataset="cifar10", root=str(tmp_path), val_size=3, download=True)
    with ThreadPoolExecutor(max_workers=3) as pool:
        sizes = list(pool.map(lambda _: len(load_dataset(config).train), range(3)))
    assert sizes == [27, 27, 27]
    assert calls == [str(tmp_path)]


def test_unreadable_batch(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    broken = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    broken.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=f"^data.root: cannot read {broken}: UnpicklingError"):
        load_dataset(_cifar10(tmp_path))


def test_val_size_must_leave_training_images(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    with pytest.raises(UserError) as error:
        load_dataset(_cifar10(tmp_path, val_size=30))
    assert str(error.value) == "data.val_size: 30 must be smaller than the 30 training images"


def test_num_classes_of_loads_nothing(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")
    assert num_classes_of(DataConfig(dataset="cifar10", root=absent, download=False)) == 10
    assert num_classes_of(DataConfig(dataset="cifar100", root=absent, download=False)) == 100
    assert num_classes_of(DataConfig(synthetic=SyntheticConfig(num_classes=7))) == 7


# ------------------------------------------------------------------------------------------ synthetic


def _synthetic(**kwargs: int) -> DataConfig:
    return DataConfig(
        val_size=60, synthetic=SyntheticConfig(**{"train_size": 600, "test_size": 120, **kwargs})
    )


def test_synthetic_is_deterministic_per_seed() -> None:
    first, again, other = (load_dataset(_synthetic(seed=seed)) for seed in (0, 0, 1))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).images, getattr(again, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(again, name).labels)
        assert not torch.equal(getattr(first, name).images, getattr(other, name).images)
    assert first.mean == again.mean


def test_synthetic_sizes_and_balance() -> None:
    dataset = load_dataset(_synthetic(num_classes=7))
    assert (dataset.name, dataset.num_classes) == ("synthetic", 7)
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (540, 60, 120)
    assert dataset.train.images.shape == (540, 3, 32, 32) and dataset.train.images.dtype == torch.uint8
    labels = torch.cat([dataset.train.labels, dataset.val.labels])
    # The classes are cycled before shuffling: 600 images over 7 classes give 85 or 86 each.
    assert set(torch.bincount(labels, minlength=7).tolist()) == {85, 86}
    assert set(torch.bincount(dataset.test.labels, minlength=7).tolist()) == {17, 18}
    # Spread over the grey levels rather than saturated or flat.
    assert 0.4 < dataset.mean[0] < 0.6 and 0.15 < dataset.std[0] < 0.35


def test_synthetic_test_split_does_not_depend_on_train_size() -> None:
    small, large = load_dataset(_synthetic(train_size=300)), load_dataset(_synthetic(train_size=900))
    assert torch.equal(small.test.images, large.test.images)


def test_synthetic_classes_are_separable_but_not_perfectly() -> None:
    # Nearest class mean on raw pixels mostly sees the class colours: far above chance (0.82 for seed 0),
    # yet the per-image colour cast keeps even that cue from separating the classes.
    dataset = load_dataset(DataConfig(val_size=0, synthetic=SyntheticConfig(train_size=2000, test_size=500)))
    train, test = dataset.train.images.flatten(1).float(), dataset.test.images.flatten(1).float()
    centroids = torch.stack([train[dataset.train.labels == c].mean(0) for c in range(dataset.num_classes)])
    accuracy = (torch.cdist(test, centroids).argmin(1) == dataset.test.labels).float().mean().item()
    assert 0.5 < accuracy < 0.95


# --------------------------------------------------------------------------------------------- loader


def _split(count: int, seed: int = 0) -> Split:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    # Labels are indices, so a batch's labels say which images it holds.
    return Split(images=images, labels=torch.arange(count))


def _loader(split: Split, batch_size: int, **kwargs: object) -> DeviceLoader:
    options: dict[str, object] = {"device": "cpu", "train": True, "augment": False, "mean": MEAN, "std": STD}
    return DeviceLoader(split, batch_size, **{**options, **kwargs})  # type: ignore[arg-type]


def _normalized(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _epoch(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def test_train_epoch_holds_every_image_once() -> None:
    split = _split(48)
    loader = _loader(split, 8)
    batches = _epoch(loader, 0)
    assert len(loader) == len(batches) == 6 and loader.num_images == 48
    labels = torch.cat([labels for _, labels in batches])
    assert sorted(labels.tolist()) == list(range(48))
    assert labels.tolist() != list(range(48))
    for images, labels in batches:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        torch.testing.assert_close(images, _normalized(split.images[labels]))


def test_train_drops_the_partial_batch_unless_asked() -> None:
    split = _split(50)
    assert [len(labels) for _, labels in _epoch(_loader(split, 16), 0)] == [16, 16, 16]
    kept = _epoch(_loader(split, 16, drop_last=False), 0)
    assert [len(labels) for _, labels in kept] == [16, 16, 16, 2]
    assert sorted(torch.cat([labels for _, labels in kept]).tolist()) == list(range(50))


def test_batches_are_a_function_of_seed_and_epoch() -> None:
    split = _split(64)

    def labels(epoch: int, seed: int = 0, augment: bool = True) -> list[int]:
        return torch.cat(
            [labels for _, labels in _epoch(_loader(split, 8, seed=seed, augment=augment), epoch)]
        ).tolist()

    # A fresh loader, as after a resume, replays the same batches.
    first, replay = _epoch(_loader(split, 8, augment=True), 3), _epoch(_loader(split, 8, augment=True), 3)
    for (images, labels_), (images_again, labels_again) in zip(first, replay, strict=True):
        assert torch.equal(images, images_again) and torch.equal(labels_, labels_again)
    assert labels(3) != labels(4)
    assert labels(3) != labels(3, seed=1)
    # Switching augmentation off keeps the order of images.
    assert labels(3) == labels(3, augment=False)


def test_augmentation_is_torchvision_random_crop_and_flip() -> None:
    split = _split(40)
    loader = _loader(split, 8, augment=True)
    draws = loader.draws(2)
    batches = _epoch(loader, 2)
    position = 0
    for images, labels in batches:
        assert torch.equal(labels, draws.order[position : position + len(labels)])
        for image, label in zip(images, labels, strict=True):
            top, left = draws.offsets[position].tolist()
            # What RandomCrop(32, padding=4) + RandomHorizontalFlip do for the same draws.
            expected = TF.crop(TF.pad(split.images[label], [4]), top, left, 32, 32)
            if draws.flips[position]:
                expected = TF.horizontal_flip(expected)
            torch.testing.assert_close(image, _normalized(expected[None])[0])
            position += 1


def test_augmentation_draws_cover_every_crop_and_flip() -> None:
    loader = _loader(_split(4000), 100, augment=True)
    draws = loader.draws(0)
    assert sorted(draws.order.tolist()) == list(range(4000))
    for axis in (0, 1):
        counts = torch.bincount(draws.offsets[:, axis], minlength=9)
        assert len(counts) == 9 and counts.min() > 300
    assert 0.45 < draws.flips.float().mean().item() < 0.55


def test_eval_keeps_order_and_the_partial_batch() -> None:
    split = _split(50)
    loader = _loader(split, 16, train=False, augment=True)
    batches = _epoch(loader, 7)
    assert len(loader) == 4 and [len(labels) for _, labels in batches] == [16, 16, 16, 2]
    torch.testing.assert_close(torch.cat([images for images, _ in batches]), _normalized(split.images))
    assert torch.cat([labels for _, labels in batches]).tolist() == list(range(50))


@pytest.mark.parametrize("train", [True, False])
def test_channels_last(train: bool) -> None:
    split = _split(24)
    plain = _epoch(_loader(split, 8, train=train, augment=True), 0)
    channels_last = _epoch(_loader(split, 8, train=train, augment=True, channels_last=True), 0)
    for (images, _), (images_cl, _) in zip(plain, channels_last, strict=True):
        assert images_cl.is_contiguous(memory_format=torch.channels_last) and not images_cl.is_contiguous()
        assert images.is_contiguous()
        assert torch.equal(images, images_cl)


def test_empty_split() -> None:
    empty = Split(
        images=torch.empty(0, 3, 32, 32, dtype=torch.uint8), labels=torch.empty(0, dtype=torch.int64)
    )
    loader = _loader(empty, 8, train=False)
    assert len(loader) == 0 and loader.num_images == 0 and _epoch(loader, 0) == []
