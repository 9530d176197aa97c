"""`sbn-study run`: a validated spec → Ray (local or a cluster) → Tune with Optuna and ASHA → MLflow.

A `Study` is one execution of a study, new or resumed, in three steps. `prepare` refuses everything that can
be refused (output folder, tracking store, an unfinished or missing earlier execution, cluster resources,
data) before anything is recorded, then opens the MLflow record and saves the study's state; `fit` runs
Tune, new or restored from its saved state; `finish` closes the record, reads the trials back and saves the
state `--resume` continues from. The dataset is loaded once and shared through Ray's object store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study.errors import UserError
from sbn_study.spec import StudySpec
from sbn_study.store.record import StudyRecord
from sbn_study.store.runs import create_store, ensure_experiment
from sbn_study.store.uri import check_reachable, redact_uri, resolve_tracking_uri
from sbn_study.store.writer import RecordHandle
from sbn_study.study import cluster
from sbn_study.study.state import StudyState, prepare_output, state_path, unsent_path

if TYPE_CHECKING:  # the CLI imports this module: torch only once a study runs
    from sbn_study.spec.config import DataConfig
    from sbn_study.trial.data import ImageDataset


@dataclass(frozen=True)
class RunOptions:
    output: Path
    address: str | None = None
    tracking_uri: str | None = None
    resume: bool = False
    num_cpus: int | None = None  # local Ray only; None = all of the machine's
    progress_interval_s: float = 10.0

    @property
    def cluster(self) -> cluster.ClusterTarget:
        return cluster.ClusterTarget(self.address, self.num_cpus)


@dataclass(frozen=True)
class StudyOutcome:
    name: str
    status: str  # "finished" | "interrupted"
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tune_path: str
    trial_statuses: dict[str, str]
    best: dict[str, Any] | None
    unsent_writes: int  # MLflow writes saved to <output>/studies/<name>.unsent.jsonl instead of the store


def run_study(spec: StudySpec, spec_text: str, options: RunOptions) -> StudyOutcome:
    study = Study(spec, spec_text, options)
    with study.ray_session():
        tuner = study.prepare()
        return study.finish(study.fit(tuner))


class Study:
    """One execution of a study. Creating it refuses what needs no Ray (output folder, tracking store, the
    earlier execution); each step then leaves what the next needs on the object: the record, the state."""

    def __init__(self, spec: StudySpec, spec_text: str, options: RunOptions) -> None:
        self.spec = spec
        self.spec_text = spec_text
        self.options = options
        self.output = prepare_output(options.output)
        self.uri = resolve_tracking_uri(options.tracking_uri, spec.tracking.uri, self.output)
        self.state_file = state_path(self.output, spec.name)
        self.unsent_path = unsent_path(self.output, spec.name)
        self.previous = self._check_input()
        self._preparing: Future[ImageDataset] | None = None
        self.record: StudyRecord | None = None
        self.state: StudyState | None = None

    def _check_input(self) -> StudyState | None:
        """Refuses what needs no Ray; returns the state of the execution to resume, if one is asked for."""
        if cluster.is_ray_client(self.options.address):
            cluster.check_ray_client(self.options.address, self.uri, self.spec.storage)
        check_reachable(self.uri)
        state = StudyState.load(self.state_file)
        name, output = self.spec.name, self.output
        if self.options.resume and (state is None or state.status == "finished"):
            raise UserError(f"--resume: study '{name}' has no unfinished run in {output}")
        if not self.options.resume and state is not None and state.status != "finished":
            raise UserError(
                f"study '{name}' has an unfinished run in {output} ({state.status}); "
                "continue it with --resume, or give the study another name"
            )
        return state if self.options.resume else None

    @contextlib.contextmanager
    def ray_session(self) -> Iterator[None]:
        """Ray for the study's steps; shut down after them if this started it."""
        import ray  # before the store's thread starts: MLflow and Ray import modules in common (protobuf)

        if self.options.address is None:
            # The store and the dataset are made ready while the embedded Ray starts. A cluster may still
            # refuse a local store, so there they wait for the cluster check.
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbn-prepare")
            self._preparing = pool.submit(_open_store_and_load, self.uri, self.spec.data)
            pool.shutdown(wait=False)
        started = cluster.start_ray(self.options.cluster)
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def prepare(self) -> Any:
        """Checks the cluster, loads the data, opens the record and returns the Tuner to fit: Tune's saved one
        when a resumed study has one, else a new one."""
        _quiet_libraries()
        resources = self.spec.resources
        cluster.check_fits(resources.cpu, resources.gpu, "resources", "trial")
        cluster.check_store_serves_every_node(self.uri)
        if cluster.is_ray_client(self.options.address):
            cluster.check_reachable_from_head(self.uri)
        preparing = self._preparing
        dataset = preparing.result() if preparing else _open_store_and_load(self.uri, self.spec.data)
        # Only now, with every check passed: a refused study leaves no experiment behind.
        experiment_id = ensure_experiment(self.uri, self.spec.name, self.output / "artifacts")
        if self.previous is None:
            self._start(experiment_id)
        elif self._resume(self.previous):
            from ray import tune

            trainable = self._trainable(dataset)
            return tune.Tuner.restore(
                self.previous.tune_path, trainable, resume_unfinished=True, resume_errored=True
            )
        return self._new_tuner(dataset)

    def _start(self, experiment_id: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = self.spec.name
        tags = {"sbn.study": name, "sbn.kind": "study"}
        self.record = StudyRecord.start(self.uri, experiment_id, f"{name}-{stamp}", tags, self.unsent_path)
        self.record.log_artifacts(study_artifacts(self.spec, self.spec_text))
        storage = self.spec.storage or str(self.output / "ray")
        self.state = StudyState(
            status="running",
            parent_run_id=self.record.handle.parent_run_id,
            experiment_id=experiment_id,
            tune_path=f"{storage.rstrip('/')}/{name}-{stamp}",
            tracking_uri=redact_uri(self.uri),
        )
        self.state.save(self.state_file)

    def _resume(self, state: StudyState) -> bool:
        """Reopens the record of `state`; True when Tune saved a state to restore."""
        handle = RecordHandle(self.uri, state.experiment_id, state.parent_run_id, self.unsent_path)
        self.record = StudyRecord.resume(handle)
        self.state = state
        state.status = "running"
        state.save(self.state_file)
        saved = cluster.where_tune_runs(_saved_trial_ids, state.tune_path)
        # Tune and the sampler resume from their saved state, which does not know the trials a killed driver
        # started after it, and sample replacements: those trials' runs would stay beside them.
        if dropped := self.record.drop_trials_except(saved or set()):
            print(f"sbn-study: {dropped} trial(s) started after the last saved state will be sampled again")
        if saved is None:
            print("sbn-study: the study stopped before Tune saved its first state; it starts over")
        return saved is not None

    def _trainable(self, dataset: ImageDataset) -> Any:
        from ray import tune

        from sbn_study.tune.trainable import run_trial

        return tune.with_resources(
            tune.with_parameters(run_trial, spec=self.spec, dataset=dataset),
            {"cpu": self.spec.resources.cpu, "gpu": self.spec.resources.gpu},
        )

    def _new_tuner(self, dataset: ImageDataset) -> Any:
        from ray import tune

        from sbn_study.tune.callbacks import ProgressTable, TrackingCallback
        from sbn_study.tune.search import StudySearch, make_scheduler

        assert self.record is not None and self.state is not None
        spec = self.spec
        storage, name = self.state.tune_storage_and_name
        callbacks = [
            TrackingCallback(spec, self.record.handle),
            ProgressTable(spec, self.options.progress_interval_s),
        ]
        return tune.Tuner(
            self._trainable(dataset),
            tune_config=tune.TuneConfig(
                search_alg=StudySearch(spec),
                scheduler=make_scheduler(spec),
                num_samples=spec.search.num_samples,
                max_concurrent_trials=spec.search.max_concurrent,
                # Trials reuse worker processes: no second torch import and start-up gap per trial.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
            ),
        )

    def fit(self, tuner: Any) -> bool:
        """Runs Tune to the end or to an interruption; True when every trial ended."""
        # Tune turns the first Ctrl-C into a graceful, checkpointed stop; a second one lands here.
        results = None
        with contextlib.suppress(KeyboardInterrupt):
            results = tuner.fit()
        # Tune's own view decides whether the study ended, so that an unreachable tracking server cannot.
        return (
            results is not None
            and results.num_terminated + results.num_errors >= self.spec.search.num_samples
        )

    def finish(self, ended: bool) -> StudyOutcome:
        """Closes the record (trial runs still open end as killed), reads the trials back, saves the state."""
        assert self.record is not None and self.state is not None
        state = self.state
        state.status = "finished" if ended else "interrupted"
        # Through the record's writer: the callback's, if Tune never ended it (a second Ctrl-C), else a new one.
        self.record.finish("FINISHED" if ended else "KILLED")
        try:
            trial_statuses, best = self.record.trial_statuses(), _best_trial(self.uri, self.spec, state)
        except Exception as exc:  # the tracking server is still away: its writes were saved, not lost
            print(
                f"sbn-study: cannot read the study back from MLflow ({type(exc).__name__}); its writes are kept"
            )
            trial_statuses, best = {}, None
        state.unsent_writes = self.record.unsent_writes()
        state.unsent_path = str(self.unsent_path)
        state.save(self.state_file)
        return StudyOutcome(
            name=self.spec.name,
            status=state.status,
            tracking_uri=redact_uri(self.uri),
            experiment_id=state.experiment_id,
            parent_run_id=state.parent_run_id,
            tune_path=state.tune_path,
            trial_statuses=trial_statuses,
            best=best,
            unsent_writes=state.unsent_writes,
        )


def _quiet_libraries() -> None:
    """Before Tune, Optuna or MLflow build anything: their set-up lines would bury the live table."""
    for key, value in cluster.TUNE_ENV.items():
        os.environ.setdefault(key, value)
    # Tune's warnings about the missing logger files.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines on creating a store
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study created and per trial sampled


def _open_store_and_load(uri: str, data: DataConfig) -> ImageDataset:
    """The tracking store opened (MLflow's import and a fresh sqlite store's migrations: ≈ 2.5 s) and the
    dataset loaded: what the driver needs besides Ray. Raises UserError for a dataset that cannot be had."""
    from sbn_study.trial.data import load_dataset

    create_store(uri)
    return load_dataset(data)


def _saved_trial_ids(tune_path: str) -> set[str] | None:
    """The trials in Tune's saved experiment state, or None when Tune saved none (killed before its first)."""
    from ray import tune

    if not tune.Tuner.can_restore(tune_path):
        return None
    return {trial.trial_id for trial in tune.ExperimentAnalysis(tune_path).trials}


def study_artifacts(spec: StudySpec, spec_text: str) -> dict[str, str]:
    """The spec as written and as resolved, for the study's parent run, without any credentials in URIs."""
    import yaml

    resolved = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    return {"spec.yaml": redact_uri(spec_text), "resolved.yaml": redact_uri(resolved)}


def _best_trial(uri: str, spec: StudySpec, state: StudyState) -> dict[str, Any] | None:
    """The trial `sbn-study export` ranks first: the best value of the metric over its epochs, among the
    trials that completed or were stopped early."""
    import pandas as pd

    from sbn_study.protocol import RANKED_STATUSES
    from sbn_study.results.analysis import best_trials, trials

    table = trials(uri, spec.name, execution=state.parent_run_id)
    score = f"best_{table.attrs['metric']}"
    if score not in table:
        return None
    ranked = best_trials(table[table["status"].isin(RANKED_STATUSES)], score, k=1)
    if ranked.empty:
        return None
    best = ranked.iloc[0]
    return {
        "trial_id": best["trial_id"],
        "run_id": best["run_id"],
        "metric": table.attrs["metric"],
        "value": float(best[score]),
        "epoch": int(best["best_epoch"]),
        "status": best["status"],
        # A conditional parameter this trial did not sample is NaN in its row.
        "params": {k: best[k] for k in table.attrs["searched"] if k in best and not pd.isna(best[k])},
    }
