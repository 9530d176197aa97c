"""Safe by default: the UI and the embedded Ray bind to nothing but loopback, and credentials never reach
what a study records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest

from sbn_study.store.uri import redact_uri
from tests.servers import sbn_study_ui


def test_redact_uri_drops_user_info_from_every_uri_in_a_text() -> None:
    text = (
        "tracking:\n  uri: https://alice:s3cret@mlflow.example.com:5000/x\n"
        "storage: s3://AKIAKEY:topsecret@bucket/sbn\n"
        "root: sqlite:////data/a@b/mlflow.db\n"
        "contact: someone@example.com\n"
    )
    assert redact_uri(text) == (
        "tracking:\n  uri: https://mlflow.example.com:5000/x\n"
        "storage: s3://bucket/sbn\n"
        "root: sqlite:////data/a@b/mlflow.db\n"
        "contact: someone@example.com\n"
    )


def _listening_addresses(pid: int) -> set[str]:
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        conn.laddr.ip
        for process in processes
        for conn in process.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }


@pytest.mark.slow
def test_ui_serves_the_store_on_loopback_only(tmp_path: Path) -> None:
    log = tmp_path / "ui.log"
    with sbn_study_ui(tmp_path, log) as (process, port):
        assert log.read_text().startswith(
            f"MLflow UI for sqlite:///{tmp_path.resolve() / 'mlflow.db'} at http://127.0.0.1:{port}"
        )
        assert _listening_addresses(process.pid) == {"127.0.0.1"}


def test_embedded_ray_starts_without_a_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from sbn_study.study.cluster import ClusterTarget, start_ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert start_ray(ClusterTarget(num_cpus=2))
    assert calls and calls[0]["include_dashboard"] is False


def test_credentials_in_the_spec_never_reach_the_studys_artifacts() -> None:
    from sbn_study.spec import load_spec
    from sbn_study.study.lifecycle import study_artifacts
    from tests.conftest import QUICKSTART

    secret = "https://alice:s3cret@mlflow.example.com"
    text = (
        QUICKSTART.read_text() + f"\ntracking: {{uri: '{secret}'}}\nstorage: s3://KEY:TOPSECRET@bucket/sbn\n"
    )
    spec = load_spec(QUICKSTART, [f"tracking.uri={secret}", "storage=s3://KEY:TOPSECRET@bucket/sbn"])
    artifacts = study_artifacts(spec, text)
    assert set(artifacts) == {"spec.yaml", "resolved.yaml"}
    for name, content in artifacts.items():
        assert "s3cret" not in content and "TOPSECRET" not in content, name
        assert "https://mlflow.example.com" in content and "s3://bucket/sbn" in content, name
