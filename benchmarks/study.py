"""The quick-start study end to end (`search_spaces/quickstart.yaml` through `run_study`), on a local Ray with
as many CPUs as the machine has, into a temporary output with a sqlite store; everything is read back from
MLflow afterwards. It runs in a fresh Python process, as `sbn-study run` does: the other benchmarks have
already imported torch and MLflow into this one, which would hide their import time.

- busy fraction = Σ `epoch_time_s` of every reported epoch / (wall × slots), slots = min(max_concurrent,
  cores / resources.cpu): the share of the machine's trial slots spent training and evaluating. Wall here
  runs from just before Ray starts to `run_study` returning; the process's start and first imports (as far
  as `sbn_study.study.lifecycle` and `ray`) come before and are a phase of their own.
- time to the first reported epoch: the earliest metric timestamp in MLflow, counted once from just before
  Ray starts (Ray start-up included) and once from Ray being up (excluded).
- the phases seen from outside: Ray start-up, the dataset load (timed apart, as `run_study` does it), the
  parent run's creation and the first trial run's creation (MLflow start times), and where trial time goes
  (set-up before the first epoch, per-epoch reporting, tails, slots without a trial).
- where the CPU went: trial actors, the driver, Ray's own processes (psutil, sampled on a thread),
  and the base trial's epoch time trained alone after the study, which shows how much slower epochs ran
  inside it. The busy fraction counts a slowed epoch as busy; these two rows show what that hides.

`run_study` starts Ray itself, as `sbn-study run` does (it creates the tracking store on a thread meanwhile);
a wrapper around `sbn_study.study.cluster.start_ray` notes when Ray is up. Runs once: it is the slowest benchmark
(1–2 min).

Run: `python -m benchmarks study` from the repository root.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sbn_study.spec import load_spec

NAME = "study"
TARGET = "busy ≥ 0.9; first epoch ≤ 8 s"

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
BUSY_LIMIT = 0.9
FIRST_EPOCH_LIMIT_S = 8.0
QUICK_OVERRIDES = [
    "search.num_samples=2",
    "search.sampler.n_startup_trials=2",
    "search.scheduler.grace_period=1",
    "train.epochs=2",
    "features.interval=1",
    "data.val_size=128",
    "data.synthetic.train_size=512",
    "data.synthetic.test_size=64",
    "model.width=8",
]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _trial_timeline(client: Any, run: Any) -> dict[str, Any]:
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_time_s"), key=lambda m: m.step)
    start_s, end_s = run.info.start_time / 1e3, (run.info.end_time or run.info.start_time) / 1e3
    stamps = [m.timestamp / 1e3 for m in history]
    epochs = [m.value for m in history]
    # What lies between two logged epochs beyond the epoch itself: checkpoint, report, driver round trip.
    between = sum(b - a - e for a, b, e in zip(stamps, stamps[1:], epochs[1:], strict=False))
    return {
        "start": start_s,
        "end": end_s,
        "stamps": stamps,
        "epochs": epochs,
        "setup": (stamps[0] - start_s - epochs[0]) if stamps else end_s - start_s,
        "between": between,
        "tail": (end_s - stamps[-1]) if stamps else 0.0,
        "status": run.data.tags.get("sbn.status", "?"),
    }


ROWS_MARKER = "BENCHMARK-ROWS "


class _CpuSampler:
    """CPU seconds of this process's descendants (the local Ray), trial actors apart, sampled on a thread:
    Tune ends its actors before `run_study` returns, and a process that is gone can no longer be asked.
    Also the whole machine's busy CPU time, which shows what other processes took meanwhile."""

    def __init__(self, interval_s: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self._interval_s = interval_s
        self._seen: dict[int, tuple[bool, float]] = {}  # pid → (ever a trial actor, CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._machine_start = self._machine_busy()

    def _machine_busy(self) -> float:
        times = self._psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def _sample(self) -> None:
        for child in self._psutil.Process().children(recursive=True):
            try:
                name, times = child.name(), child.cpu_times()
            except self._psutil.Error:
                continue
            # Tune's function trainables run in actors named after their class; a worker that was one
            # stays counted as one, start-up included.
            was_trial = self._seen.get(child.pid, (False, 0.0))[0]
            self._seen[child.pid] = (was_trial or "ImplicitFunc" in name, times.user + times.system)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Takes a last sample and sets `trials`, `ray` and `machine` (CPU seconds since `start`)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        self.machine = self._machine_busy() - self._machine_start
        self.trials = sum(cpu for trial, cpu in self._seen.values() if trial)
        self.ray = sum(cpu for trial, cpu in self._seen.values() if not trial)


def _epoch_alone(spec: Any, dataset: Any) -> float:
    """Mean epoch time of the base trial, trained alone outside Ray at the trial's thread count: the
    reference that shows whether trials inside the study ran slower than the machine allows."""
    import torch

    from sbn_study.trial.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    try:
        base = spec.base_config()
        # As many epochs as one feature-statistics interval, so the measurement is spread as in a trial.
        config = base.model_copy(
            update={"train": base.train.model_copy(update={"epochs": base.features.interval})}
        )
        history = train(config, dataset=dataset).history
    finally:
        torch.set_num_threads(threads)
    return statistics.mean(m["epoch_time_s"] for m in history if m["epoch"] >= 1)


def run(quick: bool = False) -> list[dict[str, object]]:
    command = [sys.executable, "-m", "benchmarks.study", "--child", str(time.time())]
    result = subprocess.run(
        [*command, *(["--quick"] if quick else [])],
        cwd=QUICKSTART.parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(ROWS_MARKER)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the study benchmark failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1][len(ROWS_MARKER) :])


