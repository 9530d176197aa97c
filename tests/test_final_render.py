"""What `sbn-study train` prints, on constructed plans and outcomes: no Ray, no MLflow store, no training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from sbn_study import cli
from sbn_study.final import render as final_render
from sbn_study.final.arms import ArmPlan, ArmRequest, Recipe, plan_arms
from sbn_study.final.comparison import SeedScore, compare_arms, markdown_table
from sbn_study.final.training import FinalOptions, FinalOutcome, SeedResult
from sbn_study.results.export import FinalConfig
from tests.test_render import URI, provenance


def final_config(**changes: Any) -> FinalConfig:
    document: dict[str, Any] = {
        "model": {"arch": "tiny"},
        "norm": {"placement": "23", "momentum": 0.3},
        "train": {"epochs": 3, "weight_decay": 1e-4},
    }
    return FinalConfig.model_validate({**document, **changes})


def exported_plan(
    monkeypatch: pytest.MonkeyPatch, *kinds: str, search_seeds: list[int] | None = None
) -> ArmPlan:
    """The plan of a config exported from a study that tuned norm.momentum and train.weight_decay."""
    recipe = Recipe(
        {"norm.momentum": 0.1, "train.weight_decay": 5e-4}, ("norm.momentum", "train.weight_decay"), (0, 3)
    )
    monkeypatch.setattr("sbn_study.final.arms.read_recipe", lambda source, uri: recipe)
    source = provenance(1, "a", search_seeds=search_seeds).model_dump()
    return plan_arms(final_config(provenance=source), ArmRequest(kinds), URI)


def seed(arm: str, seed: int, status: str = "completed", **changes: Any) -> SeedResult:
    fields: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "run_id": f"{arm}-{seed}",
        "status": status,
        "test_acc": 0.8,
        "test_loss": 0.5,
        "best_val_acc": 0.81,
        "best_epoch": 2,
        "epochs_run": 3,
    }
    return SeedResult(**{**fields, **changes})


def final_outcome(folder: Path, results: tuple[SeedResult, ...], **changes: Any) -> FinalOutcome:
    summaries, differences = compare_arms(
        [SeedScore(r.arm, r.seed, r.status, r.test_acc) for r in results], "config"
    )
    fields: dict[str, Any] = {
        "experiment": "demo-final",
        "tracking_uri": URI,
        "parent_run_id": "final-parent",
        "results": results,
        "arms": summaries,
        "differences": differences,
        "labels": {"config": "sbn23 (config)", "bn": "bn", "2bn": "2bn23"},
        "folder": folder,
        "files": ("comparison.md", "comparison.tex", "forest_plot.png"),
        "not_logged": "",
        "unsent": None,
    }
    return FinalOutcome(**{**fields, **changes})


def test_final_config_line_names_its_source_and_warns_of_a_stopped_trial() -> None:
    assert final_render.render_valid("f.yaml", final_config()) == (
        "ok: f.yaml: final-training config (tiny, sbn at placement 23, 3 epochs)"
    )
    stopped = final_config(provenance=provenance(1, "a", epochs_run=1, full_budget=False).model_dump())
    assert final_render.render_valid("f.yaml", stopped) == (
        "ok: f.yaml: final-training config (tiny, sbn at placement 23, 3 epochs; study demo, trial a, "
        "best val_acc 0.9123)"
    )
    assert final_render.config_warnings(final_config()) == []
    (warning,) = final_render.config_warnings(stopped)
    assert warning.startswith("warning: trial a was stopped by the scheduler after 1 of 4 epochs")


def test_start_line_and_arm_values_say_what_each_arm_trains_with(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = exported_plan(monkeypatch, "bn", "2bn")
    options = FinalOptions(experiment="demo-final", seeds=plan.default_seeds)
    assert final_render.render_start("f.yaml", plan, options) == (
        "sbn-study: final training of f.yaml: seeds 4,5,6,7,8 × sbn23 (config), bn, 2bn23, 3 epochs each, "
        "experiment 'demo-final'"
    )
    assert final_render.render_arm_values(plan) == [
        "arm values: the arms take the recipe's base values of what study 'demo' tuned (resolved.yaml of "
        "execution parent):",
        "  config       norm.momentum=0.3 train.weight_decay=0.0001",
        "  bn           train.weight_decay=0.0005 (norm.momentum: does not act)",
        "  2bn          norm.momentum=0.1 train.weight_decay=0.0005",
    ]
    alone = plan_arms(final_config(), ArmRequest(), URI)
    assert final_render.render_arm_values(alone) == []


def test_seeds_the_search_used_are_named_in_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = exported_plan(monkeypatch, search_seeds=[0, 1, 7])
    assert plan.default_seeds == (8, 9, 10, 11, 12)
    assert final_render.seed_warnings(plan, (8, 9)) == []
    assert final_render.seed_warnings(plan, (1, 7, 8)) == [
        "warning: --seeds 1,7: the search trained on these seeds, and the config won partly by their luck; "
        "seeds after 7 are independent of the search"
    ]
    # A hand-written config: no search, no seed to avoid.
    assert final_render.seed_warnings(plan_arms(final_config(), ArmRequest(), URI), (0,)) == []


def test_seed_lines_line_up_and_an_error_says_what_failed() -> None:
    assert final_render.render_seed(seed("config", 1)) == (
        "  config       seed 1: completed, test_acc 0.8000, test_loss 0.5000 (best val_acc 0.8100 at epoch 2)"
    )
    assert final_render.render_seed(seed("sbn_noaffine", 2, "error", error="worker died")) == (
        "  sbn_noaffine seed 2: error: worker died"
    )


def test_summary_is_the_comparison_table_with_its_files_and_runs(tmp_path: Path) -> None:
    results = (
        seed("config", 1, test_acc=0.80),
        seed("config", 2, test_acc=0.82),
        seed("bn", 1, test_acc=0.79),
        seed("bn", 2, "diverged", test_acc=math.nan),
        seed("2bn", 1, test_acc=0.78),
        seed("2bn", 2, "error", test_acc=math.nan),
    )
    outcome = final_outcome(tmp_path, results)
    lines = final_render.render_summary(outcome).splitlines()
    assert lines[0] == (
        "test accuracy of each seed's best-validation checkpoint; Δ = arm − config on the same seed, with its "
        "95 % Student-t interval over the seeds both completed (n pairs), the paired t-test's p and Holm's p "
        "(corrected for the 2 arms compared with the config):"
    )
    table = markdown_table(outcome.arms, outcome.differences, outcome.labels).splitlines()
    assert lines[1:6] == table
    # Seeds that did not complete are counted, and the interval says it rests on one pair.
    assert lines[4].startswith("| bn | 1/2 | 1 | 0 |") and "(n=1)" in lines[4]
    assert lines[5].startswith("| 2bn23 | 1/2 | 0 | 1 |")
    assert lines[6:] == [
        f"wrote {tmp_path}/: comparison.md, comparison.tex, forest_plot.png",
        f"results: MLflow {URI} (experiment 'demo-final', run final-parent)",
    ]
    assert final_render.summary_warnings(outcome) == []
    failing = final_outcome(tmp_path, results, unsent=Path("u.jsonl"), not_logged="the store is away")
    assert final_render.summary_warnings(failing) == [
        "warning: the tracking store did not take every write; saved to u.jsonl",
        f"warning: the parent run has no copy of the comparison (the store is away); it is in {tmp_path}/",
    ]


def test_comparison_file_has_the_table_and_the_values_of_each_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = exported_plan(monkeypatch, "bn")
    summaries, differences = compare_arms(
        [SeedScore(arm, s, "completed", 0.8 + 0.01 * s) for arm in ("config", "bn") for s in (1, 2)], "config"
    )
    text = final_render.render_comparison(summaries, differences, plan)
    assert text.startswith("# Final training: sbn23 (config), bn\n\nTest accuracy of each seed's")
    assert markdown_table(summaries, differences, plan.names) in text
    assert text.endswith(
        "- config: norm.momentum=0.3 train.weight_decay=0.0001\n"
        "- bn: train.weight_decay=0.0005 (norm.momentum: does not act)\n"
    )


def test_train_prints_each_seed_as_it_ends_then_the_table_and_fails_on_a_failed_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results = (seed("config", 0), seed("bn", 0, "error", error="boom"))
    planned: list[ArmPlan] = []

    def run_final(plan: ArmPlan, options: FinalOptions, progress: Any) -> FinalOutcome:
        planned.append(plan)
        progress.start()
        for result in results:
            progress.ended(result)
        progress.stop()
        return final_outcome(tmp_path, results)

    monkeypatch.setattr("sbn_study.final.training.run_final", run_final)
    path = tmp_path / "final.yaml"
    path.write_text(final_config().model_dump_json())
    code = cli.main(["train", str(path), "--seeds", "0", "--baseline", "--arm-set", "train.lr=0.02"])
    out, err = capsys.readouterr()
    assert (code, err) == (1, "")
    (plan,) = planned
    assert list(plan.arms) == ["config", "bn"] and plan.arms["bn"].train.lr == 0.02
    lines = out.splitlines()
    assert lines[:7] == [
        f"sbn-study: final training of {path}: seeds 0 × sbn23 (config), bn, 3 epochs each, "
        "experiment 'final-final'",
        "arm values: no provenance (a hand-written config): the arms take this config's own values, as no "
        "search says which of them were tuned; --arm-set train.lr=0.02:",
        "  config       norm.momentum=0.3 norm.eps=1e-05 norm.fft_norm=backward train.weight_decay=0.0001 "
        "train.lr=0.1",
        "  bn           train.weight_decay=0.0001 train.lr=0.02 (norm.momentum, norm.eps, norm.fft_norm: do not "
        "act)",
        # Each seed as it ends, with the count so far (and an ETA while seeds are left).
        f"{final_render.render_seed(results[0])}  [1/2 seeds ended (1 completed) · ETA ~ 0s]",
        "  bn           seed 0: error: boom  [2/2 seeds ended (1 completed, 1 error)]",
        final_render.render_summary(final_outcome(tmp_path, results)).splitlines()[0],
    ]
