"""`sbn-study`: the command line.

Each subcommand is an `_add_<name>(subparsers)` that declares its arguments and a `_<name>(args) -> int` that
runs it; an option two subcommands share is declared once, by one `_add_..._arguments`. What a command prints
is made by the render functions beside what they render (`study.render`, `results.report`, `final.render`), so
this module only parses, dispatches, and turns errors into exit codes. Heavy modules (torch, ray, mlflow,
optuna, pandas, and even the spec schema) are imported inside the subcommand functions so that `--help`,
`--version` and typos answer at once. `main` turns every UserError (a SpecError lists one problem per line)
into `error: ...` lines on stderr and exit code 2, and Ctrl-C into exit code 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from sbn_study import __version__
from sbn_study.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
DEFAULT_OUTPUT = "sbn-runs"

Subparsers = argparse._SubParsersAction  # argparse names no public type for it


def _print_err(lines: Iterable[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


# --- options shared by several subcommands ---------------------------------------------------------------


def _add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The spec file and its --set overrides, shared by every subcommand that reads a spec."""
    parser.add_argument("spec", help="study spec (YAML), e.g. search_spaces/quickstart.yaml")
    _add_overrides(
        parser,
        "override one spec key before validation; VALUE is YAML (e.g. --set search.num_samples=4, "
        "--set 'search.space.norm.eps={loguniform: [1e-6, 1e-2]}', --set search.space.norm.eps=null "
        "stops searching it); repeatable",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"folder of the default MLflow store, Tune state and checkpoints (default: ./{DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the spec's tracking.uri, "
        "else sqlite under --output)",
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join a Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray)",
    )


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The study to read back, and where its MLflow store is; shared by report and export."""
    parser.add_argument("study", help="study name (the spec's `name`, the MLflow experiment)")
    _add_output_arguments(parser)
    parser.add_argument(
        "--execution",
        metavar="RUN",
        help="parent run id or name of the study execution to read (default: the latest)",
    )


def _tracking_uri(args: argparse.Namespace) -> str:
    """The store of --tracking-uri/--output: a spec's tracking.uri plays no part for commands without one."""
    from pathlib import Path

    from sbn_study.store.uri import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, None, Path(args.output))


# --- validate ---------------------------------------------------------------------------------------------


def _add_validate(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a study spec (or an exported final-training config) and report every problem at once",
        description="Check a study spec (schema, searched keys, ranges, arch/placement) without running it. "
        "A file without `name` and `search` sections is checked as a final-training configuration "
        "(what `sbn-study export` writes and `sbn-study train` takes).",
    )
    _add_spec_arguments(parser)
    parser.set_defaults(handler=_validate)


def _is_final_config(path: str) -> bool:
    """Every study spec has `name` and `search`; a final-training configuration has neither."""
    from sbn_study.spec import SpecError
    from sbn_study.spec.loader import read_yaml

    try:
        data = read_yaml(path, "spec")
    except SpecError:
        return False  # load_spec reports the problem in its own words
    return isinstance(data, dict) and "search" not in data and "name" not in data


def _validate(args: argparse.Namespace) -> int:
    if _is_final_config(args.spec):
        return _validate_final(args)
    from sbn_study.spec import load_spec
    from sbn_study.study.render import render_valid, spec_warnings

    spec = load_spec(args.spec, args.overrides)
    print(render_valid(spec))
    _print_err(spec_warnings(spec))
    return 0


def _validate_final(args: argparse.Namespace) -> int:
    from sbn_study.final.render import config_warnings, render_valid
    from sbn_study.results.export import load_final_config

    config = load_final_config(args.spec, args.overrides)
    print(render_valid(args.spec, config))
    _print_err(config_warnings(config))
    return 0


# --- run, ui ----------------------------------------------------------------------------------------------


def _add_run(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a study: Ray Tune trials with an Optuna sampler and ASHA, logged to MLflow",
        description="Run the study a spec describes, on an embedded local Ray or a cluster (--address).",
    )
    _add_spec_arguments(parser)
    _add_output_arguments(parser)
    _add_address(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue this study's unfinished run (after Ctrl-C or a killed driver)",
    )
    parser.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray (default: all)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.spec import load_spec
    from sbn_study.study import render
    from sbn_study.study.lifecycle import RunOptions, run_study

    spec = load_spec(args.spec, args.overrides)
    _print_err(render.spec_warnings(spec))
    spec_text = Path(args.spec).read_text()
    options = RunOptions(
        output=Path(args.output),
        address=args.address,
        tracking_uri=args.tracking_uri,
        resume=args.resume,
        num_cpus=args.num_cpus,
    )
    print(render.render_start(spec, args.resume), flush=True)
    outcome = run_study(spec, spec_text, options)
    print(render.render_outcome(outcome))
    _print_err(render.outcome_warnings(outcome, options.output))
    if outcome.status == "interrupted":
        command = render.RunCommand(
            spec=args.spec,
            overrides=tuple(args.overrides),
            output=None if args.output == DEFAULT_OUTPUT else args.output,
            tracking_uri=args.tracking_uri,
            address=args.address,
        )
        print(render.resume_command(command))
        return EXIT_INTERRUPTED
    return 0


def _add_ui(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="open the MLflow UI of a study store on 127.0.0.1",
        description="Start the MLflow UI for a tracking store, bound to 127.0.0.1.",
    )
    _add_output_arguments(parser)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; reach it remotely through an SSH tunnel)",
    )
    parser.set_defaults(handler=_ui)


