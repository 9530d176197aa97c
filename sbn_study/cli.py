"""`sbn-study`: the command line.

Each subcommand is an `_add_<name>(subparsers)` that declares its arguments and a `_<name>(args) -> int` that
runs it. Heavy modules (torch, ray, mlflow, optuna, pandas, and even the spec schema) are imported inside
the subcommand functions so that `--help`, `--version` and typos answer at once. `main` turns every
UserError (a SpecError lists one problem per line) into `error: ...` lines on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sbn_study import __version__
from sbn_study.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The spec file and its --set overrides, shared by every subcommand that reads a spec."""
    parser.add_argument("spec", help="study spec (YAML), e.g. search_spaces/quickstart.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override one spec key before validation; VALUE is YAML (e.g. --set search.num_samples=4, "
            "--set 'search.space.norm.eps={loguniform: [1e-6, 1e-2]}', --set search.space.norm.eps=null "
            "stops searching it); repeatable"
        ),
    )


def _add_validate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a study spec and report every problem at once",
        description="Check a study spec (schema, searched keys, ranges, arch/placement) without running it.",
    )
    _add_spec_arguments(parser)
    parser.set_defaults(handler=_validate)


def _validate(args: argparse.Namespace) -> int:
    from sbn_study.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    search = spec.search
    searched = len(search.space)
    print(
        f"ok: {spec.name}: {search.num_samples} trial{'s' * (search.num_samples != 1)} over {searched} "
        f"searched parameter{'s' * (searched != 1)} "
        f"(sampler {search.sampler.type}, scheduler {search.scheduler.type})"
    )
    for warning in spec.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


DEFAULT_OUTPUT = "sbn-runs"


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


def _add_run(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a study: Ray Tune trials with an Optuna sampler and ASHA, logged to MLflow",
        description="Run the study a spec describes, on an embedded local Ray or a cluster (--address).",
    )
    _add_spec_arguments(parser)
    _add_output_arguments(parser)
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join a Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray)",
    )
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
    from sbn_study.study import RunOptions, run_study

    spec = load_spec(args.spec, args.overrides)
    for warning in spec.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    spec_text = Path(args.spec).read_text()
    options = RunOptions(
        output=Path(args.output),
        address=args.address,
        tracking_uri=args.tracking_uri,
        resume=args.resume,
        num_cpus=args.num_cpus,
    )
    print(
        f"sbn-study: {'resuming' if args.resume else 'starting'} study '{spec.name}': "
        f"{spec.search.num_samples} trials, {spec.search.sampler.type} + {spec.search.scheduler.type}",
        flush=True,
    )
    outcome = run_study(spec, spec_text, options)
    counts: dict[str, int] = {}
    for status in outcome.trial_statuses.values():
        counts[status] = counts.get(status, 0) + 1
    print(
        f"\nstudy '{outcome.name}' {outcome.status}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    if outcome.best:
        best = outcome.best
        print(f"best trial {best['trial_id']} ({best['status']}): last {best['metric']} = {best['value']:.4f}")
        for key, value in best["params"].items():
            print(f"  {key} = {value}")
        print(f"  MLflow run {best['run_id']}")
    print(
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.name}'), Tune state {outcome.tune_path}"
    )
    print(f"browse:  sbn-study ui --tracking-uri '{outcome.tracking_uri}'")
    if outcome.status == "interrupted":
        print(
            f"resume:  sbn-study run {args.spec} --resume"
            + (f" --output {args.output}" if args.output != DEFAULT_OUTPUT else "")
        )
        return EXIT_INTERRUPTED
    return 0


def _add_ui(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    import subprocess
    from pathlib import Path

    from sbn_study.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, None, Path(args.output))
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
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
    return subprocess.call(command)


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
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sbn-study: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
