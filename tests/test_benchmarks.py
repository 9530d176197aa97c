"""The benchmark runner: its table formatting, and a smoke run of some benchmarks as a user starts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import markdown_table

REPO = Path(__file__).resolve().parents[1]


def test_markdown_table_takes_the_union_of_the_rows_columns() -> None:
    table = markdown_table([{"a": 1, "b": "x"}, {"a": 22, "c": 3.5}])
    assert table.splitlines() == [
        "| a  | b | c   |",
        "|----|---|-----|",
        "| 1  | x |     |",
        "| 22 |   | 3.5 |",
    ]


def test_unknown_benchmark_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "nope"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown benchmark(s) nope" in result.stderr


@pytest.mark.slow
def test_quick_run_prints_a_table_and_a_verdict_per_benchmark() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "validate", "sbn_layer", "gpu_share", "data", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for heading, column in (
        ("## validate (target:", "| command"),
        ("## sbn_layer (target:", "| shape"),
        ("## gpu_share (target:", "| trials at once"),
        ("## data (target:", "| pipeline"),
    ):
        section = out.split(heading, 1)[1].split("\n## ", 1)[0]
        assert column in section
        assert "|---" in section
        assert "Verdict: " in section
    assert "## Machine" in out
    assert "torch " in out and "device used:" in out