def _ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from sbn_study.store.uri import redact_uri

    uri = _tracking_uri(args)
    print(f"MLflow UI for {redact_uri(uri)} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    # MLflow's job runner is seven more processes and seconds of start-up for a feature studies never use.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.call(command, env=env)


# --- report, export ---------------------------------------------------------------------------------------


def _add_report(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="summarize a study from MLflow: best trials, statuses, compute; export the trials table",
        description="Summarize a finished (or running) study from its MLflow store, and optionally write "
        "its trials table (one row per trial, every parameter) as CSV or parquet.",
    )
    _add_study_arguments(parser)
    parser.add_argument("--top", type=int, default=5, metavar="K", help="best trials to list (default 5)")
    parser.add_argument("--csv", metavar="PATH", help="write the trials table as CSV")
    parser.add_argument("--parquet", metavar="PATH", help="write the trials table as parquet")
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from sbn_study.results.analysis import curves, load_study, trials
    from sbn_study.results.importance import rung_fidelity, study_rungs
    from sbn_study.results.report import render_report, write_table

    uri = _tracking_uri(args)
    table = trials(uri, args.study, execution=args.execution, all_params=True)
    execution = table.attrs["execution"]
    rungs = study_rungs(table, load_study(uri, args.study, execution).spec.search.scheduler)
    fidelity = rung_fidelity(curves(uri, args.study, [rungs.metric], execution=execution), rungs)
    print(render_report(table, uri, args.top, fidelity))
    for fmt in ("csv", "parquet"):
        if path := getattr(args, fmt):
            print(write_table(table, path, fmt))
    return 0


def _add_export(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write the best trials of a study as final-training configs for `sbn-study train`",
        description="Write the top K trials of a study (by the best value of the study's metric) as fully "
        "resolved configuration files with a provenance block, ready for `sbn-study train`.",
    )
    _add_study_arguments(parser)
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="trials to export (default 1)")
    parser.add_argument(
        "-o", "--out-dir", metavar="DIR", help="folder for the configs (default: <--output>/exports)"
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.results.export import export_best
    from sbn_study.results.report import export_warnings, render_exported

    if args.top_k < 1:
        raise UserError(f"--top-k: expected at least 1, got {args.top_k}")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.output) / "exports"
    exported = export_best(_tracking_uri(args), args.study, args.top_k, out_dir, execution=args.execution)
    print(render_exported(exported))
    _print_err(export_warnings(exported, args.top_k))
    return 0


# --- train ------------------------------------------------------------------------------------------------


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _add_train(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="final training: several seeds at the full budget, best-validation checkpoint tested once",
        description="Train a final-training config (what `sbn-study export` writes) on several seeds in "
        "parallel as Ray tasks, keep each seed's best-validation checkpoint and evaluate it once on the test "
        "split; with --baseline also train plain BN on the same seeds and report the paired difference.",
    )
    parser.add_argument(
        "config", help="final-training config (YAML), e.g. sbn-runs/exports/STUDY-top1-ID.yaml"
    )
    _add_overrides(parser, "override one config key; VALUE is YAML (e.g. --set train.epochs=2); repeatable")
    parser.add_argument(
        "--seeds", type=_seed_list, default=(0, 1, 2, 3, 4), metavar="LIST", help="default 0,1,2,3,4"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same config with plain BN (norm.kind bn, placement none) on the same seeds",
    )
    _add_output_arguments(parser)
    _add_address(parser)
    parser.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: <study>-final, from the provenance)"
    )
    parser.add_argument("--cpus-per-seed", type=float, default=1.0, metavar="N", help="default 1")
    parser.add_argument(
        "--gpus-per-seed", type=float, metavar="N", help="default: 1 when the Ray cluster has GPUs, else 0"
    )
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.final import render
    from sbn_study.final.training import FinalOptions, experiment_name, run_final, training_arms
    from sbn_study.results.export import load_final_config

    config = load_final_config(args.config, args.overrides)
    options = FinalOptions(
        experiment=args.experiment or experiment_name(config, Path(args.config)),
        seeds=args.seeds,
        baseline=args.baseline,
        output=Path(args.output),
        tracking_uri=args.tracking_uri,
        address=args.address,
        cpus_per_seed=args.cpus_per_seed,
        gpus_per_seed=args.gpus_per_seed,
    )
    labels = render.arm_labels(training_arms(config, args.baseline))
    print(render.render_start(args.config, config, options, labels), flush=True)
    _print_err(render.config_warnings(config))
    outcome = run_final(config, options, lambda result: print(render.render_seed(result), flush=True))
    print(render.render_summary(outcome, labels))
    _print_err(render.summary_warnings(outcome))
    return 0 if all(r.status == "completed" for r in outcome.results) else 1


# --- entry point ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbn-study",
        description="Hyperparameter studies of Spectral Batch Normalization on Ray Tune, Optuna and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"sbn-study {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(subparsers)
    _add_run(subparsers)
    _add_ui(subparsers)
    _add_report(subparsers)
    _add_export(subparsers)
    _add_train(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; main returns codes, never exits
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return int(args.handler(args))
    except UserError as exc:
        _print_err(f"error: {line}" for line in str(exc).splitlines() or [type(exc).__name__])
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sbn-study: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
