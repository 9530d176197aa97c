"""`sbn-study probe`: statistics of untrained networks per arm × placement × seed, summarized over seeds."""

from __future__ import annotations

import pytest

from sbn_study.results.probe import (
    ProbeRequest,
    markdown_summary,
    probe_at_init,
    probe_figure,
    summarize_probe,
)
from sbn_study.results.stats import t_interval
from sbn_study.spec.config import TrialConfig


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
