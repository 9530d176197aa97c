"""What `sbn-study train` (and `validate` on a final-training config) tell a person: the config checked, the
line training starts with, one line per seed as it ends, and the table of test accuracies at the end.

Pure functions from a config, a SeedResult or a FinalOutcome to text, so that every line can be tested without
Ray. No pydantic, Ray or MLflow at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sbn_study.final.training import FinalOptions, FinalOutcome, SeedResult
    from sbn_study.results.export import FinalConfig
    from sbn_study.spec.config import TrialConfig

# Wide enough for "baseline", so that the arms of the progress lines and the table line up.
_ARM_WIDTH = 8


def render_valid(path: str, config: FinalConfig) -> str:
    source = config.provenance
    origin = (
        f"; study {source.study}, trial {source.trial_id}, best {source.metric} {source.value:.4g}"
        if source
        else ""
    )
    return (
        f"ok: {path}: final-training config ({config.model.arch}, {config.norm.kind} at placement "
        f"{config.norm.placement}, {config.train.epochs} epochs{origin})"
    )


def config_warnings(config: FinalConfig) -> list[str]:
    """The warning that the config's score is no full-budget result, whenever one reads or trains it."""
    from sbn_study.results.export import budget_warning

    source = config.provenance
    return [f"warning: {budget_warning(source)}"] if source and not source.full_budget else []


def arm_labels(arms: Mapping[str, TrialConfig]) -> dict[str, str]:
    """arm → the paper's name of its norm configuration ("sbn23", "bn")."""
    from sbn_study.results.analysis import arm_label

    return {arm: arm_label(config.norm.kind, config.norm.placement) for arm, config in arms.items()}


def render_start(path: str, config: FinalConfig, options: FinalOptions, labels: Mapping[str, str]) -> str:
    return (
        f"sbn-study: final training of {path}: seeds {','.join(map(str, options.seeds))} × "
        + ", ".join(f"{arm} ({label})" for arm, label in labels.items())
        + f", {config.train.epochs} epochs each, experiment '{options.experiment}'"
    )


def render_seed(result: SeedResult) -> str:
    """One seed of one arm as it ends: its test score, and the validation epoch whose weights were tested."""
    r = result
    if r.status == "error":
        return f"  {r.arm:<{_ARM_WIDTH}} seed {r.seed}: error: {r.error}"
    return (
        f"  {r.arm:<{_ARM_WIDTH}} seed {r.seed}: {r.status}, test_acc {r.test_acc:.4f}, "
        f"test_loss {r.test_loss:.4f} (best val_acc {r.best_val_acc:.4f} at epoch {r.best_epoch})"
    )


def render_summary(outcome: FinalOutcome, labels: Mapping[str, str]) -> str:
    """Each arm's mean ± std over its completed seeds, the paired difference when there is a baseline, and
    where the runs are."""
    lines = ["test accuracy of the best-validation checkpoint, mean ± std over completed seeds:"]
    lines += [
        f"  {arm:<{_ARM_WIDTH}} {labels[arm]:<10} {summary.mean:.4f} ± {summary.std:.4f}  (n={summary.n})"
        for arm, summary in outcome.arms.items()
    ]
    diff = outcome.difference
    if diff is not None:
        lines.append(
            f"paired difference config − baseline: {diff.mean:+.4f}, {diff.confidence:.0%} CI "
            f"[{diff.low:+.4f}, {diff.high:+.4f}] (Student t, n={diff.n} seeds)"
        )
    lines.append(
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.experiment}', run {outcome.parent_run_id})"
    )
    return "\n".join(lines)


def summary_warnings(outcome: FinalOutcome) -> list[str]:
    if not outcome.unsent:
        return []
    return [f"warning: the tracking store did not take every write; saved to {outcome.unsent}"]
