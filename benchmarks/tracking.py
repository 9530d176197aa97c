"""MLflow logging cost per Tune result on a sqlite store: `StudyTracker.log_metrics` (one batched `log_batch`
of the result's meaningful metrics) against the stock pattern of one `log_metric` call per number, which is
what Ray's `MLflowLoggerCallback` does (it also calls `get_run` once per result, not counted here, so the
stock figure is a lower bound).

A realistic result: the 7 epoch metrics and the feature statistics of the quick-start model (tiny, SBN placed
at stages 2 and 3), measured for real on a random probe. Each pattern logs into its own child run of a parent
run, opened as a study opens them; the patterns alternate result by result over several rounds. The verdict
takes the median wall-clock time, which is what Tune's event loop waits; the process's CPU time stands beside
it (it leaves out sqlite's waits for the disk and the time other processes held the core).

Run: `python -m benchmarks tracking` from the repository root.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from sbn_study.featstats import measure_feature_stats
from sbn_study.models import create_model_from_config
from sbn_study.spec import load_spec
from sbn_study.tracking import EPOCH_METRICS, StudyTracker, ensure_experiment, result_metrics

NAME = "tracking"
TARGET = "≤ 10 ms per result (sqlite)"

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
LIMIT_MS = 10.0


def _result() -> dict[str, float]:
    spec = load_spec(QUICKSTART)
    config = spec.base_config()
    torch.manual_seed(0)
    model = create_model_from_config(config.model, config.norm, config.data.synthetic.num_classes)
    features = measure_feature_stats(model, torch.randn(32, 3, 32, 32))
    epoch = {name: 0.5 + 0.01 * i for i, name in enumerate(EPOCH_METRICS)}
    # What a Tune result also carries (and result_metrics drops): bookkeeping that is not worth a metric.
    extra = {"epoch": 3.0, "training_iteration": 3, "time_this_iter_s": 1.2, "node_id": "abc", "done": False}
    return result_metrics({**epoch, **features, **extra})


def run(quick: bool = False) -> list[dict[str, object]]:
    metrics = _result()
    epoch_only = {k: v for k, v in metrics.items() if k in EPOCH_METRICS}
    rounds, per_round = (2, 2) if quick else (5, 10)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        experiment_id = ensure_experiment(uri, "bench-tracking", root / "artifacts")
        tracker = StudyTracker.start(uri, experiment_id, "bench-tracking", "parent", root / "unsent.jsonl")
        names = ("ours: log_batch", "ours: log_batch, epoch metrics only", "stock: log_metric per number")
        for trial in names:
            tracker.trial_run(trial, trial, {"model.arch": "tiny"}, "model: {arch: tiny}\n", {})
        client = tracker.client
        stock_run = tracker.run_id(names[2])
        assert stock_run is not None

        def ours(step: int) -> None:
            tracker.log_metrics(names[0], metrics, step)

        def ours_epoch_only(step: int) -> None:
            tracker.log_metrics(names[1], epoch_only, step)

        def stock(step: int) -> None:
            for key, value in metrics.items():
                client.log_metric(stock_run, key, value, step=step)

        calls = dict(zip(names, (ours, ours_epoch_only, stock), strict=True))
        seconds: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        step = 0
        for _ in range(2):  # first writes create tables' pages and warm SQLAlchemy: not per-result cost
            step += 1
            for call in calls.values():
                call(step)
        for _ in range(rounds):
            for _ in range(per_round):
                step += 1
                for name, call in calls.items():
                    start, cpu_start = time.perf_counter(), time.process_time()
                    call(step)
                    seconds[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - cpu_start)
        assert tracker.pending == 0, "a write failed: the figures would not be what they say"

    ours_ms = 1e3 * statistics.median(seconds[names[0]])
    rows: list[dict[str, object]] = []
    for name, values, count in zip(
        names, seconds.values(), (len(metrics), len(epoch_only), len(metrics)), strict=True
    ):
        ms = 1e3 * statistics.median(values)
        rows.append(
            {
                "pattern": name,
                "metrics/result": count,
                "calls/result": 1 if name.startswith("ours") else count,
                "ms/result (median)": round(ms, 2),
                "ms/result (p90)": round(1e3 * statistics.quantiles(values, n=10)[-1], 2),
                "cpu ms/result (median)": round(1e3 * statistics.median(cpu[name]), 2),
                "× ours": round(ms / ours_ms, 1),
                "results": len(values),
            }
        )
    return rows


def verdict(rows: list[dict[str, object]]) -> str:
    ours, stock = rows[0], rows[-1]
    ms = float(str(ours["ms/result (median)"]))
    status = "met" if ms <= LIMIT_MS else "NOT met"
    return (
        f"{status}: {ms} ms per result ({ours['metrics/result']} metrics, one log_batch); "
        f"stock per-number logging {stock['ms/result (median)']} ms = {stock['× ours']}×"
    )


if __name__ == "__main__":
    from benchmarks.__main__ import markdown_table

    table = run()
    print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
