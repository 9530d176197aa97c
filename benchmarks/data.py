"""One training epoch of input pipeline, augmentation included: `DeviceLoader` (the whole split on the device,
crop + flip batched there) against torchvision's `DataLoader` over a CIFAR-style dataset that runs the
usual PIL transforms per image, with 0 and 2 worker processes. Synthetic uint8 images: nothing downloads.

Run: `python -m benchmarks.data` from the repository root.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from benchmarks._timing import measure
from sbn_study.trial.data import DeviceLoader, Split

NAME = "data"
TARGET = "≥ 10× images/s"

NUM_IMAGES = 10_240
BATCH_SIZE = 512
WORKERS = (0, 2)
ROUNDS = 3
MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


class _CifarStyle(Dataset[tuple[torch.Tensor, int]]):
    """What `torchvision.datasets.CIFAR10` does per item: HWC uint8 array → PIL image → transforms."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def _device_epoch(loader: DeviceLoader) -> Callable[[], None]:
    epochs = count()

    def epoch() -> None:
        # A new epoch number each call: every call draws a fresh shuffle and augmentation, as in training.
        for images, labels in loader.epoch(next(epochs)):
            del images, labels

    return epoch


def _torchvision_epoch(loader: DataLoader, device: torch.device) -> Callable[[], None]:
    def epoch() -> None:
        for images, labels in loader:
            # Charged to this pipeline: its batches start on the host and training needs them on the device.
            images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return epoch


def run() -> list[dict[str, object]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One intra-op thread on the CPU: on a small shared machine a 2-thread op waits for whichever thread
        # the OS parked (measured 8k-46k images/s with 2 threads against 100k-190k with 1, minutes apart),
        # while the per-image PIL work, single-threaded anyway, does not notice.
        torch.set_num_threads(1)
    try:
        return _measure(device)
    finally:
        torch.set_num_threads(threads)


def _measure(device: torch.device) -> list[dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    split = Split(
        images=torch.randint(0, 256, (NUM_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator),
        labels=torch.randint(0, 10, (NUM_IMAGES,), generator=generator),
    )
    pipelines: dict[tuple[str, str], Callable[[], None]] = {}
    device_loader = DeviceLoader(
        split, BATCH_SIZE, device=device, train=True, augment=True, mean=MEAN, std=STD
    )
    pipelines["DeviceLoader", "-"] = _device_epoch(device_loader)
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = _CifarStyle(split, transform)
    for workers in WORKERS:
        loader = DataLoader(
            dataset,
            batch_size=BATCH_SIZE,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            # Workers kept across epochs, so that their start-up lands in the warm-up, not in the timing.
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        pipelines["torchvision DataLoader", str(workers)] = _torchvision_epoch(loader, device)

    # Interleaved rounds, each pipeline's best round kept: they share whatever else the machine is doing
    # instead of one of them getting all of a busy spell.
    seconds = dict.fromkeys(pipelines, float("inf"))
    for _ in range(ROUNDS):
        for key, epoch in pipelines.items():
            seconds[key] = min(seconds[key], measure(epoch, warmup=1, repeat=2))
    images_per_epoch = len(device_loader) * BATCH_SIZE
    rates = {key: images_per_epoch / value for key, value in seconds.items()}
    device_rate = rates["DeviceLoader", "-"]
    return [
        {
            "pipeline": name,
            "workers": workers,
            "device": device.type,
            "threads": torch.get_num_threads(),
            "images": images_per_epoch,
            "images/s": round(rate),
            "DeviceLoader ×": round(device_rate / rate, 1),
        }
        for (name, workers), rate in rates.items()
    ]


if __name__ == "__main__":
    table = run()
    columns = list(table[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in table)) for c in columns}
    print(f"{NAME} (target: {TARGET})")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in table:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
