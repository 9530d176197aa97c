"""What a study checks and keeps before Tune starts, without a Ray cluster: the state `--resume` reads, and
the refusals of work no node can hold or a store the nodes cannot share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sbn_study.errors import UserError
from sbn_study.study import cluster
from sbn_study.study.state import StudyState, state_path

# A state file as the driver writes it when a study starts: what an older sbn-study left on disk too.
STARTED = {
    "status": "running",
    "parent_run_id": "0123abcd",
    "experiment_id": "1",
    "tune_path": "/data/sbn/ray/e2e-small-20250101-120000",
    "tracking_uri": "sqlite:////data/sbn/mlflow.db",
}


def test_a_state_file_keeps_its_fields_through_load_and_save(tmp_path: Path) -> None:
    path = state_path(tmp_path, "e2e-small")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(STARTED, indent=2))
    state = StudyState.load(path)
    assert state is not None and state.status == "running"
    assert state.tune_storage_and_name == ("/data/sbn/ray", "e2e-small-20250101-120000")
    state.save(path)
    assert json.loads(path.read_text()) == STARTED

    state.status, state.unsent_writes, state.unsent_path = "finished", 0, "/data/sbn/studies/x.unsent.jsonl"
    state.save(path)
    assert StudyState.load(path) == state
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed, not left
    assert StudyState.load(state_path(tmp_path, "another")) is None


def alive(cpu: float, gpu: float = 0.0) -> dict[str, Any]:
    return {"Alive": True, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


@pytest.fixture
def nodes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The nodes `ray.nodes()` reports: a node with 2 CPUs, and a dead one that had GPUs."""
    import ray

    found = [alive(2.0), {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 4.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: found)
    return found


def test_work_no_node_can_hold_is_refused_naming_the_option_that_asked_for_it(
    nodes: list[dict[str, Any]],
) -> None:
    cluster.check_fits(2, 0, "resources", "trial")
    refusals = [
        (
            (1, 1, "resources", "trial"),
            "resources: no node of the cluster has the GPUs one trial needs (1 CPU, 1 GPU; the largest node has "
            "2 CPUs, 0 GPUs)",
        ),
        (
            (64, 0, "resources", "trial"),
            "resources: no node of the cluster has the resources one trial needs (64 CPUs, 0 GPUs; the largest "
            "node has 2 CPUs, 0 GPUs)",
        ),
        (
            (1, 0.5, "--cpus-per-seed/--gpus-per-seed", "seed"),
            "--cpus-per-seed/--gpus-per-seed: no node of the cluster has the GPUs one seed needs (1 CPU, 0.5 "
            "GPUs; the largest node has 2 CPUs, 0 GPUs)",
        ),
    ]
    for arguments, message in refusals:
        with pytest.raises(UserError) as caught:
            cluster.check_fits(*arguments)
        assert str(caught.value) == message
    nodes.append(alive(1.0, 1.0))
    cluster.check_fits(1, 1, "resources", "trial")
    with pytest.raises(
        UserError, match=r"has the resources one trial needs .* largest node has 1 CPU, 1 GPU\)$"
    ):
        cluster.check_fits(2, 1, "resources", "trial")


def test_a_local_store_is_refused_for_a_cluster_of_several_nodes(nodes: list[dict[str, Any]]) -> None:
    cluster.check_store_serves_every_node("sqlite:////data/mlflow.db")
    nodes.append(alive(2.0))
    cluster.check_store_serves_every_node("http://mlflow:5000")
    with pytest.raises(UserError, match=r"^tracking\.uri: a cluster of 2 nodes needs an MLflow server"):
        cluster.check_store_serves_every_node("sqlite:////data/mlflow.db")


def test_ray_client_needs_a_server_and_shared_storage() -> None:
    address = "ray://head:10001"
    cluster.check_ray_client(address, "http://mlflow:5000", "/shared/sbn")
    with pytest.raises(UserError, match=r"^tracking\.uri: --address ray://head:10001 runs the study on the"):
        cluster.check_ray_client(address, "sqlite:////data/mlflow.db", "/shared/sbn")
    with pytest.raises(UserError, match=r"^storage: --address ray://head:10001 keeps Tune's state"):
        cluster.check_ray_client(address, "http://mlflow:5000", None)
