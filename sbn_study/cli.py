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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbn-study",
        description="Hyperparameter studies of Spectral Batch Normalization on Ray Tune, Optuna and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"sbn-study {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_validate(subparsers)
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
