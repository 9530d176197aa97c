"""`sbn-study validate search_spaces/cifar100.yaml` against `python -c "import torch"`, each a fresh Python
process as a user starts it, wall clock from start to exit. Validation reads architectures and norm kinds
from the spec catalog, so it should cost a fraction of torch's import; the ratio, measured side by side, is
what stays comparable across machines.

The two commands alternate within each round (after one untimed round that warms the file cache), so that
both share whatever else the machine is doing; each figure is the median of its rounds.

Run: `python -m benchmarks validate` from the repository root.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

NAME = "validate"
TARGET = "≤ 0.3× `import torch`"

REPO = Path(__file__).resolve().parents[1]
SPEC = "search_spaces/cifar100.yaml"
RUNS = 5
RATIO_LIMIT = 0.3

COMMANDS: dict[str, list[str]] = {
    f"sbn-study validate {SPEC}": [sys.executable, "-m", "sbn_study.cli", "validate", SPEC],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    # check: a validation that fails fast must not pass for a fast one.
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def run(quick: bool = False) -> list[dict[str, object]]:
    rounds = 1 if quick else RUNS
    for command in COMMANDS.values():
        _seconds(command)
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for _ in range(rounds):
        for label, command in COMMANDS.items():
            times[label].append(_seconds(command))
    medians = {label: statistics.median(values) for label, values in times.items()}
    torch_s = medians['python -c "import torch"']
    return [
        {
            "command": label,
            "runs": rounds,
            "median s": f"{median:.3f}",
            "min s": f"{min(times[label]):.3f}",
            "× import torch": f"{median / torch_s:.2f}",
        }
        for label, median in medians.items()
    ]


def verdict(rows: list[dict[str, object]]) -> str:
    validate, torch_row = rows
    ratio = float(str(validate["× import torch"]))
    return (
        f"{'met' if ratio <= RATIO_LIMIT else 'NOT met'}: validate {validate['median s']} s = {ratio:.2f}× "
        f"`import torch` ({torch_row['median s']} s), medians of {validate['runs']} runs each"
    )


if __name__ == "__main__":
    from benchmarks.__main__ import markdown_table

    table = run()
    print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
