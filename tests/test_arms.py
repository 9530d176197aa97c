"""The arms of a final training: the recipe's base values for what the search tuned, the user's exceptions,
the search's seeds, and every refusal before anything trains (a study made by hand in a sqlite store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sbn_study.errors import UserError
from sbn_study.final.arms import ArmRequest, plan_arms
from sbn_study.results.export import FinalConfig
from sbn_study.spec import load_spec
from tests.conftest import QUICKSTART

TUNED = ("norm.momentum", "norm.eps", "norm.fft_norm", "train.weight_decay", "train.lr")
BASE = {"norm.momentum": 0.1, "norm.eps": 1e-5, "norm.fft_norm": "backward", "train.weight_decay": 5e-4}
BASE |= {"train.lr": 0.05}


@pytest.fixture(scope="module")
def study_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An execution of the quick-start study (which searches placement and the five TUNED keys) with two
    trials that trained with seeds 11 and 3, as the tracker records them."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("sbn-quickstart")
    parent = client.create_run(experiment_id, tags={"sbn.kind": "study"}).info.run_id
    client.log_text(
        parent,
        yaml.safe_dump(load_spec(QUICKSTART).model_dump(mode="json"), sort_keys=False),
        "resolved.yaml",
    )
    for trial, seed in (("t0", 11), ("t1", 3)):
        tags = {"mlflow.parentRunId": parent, "sbn.trial_id": trial}
        run = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_param(run, "train.seed", str(seed))
    return uri


def exported(uri: str, **provenance: Any) -> FinalConfig:
    """The quick-start's base configuration with the values a search tuned for SBN, exported from `uri`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sbn-quickstart")
    execution = experiment and client.search_runs([experiment.experiment_id], "tags.`sbn.kind` = 'study'")
    document = load_spec(QUICKSTART).base_config().model_dump(mode="json")
    document["norm"] |= {"momentum": 0.3, "eps": 1e-3, "fft_norm": "ortho"}
    document["train"] |= {"weight_decay": 2e-5, "lr": 0.1}
    document["provenance"] = {
        "study": "sbn-quickstart",
        "execution": execution[0].info.run_id if execution else "gone",
        "trial_id": "t0",
        "run_id": "r",
        "tracking_uri": uri,
        "status": "completed",
        "rank": 1,
        "metric": "val_acc",
        "mode": "max",
        "value": 0.9,
        "epoch": 8,
        "epochs_run": 8,
        "budget": 8,
        "full_budget": True,
        **provenance,
    }
    return FinalConfig.model_validate(document)


def values(config: Any) -> dict[str, Any]:
    return {key: getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) for key in TUNED}


def test_arms_take_the_recipes_base_values_of_what_the_search_tuned(study_store: str) -> None:
    config = exported(study_store)
    plan = plan_arms(config, ArmRequest(("bn", "2bn", "scale")), "sqlite:///elsewhere.db")
    assert list(plan.arms) == ["config", "bn", "2bn", "scale"]
    assert plan.labels == {"config": "sbn23", "bn": "bn", "2bn": "2bn23", "scale": "scale23"}
    assert (plan.stated, plan.origin) == (TUNED, "recipe")
    assert values(plan.arms["config"]) == values(config)
    for arm in ("bn", "2bn", "scale"):
        assert values(plan.arms[arm]) == BASE, arm
        assert plan.arms[arm].norm.kind == arm
    assert plan.arms["bn"].norm.placement == "none" and plan.arms["scale"].norm.placement == "23"
    # What does not act is said so: plain BN reads no norm.* setting, 2bn has no FFT norm.
    assert plan.values("bn") == {"norm.momentum": None, "norm.eps": None, "norm.fft_norm": None} | {
        "train.weight_decay": 5e-4,
        "train.lr": 0.05,
    }
    assert plan.values("2bn")["norm.fft_norm"] is None and plan.values("scale")["norm.fft_norm"] == "backward"
    # The seeds come from the trials when the export predates them in the provenance.
    assert plan.search_seeds == (3, 11) and plan.default_seeds == (12, 13, 14, 15, 16)


