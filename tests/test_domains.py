"""Multi-domain data: the published folder layouts (tiny PNG/JPEG images written here, nothing downloads),
the decode cache, the synthetic domains and the shift between them, and leave-one-domain-out splits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sbn_study.errors import UserError
from sbn_study.trial import domains
from sbn_study.trial.data import _channel_stats
from sbn_study.trial.domains import (
    CACHE_FOLDER,
    LAYOUTS,
    SyntheticDomainsConfig,
    leave_one_domain_out,
    load_domains,
    num_domain_classes,
    synthetic_domains,
)

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")


def _colour(domain: str, label: int, index: int) -> tuple[int, int, int]:
    return (sum(map(ord, domain)) % 256, 8 * label + 5, 50 * index + 20)


def _write_tree(folder: Path, domain_names, class_names, per_class: int = 2, inner: str = "") -> None:
    """Solid-colour images whose colour encodes (domain, class, index), alternately PNG and 5×7 JPEG."""
    for domain in domain_names:
        for c, name in enumerate(class_names):
            class_folder = folder / domain / inner / name
            class_folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (5, 7) if i % 2 else (6, 6), _colour(domain, c, i))
                image.save(class_folder / (f"img_{i}.jpg" if i % 2 else f"img_{i}.png"))


def _check_solid(dataset, domain_names, class_names, per_class: int = 2) -> None:
    assert dataset.domain_names == tuple(domain_names)
    assert dataset.classes == tuple(sorted(class_names))
    for domain in domain_names:
        split = dataset.domains[domain]
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 4, 4)
        assert split.labels.tolist() == [c for c in range(len(class_names)) for _ in range(per_class)]
        for position, (image, label) in enumerate(zip(split.images, split.labels, strict=True)):
            index = position % per_class
            expected = torch.tensor(_colour(domain, int(label), index)).view(3, 1, 1)
            # JPEG is lossy, PNG exact
            assert (image.int() - expected).abs().max() <= (6 if index % 2 else 0)


def test_pacs_layout(tmp_path: Path) -> None:
    _write_tree(tmp_path / "PACS", PACS_DOMAINS, PACS_CLASSES)
    (tmp_path / "PACS" / "photo" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "PACS" / "photo" / ".hidden").mkdir()
    dataset = load_domains("pacs", tmp_path, 4)
    assert dataset.num_classes == num_domain_classes("pacs", "/nowhere") == 7
    _check_solid(dataset, PACS_DOMAINS, PACS_CLASSES)


def test_pacs_kfold_layout(tmp_path: Path) -> None:
    _write_tree(tmp_path / "PACS" / "kfold", PACS_DOMAINS, PACS_CLASSES, per_class=1)
    _check_solid(load_domains("pacs", tmp_path, 4), PACS_DOMAINS, PACS_CLASSES, per_class=1)


@pytest.mark.parametrize("inner", ["images", ""])
def test_office31_layout(tmp_path: Path, inner: str) -> None:
    classes = [f"class_{k:02d}" for k in range(31)]
    _write_tree(tmp_path / "office31", ("amazon", "dslr", "webcam"), classes, per_class=1, inner=inner)
    _check_solid(load_domains("office31", tmp_path, 4), ("amazon", "dslr", "webcam"), classes, per_class=1)


def test_office_caltech_10_layout(tmp_path: Path) -> None:
    classes = ["back_pack", "bike", "calculator", "headphones", "keyboard"]
    classes += ["laptop_computer", "monitor", "mouse", "mug", "projector"]
    names = ("amazon", "caltech", "dslr", "webcam")
    _write_tree(tmp_path / "office_caltech_10", names, classes, per_class=1)
    _check_solid(load_domains("office_caltech_10", tmp_path, 4), names, classes, per_class=1)


def test_generic_domains_layout(tmp_path: Path) -> None:
    _write_tree(tmp_path, ("b_domain", "a_domain", "c_domain"), ("x", "y"))
    (tmp_path / "README.txt").write_text("a file next to the domains")
    assert num_domain_classes("domains", tmp_path) == 2
    dataset = load_domains("domains", tmp_path, 4)
    _check_solid(dataset, ("a_domain", "b_domain", "c_domain"), ("x", "y"))
    # the cache folder the first load wrote is hidden, so it is not taken for a domain
    assert (tmp_path / CACHE_FOLDER).is_dir()
    assert load_domains("domains", tmp_path, 4).domain_names == ("a_domain", "b_domain", "c_domain")


def test_shorter_side_resize_then_centre_crop(tmp_path: Path) -> None:
    # 36×12: blue | green | red thirds; resized to 24×8, the centre 8×8 square is the green third
    image = Image.new("RGB", (36, 12))
    for third, colour in enumerate([(0, 0, 255), (0, 255, 0), (255, 0, 0)]):
        image.paste(colour, (12 * third, 0, 12 * third + 12, 12))
    for domain in ("d1", "d2"):
        (tmp_path / domain / "k").mkdir(parents=True)
        image.save(tmp_path / domain / "k" / "wide.png")
    pixels = load_domains("domains", tmp_path, 8).domains["d1"].images[0]
    assert pixels[:, :, 2:6].tolist() == torch.tensor([0, 255, 0]).view(3, 1, 1).expand(3, 8, 4).tolist()


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_layouts_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        load_domains("pacs", tmp_path, 4)
    message = _one_line_error(excinfo)
    assert str(tmp_path / "PACS") in message and LAYOUTS["pacs"].expected in message
    _write_tree(tmp_path / "PACS", PACS_DOMAINS[:3], PACS_CLASSES, per_class=1)
    with pytest.raises(UserError, match="missing sketch"):
        load_domains("pacs", tmp_path, 4)
    with pytest.raises(UserError, match=r"office31 needs <domain>/images/<class>/<image>"):
        load_domains("office31", tmp_path, 4)
    with pytest.raises(UserError, match="unknown multi-domain dataset"):
        load_domains("vlcs", tmp_path, 4)
    lonely = tmp_path / "lonely"
    _write_tree(lonely, ("only",), ("x",), per_class=1)
    with pytest.raises(UserError, match="found 1 domain folder"):
        load_domains("domains", lonely, 4)


def test_domains_with_different_classes(tmp_path: Path) -> None:
    _write_tree(tmp_path / "a", ("d1",), ("cat", "dog", "owl"), per_class=1)
    _write_tree(tmp_path / "a", ("d2",), ("cat", "dog", "yak"), per_class=1)
    with pytest.raises(UserError) as excinfo:
        load_domains("domains", tmp_path / "a", 4)
    assert "d2 lacks owl; d2 has extra yak; vs d1" in _one_line_error(excinfo)
    _write_tree(tmp_path / "PACS", PACS_DOMAINS, PACS_CLASSES[:6], per_class=1)
    with pytest.raises(UserError, match="has 6 class folders per domain; PACS has 7"):
        load_domains("pacs", tmp_path, 4)


def test_empty_class_and_unreadable_image(tmp_path: Path) -> None:
    _write_tree(tmp_path, ("d1", "d2"), ("x", "y"), per_class=1)
    (tmp_path / "d2" / "y" / "img_0.png").unlink()
    with pytest.raises(UserError, match=r"d2/y has no images"):
        load_domains("domains", tmp_path, 4)
    (tmp_path / "d2" / "y" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as excinfo:
        load_domains("domains", tmp_path, 4)
    assert "cannot read" in _one_line_error(excinfo) and "broken.jpg" in str(excinfo.value)


# -------------------------------------------------------------------------------------------- cache


def _counting_decoder(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    decoded: list[Path] = []
    real = domains._decode

    def decode(path: Path, resolution: int) -> torch.Tensor:
        decoded.append(path)
        time.sleep(0.01)  # keeps a concurrent loader waiting on the lock, not finishing first by luck
        return real(path, resolution)

    monkeypatch.setattr(domains, "_decode", decode)
    return decoded


def test_images_are_decoded_once_per_file_list_and_resolution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tree(tmp_path, ("d1", "d2"), ("x", "y"))
    decoded = _counting_decoder(monkeypatch)
    first = load_domains("domains", tmp_path, 4)
    assert len(decoded) == 8
    again = load_domains("domains", tmp_path, 4)
    assert len(decoded) == 8
    assert all(torch.equal(first.domains[d].images, again.domains[d].images) for d in ("d1", "d2"))
    load_domains("domains", tmp_path, 6)
    assert len(decoded) == 16
    Image.new("RGB", (6, 6), (1, 2, 3)).save(tmp_path / "d1" / "x" / "extra.png")
    assert len(load_domains("domains", tmp_path, 4).domains["d1"]) == 5
    assert len(decoded) == 25
    # the cache of the old file list went; the other resolution's stays
    assert len(list((tmp_path / CACHE_FOLDER).glob("domains-4px-*.pt"))) == 1
    assert len(list((tmp_path / CACHE_FOLDER).glob("domains-6px-*.pt"))) == 1


def test_concurrent_loads_decode_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tree(tmp_path, ("d1", "d2"), ("x", "y"))
    decoded = _counting_decoder(monkeypatch)
    start = threading.Barrier(3)

    def load(_: int):
        start.wait()
        return load_domains("domains", tmp_path, 4)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(load, range(3)))
    assert len(decoded) == 8
    assert all(torch.equal(r.domains["d2"].images, results[0].domains["d2"].images) for r in results)


def test_a_damaged_cache_is_rebuilt_and_an_unwritable_root_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_tree(tmp_path, ("d1", "d2"), ("x", "y"))
    expected = load_domains("domains", tmp_path, 4).domains["d1"].images
    (cache,) = (tmp_path / CACHE_FOLDER).glob("*.pt")
    cache.write_bytes(b"truncated")
    assert torch.equal(load_domains("domains", tmp_path, 4).domains["d1"].images, expected)
    assert torch.load(cache, weights_only=True).shape == (8, 3, 4, 4)

    def unwritable(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(domains, "FileLock", unwritable)
    assert torch.equal(load_domains("domains", tmp_path, 4).domains["d1"].images, expected)


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_domains_are_deterministic_and_shaped() -> None:
    cfg = SyntheticDomainsConfig(num_classes=5, images_per_domain=40, seed=3)
    first, second = synthetic_domains(cfg), load_domains("synthetic_domains", "unused", 32, cfg)
    assert first.domain_names == ("plain", "tinted", "faded", "grey")
    assert first.num_classes == num_domain_classes("synthetic_domains", "unused", cfg) == 5
    for name, split in first.domains.items():
        assert split.images.shape == (40, 3, 32, 32) and split.images.dtype == torch.uint8
        assert torch.equal(split.images, second.domains[name].images)
        assert torch.bincount(split.labels, minlength=5).tolist() == [8] * 5
    other = synthetic_domains(SyntheticDomainsConfig(num_classes=5, images_per_domain=40, seed=4))
    assert not torch.equal(first.domains["plain"].images, other.domains["plain"].images)
    small = load_domains("synthetic_domains", "unused", 16, cfg)
    assert small.domains["grey"].images.shape == (40, 3, 16, 16)
    # the grey domain has no colour: its channels are equal up to rounding and the shared per-pixel noise
    grey = first.domains["grey"].images.float()
    plain = first.domains["plain"].images.float()
    assert (grey - grey.mean(1, keepdim=True)).abs().mean() < 0.5 * (
        plain - plain.mean(1, keepdim=True)
    ).abs().mean()


def _linear_classifier_accuracy(split: domains.DomainSplit) -> tuple[float, float]:
    """(accuracy on the held-out source images, on the target) of a ridge least-squares classifier of
    one-hot labels from standardized 8×8-pooled pixels, fitted on the source training images (closed form:
    seconds, where a CNN would take minutes on 2 cores)."""
    data = split.data

    def features(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.double() / 255, 4).flatten(1)

    train = features(data.train.images)
    mean, std = train.mean(0), train.std(0)

    def design(images: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [(features(images) - mean) / std, torch.ones(len(images), 1, dtype=torch.float64)], 1
        )

    x = design(data.train.images)
    ridge = 0.01 * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(
        x.T @ x + ridge, x.T @ F.one_hot(data.train.labels, data.num_classes).double()
    )
    accuracy = [
        (design(s.images) @ weights).argmax(1).eq(s.labels).double().mean().item()
        for s in (data.val, data.test)
    ]
    return accuracy[0], accuracy[1]


def test_a_domain_shift_costs_accuracy() -> None:
    dataset = synthetic_domains(SyntheticDomainsConfig(images_per_domain=600, seed=0))
    gaps = {}
    for target in dataset.domain_names:
        source_acc, target_acc = _linear_classifier_accuracy(leave_one_domain_out(dataset, target, 0.25))
        print(f"target {target}: held-out sources {source_acc:.3f}, target {target_acc:.3f}")
        assert source_acc > 0.6, target  # the classes are learnable (chance: 1/7)
        gaps[target] = source_acc - target_acc
    # `plain` lies between the other domains' hues: like PACS's photo, it is the easy target
    assert min(gaps["tinted"], gaps["faded"], gaps["grey"]) > 0.15, gaps


# ------------------------------------------------------------------------------- leave one domain out


def test_leave_one_domain_out() -> None:
    dataset = synthetic_domains(SyntheticDomainsConfig(num_classes=3, images_per_domain=50))
    split = leave_one_domain_out(dataset, "faded", val_fraction=0.2, seed=1)
    assert split.sources == ("plain", "tinted", "grey") and split.target == "faded"
    data = split.data
    assert data.num_classes == 3 and data.name == "synthetic_domains:faded"
    # all of the target, each image once with its label, shuffled out of the files' class order
    faded = dataset.domains["faded"]
    assert not torch.equal(data.test.labels, faded.labels)
    assert sorted(
        zip(data.test.images.flatten(1).tolist(), data.test.labels.tolist(), strict=True)
    ) == sorted(zip(faded.images.flatten(1).tolist(), faded.labels.tolist(), strict=True))
    assert split.train_domains.tolist() == [i for i in range(3) for _ in range(40)]
    assert split.val_domains.tolist() == [i for i in range(3) for _ in range(10)]
    assert (data.mean, data.std) == _channel_stats(data.train.images)
    for index, source in enumerate(split.sources):
        images = dataset.domains[source].images
        train, val = split.source_train(index).images, data.val.images[split.val_domains == index]
        # together exactly the source's images, each once (solid noise images are all distinct)
        rows = {tuple(image.flatten().tolist()) for image in torch.cat([train, val])}
        assert len(rows) == 50 and rows == {tuple(image.flatten().tolist()) for image in images}
    again = leave_one_domain_out(dataset, "faded", val_fraction=0.2, seed=1)
    assert torch.equal(again.data.val.images, data.val.images)
    other = leave_one_domain_out(dataset, "faded", val_fraction=0.2, seed=2)
    assert not torch.equal(other.data.val.images, data.val.images)
    assert len(leave_one_domain_out(dataset, "plain", val_fraction=0.0).data.val) == 0
    with pytest.raises(
        UserError, match="'sketch' is not a domain of synthetic_domains: plain, tinted, faded, grey"
    ):
        leave_one_domain_out(dataset, "sketch")
