"""`sbn-study run`: a validated spec → Ray (local or a cluster) → Tune with Optuna and ASHA → MLflow.

Order of work: everything that can be refused (output folder, tracking store, cluster resources, data) is
checked before the first trial starts; the store and experiment are created by the driver alone; the
dataset is loaded once and shared through the object store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from sbn_study.errors import UserError, one_line
from sbn_study.spec import StudySpec
from sbn_study.store.tracker import create_store, ensure_experiment
from sbn_study.store.uri import check_reachable, is_remote_store, redact_uri, resolve_tracking_uri

if TYPE_CHECKING:  # the CLI imports this module: torch only once a study runs
    from sbn_study.spec.config import DataConfig
    from sbn_study.trial.data import ImageDataset

T = TypeVar("T")

# Tune's CSV/JSON/TensorBoard loggers would write every feature statistic of every result a second time; MLflow
# is the record. Tune's warning about checkpointing every epoch (which we do on purpose, so a restarted trial
# loses at most one epoch) would bury the live table.
_TUNE_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@dataclass(frozen=True)
class RunOptions:
    output: Path
    address: str | None = None
    tracking_uri: str | None = None
    resume: bool = False
    num_cpus: int | None = None  # local Ray only; None = all of the machine's
    progress_interval_s: float = 10.0


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


def state_path(output: Path, name: str) -> Path:
    return output / "studies" / f"{name}.json"


def prepare_output(output: Path) -> Path:
    output = output.expanduser().resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--output: cannot write to {output} ({exc.strerror or exc})") from None
    return output


def is_ray_client(address: str | None) -> TypeGuard[str]:
    return address is not None and address.startswith("ray://")


def start_ray(options: RunOptions) -> bool:
    """Starts a local Ray or joins a cluster; returns True when this process started Ray."""
    import ray

    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": "WARNING"}
    if is_ray_client(options.address):
        # Tune's loop then runs in an actor on the head node: it gets Tune's settings only through the job's
        # environment, and its live table reaches this terminal only as a worker log. The INFO and WARNING
        # lines of Ray, Tune and the trials that a local driver hides (log levels, no worker logs) stay hidden,
        # the head's own session process included.
        env = {key: os.environ.get(key, value) for key, value in _TUNE_ENV.items()}
        common.update(
            log_to_driver=True,
            logging_level="ERROR",
            runtime_env={"env_vars": env},
            logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
        )
    if options.address:
        try:
            _join(options.address, common)
        except Exception as exc:
            hint = (
                "; a cluster with token authentication needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN here"
            )
            if is_ray_client(options.address):
                hint += (
                    "; ray:// needs the head's Ray Client server (ray start --head --ray-client-server-port "
                    "PORT, default 10001, with ray[client] installed there)"
                )
            raise UserError(
                f"--address: cannot join the Ray cluster at {options.address} ({one_line(exc)}){hint}"
            ) from None
        return True
    # An exposed Ray dashboard lets anyone run code on the cluster: keep it off on the embedded Ray.
    ray.init(num_cpus=options.num_cpus or os.cpu_count(), include_dashboard=False, **common)
    return True


def _join(address: str, init_args: dict[str, Any], client_attempts: int = 3) -> None:
    import ray

    for attempt in range(1, client_attempts + 1):
        try:
            ray.init(address=address, **init_args)
            return
        except ConnectionAbortedError:
            # The head's Ray Client proxy sometimes loses the server process it forks for a new session
            # (ray-project/ray#63202, Ray 2.60): a new session gets a new process. A wrong token or port is a
            # plain ConnectionError, not retried.
            if not is_ray_client(address) or attempt == client_attempts:
                raise
            print(
                f"sbn-study: the Ray Client server at {address} failed to start a session; trying again",
                file=sys.stderr,
                flush=True,
            )


def _check_ray_client(spec: StudySpec, uri: str, address: str) -> None:
    """With Ray Client, Tune's loop and its MLflow writes run on the cluster's head node, not on this machine."""
    if not is_remote_store(uri):
        raise UserError(
            f"tracking.uri: --address {address} runs the study on the cluster's head node, which needs an MLflow "
            f"server (--tracking-uri http://HOST:5000), not the local store {redact_uri(uri)}"
        )
    if spec.storage is None:
        raise UserError(
            f"storage: --address {address} keeps Tune's state on the cluster: set `storage:` in the spec to a path "
            "or URI the head node can write (e.g. /shared/sbn or s3://bucket/sbn), not the default <output>/ray"
        )


def _where_tune_runs(function: Callable[..., T], *args: Any) -> T:
    """Calls `function` here, or with Ray Client on the head node, where Tune's loop runs (Tune's own rule)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.util.client.ray.is_connected():
        return function(*args)
    # Through Ray Client, the current node is the one of the client server: the head.
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.get(ray.remote(num_cpus=0, scheduling_strategy=head)(function).remote(*args))


