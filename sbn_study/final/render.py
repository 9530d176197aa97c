"""What `sbn-study train` (and `validate` on a final-training config) tell a person: the config checked, the
line training starts with and the values each arm uses, one line per seed as it ends, and the comparison of
the arms at the end (also the `comparison.md` it writes).

Pure functions from a config, an ArmPlan, a SeedResult or a FinalOutcome to text, so that every line can be
tested without Ray. No pydantic, Ray or MLflow at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sbn_study.final.arms import ArmPlan
    from sbn_study.final.comparison import ArmSummary, PairedDifference
    from sbn_study.final.evaluation import CheckpointEvaluation, Comparison
    from sbn_study.final.training import FinalOptions, FinalOutcome, SeedResult
    from sbn_study.results.export import FinalConfig

# Wide enough for the longest norm kind ("sbn_noaffine"), so that the arms of the lines below line up.
_ARM_WIDTH = 12


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


def render_start(path: str, plan: ArmPlan, options: FinalOptions) -> str:
    return (
        f"sbn-study: final training of {path}: seeds {','.join(map(str, options.seeds))} × "
        + ", ".join(plan.names.values())
        + f", {plan.config.train.epochs} epochs each, experiment '{options.experiment}'"
    )


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _arm_values(plan: ArmPlan) -> dict[str, str]:
    """arm → its value of every stated setting, and those that do not act in it."""
    texts = {}
    for arm in plan.arms:
        values = plan.values(arm)
        idle = [key for key, v in values.items() if v is None]
        texts[arm] = " ".join(f"{key}={_value(v)}" for key, v in values.items() if v is not None) + (
            f" ({', '.join(idle)}: {'does' if len(idle) == 1 else 'do'} not act)" if idle else ""
        )
    return texts


def render_arm_values(plan: ArmPlan) -> list[str]:
    """Where the arms' values come from, and each arm's value of every setting the search tuned (of the
    SBN settings when the search is unknown); nothing for the configuration alone."""
    if len(plan.arms) < 2:
        return []
    texts = _arm_values(plan)
    return [f"arm values: {plan.note}:", *(f"  {arm:<{_ARM_WIDTH}} {text}" for arm, text in texts.items())]


def seed_warnings(plan: ArmPlan, seeds: Sequence[int]) -> list[str]:
    """Seeds the search trained with: the configuration was selected on them, so their test scores carry
    the luck of that selection."""
    lines = [f"warning: {warning}" for warning in plan.warnings]
    overlap = plan.seed_overlap(seeds)
    if overlap:
        lines.append(
            f"warning: --seeds {','.join(map(str, overlap))}: the search trained on "
            f"{'this seed' if len(overlap) == 1 else 'these seeds'}, and the config won partly by "
            f"{'its' if len(overlap) == 1 else 'their'} luck; seeds after {max(plan.search_seeds or [0])} "
            "are independent of the search"
        )
    return lines


def render_seed(result: SeedResult) -> str:
    """One seed of one arm as it ends: its test score, and the validation epoch whose weights were tested."""
    r = result
    if r.status == "error":
        return f"  {r.arm:<{_ARM_WIDTH}} seed {r.seed}: error: {r.error}"
    return (
        f"  {r.arm:<{_ARM_WIDTH}} seed {r.seed}: {r.status}, test_acc {r.test_acc:.4f}, "
        f"test_loss {r.test_loss:.4f} (best val_acc {r.best_val_acc:.4f} at epoch {r.best_epoch})"
    )


def _explanation(differences: Sequence[PairedDifference]) -> str:
    compared = f"{len(differences)} arm{'s' if len(differences) != 1 else ''}"
    return (
        "test accuracy of each seed's best-validation checkpoint; Δ = arm − config on the same seed, with its "
        "95 % Student-t interval over the seeds both completed (n pairs), the paired t-test's p and Holm's p "
        f"(corrected for the {compared} compared with the config)"
    )


def _suites_explanation() -> str:
    return (
        "the evaluation suites' figures of the same checkpoints (lower is better for every one), compared the "
        "same way; Holm's p corrects within a figure"
    )


def render_suites(suites: Mapping[str, Comparison], labels: Mapping[str, str]) -> str:
    """The suites' comparison table; "" without suites."""
    from sbn_study.final.comparison import suite_table
    from sbn_study.final.evaluation import COMPARED

    return suite_table(suites, COMPARED, labels) if suites else ""


def render_comparison(
    summaries: Mapping[str, ArmSummary],
    differences: Sequence[PairedDifference],
    plan: ArmPlan,
    suites: Mapping[str, Comparison] | None = None,
) -> str:
    """`comparison.md`: the table, what its columns mean, the suites' table, and the values each arm used."""
    from sbn_study.final.comparison import markdown_table

    explanation = _explanation(differences)
    text = f"# Final training: {', '.join(plan.names.values())}\n\n"
    text += (
        f"{explanation[0].upper()}{explanation[1:]}.\n\n{markdown_table(summaries, differences, plan.names)}"
    )
    if suites:
        sentence = _suites_explanation()
        text += f"\n{sentence[0].upper()}{sentence[1:]}.\n\n{render_suites(suites, plan.names)}"
    if len(plan.arms) > 1:
        text += f"\nArm values: {plan.note}.\n\n"
        text += "".join(f"- {arm}: {values}\n" for arm, values in _arm_values(plan).items())
    return text


def render_summary(outcome: FinalOutcome) -> str:
    """The table of the arms, where its files are, and where the runs are."""
    from sbn_study.final.comparison import markdown_table

    lines = [
        _explanation(outcome.differences) + ":",
        markdown_table(outcome.arms, outcome.differences, outcome.labels).rstrip("\n"),
        *(
            [_suites_explanation() + ":", render_suites(outcome.suites, outcome.labels).rstrip("\n")]
            if outcome.suites
            else []
        ),
        f"wrote {outcome.folder}/: {', '.join(outcome.files)}",
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.experiment}', run "
        f"{outcome.parent_run_id})",
    ]
    return "\n".join(lines)


def summary_warnings(outcome: FinalOutcome) -> list[str]:
    lines = []
    if outcome.unsent:
        lines.append(f"warning: the tracking store did not take every write; saved to {outcome.unsent}")
    if outcome.not_logged:
        lines.append(
            f"warning: the parent run has no copy of the comparison ({outcome.not_logged}); it is in "
            f"{outcome.folder}/"
        )
    return lines


def render_evaluation(result: CheckpointEvaluation) -> str:
    """What `sbn-study evaluate` measured (every figure but the error per corruption and severity, which the
    run and the dashboard hold), and where it went."""
    import re

    shown = {k: v for k, v in result.metrics.items() if not re.fullmatch(r"robust/\w+/\d/error", k)}
    lines = [
        f"evaluated {result.what}, the weights of epoch {result.epoch}:",
        "| figure | value |",
        "|---|---|",
        *(f"| {key} | {value:.4f} |" for key, value in shown.items()),
    ]
    if result.run_id:
        lines.append(
            f"logged to run {result.run_id}: {len(result.metrics)} metrics, {', '.join(result.files)}"
        )
    if result.folder:
        lines.append(f"wrote {result.folder}/: {', '.join(result.files)}")
    return "\n".join(lines)