def _measure(launched_at: float, quick: bool) -> list[dict[str, object]]:
    import ray

    from sbn_study.study import cluster
    from sbn_study.study import lifecycle as study

    imported = time.time()
    spec_text = QUICKSTART.read_text()
    spec = load_spec(QUICKSTART, QUICK_OVERRIDES if quick else [])
    cores = _cores()
    slots = min(spec.search.max_concurrent, int(cores // spec.resources.cpu))

    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder)
        uri = f"sqlite:///{output / 'mlflow.db'}"
        options = study.RunOptions(
            output=output, tracking_uri=uri, num_cpus=cores, progress_interval_s=3600.0
        )
        if ray.is_initialized():
            raise RuntimeError("Ray is already running in this process: its start-up could not be timed")
        # run_study starts Ray itself, overlapping it with the tracking store's creation; this wrapper only
        # notes when Ray is up.
        start_ray = cluster.start_ray
        ray_up = 0.0

        def timed_start_ray(target: Any) -> bool:
            nonlocal ray_up
            started = start_ray(target)
            ray_up = time.time()
            return started

        cluster.start_ray = timed_start_ray
        sampler = _CpuSampler()
        sampler.start()
        t0 = time.time()
        driver_cpu_start = time.process_time()
        try:
            # The live table would interleave with the benchmark's own output.
            with contextlib.redirect_stdout(io.StringIO()):
                outcome = study.run_study(spec, spec_text, options)
            t_end = time.time()
            driver_cpu = time.process_time() - driver_cpu_start
        finally:
            sampler.stop()
            cluster.start_ray = start_ray

        # Imported only now: before the study they would take torch's and MLflow's imports out of its time.
        from mlflow.tracking import MlflowClient

        from sbn_study.store.runs import trial_runs
        from sbn_study.trial.data import load_dataset

        client = MlflowClient(tracking_uri=uri)
        parent = client.get_run(outcome.parent_run_id)
        children = trial_runs(client, outcome.experiment_id, outcome.parent_run_id)
        trials = [_trial_timeline(client, run) for run in children]
    load_start = time.perf_counter()
    dataset = load_dataset(spec.data)
    dataset_s = time.perf_counter() - load_start
    alone = _epoch_alone(spec, dataset)

    wall = t_end - t0
    wall_from_ray = t_end - ray_up
    epochs = [e for trial in trials for e in trial["epochs"]]
    trained = sum(epochs)
    first_metric = min(s for trial in trials for s in trial["stamps"])
    first_trial = min(trial["start"] for trial in trials)
    last_end = max(trial["end"] for trial in trials)
    in_trials = sum(trial["end"] - trial["start"] for trial in trials)
    # Idle slot time at the start (until each slot's first trial) and at the end (after each slot's last).
    idle_start = sum(sorted(trial["start"] for trial in trials)[:slots]) - slots * t0
    idle_end = slots * t_end - sum(sorted(trial["end"] for trial in trials)[-slots:])
    idle_between = wall * slots - in_trials - idle_start - idle_end
    statuses = Counter(outcome.trial_statuses.values())
    busy = trained / (wall * slots)

    def row(measure: str, value: object, note: str = "") -> dict[str, object]:
        return {"measure": measure, "value": value, "note": note}

    return [
        row(
            "wall time",
            f"{wall:.1f} s",
            "Ray start → run_study returns (its own lazy imports of torch, Tune, MLflow included)",
        ),
        row(
            "trials",
            f"{len(trials)}: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
            f"{spec.search.num_samples} sampled, ASHA grace {spec.search.scheduler.grace_period}, "
            f"max {spec.max_budget} epochs",
        ),
        row("epochs reported", len(epochs), f"median epoch_time_s {statistics.median(epochs):.2f} s"),
        row(
            "epoch alone, no Ray",
            f"{alone:.2f} s",
            f"mean epoch_time_s of the base trial, {spec.resources.cpu:g} thread(s), after the study",
        ),
        row(
            "slots",
            slots,
            f"min(max_concurrent {spec.search.max_concurrent}, {cores} cores / {spec.resources.cpu:g} CPU)",
        ),
        row("Σ epoch_time_s", f"{trained:.1f} s", "training + validation + feature statistics"),
        row("busy fraction", f"{busy:.2f}", "Σ epoch_time_s / (wall × slots), wall including Ray start"),
        row(
            "busy fraction from Ray up",
            f"{trained / (wall_from_ray * slots):.2f}",
            "the same, wall from Ray being up",
        ),
        row("first epoch from start", f"{first_metric - t0:.1f} s", "includes Ray start-up"),
        row("first epoch from Ray up", f"{first_metric - ray_up:.1f} s", "excludes Ray start-up"),
        row(
            "phase: process start → sbn_study.study.lifecycle and ray imported",
            f"{imported - launched_at:.1f} s",
            "interpreter start and imports before anything runs",
        ),
        row(
            "phase: Ray start-up",
            f"{ray_up - t0:.1f} s",
            f"ray.init(num_cpus={cores}); MLflow import + store creation on a thread meanwhile",
        ),
        row("phase: dataset load", f"{dataset_s:.2f} s", "load_dataset(spec.data), timed apart"),
        row(
            "phase: Ray up → parent run created",
            f"{parent.info.start_time / 1e3 - ray_up:.1f} s",
            "ray.tune import, dataset load + put, waiting for the store created during Ray's start-up",
        ),
        row(
            "phase: Ray up → first trial run created",
            f"{first_trial - ray_up:.1f} s",
            "Tuner set-up, trial actor start (its imports of torch and sbn_study)",
        ),
        row(
            "phase: first trial run → first epoch logged",
            f"{first_metric - first_trial:.1f} s",
            "model, data on the device, epoch-0 statistics, epoch 1, report",
        ),
        row(
            "phase: last trial ended → run_study returned",
            f"{t_end - last_end:.1f} s",
            "Tune shutdown, summary queries",
        ),
        row(
            "Σ trial set-up before epoch 1",
            f"{sum(t['setup'] for t in trials):.1f} s",
            "run opened → first epoch started, over all trials",
        ),
        row(
            "Σ between-epoch gaps",
            f"{sum(t['between'] for t in trials):.1f} s",
            "logged-epoch spacing beyond epoch_time_s: checkpoint + report",
        ),
        row("Σ trial tails", f"{sum(t['tail'] for t in trials):.1f} s", "last epoch logged → run ended"),
        row(
            "slot time without a trial run",
            f"{wall * slots - in_trials:.1f} s",
            "wall × slots − Σ trial run durations, split below",
        ),
        row("  before each slot's first trial", f"{idle_start:.1f} s", "Ray start-up and study set-up"),
        row("  between trials", f"{idle_between:.1f} s", "a trial ended, the next not yet opened"),
        row("  after each slot's last trial", f"{idle_end:.1f} s", "no trial left to start"),
        *(
            row(
                f"CPU: {what}",
                f"{seconds:.1f} s",
                f"{100 * seconds / (wall * cores):.0f} % of wall × {cores} cores",
            )
            for what, seconds in (
                ("trial actors", sampler.trials),
                ("driver (Tune loop, MLflow writes, Ray client)", driver_cpu),
                ("Ray's own processes (raylet, GCS, agents, idle workers)", sampler.ray),
                (
                    "other processes on the machine",
                    sampler.machine - sampler.trials - driver_cpu - sampler.ray,
                ),
            )
        ),
    ]


def _seconds(rows: list[dict[str, object]], measure: str) -> float:
    return float(str(next(r["value"] for r in rows if r["measure"] == measure)).split()[0])


def verdict(rows: list[dict[str, object]]) -> str:
    busy = _seconds(rows, "busy fraction")
    first = _seconds(rows, "first epoch from start")
    parts = [
        f"busy {busy:.2f} ({'met' if busy >= BUSY_LIMIT else 'NOT met'})",
        f"first epoch {first:.1f} s incl. Ray start ({'met' if first <= FIRST_EPOCH_LIMIT_S else 'NOT met'})",
    ]
    status = "met" if busy >= BUSY_LIMIT and first <= FIRST_EPOCH_LIMIT_S else "NOT met"
    return f"{status}: " + "; ".join(parts)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(ROWS_MARKER + json.dumps(_measure(float(sys.argv[2]), "--quick" in sys.argv[3:])))
    else:
        from benchmarks.__main__ import markdown_table

        table = run("--quick" in sys.argv[1:])
        print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
