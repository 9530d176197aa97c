"""`sbn-study probe`: statistics of untrained networks per arm × placement × seed, summarized over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sbn_study import cli
from sbn_study.results.probe import (
    ProbeRequest,
    markdown_summary,
    probe_at_init,
    probe_figure,
    summarize_probe,
)
from sbn_study.results.stats import t_interval
from sbn_study.spec.config import TrialConfig
from tests.conftest import QUICKSTART


@pytest.fixture(scope="module")
def probe_table():
    config = TrialConfig.model_validate(
        {
            "data": {
                "dataset": "synthetic",
                "val_size": 256,
                "synthetic": {"train_size": 512, "test_size": 64},
            },
            "model": {"arch": "tiny", "width": 8},
            "features": {"probe_size": 32},
        }
    )
    return probe_at_init(ProbeRequest(config, arms=("bn", "sbn"), placements=("3",), seeds=(0, 1, 2)))


def test_sbn_shrinks_only_the_placed_slots_and_bn_keeps_them(probe_table):
    norms = probe_table[probe_table["stat"] == "norm"].pivot_table(
        index=["depth", "seed"], columns="arm", values="value"
    )
    deepest = norms.index.get_level_values("depth").max()
    # Stages 1 and 2 are plain BN in both arms, and the same seed builds the same weights there.
    assert norms.loc[: deepest - 1, "sbn"].to_numpy() == pytest.approx(
        norms.loc[: deepest - 1, "bn"].to_numpy()
    )
    # After SBN (backward norm) a stage-3 map is rescaled by about 1/sqrt(H·W) = 1/8 for the tiny model's 8×8.
    ratio = norms.loc[deepest, "sbn"] / norms.loc[deepest, "bn"]
    assert ((ratio > 1 / 16) & (ratio < 1 / 4)).all()


def test_summary_is_a_t_interval_over_seeds(probe_table):
    summary = summarize_probe(probe_table)
    row = summary[(summary["arm"] == "sbn") & (summary["stat"] == "norm")].iloc[-1]
    values = probe_table[
        (probe_table["arm"] == "sbn")
        & (probe_table["stat"] == "norm")
        & (probe_table["depth"] == row["depth"])
    ]["value"].tolist()
    assert row["n"] == 3
    assert (row["mean"], row["std"], row["low"], row["high"]) == pytest.approx(t_interval(values))
    text = markdown_summary(summary)
    assert "| sbn | 3 |" in text and "| bn | 3 |" in text
    figure = probe_figure(summary)
    assert figure.axes[0].get_ylabel().startswith("feature-map norm")


def test_probe_command_writes_table_figure_summary_and_one_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small = ("data.synthetic.train_size=1024", "data.val_size=256", "model.width=8", "features.probe_size=32")
    sets = [arg for override in small for arg in ("--set", override)]
    request = ["--arms", "sbn,bn", "--placements", "3,all", "--seeds", "0,1", "--output", str(tmp_path)]
    code = cli.main(["probe", str(QUICKSTART), *sets, *request])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("probe: 8 untrained models in ") and "| sbn | all | layer3.bn |" in out
    (folder,) = (tmp_path / "probe").iterdir()
    assert lines[-2] == f"wrote {folder}/: probe.csv, probe.png, summary.md"
    table = pd.read_csv(folder / "probe.csv", dtype={"placement": str})
    assert {(a, p, s) for a, p, s in zip(table["arm"], table["placement"], table["seed"], strict=True)} == {
        (arm, placement, seed) for arm in ("sbn", "bn") for placement in ("3", "all") for seed in (0, 1)
    }
    assert (folder / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "summary.md").read_text() in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sbn-quickstart-probe").experiment_id])
    assert lines[-1].endswith(f"(experiment 'sbn-quickstart-probe', run {run.info.run_id})")
    params = run.data.params
    assert (params["probe.arms"], params["probe.placements"], params["probe.seeds"]) == (
        "sbn,bn",
        "3,all",
        "0,1",
    )
    assert params["model.width"] == "8" and "norm.kind" not in params
    assert (run.info.status, run.data.tags["sbn.kind"]) == ("FINISHED", "probe")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "probe.csv",
        "probe.png",
        "summary.md",
    }


def test_probe_refuses_an_arm_or_placement_the_model_cannot_take_before_recording(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = ["--arms", "sbn,nope", "--placements", "4", "--output", str(tmp_path)]
    assert cli.main(["probe", str(QUICKSTART), *request]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: norm.placement: stage 4 does not exist in tiny (stages 1-3)",
        "error: norm.kind: expected one of 2bn, bgn, bn, bnscale, cbn, gn, iebn, mbn, none, proxynorm, sbn, "
        "sbn_center, sbn_noaffine, sbn_nospike, sbn_var, scale, spike or package.module:Factory, got 'nope'",
    ]
    assert not (tmp_path / "mlflow.db").exists()
