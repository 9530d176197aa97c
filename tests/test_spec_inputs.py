"""Hostile input: every value a user can type is refused at validation, in one line naming its key, never
later with a traceback (seeds numpy rejects, infinities, booleans for numbers, sizes the data cannot serve),
and no document makes validation slow (YAML aliases that expand a hundred bytes to billions of values)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sbn_study import cli
from sbn_study.spec import SpecError, load_spec, spec_from_dict
from sbn_study.spec.loader import MAX_SPEC_BYTES
from sbn_study.spec.messages import show
from tests.test_spec import BASE, GOOD_YAML, SEARCH_SPACES, errors_of, merged, space

INF, NAN = float("inf"), float("nan")
SEED_RANGE = "must be >= 0 and <= 4294967295"

HOSTILE: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "negative sampler seed",
        {"search": {"sampler": {"seed": -1}}},
        [f"search.sampler.seed: {SEED_RANGE}, got -1"],
    ),
    (
        "sampler seed beyond 32 bits",
        {"search": {"sampler": {"seed": 2**32}}},
        [f"search.sampler.seed: {SEED_RANGE}, got 4294967296"],
    ),
    ("negative train seed", {"train": {"seed": -1}}, [f"train.seed: {SEED_RANGE}, got -1"]),
    ("huge split seed", {"data": {"split_seed": 10**20}}, [f"data.split_seed: {SEED_RANGE}, got {10**20}"]),
    (
        "negative synthetic seed",
        {"data": {"synthetic": {"seed": -5}}},
        [f"data.synthetic.seed: {SEED_RANGE}, got -5"],
    ),
    ("long name", {"name": "a" * 245}, ["name: expected at most 100 characters, got 245"]),
    (
        "unknown device",
        {"train": {"device": "bogus"}},
        ["train.device: expected auto, cpu, cuda, cuda:N or mps, got 'bogus'"],
    ),
    (
        "device index",
        {"train": {"device": "cuda:01"}},
        ["train.device: expected auto, cpu, cuda, cuda:N or mps, got 'cuda:01'"],
    ),
    ("infinite eps", {"norm": {"eps": INF}}, ["norm.eps: expected a finite number > 0, got inf"]),
    ("nan lr", {"train": {"lr": NAN}}, ["train.lr: expected a finite number > 0, got nan"]),
    (
        "infinite weight decay",
        {"train": {"weight_decay": INF}},
        ["train.weight_decay: expected a finite number >= 0, got inf"],
    ),
    ("infinite cpus", {"resources": {"cpu": INF}}, ["resources.cpu: expected a finite number > 0, got inf"]),
    (
        "infinite reduction factor",
        {"search": {"scheduler": {"reduction_factor": INF}}},
        ["search.scheduler.reduction_factor: expected a finite number > 1, got inf"],
    ),
    (
        "boolean for an integer",
        {"train": {"epochs": True}},
        ["train.epochs: expected an integer >= 1, got True"],
    ),
    (
        "boolean for a float",
        {"norm": {"momentum": True}},
        ["norm.momentum: expected a number > 0 and <= 1, got True"],
    ),
    (
        "fractional integer",
        {"train": {"batch_size": 64.5}},
        ["train.batch_size: expected an integer >= 2, got 64.5"],
    ),
    ("zero milestone", {"train": {"milestones": [0, 2]}}, ["train.milestones[0]: must be >= 1, got 0"]),
    (
        "milestone never reached",
        {"train": {"milestones": [2, 4]}},
        ["train.milestones[1]: must be < train.epochs (4): the lr would never step there, got 4"],
    ),
    (
        "NUL in a path",
        {"data": {"root": "a\0b"}},
        ["data.root: a path cannot contain a NUL character, got 'a\\x00b'"],
    ),
    ("NUL in storage", {"storage": "\0"}, ["storage: a path cannot contain a NUL character, got '\\x00'"]),
    (
        "hold-out of every image",
        {"data": {"val_size": 2560}},
        ["data.val_size: must be < the 2560 training images of synthetic, got 2560"],
    ),
    (
        "CIFAR hold-out of every image",
        {"data": {"dataset": "cifar10", "val_size": 50_000}},
        ["data.val_size: must be < the 50000 training images of cifar10, got 50000"],
    ),
    (
        "batch beyond the training images",
        {"train": {"batch_size": 4096}},
        ["train.batch_size: must be <= the 2048 training images left after data.val_size, got 4096"],
    ),
    (
        "searched batch beyond the training images",
        space(train__batch_size={"int": [64, 4096]}),
        [
            "search.space.train.batch_size: must be <= the 2048 training images left after data.val_size, got 4096"
        ],
    ),
    (
        "synthetic data beyond memory",
        {"data": {"synthetic": {"train_size": 10**9}}},
        ["data.synthetic.train_size: must be >= 2 and <= 1000000, got 1000000000"],
    ),
    (
        "infinite bound",
        space(train__lr={"uniform": [0.01, INF]}),
        ["search.space.train.lr: uniform needs two numbers [low, high], got [0.01, inf]"],
    ),
    (
        "nan choice",
        space(train__lr={"choice": [0.1, NAN]}),
        ["search.space.train.lr: choice: expected a finite number > 0, got nan"],
    ),
    (
        "boolean choice for an integer",
        space(train__batch_size={"choice": [64, True]}),
        ["search.space.train.batch_size: choice: expected an integer >= 2, got True"],
    ),
    (
        "step longer than the range",
        space(train__lr={"quniform": [0.1, 0.2, 0.5]}),
        [
            "search.space.train.lr: quniform needs low < high and a step q > 0 that divides high - low, got [0.1, 0.2, 0.5]"
        ],
    ),
    (
        "step not dividing the range",
        space(train__lr={"quniform": [0.0, 1.0, 0.3]}),
        [
            "search.space.train.lr: quniform needs low < high and a step q > 0 that divides high - low, got [0.0, 1.0, 0.3]"
        ],
    ),
    (
        "the same choice twice",
        space(norm__placement={"choice": [3, "3", "23"]}),
        ["search.space.norm.placement: choice values must differ, got '3' twice"],
    ),
]


@pytest.mark.parametrize(
    ("patch", "expected"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_hostile_values_are_refused_in_one_line(patch: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(merged(BASE, patch)) == expected


def test_the_values_a_study_needs_pass() -> None:
    patch = {
        "train": {"device": "cuda:12", "seed": 2**32 - 1, "milestones": [1, 3]},
        "search": {"sampler": {"seed": None}},
        "name": "n" * 100,
    }
    spec = spec_from_dict(merged(merged(BASE, patch), space(train__lr={"quniform": [0.1, 0.3, 0.1]})))
    assert (spec.train.device, spec.search.space["train.lr"].args) == ("cuda:12", [0.1, 0.3, 0.1])


def test_a_trial_config_refuses_an_infinite_sample() -> None:
    with pytest.raises(SpecError, match=r"^train\.lr: expected a finite number > 0, got inf$"):
        spec_from_dict(BASE).trial_config({"train.lr": INF})


def test_shown_values_are_cut_without_walking_them() -> None:
    nested: list[Any] = ["lol"]
    for _ in range(60):  # 2**60 leaves: repr() would never return
        nested = [nested, nested]
    assert len(show(nested)) <= 80 and len(show("x" * 10**6)) <= 80


BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    for previous, name in zip("abcdefghi", "bcdefghij", strict=True)
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BILLION_LAUGHS,
            "line 5: the document holds more than 10000 values once its aliases are expanded; no spec needs that",
        ),
        (
            "name: t\ntrain: " + "[" * 40 + "]" * 40 + "\n",
            "line 2: the document nests more than 32 levels deep; no spec needs that",
        ),
        (
            "name: t\ndata: &d {synthetic: *d}\n",
            "line 2: the document has an alias inside its own anchor, which expands forever",
        ),
        (
            "name: t\ntrain: {epochs: " + "9" * 5000 + "}\n",
            "line 2: cannot read this int (Exceeds the limit (4300 digits) for integer string conversion)",
        ),
        (
            "name: t\ntrain: {epochs: 2001-13-45}\n",
            "line 2: cannot read this timestamp (month must be in 1..12)",
        ),
        ("name: t\ntrain: {amp: !!bool maybe}\n", "line 2: cannot read this bool ('maybe')"),
    ],
    ids=["billion laughs", "deep nesting", "recursive alias", "huge integer", "bad date", "bad tag"],
)
def test_yaml_that_would_crash_or_hang_is_refused_at_once(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert time.perf_counter() - start < 0.5
    assert caught.value.errors == [f"{path}: not valid YAML: {expected}"]


def test_an_override_is_held_to_the_same_limits() -> None:
    nested = "[" * 40 + "]" * 40
    assert errors_of(BASE, [f"train.milestones={nested}"]) == [
        f"--set train.milestones={nested}: value is not valid YAML: line 1: the document nests more than 32 "
        "levels deep; no spec needs that"
    ]


def test_a_spec_file_larger_than_any_spec_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD_YAML + "#" * MAX_SPEC_BYTES)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.errors == [
        f"{path}: cannot read spec: larger than 1,000,000 bytes; no spec needs that"
    ]


def test_validate_refuses_the_billion_laughs_in_well_under_a_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text('name: t\nsearch: {num_samples: 1}\na: &a ["lol", "lol", "lol"]\n' + BILLION_LAUGHS)
    assert len(path.read_bytes()) < 600
    start = time.perf_counter()
    code = cli.main(["validate", str(path)])
    assert time.perf_counter() - start < 0.5
    assert (code, capsys.readouterr().err.count("\n")) == (2, 1)


def test_validating_a_real_spec_takes_well_under_a_second() -> None:
    load_spec(SEARCH_SPACES / "cifar100.yaml")  # imports done
    start = time.perf_counter()
    spec = load_spec(SEARCH_SPACES / "cifar100.yaml")
    spec.warnings()
    assert time.perf_counter() - start < 0.2
