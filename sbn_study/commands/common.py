"""What several subcommands share: their common options, declared once, and the small argument types and
store lookups they use. Nothing heavy is imported at module level, so `--help` answers at once."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
DEFAULT_OUTPUT = "sbn-runs"

Subparsers = argparse._SubParsersAction  # argparse names no public type for it


def print_err(lines: Iterable[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


# --- options shared by several subcommands ---------------------------------------------------------------


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The spec file and its --set overrides, shared by every subcommand that reads a spec."""
    parser.add_argument("spec", help="study spec (YAML), e.g. search_spaces/quickstart.yaml")
    add_overrides(
        parser,
        "override one spec key before validation; VALUE is YAML (e.g. --set search.num_samples=4, "
        "--set 'search.space.norm.eps={loguniform: [1e-6, 1e-2]}', --set search.space.norm.eps=null "
        "stops searching it); repeatable",
    )


def add_output_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"folder of the default MLflow store, Tune state and checkpoints (default: ./{DEFAULT_OUTPUT})",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    add_output_folder(parser)
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the spec's tracking.uri, "
        "else sqlite under --output)",
    )


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join a Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray)",
    )


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """Which evaluation suites run on a trained model, and the grid of the Fourier heat map."""
    from sbn_study import arguments
    from sbn_study.final.evaluation import SUITE_NAMES, EvaluationOptions

    defaults = EvaluationOptions()
    parser.add_argument(
        "--suites",
        "--suite",
        type=name_list,
        metavar="LIST",
        help=f"evaluation suites: some of {','.join(SUITE_NAMES)}, or none (default: all; none with "
        "train --batch-sizes, whose table is of accuracy)",
    )
    parser.add_argument(
        "--fourier-stride",
        type=arguments.integer(1),
        default=defaults.fourier_stride,
        metavar="N",
        help="measure the Fourier heat map only at frequencies whose components are multiples of N, about "
        f"1/N² of the cost (default {defaults.fourier_stride}; 1: every frequency)",
    )
    parser.add_argument(
        "--fourier-images",
        type=arguments.integer(1),
        default=defaults.fourier_images,
        metavar="N",
        help=f"test images the Fourier heat map is measured on (default {defaults.fourier_images})",
    )


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's, Tune's, Optuna's and MLflow's own lines (hidden by default)",
    )


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The study to read back, and where its MLflow store is; shared by report and export."""
    parser.add_argument("study", help="study name (the spec's `name`, the MLflow experiment)")
    add_output_arguments(parser)
    parser.add_argument(
        "--execution",
        metavar="RUN",
        help="parent run id or name of the study execution to read (default: the latest)",
    )


def tracking_uri(args: argparse.Namespace) -> str:
    """The store of --tracking-uri/--output: a spec's tracking.uri plays no part for commands without one."""
    from pathlib import Path

    from sbn_study.store.uri import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, None, Path(args.output))


def reachable_store(args: argparse.Namespace) -> str:
    """The store to read, refused in one line when its server does not answer (MLflow would retry for
    minutes, then end in a traceback)."""
    from sbn_study.store.uri import check_reachable

    uri = tracking_uri(args)
    check_reachable(uri)
    return uri


def seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    # numpy's range, so torch's and Optuna's (the spec's train.seed has the same bounds).
    if not all(0 <= seed <= 2**32 - 1 for seed in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds from 0 to {2**32 - 1}, got {text!r}")
    return seeds


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names such as bn,2bn, got {text!r}")
    return names


def is_final_config(path: str) -> bool:
    """Every study spec has `name` and `search`; a final-training configuration has neither."""
    from sbn_study.spec import SpecError
    from sbn_study.spec.loader import read_yaml

    try:
        data = read_yaml(path, "spec")
    except SpecError:
        return False  # load_spec reports the problem in its own words
    return isinstance(data, dict) and "search" not in data and "name" not in data
