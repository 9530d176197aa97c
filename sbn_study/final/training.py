"""`sbn-study train`: final training by the paper's protocol, several seeds in parallel as Ray tasks.

Each seed trains the configuration on the training split at its full budget, keeps the weights of its best
validation epoch and evaluates them once on the test split. The comparison arms (`final.arms`) train on the
same seeds; a seed gives every arm the same batch order and augmentations, so the per-seed (paired)
difference removes part of the seed-to-seed variance. `final.comparison` turns the seeds into the table.

As for a study, the driver alone writes MLflow (no concurrent writers on a sqlite store): every run is
opened before its task starts, and a task returns its history and test metrics, which the driver logs when
the task ends. The dataset is loaded once by the driver and shared through Ray's object store. The
comparison is written under the output folder and logged to the parent run once the seeds ended.

The tested weights are kept as the seed run's MLflow model (`final.model`: `model/` holds `checkpoint.pt`, which
`sbn-study evaluate` returns to) and, in the same task,
go through the evaluation suites of `options.evaluation` (`final.evaluation`): their figures are logged to the
seed's run beside test_acc, their files (the Fourier heat map, the reliability table) are its artifacts, and
the figures of `evaluation.COMPARED` are compared across arms as accuracy is.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study import terminal
from sbn_study.errors import UserError, one_line
from sbn_study.final.arms import REFERENCE, ArmPlan
from sbn_study.final.comparison import ArmSummary, PairedDifference, SeedScore, compare_arms
from sbn_study.final.evaluation import (
    BN_ARM,
    FOLDER,
    MODEL,
    NO_SUITES,
    Comparison,
    Evaluation,
    EvaluationOptions,
    compare_suites,
    versus_bn,
    write_files,
)
from sbn_study.final.model import save_model
from sbn_study.protocol import result_metrics
from sbn_study.results.export import FinalConfig
from sbn_study.spec.config import TrialConfig, flatten
from sbn_study.store.runs import ensure_experiment
from sbn_study.store.uri import check_reachable, redact_uri, resolve_tracking_uri
from sbn_study.study import stopping

if TYPE_CHECKING:
    from sbn_study.final.progress import SeedProgress
    from sbn_study.store.record import StudyRecord
    from sbn_study.store.writer import RunWriter
    from sbn_study.trial.data import ImageDataset

# The comparison's files, under <output>/final/<parent run name>/ and as artifacts of the parent run.
TABLE_MARKDOWN, TABLE_LATEX, FOREST_PLOT = "comparison.md", "comparison.tex", "forest_plot.png"


@dataclass(frozen=True)
class FinalOptions:
    experiment: str  # MLflow experiment of the runs, conventionally "<study>-final"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    output: Path = Path("sbn-runs")
    tracking_uri: str | None = None
    address: str | None = None
    cpus_per_seed: float = 1.0
    gpus_per_seed: float | None = None  # None = 1 when the Ray cluster has GPUs, else 0
    # The suites each tested checkpoint goes through.
    evaluation: EvaluationOptions = field(default_factory=EvaluationOptions)
    verbose: bool = False  # Ray's and MLflow's own lines and the seeds' output too


@dataclass(frozen=True)
class SeedResult:
    arm: str
    seed: int
    run_id: str
    status: str  # "completed" | "diverged" | "error"
    test_acc: float
    test_loss: float
    best_val_acc: float
    best_epoch: int  # the epoch whose weights were tested
    epochs_run: int
    error: str = ""
    suites: dict[str, float] = field(default_factory=dict)  # the evaluation suites' figures


@dataclass(frozen=True)
class FinalOutcome:
    experiment: str
    tracking_uri: str
    parent_run_id: str
    results: tuple[SeedResult, ...]  # by arm (the plan's order), then seed
    arms: dict[str, ArmSummary]  # the reference first
    differences: list[PairedDifference]  # every other arm − the reference, Holm-corrected across them
    labels: dict[str, str]  # arm → how the table names it
    folder: Path  # where the comparison's files are
    files: tuple[str, ...]  # their names
    not_logged: str  # why the parent run lacks the comparison's files; "" when it has them
    unsent: Path | None  # where writes the tracking store never took were saved, if any
    suites: dict[str, Comparison] = field(default_factory=dict)  # figure of evaluation.COMPARED → comparison


def experiment_name(config: FinalConfig, path: Path, suffix: str = "final") -> str:
    """`<study>-<suffix>` for an exported configuration, else `<file stem>-<suffix>`."""
    return f"{config.provenance.study if config.provenance else path.stem}-{suffix}"


@dataclass(frozen=True)
class Publication:
    """What a final training makes of its ended seeds: metrics of the parent run, and files written under the
    output folder and logged to the parent run (texts, and matplotlib figures saved as PNG)."""

    metrics: dict[str, float]
    texts: dict[str, str]
    figures: dict[str, Any]


# The seeds' results (by arm, then seed) and each arm's summary → what the training publishes instead of the
# comparison of the arms with the configuration (`final.batch_sizes`: accuracy against batch size).
Publish = Callable[[Sequence[SeedResult], dict[str, ArmSummary]], Publication]


def run_final(
    plan: ArmPlan,
    options: FinalOptions,
    progress: SeedProgress | None = None,
    publish: Publish | None = None,
) -> FinalOutcome:
    """Trains every (arm, seed) of the plan as one Ray task on the local Ray (started unless one is already
    running in this process, which is then left running) or the cluster at `options.address`; `progress`
    shows them as they end, `publish` (default: the comparison of the arms) runs once all did."""
    from sbn_study.study.cluster import ClusterTarget, embedded_ray_processes, start_ray
    from sbn_study.study.state import prepare_output

    if not options.seeds:
        raise UserError("--seeds: expected at least one seed")
    output = prepare_output(options.output)
    uri = resolve_tracking_uri(options.tracking_uri, None, output)
    check_reachable(uri)
    if not options.verbose:
        terminal.quiet_libraries()
    started_ray = start_ray(ClusterTarget(address=options.address, verbose=options.verbose))
    ray_processes = embedded_ray_processes() if started_ray and options.address is None else {}
    try:
        return _run(plan, options, output, uri, progress, publish, ray_processes)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _run(
    plan: ArmPlan,
    options: FinalOptions,
    output: Path,
    uri: str,
    progress: SeedProgress | None,
    publish: Publish | None,
    ray_processes: dict[str, int],
) -> FinalOutcome:
    import ray
    import yaml

    from sbn_study.store.record import StudyRecord
    from sbn_study.study.cluster import check_fits
    from sbn_study.trial.data import load_dataset
    from sbn_study.trial.inputs import dataset_inputs

    gpus = options.gpus_per_seed
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
    check_fits(options.cpus_per_seed, gpus, "--cpus-per-seed/--gpus-per-seed", "seed")
    config = plan.config
    loaded = load_dataset(config.data)
    dataset, inputs = ray.put(loaded), dataset_inputs(loaded, config.data)
    experiment_id = ensure_experiment(uri, options.experiment, output / "artifacts")
    source = config.provenance
    common_tags = {
        "sbn.kind": "final",
        "sbn.study": source.study if source else "",
        "sbn.source_run": source.run_id if source else "",
        "sbn.arm_values": plan.origin,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    unsent = output / "final" / f"{options.experiment}.unsent.jsonl"
    run_name = f"{options.experiment}-{stamp}"
    record = StudyRecord.start(uri, experiment_id, run_name, common_tags, unsent)
    record.log_artifacts({"config.yaml": yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)})
    writer = record.writer()
    writer.log_inputs(inputs)

    folder = output / "final" / run_name
    task = ray.remote(_train_seed).options(num_cpus=options.cpus_per_seed, num_gpus=gpus)
    launched: dict[Any, tuple[str, int]] = {}  # task → (arm, seed)
    results: list[SeedResult] = []
    try:
        for arm, arm_config in plan.arms.items():
            label = plan.labels[arm]
            for seed in options.seeds:
                seeded = arm_config.model_copy(
                    update={"train": arm_config.train.model_copy(update={"seed": seed})}
                )
                dumped = seeded.model_dump(mode="json")
                writer.trial_run(
                    f"{arm}-seed{seed}",
                    run_name=f"{label}-seed{seed}",
                    params=flatten(dumped),
                    config_yaml=yaml.safe_dump(dumped, sort_keys=False),
                    tags={**common_tags, "sbn.arm": arm, "sbn.seed": str(seed), **plan.run_tags.get(arm, {})},
                )
                writer.log_inputs(inputs, f"{arm}-seed{seed}")
                launched[task.remote(seeded, dataset, options.evaluation)] = (arm, seed)
        pending = list(launched)
        if progress is not None:
            progress.start()
        with _closed_if_ray_is_lost(ray_processes, record, progress):
            while pending:
                # A timeout, so that the terminal's view (its ETA) moves between the seeds' ends.
                done, pending = ray.wait(pending, num_returns=1, timeout=terminal.REDRAW_S)
                if not done:
                    if progress is not None:
                        progress.tick()
                    continue
                result = _record(writer, *launched[done[0]], done[0], folder, loaded)
                results.append(result)
                if progress is not None:
                    progress.ended(result)
        if progress is not None:
            progress.stop()
        order = {arm: i for i, arm in enumerate(plan.arms)}
        results.sort(key=lambda r: (order[r.arm], r.seed))
        scores = [SeedScore(r.arm, r.seed, r.status, r.test_acc) for r in results]
        summaries, differences = compare_arms(scores, REFERENCE)
        _log_versus_bn(writer, results)
        suites = compare_suites([(r.arm, r.seed, r.status, r.suites) for r in results], REFERENCE)
        if publish is None:
            publication = _comparison(plan, (summaries, differences), suites)
        else:
            publication = publish(results, summaries)
        writer.log_parent_metrics(publication.metrics)
    except BaseException:
        # Ctrl-C (or a lost tracking store): stop the seeds still training and mark their runs killed.
        if progress is not None:
            progress.stop()
        for ref in launched:
            ray.cancel(ref, force=True)
        record.finish("KILLED")
        raise
    unsent_writes = record.finish("FINISHED")
    files, not_logged = _publish(record, folder, publication, not unsent_writes)
    return FinalOutcome(
        experiment=options.experiment,
        tracking_uri=redact_uri(uri),
        parent_run_id=record.handle.parent_run_id,
        results=tuple(results),
        arms=summaries,
        differences=differences,
        labels=plan.names,
        folder=folder,
        files=files,
        not_logged=not_logged,
        unsent=unsent if unsent_writes else None,
        suites=suites,
    )


def _closed_if_ray_is_lost(
    processes: dict[str, int], record: Any, progress: SeedProgress | None
) -> contextlib.AbstractContextManager[None]:
    """While the seeds train on the embedded Ray: should Ray end under them, their runs and the parent run are
    ended (killed) here, and the process ends, rather than with Ray's abort a minute later, runs left open."""

    def close() -> None:
        if progress is not None:
            progress.stop()
        record.finish("KILLED")
        stop = stopping.requested()
        assert stop is not None  # the watch keeps its reason before it closes
        sys.stdout.flush()
        print(stop.message, file=sys.stderr, flush=True)
        # Not through Ray, which would wait on the lost Ray until its own abort.
        os._exit(stop.exit_code)

    return stopping.close_when_ray_is_lost(processes, close, "final training", "train again")


