"""Real servers for the cluster tests: an `mlflow server` and a 2-node Ray cluster, each in its own processes.

Everything here runs in subprocesses started in their own sessions, so the test process never joins these
clusters: the session-wide local Ray of the other tests (tests/conftest.py `ray_session`) is never touched,
and teardown kills exactly the process trees started here, by pid (never `ray stop`, which would end every
Ray on the machine).

`postgres` starts a throwaway PostgreSQL cluster (initdb, pg_ctl: Debian's `postgresql` package, never the
system service) in a temp folder, on a loopback port with a random password that only the environment
(PGPASSWORD) carries: the backend of the MLflow server and the Optuna storage in the cluster tests.

Run as a script, `python tests/servers.py nodes ADDRESS N TIMEOUT_S` prints the alive nodes of a cluster as
JSON once it has N of them (the test process must not `ray.init` into a second cluster itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    # Free on every interface: Ray binds some of its ports to all of them.
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def kill_tree(process: subprocess.Popen | None, sig: int = signal.SIGKILL, grace_s: float = 5.0) -> None:
    """Ends a process started with `start_new_session=True` and everything it started.

    Its process group goes first; descendants that left the group (Ray workers start their own groups)
    are found beforehand and killed by pid.
    """
    if process is None:
        return
    import psutil

    descendants = []
    # Once reaped, its pid may belong to another process: only its group (kept alive by members) is safe.
    if process.poll() is None:
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(process.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
    if sig != signal.SIGKILL:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    psutil.wait_procs(descendants, timeout=grace_s)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL could be started here; the message says why."""


# Set where PostgreSQL must be there (CI installs it): a missing one then fails the tests instead of skipping.
REQUIRE_POSTGRES_ENV = "SBN_REQUIRE_POSTGRES"