def _unreachable(uri: str) -> str | None:
    """check_reachable's refusal as text: an exception raised in a Ray task would come back as a traceback."""
    try:
        check_reachable(uri)
    except UserError as exc:
        return str(exc)
    return None


def _check_cluster(spec: StudySpec, uri: str) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need_cpu, need_gpu = spec.resources.cpu, spec.resources.gpu
    fits = [
        n
        for n in nodes
        if n["Resources"].get("CPU", 0) >= need_cpu and n["Resources"].get("GPU", 0) >= need_gpu
    ]
    if not fits:
        largest = max(nodes, key=lambda n: (n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0)))
        has_gpus = any(n["Resources"].get("GPU", 0) for n in nodes)
        what = "GPUs" if need_gpu > 0 and not has_gpus else "resources"
        raise UserError(
            f"resources: no node of the cluster has the {what} one trial needs "
            f"({_amount(need_cpu, 'CPU')}, {_amount(need_gpu, 'GPU')}; the largest node has "
            f"{_amount(largest['Resources'].get('CPU', 0), 'CPU')}, {_amount(largest['Resources'].get('GPU', 0), 'GPU')})"
        )
    if len(nodes) > 1 and not is_remote_store(uri):
        raise UserError(
            f"tracking.uri: a cluster of {len(nodes)} nodes needs an MLflow server (--tracking-uri http://HOST:5000), "
            f"not the local store {redact_uri(uri)}"
        )


def _amount(count: float, unit: str) -> str:
    return f"{count:g} {unit}{'' if count == 1 else 's'}"


def _load_state(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)  # atomic: a driver killed mid-write never leaves a broken state file


def run_study(spec: StudySpec, spec_text: str, options: RunOptions) -> StudyOutcome:
    output = prepare_output(options.output)
    uri = resolve_tracking_uri(options.tracking_uri, spec.tracking.uri, output)
    if is_ray_client(options.address):
        _check_ray_client(spec, uri, options.address)
    check_reachable(uri)
    state_file = state_path(output, spec.name)
    state = _load_state(state_file)
    if options.resume and (state is None or state["status"] == "finished"):
        raise UserError(f"--resume: study '{spec.name}' has no unfinished run in {output}")
    if not options.resume and state is not None and state["status"] != "finished":
        raise UserError(
            f"study '{spec.name}' has an unfinished run in {output} ({state['status']}); "
            "continue it with --resume, or give the study another name"
        )

    import ray  # before the store's thread starts: MLflow and Ray import modules in common (protobuf)

    preparing = None
    if options.address is None:
        # The store and the dataset are made ready while the embedded Ray starts. A cluster may still refuse a
        # local store, so there they wait for the cluster check.
        preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sbn-prepare").submit(
            _prepare, uri, spec.data
        )
    started_ray = start_ray(options)
    try:
        _check_cluster(spec, uri)
        if is_ray_client(options.address) and (unreachable := _where_tune_runs(_unreachable, uri)):
            raise UserError(
                f"{unreachable} from the cluster's head node, where --address ray://… runs the study"
            )
        dataset = preparing.result() if preparing else _prepare(uri, spec.data)
        # Only now, with every check passed: a refused study leaves no experiment behind.
        experiment_id = ensure_experiment(uri, spec.name, output / "artifacts")
        return _run(
            spec,
            spec_text,
            options,
            output,
            uri,
            experiment_id,
            dataset,
            state_file,
            state if options.resume else None,
        )
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _prepare(uri: str, data: DataConfig) -> ImageDataset:
    """The tracking store opened (MLflow's import and a fresh sqlite store's migrations: ≈ 2.5 s) and the
    dataset loaded: what the driver needs besides Ray. Raises UserError for a dataset that cannot be had."""
    from sbn_study.trial.data import load_dataset

    create_store(uri)
    return load_dataset(data)


