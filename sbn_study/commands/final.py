"""`train`: final training of an exported config on several seeds, with the comparison arms."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from sbn_study import arguments
from sbn_study.commands import common
from sbn_study.commands.common import Subparsers
from sbn_study.errors import UserError

if TYPE_CHECKING:
    from sbn_study.final.arms import ArmPlan
    from sbn_study.final.training import FinalOptions


def _add_train(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="final training: several seeds at the full budget, best-validation checkpoint tested once",
        description="Train a final-training config (what `sbn-study export` writes) on several seeds in "
        "parallel as Ray tasks, keep each seed's best-validation checkpoint and evaluate it once on the test "
        "split; with --arms also train other norms at its sites on the same seeds and compare each with it "
        "(paired t intervals, Holm-corrected p; Markdown, LaTeX, forest plot; in MLflow too). Each tested "
        "checkpoint is kept and goes through the evaluation suites (--suites), compared across arms the same way.",
    )
    parser.add_argument(
        "config", help="final-training config (YAML), e.g. sbn-runs/exports/STUDY-top1-ID.yaml"
    )
    common.add_overrides(
        parser, "override one config key (so every arm's); VALUE is YAML (e.g. train.epochs=2)"
    )
    seeds = "default: the 5 seeds after the search's largest (0,1,2,3,4 without provenance)"
    parser.add_argument("--seeds", type=common.seed_list, metavar="LIST", help=seeds)
    arms = "norm kinds to train at the config's sites on the same seeds, e.g. bn,2bn,scale (bn: plain BN)"
    parser.add_argument("--arms", type=common.name_list, default=(), metavar="KINDS", help=arms)
    parser.add_argument("--baseline", action="store_true", help="shorthand for --arms bn")
    keep = "the arms keep the config's values of what the search tuned (default: the recipe's base values)"
    parser.add_argument("--arms-keep-tuned", action="store_true", help=keep)
    arm_set = "set one key of every arm (not of the config), e.g. norm.eps=1e-3; repeatable"
    parser.add_argument("--arm-set", action="append", default=[], metavar="KEY=VALUE", help=arm_set)
    common.add_output_arguments(parser)
    common.add_address(parser)
    common.add_suite_arguments(parser)
    common.add_verbose(parser)
    parser.add_argument(
        "--experiment",
        metavar="NAME",
        help="MLflow experiment (default: <study>-final, or <study>-batch-sizes with --batch-sizes)",
    )
    sizes = (
        "train the config and every arm at each of these batch sizes on the same seeds, and draw test accuracy "
        "against batch size per arm, e.g. 2,4,8,32,128"
    )
    parser.add_argument("--batch-sizes", type=arguments.integer_list(2), metavar="LIST", help=sizes)
    scaling = (
        "with --batch-sizes: lr × b/B from the config's batch size B (linear, the default) or the same lr"
    )
    parser.add_argument("--lr-scaling", choices=("linear", "none"), help=scaling)
    cpus = arguments.number(0, above=True)
    parser.add_argument("--cpus-per-seed", type=cpus, default=1.0, metavar="N", help="default 1")
    gpus = arguments.number(0)
    parser.add_argument(
        "--gpus-per-seed", type=gpus, metavar="N", help="default: 1 when the Ray cluster has GPUs, else 0"
    )
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.final import render
    from sbn_study.final.arms import ArmRequest, plan_arms
    from sbn_study.final.evaluation import EvaluationOptions, check_suites
    from sbn_study.final.progress import SeedProgress
    from sbn_study.final.training import FinalOptions, experiment_name, run_final
    from sbn_study.results.export import load_final_config

    config = load_final_config(args.config, args.overrides)
    kinds = args.arms + (("bn",) if args.baseline and "bn" not in args.arms else ())
    request = ArmRequest(kinds=kinds, keep_tuned=args.arms_keep_tuned, values=tuple(args.arm_set))
    plan = plan_arms(config, request, common.tracking_uri(args))
    options = FinalOptions(
        experiment=args.experiment or experiment_name(config, Path(args.config)),
        seeds=args.seeds or plan.default_seeds,
        output=Path(args.output),
        tracking_uri=args.tracking_uri,
        address=args.address,
        cpus_per_seed=args.cpus_per_seed,
        gpus_per_seed=args.gpus_per_seed,
        verbose=args.verbose,
        # A batch-size sweep is many runs whose table is of accuracy: the suites only when asked for.
        evaluation=EvaluationOptions(
            check_suites(("none",) if args.suites is None and args.batch_sizes else args.suites),
            args.fourier_stride,
            args.fourier_images,
        ),
    )
    if args.batch_sizes:
        return _train_batch_sizes(args, plan, options)
    if args.lr_scaling:
        raise UserError("--lr-scaling: it scales the lr with --batch-sizes, which is not given")
    print(render.render_start(args.config, plan, options), flush=True)
    print("\n".join(render.render_arm_values(plan)), flush=True)
    common.print_err([*render.config_warnings(config), *render.seed_warnings(plan, options.seeds)])
    outcome = run_final(plan, options, SeedProgress(_runs(plan, options.seeds)))
    print(render.render_summary(outcome))
    common.print_err(render.summary_warnings(outcome))
    return 0 if all(r.status == "completed" for r in outcome.results) else 1


def _train_batch_sizes(args: argparse.Namespace, plan: ArmPlan, options: FinalOptions) -> int:
    """`train --batch-sizes`: every arm at every batch size on the same seeds (`final.batch_sizes`)."""
    import dataclasses
    from functools import partial
    from pathlib import Path

    from sbn_study.final import batch_sizes, render
    from sbn_study.final.progress import SeedProgress
    from sbn_study.final.training import experiment_name, run_final

    sweep = batch_sizes.sweep(plan, args.batch_sizes, args.lr_scaling or "linear")
    experiment = args.experiment or experiment_name(plan.config, Path(args.config), "batch-sizes")
    options = dataclasses.replace(options, experiment=experiment)
    print(batch_sizes.render_start(args.config, sweep, options.seeds, experiment), flush=True)
    print("\n".join(render.render_arm_values(plan)), flush=True)
    common.print_err(
        [
            *render.config_warnings(plan.config),
            *render.seed_warnings(plan, options.seeds),
            *batch_sizes.warnings(sweep),
        ]
    )
    outcome = run_final(
        sweep.plan,
        options,
        SeedProgress(_runs(sweep.plan, options.seeds)),
        partial(batch_sizes.publication, sweep),
    )
    print(batch_sizes.render_summary(sweep, outcome))
    common.print_err(render.summary_warnings(outcome))
    # As `train` does: a run that did not complete is in the table, and in the exit status.
    return 0 if all(r.status == "completed" for r in outcome.results) else 1


def _runs(plan: ArmPlan, seeds: tuple[int, ...]) -> list[tuple[str, int]]:
    """Every (arm, seed) of a plan, in the order `run_final` launches them."""
    return [(arm, seed) for arm in plan.arms for seed in seeds]


def register(subparsers: Subparsers) -> None:
    _add_train(subparsers)
