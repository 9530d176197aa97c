"""The quick-start ablation through the real stack (Ray Tune, Optuna QMC, MLflow), then the reviewer's path:
export the best arm, train it against two other arms on seeds the search never used, and probe it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from sbn_study import cli
from tests.conftest import REPO

ABLATION = REPO / "search_spaces" / "quickstart_ablation.yaml"
# Seconds instead of minutes: 4 trials of 2 epochs on a smaller dataset and model.
TINY = [
    "search.num_samples=4",
    "train.epochs=2",
    "features.interval=1",
    "data.val_size=256",
    "data.synthetic.train_size=1024",
    "data.synthetic.test_size=256",
    "model.width=8",
]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_ablation_then_arms_trained_against_the_best_on_fresh_seeds(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    from sbn_study.final.arms import ArmRequest, plan_arms
    from sbn_study.results.analysis import trials
    from sbn_study.results.export import load_final_config
    from sbn_study.spec import load_spec
    from sbn_study.study.lifecycle import RunOptions, run_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run_cli(capsys, "validate", str(ABLATION))[::2] == (0, "")  # no warning
    spec = load_spec(ABLATION, TINY)
    study = tmp_path / "study"
    run_study(spec, ABLATION.read_text(), RunOptions(output=study, progress_interval_s=60.0))
    uri = f"sqlite:///{study / 'mlflow.db'}"
    table = trials(uri, spec.name, all_params=True)
    # Every trial puts its arm at the same sites and trains to the end with its own seed.
    assert (
        len(table) == 4 and set(table["norm.placement"]) == {"23"} and set(table["status"]) == {"completed"}
    )
    search_seeds = sorted({int(seed) for seed in table["train.seed"]})

    exports = tmp_path / "exports"
    assert run_cli(capsys, "export", spec.name, "--tracking-uri", uri, "-o", str(exports))[0] == 0
    (path,) = exports.glob("*.yaml")
    config = load_final_config(path)
    assert config.provenance is not None and config.provenance.search_seeds == search_seeds
    arms = [kind for kind in ("bn", "2bn", "scale") if kind != config.norm.kind][:2]
    plan = plan_arms(config, ArmRequest(tuple(arms)), uri)
    assert plan.default_seeds == tuple(range(search_seeds[-1] + 1, search_seeds[-1] + 6))
    seeds = [search_seeds[-1] + 1, search_seeds[-1] + 2]
    output = tmp_path / "final"
    code, out, err = run_cli(
        capsys,
        "train",
        str(path),
        "--arms",
        ",".join(arms),
        "--seeds",
        ",".join(map(str, seeds)),
        "--suites",
        "none",  # the suites have their own end-to-end test (test_robustness_e2e)
        "--output",
        str(output),
    )
    assert code == 0, err
    lines = out.splitlines()
    # The ablation searched nothing but the arm (and the seed): every arm keeps the config's values.
    assert lines[1] == (
        f"arm values: study '{spec.name}' tuned nothing but the arm: the arms take this config's values:"
    )
    header = next(i for i, line in enumerate(lines) if line.startswith("| arm | completed |"))
    rows = lines[header + 2 : header + 5]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(plan.names.values())
    assert all(row.split(" | ")[1:4] == ["2/2", "0", "0"] for row in rows)
    assert "reference" in rows[0] and all("(n=2)" in row for row in rows[1:])

    (folder,) = (output / "final").iterdir()
    # The comparison's files, and beside them each seed's tested model (what `evaluate` and MLflow load).
    seed_folders = {f"{arm}-seed{seed}" for arm in plan.arms for seed in seeds}
    assert {p.name for p in folder.iterdir()} == {
        "comparison.md",
        "comparison.tex",
        "forest_plot.png",
        *seed_folders,
    }
    assert all((folder / name / "MLmodel").is_file() for name in seed_folders)
    assert "\n".join(rows) in (folder / "comparison.md").read_text()
    assert (folder / "comparison.tex").read_text().startswith(r"\begin{tabular}")
    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"{spec.name}-final")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "sbn.seed" not in r.data.tags]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.tex", "forest_plot.png", "config.yaml"} <= parent_artifacts
    metrics = parent.data.metrics
    for arm in arms:
        assert metrics[f"{arm}/completed"] == 2 and metrics[f"diff/{arm}/pairs"] == 2
        assert metrics[f"diff/{arm}/p_holm"] >= metrics[f"diff/{arm}/p"]
    seed_runs = [r for r in runs if "sbn.seed" in r.data.tags]
    assert sorted((r.data.tags["sbn.arm"], int(r.data.params["train.seed"])) for r in seed_runs) == sorted(
        (arm, seed) for arm in ("config", *arms) for seed in seeds
    )

    # The probe reads the exported config too, named after its study.
    probe = tmp_path / "probe"
    code, out, err = run_cli(
        capsys, "probe", str(path), "--arms", "sbn,scale", "--seeds", "0", "--output", str(probe)
    )
    assert code == 0, err
    (folder,) = (probe / "probe").iterdir()
    assert set(pd.read_csv(folder / "probe.csv")["arm"]) == {"sbn", "scale"}
    assert f"(experiment '{spec.name}-probe'" in out