def test_the_user_keeps_the_tuned_values_or_sets_others(study_store: str) -> None:
    config = exported(study_store, search_seeds=[0])
    kept = plan_arms(config, ArmRequest(("2bn",), keep_tuned=True), study_store)
    assert values(kept.arms["2bn"]) == values(config) and kept.origin == "config"
    assert kept.default_seeds == (1, 2, 3, 4, 5)
    request = ArmRequest(("2bn",), values=("train.lr=0.02", "norm.affine=false", "train.label_smoothing=0.1"))
    chosen = plan_arms(config, request, study_store)
    arm = chosen.arms["2bn"]
    assert (arm.train.lr, arm.norm.affine, arm.train.label_smoothing, arm.norm.eps) == (
        0.02,
        False,
        0.1,
        1e-5,
    )
    assert chosen.stated == (*TUNED, "norm.affine", "train.label_smoothing")
    assert chosen.note.endswith("--arm-set train.lr=0.02, norm.affine=False, train.label_smoothing=0.1")
    # Every arm trains the config's budget, whatever --set changed in it.
    assert arm.train.epochs == config.train.epochs


def test_a_hand_written_config_gives_the_arms_its_own_values() -> None:
    config = FinalConfig.model_validate({"model": {"arch": "tiny"}, "norm": {"placement": "3", "eps": 1e-3}})
    plan = plan_arms(config, ArmRequest(("sbn_nospike",)), "sqlite:///unused.db")
    assert plan.origin == "hand-written" and plan.search_seeds is None
    assert plan.arms["sbn_nospike"].norm.eps == 1e-3 and plan.default_seeds == (0, 1, 2, 3, 4)
    assert plan.stated == ("norm.momentum", "norm.eps", "norm.fft_norm", "train.weight_decay")


@pytest.mark.parametrize(
    ("kinds", "settings", "expected"),
    [
        (("bn", "nope"), (), "arm nope: norm.kind: expected one of 2bn, bgn, bn,"),
        (("sbn",), (), "--arms sbn: that is the config itself (same kind, same values)"),
        (("bn",), ("lr=1",), "--arm-set lr=1: expected KEY=VALUE with a key of the trial configuration"),
        (
            ("bn",),
            ("train.epochs=2",),
            "--arm-set train.epochs=2: every arm shares train.epochs with the config",
        ),
        (("bn",), ("norm.eps=[1",), "--arm-set norm.eps=[1: the value is not valid YAML"),
        (("bn",), ("norm.eps=-1",), "arm bn: norm.eps: must be > 0, got -1"),
        (
            ("bnscale",),
            ("norm.affine=false",),
            "arm bnscale: norm.affine: norm.kind bnscale needs norm.affine: true",
        ),
    ],
)
def test_arms_are_refused_before_anything_trains(
    kinds: tuple[str, ...], settings: tuple[str, ...], expected: str
) -> None:
    config = FinalConfig.model_validate({"model": {"arch": "tiny"}, "norm": {"placement": "3"}})
    with pytest.raises(UserError) as error:
        plan_arms(config, ArmRequest(kinds, values=settings), "sqlite:///unused.db")
    assert str(error.value).startswith(expected), str(error.value)


def test_a_config_without_sites_or_whose_study_is_gone(tmp_path: Path) -> None:
    plain = FinalConfig.model_validate({"model": {"arch": "tiny"}, "norm": {"placement": "none"}})
    with pytest.raises(UserError, match=r"norm\.placement none, so it already is the plain-BN baseline"):
        plan_arms(plain, ArmRequest(("bn",)), "sqlite:///unused.db")
    gone = exported(f"sqlite:///{tmp_path / 'gone.db'}")
    with pytest.raises(UserError, match=r"--arms: cannot read study 'sbn-quickstart' .*--arms-keep-tuned"):
        plan_arms(gone, ArmRequest(("bn",)), "sqlite:///unused.db")
    # Kept values need no study; its seeds are then unknown, which is said.
    plan = plan_arms(gone, ArmRequest(("bn",), keep_tuned=True), "sqlite:///unused.db")
    (warning,) = plan.warnings
    assert warning.startswith("the search's seeds are unknown (cannot read study 'sbn-quickstart'")
    assert plan.search_seeds is None and plan.default_seeds == (0, 1, 2, 3, 4)
