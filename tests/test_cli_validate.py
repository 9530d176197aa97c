"""`sbn-study validate` through the real entry point: exit codes, exact output, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sbn_study import __version__, cli

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
name: cli-test
data: {val_size: 512}
model: {arch: tiny}
norm: {placement: "23"}
train: {epochs: 4}
search:
  num_samples: 2
  space:
    norm.eps: {loguniform: [1.0e-6, 1.0e-2]}
"""

BROKEN = """\
name: cli-test
model: {arch: resnet20}
norm: {placement: "4", fft_norm: sideways}
data: {bogus: 1, val_size: 512}
search:
  num_samples: 2
  space:
    norm.eps: {loguniform: [1.0e-2, 1.0e-6]}
"""


def sbn_study(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sbn_study.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def test_valid_spec(tmp_path: Path) -> None:
    done = sbn_study("validate", write(tmp_path, GOOD), "--set", "search.num_samples=5")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "ok: cli-test: 5 trials over 1 searched parameter (sampler tpe, scheduler asha)\n"


def test_broken_spec_lists_every_error_without_a_traceback(tmp_path: Path) -> None:
    done = sbn_study("validate", write(tmp_path, BROKEN))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        "error: data.bogus: unknown key",
        "error: norm.fft_norm: expected one of backward, ortho, forward, got 'sideways'",
        "error: search.space.norm.eps: loguniform needs 0 < low < high, got [0.01, 1e-06]",
        "error: norm.placement: stage 4 does not exist in resnet20 (stages 1-3)",
    ]


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_is_ok_without_a_warning(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "") and out.startswith("ok: ")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("search.sampler.seed=-1", "search.sampler.seed: must be >= 0 and <= 4294967295, got -1"),
        (f"name={'a' * 245}", "name: expected at most 100 characters, got 245"),
        ("train.device=bogus", "train.device: expected auto, cpu, cuda, cuda:N or mps, got 'bogus'"),
        ("norm.eps=.inf", "norm.eps: expected a finite number > 0, got inf"),
        (
            "search.space.data.dataset={choice: [cifar10, cifar100]}",
            "search.space.data.dataset: cannot be searched: the driver loads the dataset once per study and "
            "every trial trains on it, so each would use the base data.dataset while MLflow records the sampled "
            "one; run one study per value instead",
        ),
    ],
    ids=["seed", "name", "device", "inf", "dataset"],
)
def test_hostile_overrides_exit_2_with_one_line(
    tmp_path: Path, override: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["validate", write(tmp_path, GOOD), "--set", override])
    assert (code, capsys.readouterr().err) == (2, f"error: {expected}\n")


def test_missing_spec_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    done = sbn_study("validate", str(missing))
    assert (done.returncode, done.stderr) == (
        2,
        f"error: {missing}: cannot read spec: No such file or directory\n",
    )


def test_version() -> None:
    done = sbn_study("--version")
    assert (done.returncode, done.stdout) == (0, f"sbn-study {__version__}\n")


def test_importing_the_cli_stays_light() -> None:
    heavy = ("torch", "ray", "mlflow", "optuna", "pandas")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, sbn_study.cli; print([m for m in {heavy!r} if m in sys.modules])",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "[]\n"


def test_validate_and_help_import_nothing_heavy(tmp_path: Path) -> None:
    """`validate` (of a study spec and of a final-training config) and `--help` answer before torch could
    even be imported: the spec checks read architectures and norm kinds from the catalog."""
    final = tmp_path / "final.yaml"
    final.write_text('model: {arch: resnet20}\nnorm: {kind: 2bn, placement: "23"}\ntrain: {epochs: 3}\n')
    heavy = ("torch", "ray", "mlflow", "optuna", "pandas")
    code = f"""
import contextlib, io, sys
from sbn_study.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(["validate", "search_spaces/cifar100.yaml"]), main(["validate", {str(final)!r}]), main(["--help"])]
print(codes, [m for m in {heavy!r} if m in sys.modules])
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout == "[0, 0, 0] []\n", done.stderr


def test_warnings_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    code = cli.main(
        [
            "validate",
            path,
            "--set",
            "search.sampler.type=cmaes",
            "--set",
            "search.space.norm.kind={choice: [sbn, 2bn]}",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("ok: cli-test: 2 trials over 2 searched parameters (sampler cmaes,")
    assert err == "warning: sampler 'cmaes' samples categorical parameters (norm.kind) at random\n"


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("sbn_study.spec.load_spec", interrupted)
    assert cli.main(["validate", "spec.yaml"]) == 130
    assert capsys.readouterr().err == "sbn-study: interrupted\n"


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: sbn-study" in capsys.readouterr().err
