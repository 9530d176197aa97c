"""argparse types for the command line's numbers: a value outside its domain (a negative count, an infinite
share of a GPU, a port past 65535) is a one-line usage error, never a traceback or a silent default later.
Nothing heavy at import: the CLI builds its parser from these before any command runs."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when `high` is None)."""
    domain = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {domain}, got {value}")
        return value

    return parse


def number(low: float, *, above: bool = False) -> Callable[[str], float]:
    """A finite number of at least `low` (`above`: greater than it)."""
    domain = f"a finite number {'above' if above else 'of at least'} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text}")
        return value

    return parse


def integer_list(low: int) -> Callable[[str], tuple[int, ...]]:
    """Distinct comma-separated integers of at least `low`, in the order given."""
    domain = f"distinct comma-separated integers of at least {low}, such as {low},{2 * low},{4 * low}"

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text!r}") from None
        if min(values) < low or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"expected {domain}, got {text!r}")
        return values

    return parse
