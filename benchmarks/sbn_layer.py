"""SpectralBatchNorm2d forward+backward in training mode: the closed form (impl="auto") against the FFT form and
against nn.BatchNorm2d, at the shapes of a CIFAR ResNet's stages.

Run: `python -m benchmarks.sbn_layer` from the repository root.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks._timing import measure
from sbn_study.sbn import SpectralBatchNorm2d

NAME = "sbn_layer"
TARGET = "auto ≤ 1.5× BN on CPU; ≥ 3× faster than fft"

SHAPES: tuple[tuple[int, int, int, int], ...] = ((128, 64, 32, 32), (128, 256, 8, 8), (128, 512, 4, 4))
# Interleaved rounds, each layer's best round kept: on a shared machine the layers then share whatever else it
# is doing instead of one of them getting all of a busy spell. The FFT form is 3-30× slower and only needs
# to be roughly right, so it sits out most rounds.
ROUNDS = 6
FFT_ROUNDS = 2


def _train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        # Without this the input gradient would be accumulated into x.grad, an extra pass none of the
        # layers should be charged for.
        x.grad = None
        layer(x).backward(grad)

    return step


def run() -> list[dict[str, object]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=device).manual_seed(0)
    rows: list[dict[str, object]] = []
    for shape in SHAPES:
        channels = shape[1]
        x = torch.randn(shape, device=device, generator=generator).requires_grad_()
        grad = torch.randn(shape, device=device, generator=generator)
        layers = {
            "bn": nn.BatchNorm2d(channels),
            "auto": SpectralBatchNorm2d(channels, impl="auto"),
            "fft": SpectralBatchNorm2d(channels, impl="fft"),
        }
        steps = {name: _train_step(layer.to(device).train(), x, grad) for name, layer in layers.items()}
        seconds = {name: float("inf") for name in steps}
        for round_ in range(ROUNDS):
            for name, step in steps.items():
                if name != "fft" or round_ < FFT_ROUNDS:
                    seconds[name] = min(seconds[name], measure(step, warmup=1, repeat=5))
        ms = {name: 1e3 * value for name, value in seconds.items()}
        rows.append(
            {
                "shape": "×".join(map(str, shape)),
                "device": device.type,
                "threads": torch.get_num_threads(),
                "bn_ms": round(ms["bn"], 2),
                "auto_ms": round(ms["auto"], 2),
                "fft_ms": round(ms["fft"], 2),
                "auto/bn": round(ms["auto"] / ms["bn"], 2),
                "fft/auto": round(ms["fft"] / ms["auto"], 2),
            }
        )
    return rows


if __name__ == "__main__":
    table = run()
    columns = list(table[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in table)) for c in columns}
    print(f"{NAME} (target: {TARGET})")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in table:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
