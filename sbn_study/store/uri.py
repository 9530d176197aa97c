"""Where a study's MLflow store is, and what may be said of its URI: resolution order, credential redaction,
reachability. No MLflow import: the CLI and the spec checks use these before anything heavy starts."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from sbn_study.errors import UserError


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{(output / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cli_uri: str | None, spec_uri: str | None, output: Path) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the spec's tracking.uri, then sqlite under the output."""
    for source, uri in (
        ("--tracking-uri", cli_uri),
        ("MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI")),
        ("tracking.uri", spec_uri),
    ):
        if uri:
            # MLflow 3 refuses new runs in a plain folder (its file store is in maintenance mode), deep inside
            # the first call; a Windows drive letter parses as a one-letter scheme.
            if len(urlsplit(uri).scheme) <= 1 or uri.startswith("file:"):
                raise UserError(
                    f"{source}: MLflow does not keep runs in a plain folder; give a database "
                    f"(sqlite:///PATH/mlflow.db) or a server (http://HOST:5000), got {redact_uri(uri)}"
                )
            return uri
    return default_tracking_uri(output)


# scheme://user:password@ — the user-info part of any URI, wherever it stands in a text.
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s'\"]*@")


def redact_uri(text: str) -> str:
    """Drops user:password@ from every URI in `text` (one URI, or a whole spec), so that credentials never
    reach logged params, tags, artifacts or messages."""
    return _USER_INFO.sub(r"\g<scheme>", text)


def is_remote_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https", "databricks")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fails before anything starts when an HTTP tracking server does not answer."""
    if not is_remote_store(uri) or uri.startswith("databricks"):
        return
    import urllib.request

    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"tracking.uri: cannot reach the MLflow server at {redact_uri(uri)} ({reason})"
        ) from None