def _record(
    writer: RunWriter, arm: str, seed: int, ref: Any, folder: Path, dataset: ImageDataset
) -> SeedResult:
    """Logs one ended task to its run, with its model and evaluation files (written under `folder`), and
    returns its result."""
    import ray

    key = f"{arm}-seed{seed}"
    run_id = writer.run_id(key) or ""  # "" while the store is unreachable and the run not yet opened
    try:
        out = ray.get(ref)
    except ray.exceptions.RayError as exc:
        writer.finish_trial(key, "error")
        reason = one_line(exc, last=True)
        nan = math.nan
        return SeedResult(arm, seed, run_id, "error", nan, nan, nan, 0, 0, error=reason)
    for metrics in out["history"]:
        writer.log_metrics(key, result_metrics(metrics), step=int(metrics["epoch"]))
    tested = {
        name: out[name] for name in ("test_acc", "test_loss", "best_val_acc") if math.isfinite(out[name])
    }
    writer.log_metrics(key, tested, step=out["best_epoch"])
    evaluation: Evaluation | None = out["evaluation"]
    if out["checkpoint"] is not None:
        seed_folder = folder / key
        # The seed's folder is the model's: `sbn-study evaluate` finds the checkpoint where it always was.
        for path in save_model(seed_folder, *out["checkpoint"], out["best_epoch"], dataset):
            writer.log_artifact(key, path, MODEL)
        if evaluation is not None:
            writer.log_metrics(key, evaluation.metrics, step=out["best_epoch"])
            for path in write_files(evaluation, seed_folder / FOLDER, f"{arm}, seed {seed}"):
                writer.log_artifact(key, path, FOLDER)
    writer.set_tags(key, {"sbn.node": out["node"], "sbn.best_epoch": str(out["best_epoch"])})
    writer.finish_trial(key, out["status"])
    return SeedResult(
        arm,
        seed,
        run_id,
        out["status"],
        out["test_acc"],
        out["test_loss"],
        out["best_val_acc"],
        out["best_epoch"],
        out["epochs_run"],
        suites=evaluation.metrics if evaluation is not None else {},
    )


