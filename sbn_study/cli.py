"""`sbn-study`: the command line.

Each subcommand is an `_add_<name>(subparsers)` that declares its arguments and a `_<name>(args) -> int` that
runs it; an option two subcommands share is declared once, by one `_add_..._arguments`. What a command prints
is made by the render functions beside what they render (`study.render`, `results.report`, `final.render`), so
this module only parses, dispatches, and turns errors into exit codes. Heavy modules (torch, ray, mlflow,
optuna, pandas, and even the spec schema) are imported inside the subcommand functions so that `--help`,
`--version` and typos answer at once. `main` turns every UserError (a SpecError lists one problem per line)
into `error: ...` lines on stderr and exit code 2, Ctrl-C into exit code 130, and SIGTERM into Ctrl-C's
clean stop with exit code 143 (`study.stopping`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

from sbn_study import __version__, arguments
from sbn_study.errors import UserError
from sbn_study.study import stopping

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


def _add_output_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"folder of the default MLflow store, Tune state and checkpoints (default: ./{DEFAULT_OUTPUT})",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    _add_output_folder(parser)
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


def _reachable_store(args: argparse.Namespace) -> str:
    """The store to read, refused in one line when its server does not answer (MLflow would retry for
    minutes, then end in a traceback)."""
    from sbn_study.store.uri import check_reachable

    uri = _tracking_uri(args)
    check_reachable(uri)
    return uri


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
    parser.add_argument(
        "--num-cpus", type=arguments.integer(1), metavar="N", help="CPUs of the local Ray (default: all)"
    )
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
        stop = stopping.requested()
        _print_err([stop.message] if stop else [])
        print(render.resume_command(command))
        return stop.exit_code if stop else EXIT_INTERRUPTED
    return 0


def _add_ui(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="open the MLflow UI of a study store on 127.0.0.1",
        description="Start the MLflow UI for a tracking store, bound to 127.0.0.1.",
    )
    _add_output_arguments(parser)
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

    uri = _tracking_uri(args)
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


# --- report, export ---------------------------------------------------------------------------------------


def _add_report(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="summarize a study from MLflow: best trials, statuses, compute; export the trials table",
        description="Summarize a finished (or running) study from its MLflow store, and optionally write "
        "its trials table (one row per trial, every parameter) as CSV or parquet.",
    )
    _add_study_arguments(parser)
    parser.add_argument(
        "--top", type=arguments.integer(1), default=5, metavar="K", help="best trials to list (default 5)"
    )
    parser.add_argument("--csv", metavar="PATH", help="write the trials table as CSV")
    parser.add_argument("--parquet", metavar="PATH", help="write the trials table as parquet")
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from sbn_study.results.analysis import curves, load_study, trials
    from sbn_study.results.importance import rung_fidelity, study_rungs
    from sbn_study.results.report import render_report, write_table

    uri = _reachable_store(args)
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
    parser.add_argument(
        "--top-k", type=arguments.integer(1), default=1, metavar="K", help="trials to export (default 1)"
    )
    parser.add_argument(
        "-o", "--out-dir", metavar="DIR", help="folder for the configs (default: <--output>/exports)"
    )
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.results.export import export_best
    from sbn_study.results.report import export_warnings, render_exported

    out_dir = Path(args.out_dir) if args.out_dir else Path(args.output) / "exports"
    exported = export_best(_reachable_store(args), args.study, args.top_k, out_dir, execution=args.execution)
    print(render_exported(exported))
    _print_err(export_warnings(exported, args.top_k))
    return 0


def _add_replay(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="send a study's MLflow writes that the store did not take (saved in <output>/studies)",
        description="Send the MLflow writes a study saved to <output>/studies/<name>.unsent.jsonl while its "
        "store did not take them, in order, to the store its state names; sending one twice does no harm. "
        "`run` does it first by itself.",
    )
    parser.add_argument("study", help="study name (the spec's `name`)")
    _add_output_folder(parser)
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="the study's store, with credentials (default: its state's)"
    )
    parser.set_defaults(handler=_replay)


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.study.state import replay

    print(replay(Path(args.output), args.study, args.tracking_uri))
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
    # numpy's range, so torch's and Optuna's (the spec's train.seed has the same bounds).
    if not all(0 <= seed <= 2**32 - 1 for seed in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds from 0 to {2**32 - 1}, got {text!r}")
    return seeds


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names such as bn,2bn, got {text!r}")
    return names


def _add_train(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="final training: several seeds at the full budget, best-validation checkpoint tested once",
        description="Train a final-training config (what `sbn-study export` writes) on several seeds in "
        "parallel as Ray tasks, keep each seed's best-validation checkpoint and evaluate it once on the test "
        "split; with --arms also train other norms at its sites on the same seeds and compare each with it "
        "(paired t intervals, Holm-corrected p; Markdown, LaTeX, forest plot; in MLflow too).",
    )
    parser.add_argument(
        "config", help="final-training config (YAML), e.g. sbn-runs/exports/STUDY-top1-ID.yaml"
    )
    _add_overrides(parser, "override one config key (so every arm's); VALUE is YAML (e.g. train.epochs=2)")
    seeds = "default: the 5 seeds after the search's largest (0,1,2,3,4 without provenance)"
    parser.add_argument("--seeds", type=_seed_list, metavar="LIST", help=seeds)
    arms = "norm kinds to train at the config's sites on the same seeds, e.g. bn,2bn,scale (bn: plain BN)"
    parser.add_argument("--arms", type=_name_list, default=(), metavar="KINDS", help=arms)
    parser.add_argument("--baseline", action="store_true", help="shorthand for --arms bn")
    keep = "the arms keep the config's values of what the search tuned (default: the recipe's base values)"
    parser.add_argument("--arms-keep-tuned", action="store_true", help=keep)
    arm_set = "set one key of every arm (not of the config), e.g. norm.eps=1e-3; repeatable"
    parser.add_argument("--arm-set", action="append", default=[], metavar="KEY=VALUE", help=arm_set)
    _add_output_arguments(parser)
    _add_address(parser)
    parser.add_argument(
        "--experiment", metavar="NAME", help="MLflow experiment (default: <study>-final, from the provenance)"
    )
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
    from sbn_study.final.training import FinalOptions, experiment_name, run_final
    from sbn_study.results.export import load_final_config

    config = load_final_config(args.config, args.overrides)
    kinds = args.arms + (("bn",) if args.baseline and "bn" not in args.arms else ())
    request = ArmRequest(kinds=kinds, keep_tuned=args.arms_keep_tuned, values=tuple(args.arm_set))
    plan = plan_arms(config, request, _tracking_uri(args))
    options = FinalOptions(
        experiment=args.experiment or experiment_name(config, Path(args.config)),
        seeds=args.seeds or plan.default_seeds,
        output=Path(args.output),
        tracking_uri=args.tracking_uri,
        address=args.address,
        cpus_per_seed=args.cpus_per_seed,
        gpus_per_seed=args.gpus_per_seed,
    )
    print(render.render_start(args.config, plan, options), flush=True)
    print("\n".join(render.render_arm_values(plan)), flush=True)
    _print_err([*render.config_warnings(config), *render.seed_warnings(plan, options.seeds)])
    outcome = run_final(plan, options, lambda result: print(render.render_seed(result), flush=True))
    print(render.render_summary(outcome))
    _print_err(render.summary_warnings(outcome))
    return 0 if all(r.status == "completed" for r in outcome.results) else 1


# --- probe ------------------------------------------------------------------------------------------------


def _add_probe(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="feature-map statistics of untrained networks, per norm arm × placement × seed (no Ray)",
        description="Build the model of a spec's base configuration (or of a final-training config) for every "
        "arm × placement × seed, measure the feature-map statistics at initialization on the trials' probe "
        "batch, and summarize them over seeds with t intervals: a table (CSV), a figure (PNG) and a summary "
        "under --output, and one MLflow run in the experiment <name>-probe.",
    )
    _add_spec_arguments(parser)
    parser.add_argument(
        "--arms", type=_name_list, default=("sbn", "bn", "2bn"), metavar="KINDS", help="default sbn,bn,2bn"
    )
    parser.add_argument(
        "--placements", type=_name_list, metavar="LIST", help="e.g. 34,all (default: the config's placement)"
    )
    parser.add_argument("--seeds", type=_seed_list, default=(0, 1, 2), metavar="LIST", help="default 0,1,2")
    _add_output_arguments(parser)
    parser.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.results import probe
    from sbn_study.store.uri import resolve_tracking_uri

    source = probe.load_source(args.spec, args.overrides, final=_is_final_config(args.spec))
    placements = args.placements or (source.config.norm.placement,)
    request = probe.ProbeRequest(source.config, args.arms, placements, args.seeds)
    uri = resolve_tracking_uri(args.tracking_uri, source.tracking_uri, Path(args.output))
    print(probe.render_probe(probe.run_probe(request, probe.ProbeOptions(source, Path(args.output), uri))))
    return 0


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
    _add_replay(subparsers)
    _add_train(subparsers)
    _add_probe(subparsers)
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
            _print_err(f"error: {line}" for line in str(exc).splitlines() or [type(exc).__name__])
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            stop = stopping.requested()
            print(stop.message if stop else "sbn-study: interrupted", file=sys.stderr)
            return stop.exit_code if stop else EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
