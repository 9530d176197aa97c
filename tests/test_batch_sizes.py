"""`sbn-study train --batch-sizes`: the small-batch regime, every arm at every batch size on the same seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sbn_study.errors import UserError
from sbn_study.final.arms import ArmRequest, plan_arms
from sbn_study.final.batch_sizes import sweep, warnings
from sbn_study.results.export import FinalConfig
from sbn_study.results.stats import t_interval
from sbn_study.spec.config import NormConfig
from tests.test_export_train import run_cli
from tests.test_train import tiny_config

# A norm that needs 4 images per batch: at batch size 2 every run of it fails, as BN does on a lone value.
GHOST = "tests.custom_norm_module:GhostBatchNorm2d"


def write_config(folder: Path, kind: str = GHOST) -> Path:
    config = tiny_config(epochs=1, batch_size=16, lr=0.08)
    config.norm = NormConfig(kind=kind, placement="all")
    config.features.enabled = False
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--batch-sizes", "2,x"],
            "argument --batch-sizes: expected distinct comma-separated integers of at least 2",
        ),
        (
            ["--batch-sizes", "1,2"],
            "argument --batch-sizes: expected distinct comma-separated integers of at least 2",
        ),
        (
            ["--batch-sizes", "4,4"],
            "argument --batch-sizes: expected distinct comma-separated integers of at least 2",
        ),
        (
            ["--batch-sizes", ""],
            "argument --batch-sizes: expected distinct comma-separated integers of at least 2",
        ),
        (["--batch-sizes", "2", "--lr-scaling", "sqrt"], "argument --lr-scaling: invalid choice: 'sqrt'"),
        (
            ["--lr-scaling", "none"],
            "error: --lr-scaling: it scales the lr with --batch-sizes, which is not given",
        ),
        (
            ["--batch-sizes", "2,2048"],
            "error: --batch-sizes 2048: larger than the 1024 training images left after data.val_size",
        ),
    ],
)
def test_a_bad_batch_size_list_is_one_line_and_exit_2_before_anything_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    config = write_config(tmp_path)
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, "train", str(config), "--output", str(output), *arguments)
    assert (code, out) == (2, "")
    assert message in err.splitlines()[-1]
    assert not output.exists()


def test_every_arm_is_planned_at_every_batch_size_with_its_lr_scaled_from_the_configs_batch(
    tmp_path: Path,
) -> None:
    config = FinalConfig.model_validate(yaml.safe_load(write_config(tmp_path, "bgn").read_text()))
    plan = plan_arms(config, ArmRequest(("bn", "cbn")), "sqlite:///unused.db")
    linear = sweep(plan, (32, 2, 8), "linear")
    assert linear.batch_sizes == (2, 8, 32)
    assert list(linear.plan.arms) == [f"{arm}-b{b}" for arm in ("config", "bn", "cbn") for b in (2, 8, 32)]
    for arm in plan.arms:
        for b in (2, 8, 32):
            swept = linear.plan.arms[f"{arm}-b{b}"]
            assert (swept.train.batch_size, swept.train.lr) == (b, pytest.approx(0.08 * b / 16))
            # Everything else is the arm's: only the batch size and the lr move along the axis.
            rest = swept.model_copy(update={"train": plan.arms[arm].train})
            assert rest == plan.arms[arm]
            assert linear.plan.run_tags[f"{arm}-b{b}"] == {
                "sbn.arm": arm,
                "sbn.batch_size": str(b),
                "sbn.lr_scaling": "linear",
            }
    assert linear.plan.labels["cbn-b8"] == "cbn-all-b8" and linear.plan.labels["bn-b2"] == "bn-b2"
    same = sweep(plan, (2, 32), "none")
    assert {arm.train.lr for arm in same.plan.arms.values()} == {0.08}
    # Only an lr scaled above the config's, without a warm-up, is warned about.
    assert warnings(linear) == [
        "warning: --batch-sizes 32: the linear rule raises the lr up to ×2 the config's with no warm-up "
        "(Goyal et al. warm up 5 of 90 epochs): --set train.warmup_epochs=N"
    ]
    assert warnings(same) == warnings(sweep(plan, (2, 16), "linear")) == []
    warm = config.model_copy(update={"train": config.train.model_copy(update={"warmup_epochs": 2})})
    warm_plan = plan_arms(warm, ArmRequest(("bn",)), "sqlite:///unused.db")
    assert warnings(sweep(warm_plan, (2, 32), "linear")) == []
    with pytest.raises(UserError, match="--batch-sizes 1025: larger than the 1024 training images"):
        sweep(plan, (2, 1025), "linear")


@pytest.mark.slow
def test_the_sweep_trains_every_arm_batch_size_and_seed_and_counts_the_runs_that_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    config = write_config(tmp_path)
    output = tmp_path / "out"
    code, out, err = run_cli(
        capsys,
        "train",
        str(config),
        "--arms",
        "bn",
        "--batch-sizes",
        "8,2",
        "--seeds",
        "0,1",
        "--output",
        str(output),
    )
    # The ghost norm fails at batch size 2: reported in the table and in the exit status, as `train` does.
    assert code == 1, err
    assert (
        "protocol: lr × b/16 (linear scaling from the config's batch size); 1 epoch at every batch size"
        in out
    )

    client = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("small-batch-sizes")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "sbn.seed" not in r.data.tags]
    seeds = [r for r in runs if "sbn.seed" in r.data.tags]
    cells = {
        (r.data.tags["sbn.arm"], int(r.data.tags["sbn.batch_size"]), int(r.data.tags["sbn.seed"]))
        for r in seeds
    }
    assert len(seeds) == len(cells) == 8
    assert cells == {(arm, b, seed) for arm in ("config", "bn") for b in (2, 8) for seed in (0, 1)}
    accuracy: dict[tuple[str, int], list[float]] = {}
    for run in seeds:
        tags, params = run.data.tags, run.data.params
        arm, b = tags["sbn.arm"], int(tags["sbn.batch_size"])
        assert params["train.batch_size"] == str(b) and float(params["train.lr"]) == pytest.approx(
            0.08 * b / 16
        )
        assert (
            tags["sbn.lr_scaling"] == "linear" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        )
        # A sweep runs the evaluation suites only when --suites names them.
        assert not [key for key in run.data.metrics if key.startswith(("robust/", "fourier/", "calib/"))]
        failed = (arm, b) == ("config", 2)
        assert tags["sbn.status"] == ("error" if failed else "completed"), (arm, b)
        if not failed:
            accuracy.setdefault((arm, b), []).append(run.data.metrics["test_acc"])

    # Each completed cell's interval is the t interval of its runs' test accuracies; the failed cell is counted.
    metrics = parent.data.metrics
    for (arm, b), values in accuracy.items():
        mean, _, low, high = t_interval(values)
        assert metrics[f"{arm}/b{b}/test_acc_mean"] == pytest.approx(mean)
        assert (metrics[f"{arm}/b{b}/test_acc_low"], metrics[f"{arm}/b{b}/test_acc_high"]) == pytest.approx(
            (low, high)
        )
        assert (metrics[f"{arm}/b{b}/completed"], metrics[f"{arm}/b{b}/failed"]) == (2, 0)
    assert (metrics["config/b2/completed"], metrics["config/b2/failed"]) == (0, 2)
    assert "config/b2/test_acc_mean" not in metrics

    (folder,) = (output / "final").glob("small-batch-sizes-*")
    table = (folder / "batch_sizes.md").read_text()
    assert (folder / "batch_sizes.png").read_bytes().startswith(b"\x89PNG")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| arm | b=2 | b=8 |"
    config_row, bn_row = rows[1:]
    assert config_row.startswith(f"| {GHOST}-all (config) | – (0/2) | ") and config_row.endswith("(2/2) |")
    mean, _, low, high = t_interval(accuracy["bn", 2])
    assert bn_row.startswith(f"| bn | {mean:.3f} [{low:.3f}, {high:.3f}] (2/2) | ")
    for seed in (0, 1):
        line = f"- config-b2, seed {seed}: error: ValueError: expected a batch of at least 4 images, got 2"
        assert line in table.splitlines() and line in out.splitlines()
    assert table.splitlines()[2] in out  # the table is printed too
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"batch_sizes.md", "batch_sizes.png"} <= artifacts
