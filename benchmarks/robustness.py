"""The cost of each evaluation suite of `sbn_study.evaluate` (corruptions, Fourier sensitivity, calibration) on the
CPU, for the tiny model (width 16, 10 classes, eval mode) on a synthetic split of 512 images, and the cost of
generating each corruption on its own. No target: figures to size the suites' settings by.

"model share" is the suite's images through the model times the time per image of a plain forward pass,
over the suite's time: what is left is generating the inputs (corruptions, perturbations, filters).
Torch runs at 1 thread: on a small shared machine a 2-thread op waits for whichever thread the OS parked,
and 1-thread figures are the steadier ones; each time is taken once, wall clock and process CPU time.

Run: `python -m benchmarks robustness` from the repository root.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks._timing import measure
from sbn_study.evaluate.calibration import calibration
from sbn_study.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from sbn_study.evaluate.fourier import FourierConfig, fourier_sensitivity, half_grid
from sbn_study.evaluate.inference import Classifier, generator
from sbn_study.evaluate.robustness import CorruptionConfig, corruption_errors
from sbn_study.trial.data import Split
from sbn_study.trial.models import create_model

NAME = "robustness"
TARGET = "cost per suite on the CPU; no target"

NUM_IMAGES = 512
BANDWIDTHS = FourierConfig().bandwidths


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(quick: bool = False) -> list[dict[str, object]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(quick)
    finally:
        torch.set_num_threads(threads)


def _measure(quick: bool) -> list[dict[str, object]]:
    count = 128 if quick else NUM_IMAGES
    generator_ = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator_),
        torch.randint(0, 10, (count,), generator=generator_),
    )
    torch.manual_seed(0)
    model = create_model("tiny", 10).eval()
    classifier = Classifier(model, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    forward = measure(lambda: classifier.logits(split.images), warmup=1, repeat=3) / count
    rows: list[dict[str, object]] = [
        {"what": "forward pass (reference)", "images": count, "ms/image": round(1e3 * forward, 3)}
    ]

    for name in CORRUPTIONS:
        streams = [generator(torch.device("cpu"), 0, name, s) for s in SEVERITIES]
        seconds = measure(
            lambda name=name, streams=streams: [
                corrupt(split.images, name, s, g) for s, g in zip(SEVERITIES, streams, strict=True)
            ],
            warmup=1,
            repeat=1 if quick else 3,
        )
        per_image = seconds / (len(SEVERITIES) * count)
        rows.append(
            {
                "what": f"corrupt: {name} (mean of 5 severities)",
                "images": count,
                "ms/image": round(1e3 * per_image, 3),
                "× forward": round(per_image / forward, 2),
            }
        )

    stride = 4 if quick else 1
    fourier = FourierConfig(stride=stride, heat_map_images=count)
    suites: dict[str, tuple[int, Callable[[], object]]] = {
        f"suite: corruptions ({len(CORRUPTIONS)} × 5 severities + clean)": (
            (len(CORRUPTIONS) * len(SEVERITIES) + 1) * count,
            lambda: corruption_errors(classifier, split, CorruptionConfig()),
        ),
        f"suite: fourier (heat map stride {stride}, {len(BANDWIDTHS)} bandwidths)": (
            # clean + low and high pass per bandwidth, then the heat map's clean pass and frequencies
            (1 + 2 * len(BANDWIDTHS) + 1 + len(half_grid(32, 32, stride))) * count,
            lambda: fourier_sensitivity(classifier, split, fourier),
        ),
        "suite: calibration (test + validation of the same size)": (
            2 * count,
            lambda: calibration(classifier, split, split),
        ),
    }
    for what, (images, suite) in suites.items():
        wall, cpu = _timed(suite)
        rows.append(
            {
                "what": what,
                "images": images,
                "s (wall)": round(wall, 2),
                "s (cpu)": round(cpu, 2),
                "ms/image": round(1e3 * wall / images, 3),
                "model share": f"{100 * min(1.0, images * forward / wall):.0f} %",
            }
        )
    return rows


if __name__ == "__main__":
    from benchmarks.__main__ import markdown_table

    print(f"{NAME} (target: {TARGET})\n{markdown_table(run())}")
