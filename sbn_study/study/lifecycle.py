"""`sbn-study run`: a validated spec → Ray (local or a cluster) → Tune with Optuna and ASHA → MLflow.

A `Study` is one execution of a study, new or resumed, in three steps. `prepare` refuses everything that can
be refused (output folder, tracking store, an unfinished or missing earlier execution, cluster resources,
data) before anything is recorded, then opens the MLflow record and saves the study's state; `fit` runs
Tune, new or restored from its saved state; `finish` closes the record, reads the trials back and saves the
state `--resume` continues from. The dataset is loaded once and shared through Ray's object store.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study import terminal
from sbn_study.errors import UserError
from sbn_study.spec import StudySpec
from sbn_study.store.record import StudyRecord
from sbn_study.store.runs import KIND_TAG, STATE_FILE_TAG, create_store, ensure_experiment, running_study_runs
from sbn_study.store.ui import best_so_far
from sbn_study.store.uri import (
    check_reachable,
    redact_uri,
    resolve_optuna_storage,
    resolve_tracking_uri,
    use_server_credentials,
)
from sbn_study.store.writer import RecordHandle
from sbn_study.study import cluster, stopping
from sbn_study.study.state import (
    NOT_TRIAL_DEFINING,
    StudyState,
    changed_keys,
    hold_study,
    prepare_output,
    send_saved_writes,
    state_path,
    unsent_path,
)
from sbn_study.tune.checkpoints import local_path, pause_point, ready_tune_path

if TYPE_CHECKING:  # the CLI imports this module: torch only once a study runs
    from sbn_study.spec.config import TrialConfig
    from sbn_study.trial.data import ImageDataset


@dataclass(frozen=True)
class RunOptions:
    output: Path
    address: str | None = None
    tracking_uri: str | None = None
    resume: bool = False
    num_cpus: int | None = None  # local Ray only; None = all of the machine's
    progress_interval_s: float = 30.0  # between progress lines where the output is no terminal
    verbose: bool = False  # Ray's, Tune's, Optuna's and MLflow's own lines too
    # How the command shows an outcome, returning its exit code: for a study that must end the process itself
    # (the embedded Ray lost under it). Without it the outcome is not shown.
    report: Callable[[StudyOutcome], int] | None = None

    @property
    def cluster(self) -> cluster.ClusterTarget:
        return cluster.ClusterTarget(self.address, self.num_cpus, self.verbose)


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
    with hold_study(options.output, spec.name):
        study = Study(spec, spec_text, options)
        with study.ray_session():
            tuner = study.prepare()
            with stopping.stop_when_space_runs_out(study.disk()), study.closed_if_ray_is_lost():
                ended = study.fit(tuner)
            return study.finish(ended)


class Study:
    """One execution of a study. Creating it refuses what needs no Ray (output folder, tracking store, the
    earlier execution); each step then leaves what the next needs on the object: the record, the state."""

    def __init__(self, spec: StudySpec, spec_text: str, options: RunOptions) -> None:
        self.spec_text = spec_text
        self.options = options
        self.output = prepare_output(options.output)
        uri = resolve_tracking_uri(options.tracking_uri, spec.tracking.uri, self.output)
        self.uri = use_server_credentials(uri)
        # Tune pickles the spec into its state (the trials' parameters, the callbacks), and no trial uses the
        # tracking URI: that copy keeps no credentials.
        secretless = {
            key: value and redact_uri(value)
            for key, value in (("uri", spec.tracking.uri), ("optuna_storage", spec.tracking.optuna_storage))
        }
        self.spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update=secretless)})
        # What defines the trials, for the state: a resume compares its own with it.
        self.trials_spec = spec.model_dump(mode="json", exclude=set(NOT_TRIAL_DEFINING))
        self.state_file = state_path(self.output, spec.name)
        self.unsent_path = unsent_path(self.output, spec.name)
        head_storage = spec.storage if cluster.is_ray_client(options.address) else None
        self.optuna_storage = resolve_optuna_storage(spec.tracking.optuna_storage, self.output, head_storage)
        self.previous = self._check_input()
        self._preparing: Future[ImageDataset] | None = None
        self.record: StudyRecord | None = None
        self.state: StudyState | None = None
        self._warm_start: list[Any] = []  # the earlier study's trials (Optuna's FrozenTrial) its sampler gets
        self._ray_processes: dict[str, int] = {}  # the embedded Ray's GCS and raylet, when this started it

    def _check_input(self) -> StudyState | None:
        """Refuses what needs no Ray; returns the state of the execution to resume, if one is asked for."""
        if cluster.is_ray_client(self.options.address):
            cluster.check_ray_client(self.options.address, self.uri, self.spec.storage)
        check_reachable(self.uri)
        if shortage := stopping.Disk(self._folders()).shortage():
            raise UserError(f"{shortage}; free space first")
        state = StudyState.load(self.state_file)
        name, output = self.spec.name, self.output
        if state is not None and self.unsent_path.exists():
            # Before anything else is written: the file is then one execution's, in its order.
            sent = send_saved_writes(self.uri, state, self.unsent_path)
            print(f"sbn-study: sent {sent} MLflow writes saved when the store did not take them")
        unfinished = state is not None and state.status != "finished"
        if not self.options.resume and unfinished:
            raise UserError(
                f"study '{name}' has an unfinished run in {output} ({state.status}); "
                "continue it with --resume, or give the study another name"
            )
        if self.options.resume and unfinished:
            self._check_same_study(state)
            return state
        if self.options.resume and state is not None and self._extends(state):
            return state
        # Without an unfinished state there may still be an execution killed before it saved its state:
        # `prepare` looks for its parent run once the store is open.
        return None

    def _extends(self, state: StudyState) -> bool:
        """Whether `--resume` adds trials to the finished execution of `state`: the same study with a larger
        `search.num_samples` does, under the same parent run, its sampler keeping its history; the same study
        does not (nothing to continue); any other change is refused."""
        started = state.spec if state.spec is not None else _resolved_spec(self.uri, state.parent_run_id)
        if started is None or not changed_keys(started, self.trials_spec):
            return False
        self._check_same_study(state, extending=True)
        before, now = started["search"]["num_samples"], self.spec.search.num_samples
        if now <= before:
            raise UserError(
                f"--resume: study '{self.spec.name}' finished with search.num_samples {before}: a larger "
                f"one adds trials to it, got {now}"
            )
        return True

    def _check_same_study(self, state: StudyState, extending: bool = False) -> None:
        """A resume continues the execution of `state` only with its stores and what defines its trials: Tune
        and the sampler go on from their saved state, and trials of another spec would mix with theirs unseen.
        `extending` (a finished execution) allows a change of `search.num_samples`."""
        name, uri = self.spec.name, redact_uri(self.uri)
        if state.tracking_uri != uri:
            raise UserError(
                f"--resume: study '{name}' is recorded in {state.tracking_uri}, not in {uri}: resume it with "
                f"--tracking-uri {state.tracking_uri}"
            )
        optuna_storage = redact_uri(self.optuna_storage)
        if state.optuna_storage is not None and state.optuna_storage != optuna_storage:
            raise UserError(
                f"--resume: study '{name}' keeps its sampler's trials in {state.optuna_storage}, not in "
                f"{optuna_storage}: resume it with --set tracking.optuna_storage={state.optuna_storage}"
            )
        started = state.spec if state.spec is not None else _resolved_spec(self.uri, state.parent_run_id)
        keys = changed_keys(started, self.trials_spec) if started is not None else []
        if extending and (other := [key for key in keys if key != "search.num_samples"]):
            raise UserError(
                f"--resume: study '{name}' finished; a larger search.num_samples adds trials to it, but the "
                f"spec differs from the one it ran with in {', '.join(other)} too: run the new one as another "
                "study (its own name)"
            )
        if not extending and keys:
            raise UserError(
                f"--resume: the spec differs from the one study '{name}' started with in {', '.join(keys)}; "
                "resume with the same spec and --set overrides, or run the new one as another study (its own "
                "name), search.num_samples included"
            )

    def _folders(self) -> tuple[Path, ...]:
        """Where the study writes on this machine before Tune does: the output folder and a local store."""
        if self.uri.startswith("sqlite:///"):
            return self.output, Path(self.uri.removeprefix("sqlite:///")).parent
        return (self.output,)

    def disk(self) -> stopping.Disk:
        """Where the prepared study writes on this machine, and the room its trials' checkpoints take there."""
        assert self.state is not None
        experiment = local_path(self.state.tune_path)
        folders = self._folders() + ((experiment,) if experiment else ())
        # A trial replaces its checkpoint through a temporary copy: two files of each trial that runs.
        return stopping.Disk(folders, experiment, copies=2 * self.spec.search.max_concurrent)

    @contextlib.contextmanager
    def ray_session(self) -> Iterator[None]:
        """Ray for the study's steps; shut down after them if this started it."""
        for key, value in cluster.TUNE_ENV.items():
            os.environ.setdefault(key, value)
        if not self.options.verbose:
            terminal.quiet_libraries()
        # Before the store's thread starts: MLflow and Ray import modules in common (protobuf).
        ray = cluster.import_ray(self.options.cluster)

        if self.options.address is None:
            # The store and the dataset are made ready while the embedded Ray starts. A cluster may still
            # refuse a local store, so there they wait for the cluster check.
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbn-prepare")
            self._preparing = pool.submit(_open_store_and_load, self.uri, self.spec)
            pool.shutdown(wait=False)
        started = cluster.start_ray(self.options.cluster)
        if started and self.options.address is None:
            self._ray_processes = cluster.embedded_ray_processes()
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def prepare(self) -> Any:
        """Checks the cluster, loads the data, opens the record and returns the Tuner to fit: Tune's saved one
        when a resumed study has one, else a new one."""
        resources = self.spec.resources
        cluster.check_fits(resources.cpu, resources.gpu, "resources", "trial")
        cluster.check_store_serves_every_node(self.uri)
        if cluster.is_ray_client(self.options.address):
            cluster.check_reachable_from_head(self.uri)
        preparing = self._preparing
        dataset = preparing.result() if preparing else _open_store_and_load(self.uri, self.spec)
        previous = self.previous or self._killed_before_its_state()
        if self.spec.search.warm_start and (previous is None or previous.status != "finished"):
            from sbn_study.tune.search import warm_start_trials

            self._warm_start = warm_start_trials(self.optuna_storage, self.spec)
        # Only now, with every check passed: a refused study leaves no experiment behind.
        experiment_id = ensure_experiment(self.uri, self.spec.name, self.output / "artifacts")
        if previous is None:
            self._start(experiment_id)
        elif previous.status == "finished":
            self._extend(previous)
        elif self._resume(previous):
            from ray import tune

            trainable = self._trainable(dataset)
            return tune.Tuner.restore(
                previous.tune_path, trainable, resume_unfinished=True, resume_errored=True
            )
        return self._new_tuner(dataset)

    def _killed_before_its_state(self) -> StudyState | None:
        """The execution whose driver died after it opened its parent run and before it saved its state file,
        found by the parent run's tags: `--resume` continues it, a new execution is refused. With `--resume`
        and nothing to continue, a study of which nothing was recorded starts (a driver killed before its
        parent run leaves nothing to continue), one that finished is refused."""
        name, output = self.spec.name, self.output
        runs = running_study_runs(self.uri, name, str(self.state_file))
        if runs and not self.options.resume:
            raise UserError(
                f"study '{name}' has an unfinished run in {output} (stopped before its state was saved); "
                "continue it with --resume, or give the study another name"
            )
        if not runs:
            if self.options.resume and StudyState.load(self.state_file) is not None:
                raise UserError(f"--resume: study '{name}' has no unfinished run in {output}")
            if self.options.resume:
                print(f"sbn-study: nothing of study '{name}' was recorded in {output} yet; it starts now")
            return None
        run = runs[0].info
        # Its driver died before Tune started: nothing ran yet under the spec it was started with.
        return StudyState(
            status="interrupted",
            parent_run_id=run.run_id,
            experiment_id=run.experiment_id,
            tune_path=self._tune_path(run.run_name),
            tracking_uri=redact_uri(self.uri),
            spec=self.trials_spec,
            optuna_storage=redact_uri(self.optuna_storage),
            optuna_study=run.run_name,
        )

    def _tune_path(self, run_name: str) -> str:
        """Tune's experiment folder of the execution whose parent run is `run_name` (<name>-<timestamp>)."""
        storage = self.spec.storage or str(self.output / "ray")
        return f"{storage.rstrip('/')}/{run_name}"

    def _start(self, experiment_id: str) -> None:
        run_name = f"{self.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = {"sbn.study": self.spec.name, KIND_TAG: "study", STATE_FILE_TAG: str(self.state_file)}
        self.record = StudyRecord.start(self.uri, experiment_id, run_name, tags, self.unsent_path)
        pause_point("parent-run-open")
        self.state = StudyState(
            status="running",
            parent_run_id=self.record.handle.parent_run_id,
            experiment_id=experiment_id,
            tune_path=self._tune_path(run_name),
            tracking_uri=redact_uri(self.uri),
            spec=self.trials_spec,
            optuna_storage=redact_uri(self.optuna_storage),
            optuna_study=run_name,
        )
        self.state.save(self.state_file)
        self.record.log_artifacts(study_artifacts(self.spec, self.spec_text))
        cluster.where_tune_runs(ready_tune_path, self.state.tune_path)

    def _extend(self, state: StudyState) -> None:
        """Reopens the record of the finished execution of `state` for the trials a larger `num_samples` adds:
        a new Tune experiment of only those, under the same parent run, sampled by the same Optuna study."""
        from sbn_study.tune.callbacks import progress_metrics

        handle = RecordHandle(self.uri, state.experiment_id, state.parent_run_id, self.unsent_path)
        self.record = StudyRecord.resume(handle)
        self.state = state
        statuses = self.record.trial_statuses()
        state.earlier_trials = sorted(statuses)
        best = self.record.parent_metrics().get(best_so_far(self.spec.search.metrics[0]))
        state.earlier_progress = progress_metrics(
            self.spec, statuses.values(), [] if best is None else [best]
        )
        state.status, state.spec = "running", self.trials_spec
        # Its own Tune folder: Tune's saved state of the finished one holds its number of samples.
        state.tune_path = self._tune_path(f"{self.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        state.optuna_storage = redact_uri(self.optuna_storage)
        state.save(self.state_file)
        self.record.log_artifacts(study_artifacts(self.spec, self.spec_text))
        cluster.where_tune_runs(ready_tune_path, state.tune_path)
        print(
            f"sbn-study: study '{self.spec.name}' has {len(state.earlier_trials)} trials; "
            f"{self._trials_to_run()} more are sampled with their history"
        )

    def _trials_to_run(self) -> int:
        """This execution's Tune trials: `num_samples` but the trials of the executions it extends."""
        assert self.state is not None
        return self.spec.search.num_samples - len(self.state.earlier_trials or ())

    def _resume(self, state: StudyState) -> bool:
        """Reopens the record of `state`; True when Tune saved a state to restore."""
        handle = RecordHandle(self.uri, state.experiment_id, state.parent_run_id, self.unsent_path)
        self.record = StudyRecord.resume(handle)
        self.state = state
        state.status = "running"
        state.save(self.state_file)
        # Again: a driver killed before it logged them left the parent run without them.
        self.record.log_artifacts(study_artifacts(self.spec, self.spec_text))
        saved = cluster.where_tune_runs(ready_tune_path, state.tune_path)
        # Tune and the sampler resume from their saved state, which does not know the trials a killed driver
        # started after it, and sample replacements: those trials' runs would stay beside them. The trials of
        # the executions an extension adds to are not Tune's to know.
        known = (saved or set()) | set(state.earlier_trials or ())
        if dropped := self.record.drop_trials_except(known):
            print(f"sbn-study: {dropped} trial(s) started after the last saved state will be sampled again")
        if saved is None:
            print("sbn-study: the study stopped before Tune saved its first state; it starts over")
        return saved is not None

    def _trainable(self, dataset: ImageDataset) -> Any:
        from ray import tune

        from sbn_study.tune.trainable import run_trial

        assert self.state is not None
        tune_path = self.state.tune_path
        return tune.with_resources(
            tune.with_parameters(run_trial, spec=self.spec, dataset=dataset, tune_path=tune_path),
            {"cpu": self.spec.resources.cpu, "gpu": self.spec.resources.gpu},
        )

    def _new_tuner(self, dataset: ImageDataset) -> Any:
        from ray import tune

        from sbn_study.trial.inputs import dataset_inputs
        from sbn_study.tune.callbacks import TrackingCallback
        from sbn_study.tune.progress import StudyProgress
        from sbn_study.tune.search import StudySearch, make_scheduler

        assert self.record is not None and self.state is not None
        spec = self.spec
        storage, name = self.state.tune_storage_and_name
        earlier = len(self.state.earlier_trials or ())
        callbacks = [
            TrackingCallback(
                spec,
                self.record.handle,
                earlier,
                dataset_inputs(dataset, spec.data),
                self.state.earlier_progress or {},
            ),
            StudyProgress(spec, self.options.progress_interval_s, earlier),
        ]
        # The study's name in Optuna: the parent run's, which an extension keeps.
        optuna_study = self.state.optuna_study or name
        return tune.Tuner(
            self._trainable(dataset),
            tune_config=tune.TuneConfig(
                search_alg=StudySearch(spec, self.optuna_storage, optuna_study, self._warm_start),
                scheduler=make_scheduler(spec),
                num_samples=self._trials_to_run(),
                max_concurrent_trials=spec.search.max_concurrent,
                # Trials reuse worker processes: no second torch import and start-up gap per trial.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                # No Tune checkpoints: each trial keeps its own file (tune.checkpoints says why).
                verbose=1 if self.options.verbose else 0,  # Tune's status table besides the study's
            ),
        )

    def closed_if_ray_is_lost(self) -> contextlib.AbstractContextManager[None]:
        """While Tune runs on the embedded Ray: should Ray end under it, the study closes its record and state
        itself, the command shows the outcome, and the process ends with its exit code."""

        def close() -> None:
            terminal.stop_all()
            outcome = self.finish(ended=False)
            code = self.options.report(outcome) if self.options.report else 1
            sys.stdout.flush()
            sys.stderr.flush()
            # Not through Tune or Ray, which would wait on the lost Ray until Ray's own abort.
            os._exit(code)

        return stopping.close_when_ray_is_lost(self._ray_processes, close)

    def fit(self, tuner: Any) -> bool:
        """Runs Tune to the end or to an interruption; True when every trial ended."""
        # Tune turns the first Ctrl-C into a graceful, checkpointed stop; a second one lands here.
        results = None
        try:
            with contextlib.suppress(KeyboardInterrupt):
                results = tuner.fit()
        finally:
            terminal.stop_all()
        pause_point("study-trained")
        # Tune's own view decides whether the study ended, so that an unreachable tracking server cannot.
        return results is not None and results.num_terminated + results.num_errors >= self._trials_to_run()

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
        # Only for trials read back (a store still away would fail again), once the state is saved: a Ctrl-C
        # while the figures are drawn loses only them.
        if trial_statuses:
            from sbn_study.study.overview import publish_overview

            if problem := publish_overview(self.record, self.spec, self.uri):
                print(f"sbn-study: the study's description and figures are not in MLflow ({problem})")
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


def _open_store_and_load(uri: str, config: TrialConfig) -> ImageDataset:
    """The tracking store opened (MLflow's import and a fresh sqlite store's migrations: ≈ 2.5 s) and the
    dataset loaded (a multi-domain one whole): what the driver needs besides Ray. Raises UserError for a
    dataset that cannot be had, or a model every trial would fail to build (`load_study_data`)."""
    from sbn_study.trial.domain_train import load_study_data

    create_store(uri)
    return load_study_data(config)


def _resolved_spec(uri: str, parent_run_id: str) -> dict[str, Any] | None:
    """The resolved spec an execution logged when it started (`resolved.yaml`); None when it did not get to."""
    import tempfile

    import yaml

    from sbn_study.store.runs import open_client

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = open_client(uri).download_artifacts(parent_run_id, "resolved.yaml", folder)
        except Exception:  # MLflow raises its own errors (and OSError) for an artifact that is not there
            return None
        return yaml.safe_load(Path(path).read_text())


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
        "run_name": best["run_name"],
        "metric": table.attrs["metric"],
        "value": float(best[score]),
        "epoch": int(best["best_epoch"]),
        "status": best["status"],
        # A conditional parameter this trial did not sample is NaN in its row.
        "params": {k: best[k] for k in table.attrs["searched"] if k in best and not pd.isna(best[k])},
    }
