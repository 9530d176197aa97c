"""Where a study's MLflow store is, and what may be said of its URI: resolution order, the stores MLflow keeps
runs in, credentials (redacted from every text, carried by MLflow's own variables), reachability. No MLflow
import: the CLI and the spec checks use these before anything heavy starts."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sbn_study.errors import UserError

# The stores MLflow keeps runs in (its tracking-store registry, `file:` aside): SQLAlchemy databases, with an
# optional driver (postgresql+psycopg2://), and servers. Any other scheme fails deep inside MLflow's first call.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks")
# MLflow's basic-auth credentials for a tracking server, read on every request.
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def resolve_optuna_storage(spec_storage: str | None, output: Path, head_storage: str | None = None) -> str:
    """The database of the sampler's Optuna study: `tracking.optuna_storage`, else sqlite beside the default
    MLflow store (`<output>/optuna.db`). `head_storage`: Tune's `storage:` when the sampler runs on a Ray
    Client's head node, where this machine's output folder is not; the default is then a sqlite in it."""
    where = "tracking.optuna_storage"
    if spec_storage:
        if urlsplit(spec_storage).scheme.lower().split("+")[0] not in DATABASE_SCHEMES:
            raise UserError(
                f"{where}: Optuna keeps a study in a database ({', '.join(DATABASE_SCHEMES)}; e.g. "
                f"sqlite:///PATH/optuna.db or postgresql+psycopg://USER@HOST/DB), got {redact_uri(spec_storage)}"
            )
        return spec_storage
    if head_storage is None:
        return f"sqlite:///{(output / 'optuna.db').resolve()}"
    if "://" in head_storage:
        raise UserError(
            f"{where}: --address ray://… runs the sampler on the cluster's head node, which cannot keep its "
            f"sqlite database in {redact_uri(head_storage)}: set a database this machine and the head both reach "
            "(postgresql+psycopg://USER@HOST/DB)"
        )
    return f"sqlite:///{Path(head_storage) / 'optuna.db'}"


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None, output: Path) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the spec's tracking.uri, then sqlite under the output."""
    for source, uri in (
        ("--tracking-uri", cli_uri),
        ("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")),
        ("tracking.uri", spec_uri),
    ):
        if uri:
            _check_scheme(source, uri)
            return uri
    return default_tracking_uri(output)


def _check_scheme(source: str, uri: str) -> None:
    scheme = urlsplit(uri).scheme.lower()
    # MLflow 3 refuses new runs in a plain folder (its file store is in maintenance mode), deep inside the
    # first call; a Windows drive letter parses as a one-letter scheme.
    if len(scheme) <= 1 or scheme == "file":
        raise UserError(
            f"{source}: MLflow does not keep runs in a plain folder; give a database "
            f"(sqlite:///PATH/mlflow.db) or a server (http://HOST:5000), got {redact_uri(uri)}"
        )
    if scheme.split("+")[0] not in DATABASE_SCHEMES + SERVER_SCHEMES:
        raise UserError(
            f"{source}: MLflow keeps no runs at {redact_uri(uri)}: a tracking URI is a database "
            f"({', '.join(DATABASE_SCHEMES)}; e.g. sqlite:///PATH/mlflow.db) or a server "
            f"({', '.join(SERVER_SCHEMES)}; e.g. http://HOST:5000), not {scheme}://"
        )


# scheme://user:password@ — the user info of any URI, wherever it stands in a text. It runs from `://` (when an
# authority follows: not `/`) to the LAST `@` before whitespace: a password may hold `/`, `?`, `#` or `@`
# unescaped (AWS secret keys hold `/`), so the first of those cannot be where it ends. Everything up to that
# `@` goes: in a URI whose path holds an `@` too, a redacted text also loses the path before it, never a secret.
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?!/)\S*@")


def redact_uri(text: str) -> str:
    """Drops user:password@ from every URI in `text` (one URI, or a whole spec), so that credentials never
    reach logged params, tags, artifacts or messages."""
    return _USER_INFO.sub(r"\g<scheme>", text)


def _split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """`uri` without its user info, and the user and password in it (percent-decoded; None when absent)."""
    found = _USER_INFO.match(uri)
    if found is None:
        return uri, None, None
    user, _, password = found.group(0)[len(found["scheme"]) : -1].partition(":")
    return found["scheme"] + uri[found.end() :], unquote(user), unquote(password)


def use_server_credentials(uri: str) -> str:
    """An http(s) URI without its user:password@, which this process (and every process it starts) sends from
    now on as MLflow does its own MLFLOW_TRACKING_USERNAME/PASSWORD: as basic auth on every request. So no
    object that is pickled (Tune's state), logged or shown carries them. Other URIs come back unchanged (a
    database URI's password is its driver's, which reads it from the URI alone)."""
    if urlsplit(uri).scheme.lower() not in ("http", "https"):
        return uri
    bare, user, password = _split_credentials(uri)
    if user is not None:
        os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = user, password or ""
    return bare


def is_remote_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fails before anything starts when an HTTP tracking server does not answer, sending the credentials
    MLflow would send: those in the URI, else MLFLOW_TRACKING_USERNAME/PASSWORD."""
    if not is_remote_store(uri) or uri.startswith("databricks"):
        return
    import urllib.request

    bare, user, password = _split_credentials(uri)
    if user is None:
        user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"tracking.uri: cannot reach the MLflow server at {redact_uri(uri)} ({reason})"
        ) from None
