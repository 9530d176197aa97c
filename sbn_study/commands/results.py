"""`report`, `export` and `probe`: the commands that read a study back, turn its best trials into final-training
configs, and measure untrained networks."""

from __future__ import annotations

import argparse

from sbn_study import arguments
from sbn_study.commands import common
from sbn_study.commands.common import Subparsers


def _add_report(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="summarize a study from MLflow: best trials, statuses, compute; export the trials table",
        description="Summarize a finished (or running) study from its MLflow store, and optionally write "
        "its trials table (one row per trial, every parameter) as CSV or parquet.",
    )
    common.add_study_arguments(parser)
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

    uri = common.reachable_store(args)
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
    common.add_study_arguments(parser)
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
    exported = export_best(
        common.reachable_store(args), args.study, args.top_k, out_dir, execution=args.execution
    )
    print(render_exported(exported))
    common.print_err(export_warnings(exported, args.top_k))
    return 0


def _add_probe(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="feature-map statistics of untrained networks, per norm arm × placement × seed (no Ray)",
        description="Build the model of a spec's base configuration (or of a final-training config) for every "
        "arm × placement × seed, measure the feature-map statistics at initialization on the trials' probe "
        "batch, and summarize them over seeds with t intervals: a table (CSV), a figure (PNG) and a summary "
        "under --output, and one MLflow run in the experiment <name>-probe.",
    )
    common.add_spec_arguments(parser)
    parser.add_argument(
        "--arms",
        type=common.name_list,
        default=("sbn", "bn", "2bn"),
        metavar="KINDS",
        help="default sbn,bn,2bn",
    )
    parser.add_argument(
        "--placements",
        type=common.name_list,
        metavar="LIST",
        help="e.g. 34,all (default: the config's placement)",
    )
    parser.add_argument(
        "--seeds", type=common.seed_list, default=(0, 1, 2), metavar="LIST", help="default 0,1,2"
    )
    common.add_output_arguments(parser)
    parser.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbn_study.results import probe
    from sbn_study.store.uri import resolve_tracking_uri

    source = probe.load_source(args.spec, args.overrides, final=common.is_final_config(args.spec))
    placements = args.placements or (source.config.norm.placement,)
    request = probe.ProbeRequest(source.config, args.arms, placements, args.seeds)
    uri = resolve_tracking_uri(args.tracking_uri, source.tracking_uri, Path(args.output))
    print(probe.render_probe(probe.run_probe(request, probe.ProbeOptions(source, Path(args.output), uri))))
    return 0


def register(subparsers: Subparsers) -> None:
    for add in (_add_report, _add_export, _add_probe):
        add(subparsers)