def _run(
    spec: StudySpec,
    spec_text: str,
    options: RunOptions,
    output: Path,
    uri: str,
    experiment_id: str,
    dataset: ImageDataset,
    state_file: Path,
    state: dict[str, Any] | None,
) -> StudyOutcome:
    import ray.tune as tune

    from sbn_study.store.tracker import StudyTracker
    from sbn_study.tune.callbacks import ProgressTable, TrackingCallback
    from sbn_study.tune.search import StudySearch, make_scheduler
    from sbn_study.tune.trainable import run_trial

    for key, value in _TUNE_ENV.items():
        os.environ.setdefault(key, value)
    # Tune's warnings about the missing logger files would bury the live table as well.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines on creating a store
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per sampled trial otherwise
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, dataset=dataset),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    unsent = output / "studies" / f"{spec.name}.unsent.jsonl"

    if state is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        tracker = StudyTracker.start(uri, experiment_id, spec.name, f"{spec.name}-{stamp}", unsent)
        tracker.log_study_artifacts(study_artifacts(spec, spec_text))
        storage = spec.storage or str(output / "ray")
        state = {
            "status": "running",
            "parent_run_id": tracker.parent_run_id,
            "experiment_id": experiment_id,
            "tune_path": f"{storage.rstrip('/')}/{spec.name}-{stamp}",
            "tracking_uri": redact_uri(uri),
        }
        _write_state(state_file, state)
        saved = None
    else:
        tracker = StudyTracker.start(
            uri, state["experiment_id"], spec.name, "", unsent, parent_run_id=state["parent_run_id"]
        )
        state["status"] = "running"
        _write_state(state_file, state)
        saved = _where_tune_runs(_saved_trial_ids, state["tune_path"])
        # Runs of trials that Tune's saved state does not know would stay beside the replacements it samples.
        _drop_forgotten_trials(tracker, saved or set())
    if saved is None:
        if options.resume:
            print("sbn-study: the study stopped before Tune saved its first state; it starts over")
        storage, name = state["tune_path"].rstrip("/").rsplit("/", 1)
        tracking = TrackingCallback(spec, uri, state["experiment_id"], tracker.parent_run_id, unsent)
        tuner = tune.Tuner(
            trainable,
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
                callbacks=[tracking, ProgressTable(spec, options.progress_interval_s)],
                failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
            ),
        )
    else:
        tuner = tune.Tuner.restore(state["tune_path"], trainable, resume_unfinished=True, resume_errored=True)

    # Tune turns the first Ctrl-C into a graceful, checkpointed stop; a second one lands here.
    results = None
    with contextlib.suppress(KeyboardInterrupt):
        results = tuner.fit()
    # Tune's own view decides whether the study ended, so that an unreachable tracking server cannot.
    interrupted = results is None or results.num_terminated + results.num_errors < spec.search.num_samples
    try:
        _close_open_runs(tracker)
        trial_statuses, best = _trial_statuses(tracker), _best_trial(uri, spec, state["parent_run_id"])
    except Exception as exc:  # the tracking server is still away: the writes below are kept, not lost
        print(
            f"sbn-study: cannot read the study back from MLflow ({type(exc).__name__}); its writes are kept"
        )
        trial_statuses, best = {}, None
    status = "interrupted" if interrupted else "finished"
    tracker.finish_study("KILLED" if interrupted else "FINISHED")
    tracker.save_unsent()
    state["status"] = status
    # The callback and the driver both append what they could not send to this file.
    state["unsent_writes"] = len(unsent.read_text().splitlines()) if unsent.exists() else 0
    state["unsent_path"] = str(unsent)
    _write_state(state_file, state)
    return StudyOutcome(
        name=spec.name,
        status=status,
        tracking_uri=redact_uri(uri),
        experiment_id=state["experiment_id"],
        parent_run_id=state["parent_run_id"],
        tune_path=state["tune_path"],
        trial_statuses=trial_statuses,
        best=best,
        unsent_writes=state["unsent_writes"],
    )


def _drop_forgotten_trials(tracker: Any, known: set[str]) -> None:
    """Ends and deletes the runs of trials that a killed driver started after Tune's last saved state.

    Tune and the sampler resume from that state, which does not know those trials, and sample replacements:
    keeping their runs would leave the study with more runs than trials. (MLflow deletes softly: the runs
    stay recoverable from the store's deleted runs, ended as killed rather than running forever.)
    """
    forgotten = [run for run in _trial_runs(tracker) if run.data.tags.get("sbn.trial_id") not in known]
    for run in forgotten:
        if run.info.status == "RUNNING":
            tracker.client.set_tag(run.info.run_id, "sbn.status", "killed")
            tracker.client.set_terminated(run.info.run_id, status="KILLED")
        tracker.client.delete_run(run.info.run_id)
    if forgotten:
        print(
            f"sbn-study: {len(forgotten)} trial(s) started after the last saved state will be sampled again"
        )


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


def _close_open_runs(tracker: Any) -> None:
    """Marks the runs of trials stopped mid-way (Ctrl-C) as killed; `--resume` reopens and continues them."""
    for run in _trial_runs(tracker):
        if run.info.status == "RUNNING":
            tracker.client.set_tag(run.info.run_id, "sbn.status", "killed")
            tracker.client.set_terminated(run.info.run_id, status="KILLED")


def _trial_runs(tracker: Any) -> list[Any]:
    return list(
        tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'",
            max_results=10000,
        )
    )


def _trial_statuses(tracker: Any) -> dict[str, str]:
    return {
        run.data.tags.get("sbn.trial_id", run.info.run_id): run.data.tags.get("sbn.status", "?")
        for run in _trial_runs(tracker)
    }


def _best_trial(uri: str, spec: StudySpec, parent_run_id: str) -> dict[str, Any] | None:
    """The trial `sbn-study export` ranks first: the best value of the metric over its epochs, among the
    trials that completed or were stopped early."""
    import pandas as pd

    from sbn_study.protocol import RANKED_STATUSES
    from sbn_study.results.analysis import best_trials, trials

    table = trials(uri, spec.name, execution=parent_run_id)
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
