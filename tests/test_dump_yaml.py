"""What the tool writes as YAML (exports, config artifacts) reads back through the spec loader unchanged."""

from __future__ import annotations

import pytest

from sbn_study.results.export import FinalConfig, load_final_config
from sbn_study.spec.loader import dump_yaml


@pytest.mark.parametrize("trial_id", ["1e999999", "0e12", "12e3", "3a5f_00001", "34"])
def test_an_exported_config_keeps_string_values_that_look_like_numbers(tmp_path, trial_id):
    provenance = {
        "study": "s",
        "execution": "e",
        "run_id": "r",
        "trial_id": trial_id,
        "tracking_uri": "sqlite:///mlflow.db",
        "status": "completed",
        "rank": 1,
        "metric": "val_acc",
        "mode": "max",
        "value": 0.5,
        "epoch": 1,
        "epochs_run": 1,
        "budget": 1,
        "full_budget": True,
    }
    document = {**FinalConfig().model_dump(mode="json", exclude={"provenance"}), "provenance": provenance}
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(document))
    loaded = load_final_config(path)
    assert loaded.provenance is not None and loaded.provenance.trial_id == trial_id
    assert loaded.norm.placement == FinalConfig().norm.placement
