"""`python -m benchmarks [NAME ...] [--quick]`: runs the chosen benchmarks (default all, in `ORDER`) and prints
for each a markdown table of its rows under a heading with its target and a verdict, then the machine.

A benchmark module has `NAME`, `TARGET`, `run() -> list[dict]` and optionally `verdict(rows) -> str`. With
`--quick` a module whose `run` takes `quick` is asked for a smoke run; the others get smaller module constants
for the duration of the run (`QUICK_CONSTANTS`), since their sizes live there.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

ORDER = (
    "validate",
    "sbn_layer",
    "train_step",
    "gpu_share",
    "data",
    "feature_stats",
    "probe",
    "robustness",
    "tracking",
    "checkpoint",
    "study",
)

# Smoke-run sizes for the modules that have no `quick` of their own; keys missing from a module are skipped.
QUICK_CONSTANTS: dict[str, dict[str, Any]] = {
    "sbn_layer": {"SHAPES": ((16, 64, 32, 32), (16, 256, 8, 8)), "ROUNDS": 1, "FFT_ROUNDS": 1},
    "data": {"NUM_IMAGES": 1024, "BATCH_SIZE": 256, "WORKERS": (0,), "ROUNDS": 1},
}


def _data_verdict(rows: list[dict[str, Any]]) -> str:
    others = [row for row in rows if row["pipeline"] != "DeviceLoader"]
    worst = min(others, key=lambda row: float(row["DeviceLoader ×"]))
    ok = float(worst["DeviceLoader ×"]) >= 10
    return f"{'met' if ok else 'NOT met'}: DeviceLoader = {worst['DeviceLoader ×']}× the best torchvision DataLoader ({worst['workers']} workers)"


# Verdicts for the modules that do not compute their own; a module's own `verdict` wins.
FALLBACK_VERDICTS = {"data": _data_verdict}


@contextmanager
def _constants(module: ModuleType, values: dict[str, Any]) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in values if hasattr(module, name)}
    missing = sorted(set(values) - set(saved))
    if missing:
        # A renamed constant would otherwise turn the smoke run into a full one without a word.
        print(
            f"warning: {module.NAME} has no {', '.join(missing)}; --quick leaves it at full size",
            file=sys.stderr,
        )
    for name in saved:
        setattr(module, name, values[name])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def run_module(module: ModuleType, quick: bool) -> list[dict[str, object]]:
    if "quick" in inspect.signature(module.run).parameters:
        return module.run(quick=quick)
    if not quick:
        return module.run()
    with _constants(module, QUICK_CONSTANTS.get(module.NAME, {})):
        return module.run()


def markdown_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "(no rows)"
    # The union of the rows' keys, in first-seen order: some benchmarks mix rows of different kinds.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) + " |" for line in cells
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return "not installed"


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def machine_info(load_at_start: str) -> str:
    import torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    else:
        device = f"cpu ({torch.get_num_threads()} torch threads)"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    versions = ", ".join(f"{name} {_version(name)}" for name in ("torch", "ray", "mlflow", "optuna"))
    return "\n".join(
        [
            "## Machine",
            "",
            f"- CPU: {_cpu_model()}, {cores} cores usable (os.cpu_count() = {os.cpu_count()})",
            f"- Python {platform.python_version()}, {platform.system()} {platform.release()}",
            f"- {versions}",
            f"- device used: {device}",
            # A shared machine: other processes' load explains a run that disagrees with the one before.
            f"- load average (1, 5, 15 min): {load_at_start} at the start, {_load_average()} at the end",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all: {' '.join(ORDER)})"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ORDER]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    chosen = [name for name in ORDER if name in args.names] if args.names else list(ORDER)

    load_at_start = _load_average()
    print(f"# Benchmarks{' (--quick)' if args.quick else ''}: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    if args.quick:
        print("Smoke run: sizes and repeats are cut down, so the figures and verdicts measure nothing.\n")
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        rows = run_module(module, args.quick)
        seconds = time.perf_counter() - start
        verdict_of = getattr(module, "verdict", FALLBACK_VERDICTS.get(name))
        verdict = verdict_of(rows) if verdict_of else "no verdict: see the table"
        print(f"## {module.NAME} (target: {module.TARGET})\n")
        print(markdown_table(rows))
        print(f"\nVerdict: {verdict}  \n(benchmark ran {seconds:.0f} s)\n", flush=True)
    print(machine_info(load_at_start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
