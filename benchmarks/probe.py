"""`sbn-study probe`'s measurement (`results.probe.probe_at_init`) for the quick-start's tiny model and the
paper's ResNet-18 (width 64, 32 px), 3 arms (sbn, bn, 2bn) × the config's placement × 3 seeds, on the probe batch
of the spec (128 images). The data set is loaded once beforehand, as the command does before measuring.

Wall clock is what a user waits; on a machine that other processes share it grows with their load, so the
process's CPU time (user + system) stands beside it. The verdict takes the CPU time: on an idle machine the
wall clock lies between it / the threads torch uses (perfect scaling) and it (one thread), so it is the bound.

Run: `python -m benchmarks probe` from the repository root.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

NAME = "probe"
TARGET = "tiny model: seconds; ResNet-18: < 60 s on a CPU"

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
MODELS: dict[str, list[str]] = {"tiny": [], "resnet18": ["model.arch=resnet18", "model.width=64"]}
ARMS = ("sbn", "bn", "2bn")
SEEDS = (0, 1, 2)
LIMIT_S = {"tiny": 10.0, "resnet18": 60.0}


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def run(quick: bool = False) -> list[dict[str, Any]]:
    import torch

    from sbn_study.results.probe import ProbeRequest, probe_at_init
    from sbn_study.spec import load_spec

    rows = []
    for model, overrides in MODELS.items():
        if quick and model != "tiny":
            continue
        config = load_spec(QUICKSTART, overrides).base_config()
        seeds = SEEDS[:1] if quick else SEEDS
        request = ProbeRequest(config, ARMS, (config.norm.placement,), seeds)
        probe_at_init(ProbeRequest(config, ARMS[:1], request.placements, seeds[:1]))  # warm: data, kernels
        wall, cpu = time.perf_counter(), _cpu_s()
        table = probe_at_init(request)
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
        rows.append(
            {
                "model": model,
                "networks": len(ARMS) * len(seeds),
                "slots": table["slot"].nunique(),
                "wall s": f"{wall:.1f}",
                "CPU s": f"{cpu:.1f}",
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    parts = []
    for row in rows:
        limit = LIMIT_S[row["model"]]
        cpu_s = float(row["CPU s"])
        parts.append(
            f"{row['model']} {'met' if cpu_s < limit else 'NOT met'} ({cpu_s:.1f} s of CPU, the idle machine's "
            f"wall-clock bound; {row['wall s']} s wall here; limit {limit:.0f} s)"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    from benchmarks.__main__ import markdown_table

    table = run()
    print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
