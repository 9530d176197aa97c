"""Training epochs with feature statistics on against off, on the quick-start setup (tiny model, SBN placed at
stages 2 and 3, synthetic data: `search_spaces/quickstart.yaml`), through `train()` itself.

A measurement happens once every `interval` epochs, so the cost that matters is the one spread over that many
epochs: each timed run resumes a checkpoint at epoch `interval` and trains `interval` more epochs, which ends
with exactly one measurement when the statistics are on (and none at initialization, which a resumed run
skips). Epoch time is Σ `epoch_time_s` of the run's history, so model construction is not charged. Settings
alternate within each round; the overhead is the median of the per-round ratios to the "off" run.
The default interval and probe size are FeatureStatsConfig's; the quick-start's own interval is a second row.

Torch gets `resources.cpu` threads, as a Ray trial does (Ray sets OMP_NUM_THREADS to the trial's CPUs).

Run: `python -m benchmarks feature_stats` from the repository root.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks._timing import measure
from sbn_study.config import FeatureStatsConfig, TrialConfig
from sbn_study.data import ImageDataset, load_dataset
from sbn_study.featstats import measure_feature_stats
from sbn_study.norms import norm_sites
from sbn_study.spec import load_spec
from sbn_study.train import _probe_batch, resolve_device, train

NAME = "feature_stats"
TARGET = "≤ 3 % overhead"

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
OVERHEAD_LIMIT = 0.03
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
) -> float:
    start = checkpoint["epoch"]
    result = train(
        _with(config, epochs=start + features.interval, features=features), dataset=dataset, resume=checkpoint
    )
    epochs = [m for m in result.history if m["epoch"] > start]
    return sum(m["epoch_time_s"] for m in epochs) / len(epochs)


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
        per_epoch: dict[str, list[float]] = {"off": [], **{name: [] for name in settings}}
        for _ in range(rounds):
            per_epoch["off"].append(_seconds_per_epoch(config, dataset, checkpoint, off))
            for name, features in settings.items():
                per_epoch[name].append(_seconds_per_epoch(config, dataset, checkpoint, features))

        # The cost of one measurement on its own, on the model as it is at the checkpoint.
        device = resolve_device(config.train.device)
        model = train(
            _with(config, epochs=checkpoint["epoch"], features=off), dataset=dataset, resume=checkpoint
        )
        assert model.model is not None
        probe = _probe_batch(dataset, config.model_copy(update={"features": default}), device)
        sites = norm_sites(model.model)
        one = measure(
            lambda: measure_feature_stats(model.model, probe, sites), warmup=2, repeat=5 if quick else 15
        )
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)

    off_epoch = statistics.median(per_epoch["off"])
    rows: list[dict[str, object]] = [
        {
            "setting": "off",
            "epochs timed": off.interval,
            "ms/epoch": round(1e3 * off_epoch, 1),
            "overhead": "-",
            "threads": used_threads,
            "rounds": rounds,
        }
    ]
    for name, features in settings.items():
        ratios = [on / base for on, base in zip(per_epoch[name], per_epoch["off"], strict=True)]
        rows.append(
            {
                "setting": name,
                "epochs timed": features.interval,
                "ms/epoch": round(1e3 * statistics.median(per_epoch[name]), 1),
                "overhead": f"{100 * (statistics.median(ratios) - 1):+.2f} %",
                "overhead from one measurement": f"{100 * one / (features.interval * off_epoch):.2f} %",
                "threads": used_threads,
                "rounds": rounds,
            }
        )
    rows.append(
        {
            "setting": f"one measurement ({len(sites)} sites, probe {default.probe_size})",
            "ms/measurement": round(1e3 * one, 1),
            "threads": used_threads,
        }
    )
    return rows


def verdict(rows: list[dict[str, object]]) -> str:
    row = next(r for r in rows if "(default)" in str(r["setting"]))
    overhead = float(str(row["overhead"]).split()[0]) / 100
    status = "met" if overhead <= OVERHEAD_LIMIT else "NOT met"
    return (
        f"{status}: {row['setting']}: {100 * overhead:+.2f} % measured end to end, "
        f"{row['overhead from one measurement']} from the cost of one measurement"
    )


if __name__ == "__main__":
    from benchmarks.__main__ import markdown_table

    table = run()
    print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
