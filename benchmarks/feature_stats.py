"""Training epochs with feature statistics on against off, on the quick-start setup (tiny model, SBN placed at
stages 2 and 3, synthetic data: `search_spaces/quickstart.yaml`), through `train()` itself.

A measurement happens once every `interval` epochs, so the cost that matters is the one spread over that many
epochs: each timed run resumes a checkpoint at epoch `interval` and trains `interval` more epochs, which ends
with exactly one measurement when the statistics are on (and none at initialization, which a resumed run
skips). Epoch time is Σ `epoch_time_s` of the run's history, so model construction is not charged. Settings
alternate within each round; the overhead is the median of the per-round ratios to the "off" run.
The default interval and probe size are FeatureStatsConfig's; the quick-start's own interval is a second row.

Torch gets `resources.cpu` threads, as a Ray trial does (Ray sets OMP_NUM_THREADS to the trial's CPUs).
Every run is also timed in CPU time of the process (the whole `train()` call, set-up included, which is the
same with and without statistics): at 1 thread it does not count the time other processes held the core, so
on a shared machine it is the figure the verdict takes; the wall-clock one stands beside it.

Run: `python -m benchmarks feature_stats` from the repository root.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._timing import measure
from sbn_study.spec import load_spec
from sbn_study.spec.config import FeatureStatsConfig, TrialConfig
from sbn_study.trial.data import ImageDataset, load_dataset
from sbn_study.trial.featstats import measure_feature_stats
from sbn_study.trial.norms import norm_sites
from sbn_study.trial.train import probe_batch, resolve_device, train

NAME = "feature_stats"
TARGET = "≤ 3 % overhead"

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
OVERHEAD_LIMIT = 0.03
OVERHEAD_COLUMNS = (
    "overhead (wall)",
    "overhead (cpu)",
    "cpu ratio range",
    "overhead from one measurement (cpu)",
)
QUICK_OVERRIDES = ["data.synthetic.train_size=640", "data.val_size=128", "data.synthetic.test_size=64"]


def _with(config: TrialConfig, *, epochs: int, features: FeatureStatsConfig) -> TrialConfig:
    return config.model_copy(
        update={"train": config.train.model_copy(update={"epochs": epochs}), "features": features}
    )


def _checkpoint_at(config: TrialConfig, dataset: ImageDataset, epoch: int) -> dict[str, Any]:
    saved: dict[str, Any] = {}

    def report(metrics: dict[str, float], make_checkpoint: Any) -> None:
        if make_checkpoint is not None:
            saved["checkpoint"] = make_checkpoint()

    off = FeatureStatsConfig(enabled=False)
    train(_with(config, epochs=epoch, features=off), dataset=dataset, report=report)
    return saved["checkpoint"]


def _seconds_per_epoch(
    config: TrialConfig, dataset: ImageDataset, checkpoint: dict[str, Any], features: FeatureStatsConfig
) -> tuple[float, float]:
    """(wall, CPU) seconds per epoch of `features.interval` epochs resumed from `checkpoint`."""
    start = checkpoint["epoch"]
    # Loading a checkpoint may alias its tensors (the optimizer's momentum buffers): every run gets its own.
    resume = copy.deepcopy(checkpoint)
    cpu_start = time.process_time()
    result = train(
        _with(config, epochs=start + features.interval, features=features), dataset=dataset, resume=resume
    )
    cpu = time.process_time() - cpu_start
    epochs = [m for m in result.history if m["epoch"] > start]
    return sum(m["epoch_time_s"] for m in epochs) / len(epochs), cpu / len(epochs)


def run(quick: bool = False) -> list[dict[str, object]]:
    spec = load_spec(QUICKSTART, QUICK_OVERRIDES if quick else [])
    config = spec.base_config()
    dataset = load_dataset(config.data)
    default = FeatureStatsConfig()
    intervals = {"default": default.interval, "quick-start": spec.features.interval}
    settings = {
        f"on, interval {interval} ({origin})": default.model_copy(update={"interval": interval})
        for origin, interval in intervals.items()
    }
    rounds = 1 if quick else 5
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    try:
        # Resuming at the longest interval leaves room for every setting's run to start from the same epoch.
        checkpoint = _checkpoint_at(config, dataset, max(intervals.values()))
        off = FeatureStatsConfig(enabled=False, interval=max(intervals.values()))
        every = {"off": off, **settings}
        per_epoch: dict[str, list[tuple[float, float]]] = {name: [] for name in every}
        for _ in range(rounds):
            for name, features in every.items():
                per_epoch[name].append(_seconds_per_epoch(config, dataset, checkpoint, features))

        # The cost of one measurement on its own, on the model as it is at the checkpoint.
        device = resolve_device(config.train.device)
        trained = train(
            _with(config, epochs=checkpoint["epoch"], features=off),
            dataset=dataset,
            resume=copy.deepcopy(checkpoint),
        ).model
        assert trained is not None
        probe = probe_batch(dataset, config.model_copy(update={"features": default}), device)
        sites = norm_sites(trained)
        cpu_times: list[float] = []

        def one_measurement() -> None:
            start = time.process_time()
            measure_feature_stats(trained, probe, sites)
            cpu_times.append(time.process_time() - start)

        warmup = 2
        one = measure(one_measurement, warmup=warmup, repeat=5 if quick else 15)
        one_cpu = statistics.median(cpu_times[warmup:])
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)

    off_cpu = statistics.median(cpu for _, cpu in per_epoch["off"])
    rows: list[dict[str, object]] = []
    for name, features in every.items():
        walls = [wall for wall, _ in per_epoch[name]]
        cpus = [cpu for _, cpu in per_epoch[name]]
        row: dict[str, object] = {
            "setting": name,
            "epochs timed": features.interval,
            "ms/epoch (wall)": round(1e3 * statistics.median(walls), 1),
            "ms/epoch (cpu)": round(1e3 * statistics.median(cpus), 1),
        }
        # The "off" row gets the same columns, so that the table keeps them in this order.
        row.update(dict.fromkeys(OVERHEAD_COLUMNS, "-"))
        if name != "off":
            pairs = list(zip(per_epoch[name], per_epoch["off"], strict=True))
            wall_ratios = [on / base for (on, _), (base, _) in pairs]
            cpu_ratios = [on / base for (_, on), (_, base) in pairs]
            predicted = one_cpu / (features.interval * off_cpu)
            row.update(
                zip(
                    OVERHEAD_COLUMNS,
                    (
                        f"{100 * (statistics.median(wall_ratios) - 1):+.2f} %",
                        f"{100 * (statistics.median(cpu_ratios) - 1):+.2f} %",
                        f"{min(cpu_ratios):.3f}–{max(cpu_ratios):.3f}",
                        f"{100 * predicted:.2f} %",
                    ),
                    strict=True,
                )
            )
        rows.append({**row, "threads": used_threads, "rounds": rounds})
    rows.append(
        {
            "setting": f"one measurement ({len(sites)} sites, probe {default.probe_size})",
            "ms/measurement (wall)": round(1e3 * one, 1),
            "ms/measurement (cpu)": round(1e3 * one_cpu, 1),
            "threads": used_threads,
        }
    )
    return rows


def verdict(rows: list[dict[str, object]]) -> str:
    row = next(r for r in rows if "(default)" in str(r["setting"]))
    overhead = float(str(row["overhead (cpu)"]).split()[0]) / 100
    status = "met" if overhead <= OVERHEAD_LIMIT else "NOT met"
    return (
        f"{status}: {row['setting']}: {100 * overhead:+.2f} % in CPU time end to end "
        f"({row['overhead (wall)']} wall), {row['overhead from one measurement (cpu)']} from the CPU time "
        "of one measurement"
    )


if __name__ == "__main__":
    from benchmarks.__main__ import markdown_table

    table = run()
    print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
