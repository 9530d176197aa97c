"""`validate`, `run`, `ui` and `replay`: the commands that check a spec, run a study, show its store, and send its
saved writes."""

from __future__ import annotations

import argparse
import sys

from sbn_study import arguments
from sbn_study.commands import common
from sbn_study.commands.common import Subparsers
from sbn_study.errors import UserError
from sbn_study.study import stopping


def _add_validate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a study spec (or an exported final-training config) and report every problem at once",
        description="Check a study spec (schema, searched keys, ranges, arch/placement) without running it. "
        "A file without `name` and `search` sections is checked as a final-training configuration "
        "(what `sbn-study export` writes and `sbn-study train` takes).",
    )
    common.add_spec_arguments(parser)
    parser.set_defaults(handler=_validate)


def _validate(args: argparse.Namespace) -> int:
    if common.is_final_config(args.spec):
        return _validate_final(args)
    from sbn_study.spec import load_spec
    from sbn_study.study.render import render_valid, spec_warnings

    spec = load_spec(args.spec, args.overrides)
    print(render_valid(spec))
    common.print_err(spec_warnings(spec))
    return 0


def _validate_final(args: argparse.Namespace) -> int:
    from sbn_study.final.render import config_warnings, render_valid
    from sbn_study.results.export import load_final_config

    config = load_final_config(args.spec, args.overrides)
    print(render_valid(args.spec, config))
    common.print_err(config_warnings(config))
    return 0


def _add_run(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a study: Ray Tune trials with an Optuna sampler and ASHA, logged to MLflow",
        description="Run the study a spec describes, on an embedded local Ray or a cluster (--address).",
    )
    common.add_spec_arguments(parser)
    common.add_output_arguments(parser)
    common.add_address(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue this study's unfinished run (after Ctrl-C or a killed driver)",
    )
    parser.add_argument(
        "--num-cpus", type=arguments.integer(1), metavar="N", help="CPUs of the local Ray (default: all)"
    )
    common.add_verbose(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.spec import load_spec
    from sbn_study.study import render
    from sbn_study.study.lifecycle import RunOptions, StudyOutcome, run_study

    spec = load_spec(args.spec, args.overrides)
    common.print_err(render.spec_warnings(spec))
    spec_text = Path(args.spec).read_text()

    def report(outcome: StudyOutcome) -> int:
        print(render.render_outcome(outcome))
        common.print_err(render.outcome_warnings(outcome, Path(args.output)))
        if outcome.status != "interrupted":
            return 0
        command = render.RunCommand(
            spec=args.spec,
            overrides=tuple(args.overrides),
            output=None if args.output == common.DEFAULT_OUTPUT else args.output,
            tracking_uri=args.tracking_uri,
            address=args.address,
        )
        stop = stopping.requested()
        common.print_err([stop.message] if stop else [])
        print(render.resume_command(command))
        return stop.exit_code if stop else common.EXIT_INTERRUPTED

    options = RunOptions(
        output=Path(args.output),
        address=args.address,
        tracking_uri=args.tracking_uri,
        resume=args.resume,
        num_cpus=args.num_cpus,
        verbose=args.verbose,
        report=report,
    )
    print(render.render_start(spec, args.resume), flush=True)
    return report(run_study(spec, spec_text, options))


def _add_ui(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="open the MLflow UI of a study store on 127.0.0.1",
        description="Start the MLflow UI for a tracking store, bound to 127.0.0.1.",
    )
    common.add_output_arguments(parser)
    parser.add_argument("--port", type=arguments.integer(1, 65535), default=5000)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; reach it remotely through an SSH tunnel)",
    )
    parser.set_defaults(handler=_ui)


def _ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from sbn_study.results.analysis import open_store
    from sbn_study.store.ui import experiment_links
    from sbn_study.study.render import render_ui

    uri = common.tracking_uri(args)
    url = f"http://{args.host}:{args.port}"
    try:
        links = experiment_links(open_store(uri), url)
    except UserError:  # no store yet: MLflow's UI starts on an empty one
        links = []
    print(render_ui(uri, url, links), flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    # MLflow's job runner is seven more processes and seconds of start-up for a feature studies never use. The
    # store goes by the environment, which other users cannot read, not the command line (a database
    # password would show in `ps`).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    return subprocess.call(command, env=env)


def _add_replay(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="send a study's MLflow writes that the store did not take (saved in <output>/studies)",
        description="Send the MLflow writes a study saved to <output>/studies/<name>.unsent.jsonl while its "
        "store did not take them, in order, to the store its state names; sending one twice does no harm. "
        "`run` does it first by itself.",
    )
    parser.add_argument("study", help="study name (the spec's `name`)")
    common.add_output_folder(parser)
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="the study's store, with credentials (default: its state's)"
    )
    parser.set_defaults(handler=_replay)


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.study.state import replay

    print(replay(Path(args.output), args.study, args.tracking_uri))
    return 0


def register(subparsers: Subparsers) -> None:
    for add in (_add_validate, _add_run, _add_ui, _add_replay):
        add(subparsers)