def _log_versus_bn(writer: RunWriter, results: list[SeedResult]) -> None:
    """Each seed's corruption errors relative to the BN arm's on the same seed, logged to its run."""
    bn = {r.seed: r.suites for r in results if r.arm == BN_ARM}
    for r in results:
        relative = versus_bn(r.suites, bn[r.seed]) if r.arm != BN_ARM and r.seed in bn else {}
        if relative:
            writer.log_metrics(f"{r.arm}-seed{r.seed}", relative, step=r.best_epoch)


def _train_seed(
    config: TrialConfig, dataset: ImageDataset, evaluation: EvaluationOptions = NO_SUITES
) -> dict[str, Any]:
    """The Ray task: train, restore the best-validation weights, evaluate them once on the test split, then
    run the evaluation suites on them."""
    import ray

    from sbn_study.trial.data import DeviceLoader
    from sbn_study.trial.train import evaluate, train

    result = train(config, dataset=dataset, keep_best=True)
    model = result.model
    assert model is not None
    test_loss = test_acc = math.nan
    if result.best_state is not None:  # None only when the loss diverged before the first validation
        model.load_state_dict(result.best_state)
        test = DeviceLoader(
            dataset.test,
            config.train.eval_batch_size,
            device=next(model.parameters()).device,
            train=False,
            augment=False,
            mean=dataset.mean,
            std=dataset.std,
        )
        test_loss, test_acc = evaluate(model, test, amp=config.train.amp)
    suites = None
    if result.best_state is not None and evaluation.suites:
        from sbn_study.final.evaluation import evaluate_model

        suites = evaluate_model(model, dataset, evaluation)
    return {
        "history": result.history,
        "status": result.status,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "node": ray.get_runtime_context().get_node_id(),
        "checkpoint": None
        if result.best_state is None
        else (config.model_dump(mode="json"), result.best_state),
        "evaluation": suites,
    }


