"""`evaluate`: the evaluation suites on the tested weights of a final-training seed run, or of a checkpoint file."""

from __future__ import annotations

import argparse
import re

from sbn_study.commands import common
from sbn_study.commands.common import Subparsers

_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow names a run by


def _add_evaluate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="corruption robustness, Fourier sensitivity and calibration of a final-training checkpoint",
        description="Run the evaluation suites that `sbn-study train` runs on every seed (corruptions, Fourier "
        "heat map and filters, calibration) on a seed run already in MLflow, by its run id (its checkpoint.pt "
        "artifact; the figures and files are logged to that run), or on a checkpoint.pt file (the files are "
        "written beside it).",
    )
    parser.add_argument(
        "target",
        metavar="RUN_OR_CHECKPOINT",
        help="run id of a seed run of `sbn-study train`, or a checkpoint.pt",
    )
    common.add_output_arguments(parser)
    common.add_suite_arguments(parser)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.errors import UserError
    from sbn_study.final.evaluation import EvaluationOptions, check_suites, evaluate_checkpoint, evaluate_run
    from sbn_study.final.render import render_evaluation

    suites = check_suites(args.suites)
    if not suites:
        raise UserError("--suites: none leaves nothing to evaluate")
    options = EvaluationOptions(suites, args.fourier_stride, args.fourier_images)
    path = Path(args.target)
    if path.is_file():
        result = evaluate_checkpoint(path, options)
    elif _RUN_ID.fullmatch(args.target):
        result = evaluate_run(common.reachable_store(args), args.target, options)
    else:
        raise UserError(f"{args.target}: no such checkpoint file, and no MLflow run id (32 hex digits)")
    print(render_evaluation(result))
    return 0


def register(subparsers: Subparsers) -> None:
    _add_evaluate(subparsers)