def _postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL binaries (the newest version), else of those on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    if found is None:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on PATH): "
            "apt-get install postgresql"
        )
    return Path(found).parent


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of its own in a temp folder, on a loopback port (no Unix socket), with one
    password-protected superuser and a database per `databases`. As root it runs as `nobody`, since initdb and
    postgres refuse to run as root."""

    databases: tuple[str, ...] = ("mlflow", "optuna")
    user: str = "sbn"
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    root: Path | None = None

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` (psycopg 3), without the password: libpq reads PGPASSWORD."""
        return f"postgresql+psycopg://{self.user}@{HOST}:{self.port}/{database}"

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def _run(self, *command: str | Path, timeout_s: float = 120.0) -> None:
        as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*as_user, *map(str, command)],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.root,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{Path(command[0]).name} failed: {(result.stderr or result.stdout)[-2000:]}"
            )

    def start(self) -> None:
        binaries = _postgres_bin()
        # Not pytest's tmp_path: its parents are closed to the unprivileged user the server runs as.
        self.root = Path(tempfile.mkdtemp(prefix="sbn-pg-"))
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser is missing: initdb refuses root")
            shutil.chown(self.root, "nobody")
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(password_file, "nobody")
        data = self.root / "data"
        self._run(
            binaries / "initdb",
            "-D",
            data,
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--no-sync",
        )
        password_file.unlink()
        options = f"-p {self.port} -c listen_addresses={HOST} -c unix_socket_directories='' -c fsync=off"
        self._run(
            binaries / "pg_ctl", "-D", data, "-o", options, "-l", self.root / "server.log", "-w", "start"
        )
        for database in self.databases:
            self._run(binaries / "createdb", "-h", HOST, "-p", str(self.port), "-U", self.user, database)

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(PostgresUnavailable, subprocess.TimeoutExpired):
                self._run(
                    _postgres_bin() / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", timeout_s=60
                )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    """A started PostgresServer, removed afterwards; PostgresUnavailable (with the reason) if none starts."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class MlflowServer:
    """`mlflow server` on a loopback port over a store in `root` (sqlite there, or `backend_uri` with the
    variables in `env`, e.g. a PostgresServer's database); stop() and start() keep both."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0
    backend_uri: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    def start(self, wait: bool = True, timeout_s: float = 120.0) -> None:
        """Starts the server (on the same port and store as before, after a stop) and waits for /health."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        env = {
            **os.environ,
            # The job runner and its huey consumers are seven more processes and seconds of start-up,
            # for a feature a study never uses.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **self.env,
        }
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri or f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        if wait:
            self.wait_healthy(timeout_s)

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        assert self.process is not None, "the server was not started"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{_tail(self.log)}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{_tail(self.log)}")

    def healthy(self) -> bool:
        return _answers(f"{self.uri}/health")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM lets it finish; SIGKILL is a crash (the store stays consistent: sqlite journals)."""
        kill_tree(self.process, sig)
        self.process = None
        # Until the port answers nothing, a client could still reach the dying server.
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def sbn_study_ui(output: Path, log: Path, timeout_s: float = 120.0) -> Iterator[tuple[subprocess.Popen, int]]:
    """`sbn-study ui` on the store in `output`, on a free port, its output in `log`: (process, port) once it
    answers /health; its whole process tree ends afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "sbn_study.cli", "ui", "--output", str(output), "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(f"http://{HOST}:{port}/health"):
            assert process.poll() is None, _tail(log)
            assert time.monotonic() < deadline, _tail(log)
            time.sleep(0.5)
        yield process, port
    finally:
        kill_tree(process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class RayNode:
    process: subprocess.Popen
    temp_dir: Path
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None


class RayCluster:
    """A Ray head and worker nodes on this machine, each a `ray start --block` in its own session.

    Every node keeps its own --temp-dir and ports, so it shares nothing with another Ray on the machine.
    (Ray gives nodes the machine's routable IP even when told 127.0.0.1; clients may still join through
    127.0.0.1:PORT.) Token authentication is on with a token of this cluster: Ray >= 2.59 turns it on
    by itself for `ray start --head` when ~/.ray/auth_token exists (and `ray.init()` writes that file),
    while a client joining an explicit address never turns it on by itself. Every process of the cluster
    and every client therefore needs `env` (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # Ray's sockets live in its temp dir and a socket path may not exceed 107 bytes: pytest's tmp_path
        # is too deep for that.
        self.temp_root = Path(tempfile.mkdtemp(prefix="sbn-ray-"))
        self.port = free_port()
        # Its own Ray Client server port: the default 10001 would clash between clusters on one machine.
        self.client_port = free_port()
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        self.env = cluster_env(secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://{HOST}:{self.client_port}"

    def _start(self, name: str, args: list[str], timeout_s: float) -> RayNode:
        temp_dir = self.temp_root / name
        log = self.root / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=1",
            *args,
        ]
        with log.open("w") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )
        node = RayNode(process, temp_dir, log)
        deadline = time.monotonic() + timeout_s
        while "This command will now block" not in _tail(log, 100_000):
            if process.poll() is not None or time.monotonic() > deadline:
                kill_tree(process)
                raise RuntimeError(f"ray start ({name}) failed or timed out:\n{_tail(log)}")
            time.sleep(0.3)
        return node

    def start_head(self, timeout_s: float = 90.0) -> None:
        self.head = self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                f"--ray-client-server-port={self.client_port}",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ],
            timeout_s,
        )

    def add_node(self, timeout_s: float = 90.0) -> RayNode:
        node = self._start(f"worker{len(self.workers) + 1}", [f"--address={self.address}"], timeout_s)
        self.workers.append(node)
        return node

    def nodes(self, count: int, timeout_s: float = 60.0) -> list[dict]:
        """The alive nodes once there are `count` of them, asked from a separate client process."""
        result = subprocess.run(
            [sys.executable, __file__, "nodes", self.address, str(count), str(timeout_s)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s + 60,
            cwd=REPO,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cannot list the nodes of {self.address}:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def kill_node(self, node: RayNode) -> None:
        """The node leaves as a lost machine would: no goodbye to the head, its processes gone at once."""
        kill_tree(node.process, signal.SIGKILL)

    def shutdown(self) -> None:
        # Nothing of a test cluster needs a graceful end; SIGTERM would cost seconds per node.
        for node in [*self.workers, self.head]:
            if node is not None:
                kill_tree(node.process, signal.SIGKILL)
        shutil.rmtree(self.temp_root, ignore_errors=True)


def cluster_env(token: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # The test process's own Ray settings (a session Ray's address, its token file) must not leak in.
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # A lost node is declared dead after ~3 s instead of ~30 s, so its trials move on sooner.
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@contextlib.contextmanager
def ray_cluster(root: Path, workers: int = 1) -> Iterator[RayCluster]:
    cluster = RayCluster(root)
    try:
        cluster.start_head()
        for _ in range(workers):
            cluster.add_node()
        yield cluster
    finally:
        cluster.shutdown()


def _print_nodes(address: str, count: int, timeout_s: float) -> int:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if len(nodes) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(
            json.dumps(
                [
                    {
                        "node_id": n["NodeID"],
                        "head": "node:__internal_head__" in n["Resources"],
                        "cpus": n["Resources"].get("CPU", 0),
                    }
                    for n in nodes
                ]
            )
        )
        return 0 if len(nodes) >= count else 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "nodes":
        raise SystemExit(_print_nodes(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    raise SystemExit(f"usage: {sys.argv[0]} nodes ADDRESS COUNT TIMEOUT_S")