def _summary_metrics(
    summaries: dict[str, ArmSummary], differences: list[PairedDifference], figure: str = "test_acc"
) -> dict[str, float]:
    """The comparison of `figure` as metrics of the parent run, so the MLflow UI shows it next to the seeds:
    test_acc's under the names it always had (`diff/<arm>/p`), another figure's under its own name."""
    values: dict[str, float] = {}
    own = "" if figure == "test_acc" else f"{figure}/"
    for arm, s in summaries.items():
        counts = {"completed": s.completed, "diverged": s.diverged, "failed": s.failed}
        values |= {f"{arm}/{figure}_mean": s.mean, f"{arm}/{figure}_std": s.std}
        values |= {f"{arm}/{own}{status}": count for status, count in counts.items()}
    for d in differences:
        prefix = f"diff/{d.arm}/"
        values |= {f"{prefix}{figure}_{k}": getattr(d, k) for k in ("mean", "std", "low", "high")}
        values |= {f"{prefix}{own}p": d.p_value, f"{prefix}{own}p_holm": d.p_holm, f"{prefix}{own}pairs": d.n}
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def _comparison(
    plan: ArmPlan,
    comparison: tuple[dict[str, ArmSummary], list[PairedDifference]],
    suites: dict[str, Comparison],
) -> Publication:
    """The comparison of the arms with the configuration: its metrics, table (Markdown, LaTeX) and forest
    plot."""
    from sbn_study.final.comparison import forest_plot, latex_table
    from sbn_study.final.render import render_comparison

    summaries, differences = comparison
    metrics = _summary_metrics(summaries, differences)
    for figure, compared in suites.items():
        metrics |= _summary_metrics(*compared, figure)
    texts = {
        TABLE_MARKDOWN: render_comparison(summaries, differences, plan, suites),
        TABLE_LATEX: latex_table(summaries, differences, plan.names),
    }
    # One arm alone has no difference to plot.
    figures = {FOREST_PLOT: forest_plot(differences, plan.names)} if differences else {}
    return Publication(metrics, texts, figures)


def _publish(
    record: StudyRecord, folder: Path, publication: Publication, store_took_all: bool
) -> tuple[tuple[str, ...], str]:
    """Writes the publication's files to `folder`, then to the parent run unless the store already failed to
    take a write. Returns the files' names and why the parent run lacks them ("" when it has them)."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in publication.texts.items():
        (folder / name).write_text(text)
    for name, figure in publication.figures.items():
        figure.savefig(folder / name, dpi=150)
    written = (*publication.texts, *publication.figures)
    try:
        if store_took_all:
            record.log_artifacts(publication.texts)
            for name, figure in publication.figures.items():
                record.log_figure(figure, name)
    except Exception as exc:  # a store that went away after the seeds: the files are written
        return written, one_line(exc)
    finally:
        for figure in publication.figures.values():
            plt.close(figure)
    return written, "" if store_took_all else "the tracking store did not take every write"
