"""A shared timing helper for the benchmarks: median wall-clock seconds per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _synchronize() -> None:
    # CUDA kernels run asynchronously: without a barrier the clock would stop before the work is done.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds per call of `fn` over `repeat` timed calls, after `warmup` untimed ones.

    The median rather than the mean, so that one call that the OS or another process interrupted does not
    move the figure.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    for _ in range(warmup):
        fn()
    _synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
