"""`sbn-study`: the command line.

The subcommands live in `sbn_study.commands`, one module per stage (`study`: validate, run, ui, replay;
`results`: report, export, probe; `final`: train; `evaluate`: evaluate). Each declares a command's arguments in `_add_<name>` and runs
it in `_<name>(args) -> int`; options several commands share are declared once, in `commands.common`. What a
command prints is made by the render functions beside what they render, so the commands only parse and
dispatch. Heavy modules (torch, ray, mlflow, optuna, pandas, and even the spec schema) are imported inside the
command functions so that `--help`, `--version` and typos answer at once. `main` turns every UserError (a
SpecError lists one problem per line) into `error: ...` lines on stderr and exit code 2, Ctrl-C into exit code
130, and SIGTERM into Ctrl-C's clean stop with exit code 143 (`study.stopping`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sbn_study import __version__
from sbn_study.commands import common, evaluate, final, results, study
from sbn_study.errors import UserError
from sbn_study.study import stopping


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbn-study",
        description="Hyperparameter studies of Spectral Batch Normalization on Ray Tune, Optuna and MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"sbn-study {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for commands in (study, results, final, evaluate):
        commands.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; main returns codes, never exits
        return exc.code if isinstance(exc.code, int) else 0
    # Batch schedulers end a job with SIGTERM: it stops what runs as cleanly as Ctrl-C.
    with stopping.sigterm_stops_like_ctrl_c():
        try:
            return int(args.handler(args))
        except UserError as exc:
            common.print_err(f"error: {line}" for line in str(exc).splitlines() or [type(exc).__name__])
            return common.EXIT_USER_ERROR
        except KeyboardInterrupt:
            stop = stopping.requested()
            print(stop.message if stop else "sbn-study: interrupted", file=sys.stderr)
            return stop.exit_code if stop else common.EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
