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
        help="check a study spec (or an exported final-training config) and report every problem at once",
        description="Check a study spec (schema, searched keys, ranges, arch/placement) without running it. "
        "A file without `name` and `search` sections is checked as a final-training configuration "
        "(what `sbn-study export` writes and `sbn-study train` takes).",
    )
    _add_spec_arguments(parser)
    parser.set_defaults(handler=_validate)


def _is_final_config(path: str) -> bool:
    """Every study spec has `name` and `search`; a final-training configuration has neither."""
    from pathlib import Path

    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # load_spec reports the problem in its own words
    return isinstance(data, dict) and "search" not in data and "name" not in data


def _validate(args: argparse.Namespace) -> int:
    if _is_final_config(args.spec):
        return _validate_final(args)
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


def _validate_final(args: argparse.Namespace) -> int:
    from sbn_study.results.export import budget_warning, load_final_config

    config = load_final_config(args.spec, args.overrides)
    source = config.provenance
    origin = (
        f"; study {source.study}, trial {source.trial_id}, best {source.metric} {source.value:.4g}"
        if source
        else ""
    )
    print(
        f"ok: {args.spec}: final-training config ({config.model.arch}, {config.norm.kind} at placement "
        f"{config.norm.placement}, {config.train.epochs} epochs{origin})"
    )
    if source and not source.full_budget:
        print(f"warning: {budget_warning(source)}", file=sys.stderr)
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
    from sbn_study.study.lifecycle import RunOptions, run_study

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
        print(
            f"best trial {best['trial_id']} ({best['status']}): {best['metric']} = {best['value']:.4f} "
            f"at epoch {best['epoch']}"
        )
        for key, value in best["params"].items():
            print(f"  {key} = {value}")
        print(f"  MLflow run {best['run_id']}")
    print(
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.name}'), Tune state {outcome.tune_path}"
    )
    print(f"browse:  sbn-study ui --tracking-uri '{outcome.tracking_uri}'")
    if outcome.unsent_writes:
        print(
            f"warning: the tracking server did not take {outcome.unsent_writes} writes; they are saved in "
            f"{Path(args.output) / 'studies' / (spec.name + '.unsent.jsonl')}",
            file=sys.stderr,
        )
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
    import os
    import subprocess
    from pathlib import Path

    from sbn_study.store.uri import redact_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, None, Path(args.output))
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
    from pathlib import Path

    from sbn_study.store.uri import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, None, Path(args.output))


def _add_report(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    from pathlib import Path

    from sbn_study.results.analysis import best_trials, trials
    from sbn_study.store.uri import redact_uri

    uri = _tracking_uri(args)
    table = trials(uri, args.study, execution=args.execution, all_params=True)
    attrs = table.attrs
    metric, mode, budget = attrs["metric"], attrs["mode"], attrs["budget"]
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    stopped = counts.get("stopped_early", 0)
    print(f"study '{args.study}' (execution {attrs['execution']}) in {redact_uri(uri)}")
    print(
        f"{len(table)} trials: "
        + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
        + f"; {stopped} of {len(table)} stopped early by the scheduler"
    )
    if len(table):
        epochs = int(table["epochs"].sum())
        print(
            f"compute: {table['compute_s'].sum():.1f} s of training over {epochs} trial-epochs "
            f"(Σ epoch_time_s); metric {metric} ({mode}), full budget {budget} epochs"
        )
        best = best_trials(table, f"best_{metric}", mode, args.top)
        shown = ["trial_id", "status", "epochs", f"best_{metric}", "best_epoch", "arm", *attrs["searched"]]
        print(f"best trials by best {metric}:")
        print(best[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for flag, path, write in (
        ("--csv", args.csv, table.to_csv),
        ("--parquet", args.parquet, table.to_parquet),
    ):
        if path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                write(path, index=False)
            except OSError as exc:
                raise UserError(f"{flag}: cannot write {path} ({exc.strerror or exc})") from None
            print(f"wrote the trials table ({len(table)} rows) to {path}")
    return 0


def _add_export(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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

    from sbn_study.results.export import budget_warning, export_best

    if args.top_k < 1:
        raise UserError(f"--top-k: expected at least 1, got {args.top_k}")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.output) / "exports"
    exported = export_best(_tracking_uri(args), args.study, args.top_k, out_dir, execution=args.execution)
    for item in exported:
        p = item.provenance
        print(
            f"wrote {item.path}: rank {p.rank}, trial {p.trial_id} ({p.status}), best {p.metric} "
            f"{p.value:.4g} at epoch {p.epoch} of {p.budget}"
        )
        if not p.full_budget:
            print(f"warning: {item.path.name}: {budget_warning(p)}", file=sys.stderr)
    if len(exported) < args.top_k:
        print(
            f"note: only {len(exported)} trials have a {exported[0].provenance.metric} to rank",
            file=sys.stderr,
        )
    print(f"next: sbn-study train {exported[0].path} --baseline")
    return 0


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


def _add_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key; VALUE is YAML (e.g. --set train.epochs=2); repeatable",
    )
    parser.add_argument(
        "--seeds", type=_seed_list, default=(0, 1, 2, 3, 4), metavar="LIST", help="default 0,1,2,3,4"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also train the same config with plain BN (norm.kind bn, placement none) on the same seeds",
    )
    _add_output_arguments(parser)
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="join a Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray)",
    )
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

    from sbn_study.final.training import FinalOptions, SeedResult, experiment_name, run_final, training_arms
    from sbn_study.results.analysis import arm_label
    from sbn_study.results.export import budget_warning, load_final_config

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
    arms = training_arms(config, args.baseline)
    labels = {arm: arm_label(c.norm.kind, c.norm.placement) for arm, c in arms.items()}
    print(
        f"sbn-study: final training of {args.config}: seeds {','.join(map(str, args.seeds))} × "
        + ", ".join(f"{arm} ({label})" for arm, label in labels.items())
        + f", {config.train.epochs} epochs each, experiment '{options.experiment}'",
        flush=True,
    )
    if config.provenance and not config.provenance.full_budget:
        print(f"warning: {budget_warning(config.provenance)}", file=sys.stderr)

    def progress(r: SeedResult) -> None:
        if r.status == "error":
            print(f"  {r.arm:<8} seed {r.seed}: error: {r.error}", flush=True)
            return
        print(
            f"  {r.arm:<8} seed {r.seed}: {r.status}, test_acc {r.test_acc:.4f}, test_loss {r.test_loss:.4f} "
            f"(best val_acc {r.best_val_acc:.4f} at epoch {r.best_epoch})",
            flush=True,
        )

    outcome = run_final(config, options, progress)
    print("test accuracy of the best-validation checkpoint, mean ± std over completed seeds:")
    for arm, summary in outcome.arms.items():
        print(f"  {arm:<8} {labels[arm]:<10} {summary.mean:.4f} ± {summary.std:.4f}  (n={summary.n})")
    diff = outcome.difference
    if diff is not None:
        print(
            f"paired difference config − baseline: {diff.mean:+.4f}, {diff.confidence:.0%} CI "
            f"[{diff.low:+.4f}, {diff.high:+.4f}] (Student t, n={diff.n} seeds)"
        )
    print(
        f"results: MLflow {outcome.tracking_uri} (experiment '{outcome.experiment}', run {outcome.parent_run_id})"
    )
    if outcome.unsent:
        print(
            f"warning: the tracking store did not take every write; saved to {outcome.unsent}",
            file=sys.stderr,
        )
    return 0 if all(r.status == "completed" for r in outcome.results) else 1


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
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sbn-study: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
