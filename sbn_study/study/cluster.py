"""The Ray that `run` and `train` work on: an embedded local Ray or a joined cluster, and what is refused
before anything is scheduled on it (work no node can hold, a local store for several nodes, and what
Ray Client needs)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

from sbn_study.errors import UserError, one_line
from sbn_study.store.uri import PASSWORD_ENV, USERNAME_ENV, check_reachable, is_remote_store, redact_uri

T = TypeVar("T")

# Tune's CSV/JSON/TensorBoard loggers would write every feature statistic of every result a second time; MLflow
# is the record.
# No result files beside the study's own records, and Tune's classic output engine, which at verbose 0 prints
# nothing (the new one prints its configuration box whatever the verbosity).
TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0"}
# Ray's switch between a node of a cluster and a Ray of this machine alone (off by default on macOS, Windows).
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class ClusterTarget:
    address: str | None = None  # None: an embedded local Ray; else auto, HOST:PORT or ray://HOST:PORT
    num_cpus: int | None = None  # local Ray only; None = all of the machine's
    verbose: bool = False  # Ray's INFO and WARNING lines and the workers' output on this terminal


def is_ray_client(address: str | None) -> TypeGuard[str]:
    return address is not None and address.startswith("ray://")


def import_ray(target: ClusterTarget) -> Any:
    """Ray, imported for `target`. An embedded Ray serves this machine alone, yet on Linux Ray gives its node
    the machine's routable address, and its GCS, raylet and workers then listen on every interface (whoever
    reaches them can run code here). Told that it is no cluster, as on macOS and Windows, Ray takes 127.0.0.1
    and listens there alone. It reads that when first imported, and its processes inherit it: so it is set
    before Ray's first import, and only then (a process that imported Ray before keeps Ray's own choice)."""
    if target.address is None and "ray" not in sys.modules:
        os.environ[CLUSTER_ENV] = "0"
    import ray

    return ray


def start_ray(target: ClusterTarget) -> bool:
    """Starts a local Ray or joins a cluster; returns True when this process started Ray."""
    ray = import_ray(target)
    if ray.is_initialized():
        return False
    # ray.init installs a SIGTERM handler that exits on the spot, in the middle of Tune (an abort, exit 134,
    # with runs left open): a handler the caller installed (the CLI's, which stops as Ctrl-C does) is put back.
    caller_handler = signal.getsignal(signal.SIGTERM)
    try:
        return _start_ray(target)
    finally:
        if callable(caller_handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, caller_handler)


def _start_ray(target: ClusterTarget) -> bool:
    import ray

    # Quiet unless asked: Ray's notices (token authentication, resources) would scroll the live view away.
    common: dict[str, Any] = {
        "log_to_driver": target.verbose,
        "configure_logging": True,
        "logging_level": "INFO" if target.verbose else "ERROR",
    }
    if is_ray_client(target.address):
        # Tune's loop then runs in an actor on the head node: it gets Tune's settings only through the job's
        # environment, and its live table reaches this terminal only as a worker log. The INFO and WARNING
        # lines of Ray, Tune and the trials that a local driver hides (log levels, no worker logs) stay hidden,
        # the head's own session process included.
        env = {key: os.environ.get(key, value) for key, value in TUNE_ENV.items()}
        # The trials' MLflow writes are made there too, with the tracking server's credentials.
        env.update((key, os.environ[key]) for key in (USERNAME_ENV, PASSWORD_ENV) if key in os.environ)
        common.update(
            log_to_driver=True,
            logging_level="ERROR",
            runtime_env={"env_vars": env},
            logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
        )
    if target.address:
        try:
            _join(target.address, common)
        except Exception as exc:
            hint = (
                "; a cluster with token authentication needs RAY_AUTH_MODE=token and its RAY_AUTH_TOKEN here"
            )
            if is_ray_client(target.address):
                hint += (
                    "; ray:// needs the head's Ray Client server (ray start --head --ray-client-server-port "
                    "PORT, default 10001, with ray[client] installed there)"
                )
            raise UserError(
                f"--address: cannot join the Ray cluster at {target.address} ({one_line(exc)}){hint}"
            ) from None
        return True
    # An exposed Ray dashboard lets anyone run code on the cluster: keep it off on the embedded Ray.
    with _started_in_a_process_group_of_their_own():
        ray.init(num_cpus=target.num_cpus or os.cpu_count(), include_dashboard=False, **common)
    return True


def embedded_ray_processes() -> dict[str, int]:
    """The GCS and raylet of the Ray this process started (name → pid): its children of those names."""
    import psutil

    found = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if (name := child.name()) in ("gcs_server", "raylet"):
                found[name] = child.pid
    return found


@contextlib.contextmanager
def _started_in_a_process_group_of_their_own() -> Iterator[None]:
    """The processes started meanwhile (the embedded Ray's) get a process group of their own. A signal to the
    driver's group (`timeout`, `kill -TERM -- -PGID`) then reaches the driver, not Ray under it: the study stops
    as after Ctrl-C and then stops Ray, instead of Tune losing Ray midway (runs left open, the driver ended by
    Ray's abort a minute later). A driver that leads its group (a shell's job) cannot, and leaves them in it."""
    group = os.getpgrp()
    moved = False
    if group != os.getpid():
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
            moved = True
    try:
        yield
    finally:
        if moved:
            with contextlib.suppress(OSError):  # the group is gone: its signals cannot come
                os.setpgid(0, group)


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


def check_fits(cpu: float, gpu: float, option: str, unit: str) -> None:
    """Ray would wait forever for work that no node can hold: refuse it, naming the `option` that asks for
    `cpu` CPUs and `gpu` GPUs per `unit` (a trial, a seed)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        return
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
    what = "GPUs" if gpu > 0 and not any(n.get("GPU", 0) for n in nodes) else "resources"
    raise UserError(
        f"{option}: no node of the cluster has the {what} one {unit} needs "
        f"({_amount(cpu, 'CPU')}, {_amount(gpu, 'GPU')}; the largest node has "
        f"{_amount(largest.get('CPU', 0), 'CPU')}, {_amount(largest.get('GPU', 0), 'GPU')})"
    )


def _amount(count: float, unit: str) -> str:
    return f"{count:g} {unit}{'' if count == 1 else 's'}"


def check_store_serves_every_node(uri: str) -> None:
    """Trials on several nodes report to a driver that a local store of one machine cannot follow around."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and not is_remote_store(uri):
        raise UserError(
            f"tracking.uri: a cluster of {nodes} nodes needs an MLflow server (--tracking-uri http://HOST:5000), "
            f"not the local store {redact_uri(uri)}"
        )


def check_ray_client(address: str, uri: str, storage: str | None) -> None:
    """With Ray Client, Tune's loop and its MLflow writes run on the cluster's head node, not on this machine."""
    if not is_remote_store(uri):
        raise UserError(
            f"tracking.uri: --address {address} runs the study on the cluster's head node, which needs an MLflow "
            f"server (--tracking-uri http://HOST:5000), not the local store {redact_uri(uri)}"
        )
    if storage is None:
        raise UserError(
            f"storage: --address {address} keeps Tune's state on the cluster: set `storage:` in the spec to a path "
            "or URI the head node can write (e.g. /shared/sbn or s3://bucket/sbn), not the default <output>/ray"
        )


def check_reachable_from_head(uri: str) -> None:
    """Through Ray Client the trials' writes are made on the head node: the store must answer there."""
    if unreachable := where_tune_runs(_unreachable, uri):
        raise UserError(f"{unreachable} from the cluster's head node, where --address ray://… runs the study")


def _unreachable(uri: str) -> str | None:
    """check_reachable's refusal as text: an exception raised in a Ray task would come back as a traceback."""
    try:
        check_reachable(uri)
    except UserError as exc:
        return str(exc)
    return None


def where_tune_runs(function: Callable[..., T], *args: Any) -> T:
    """Calls `function` here, or with Ray Client on the head node, where Tune's loop runs (Tune's own rule)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.util.client.ray.is_connected():
        return function(*args)
    # Through Ray Client, the current node is the one of the client server: the head.
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.get(ray.remote(num_cpus=0, scheduling_strategy=head)(function).remote(*args))
