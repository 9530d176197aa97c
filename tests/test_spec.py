"""The study spec: every broken spec names each problem, as one exact line, all at once."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from sbn_study.spec import Distribution, SpecError, StudySpec, load_spec, spec_from_dict
from sbn_study.spec.catalog import ARCHITECTURES, NORM_KINDS
from sbn_study.spec.config import TrialConfig

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"

# Valid and small; the cases below change one thing each. The arch and placement are explicit so that the
# expected lines do not depend on the TrialConfig defaults.
BASE: dict[str, Any] = {
    "name": "t",
    "data": {"val_size": 512},
    "model": {"arch": "tiny"},
    "norm": {"kind": "sbn", "placement": "23"},
    "train": {"epochs": 4},
    "search": {"num_samples": 2, "space": {"norm.eps": {"loguniform": [1e-6, 1e-2]}}},
}


MISSING = object()


def merged(tree: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`tree` with `patch` merged in: mappings recursively, MISSING removes a key, anything else replaces."""
    out = copy.deepcopy(tree)
    for key, value in patch.items():
        if value is MISSING:
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and key != "space":
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def space(**distributions: Any) -> dict[str, Any]:
    """A patch replacing `search.space`; `norm__eps=...` stands for `norm.eps`."""
    return {"search": {"space": {key.replace("__", "."): d for key, d in distributions.items()}}}


def errors_of(data: Any, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as caught:
        spec_from_dict(data, overrides or [])
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


BROKEN: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown top-level key", {"serch": {}}, ["serch: unknown key (did you mean search?)"]),
    ("unknown section key", {"data": {"bogus": 1}}, ["data.bogus: unknown key"]),
    (
        "unknown nested key",
        {"data": {"synthetic": {"train_sz": 3}}},
        ["data.synthetic.train_sz: unknown key (did you mean data.synthetic.train_size?)"],
    ),
    (
        "unknown search key",
        {"search": {"sampler": {"sed": 1}}},
        ["search.sampler.sed: unknown key (did you mean search.sampler.seed?)"],
    ),
    ("missing name", {"name": MISSING}, ["name: missing required key"]),
    ("name not a string", {"name": None}, ["name: expected a string, got None"]),
    (
        "bad name",
        {"name": "my study"},
        ["name: expected a letter or digit followed by letters, digits, '_', '.' or '-', got 'my study'"],
    ),
    ("wrong type", {"train": {"epochs": "ten"}}, ["train.epochs: expected an integer >= 1, got 'ten'"]),
    ("below a bound", {"train": {"epochs": 0}}, ["train.epochs: must be >= 1, got 0"]),
    ("outside an interval", {"norm": {"momentum": 2}}, ["norm.momentum: must be > 0 and <= 1, got 2"]),
    ("list item", {"train": {"milestones": [2, "x"]}}, ["train.milestones[1]: expected an integer, got 'x'"]),
    ("section not a mapping", {"norm": 3}, ["norm: expected a mapping, got 3"]),
    ("zero cpus", {"resources": {"cpu": 0}}, ["resources.cpu: must be > 0, got 0"]),
    (
        "literal",
        {"norm": {"fft_norm": "sideways"}},
        ["norm.fft_norm: expected one of backward, ortho, forward, got 'sideways'"],
    ),
    (
        "unknown dataset",
        {"data": {"dataset": "imagenet"}},
        [
            "data.dataset: expected one of synthetic, cifar10, cifar100, synthetic_domains, pacs, office31, "
            "office_caltech_10, domains, got 'imagenet'"
        ],
    ),
    (
        "unknown sampler",
        {"search": {"sampler": {"type": "bayes"}}},
        ["search.sampler.type: expected one of tpe, random, cmaes, gp, qmc, nsga2, got 'bayes'"],
    ),
    (
        "unknown scheduler",
        {"search": {"scheduler": {"type": "pbt"}}},
        ["search.scheduler.type: expected one of asha, hyperband, median, none, got 'pbt'"],
    ),
    (
        "unknown arch",
        {"model": {"arch": "resnet19"}},
        [f"model.arch: expected one of {', '.join(ARCHITECTURES)}, got 'resnet19'"],
    ),
    (
        "unknown norm kind",
        {"norm": {"kind": "xbn"}},
        [f"norm.kind: expected one of {', '.join(NORM_KINDS)} or package.module:Factory, got 'xbn'"],
    ),
    (
        "placement outside the arch",
        {"model": {"arch": "resnet20"}, "norm": {"placement": "4"}},
        ["norm.placement: stage 4 does not exist in resnet20 (stages 1-3)"],
    ),
    (
        "placement read as an int",
        {"norm": {"placement": 34}},
        ["norm.placement: stage 4 does not exist in tiny (stages 1-3)"],
    ),
    ("num_samples 0", {"search": {"num_samples": 0}}, ["search.num_samples: must be >= 1, got 0"]),
    (
        "num_samples missing",
        {"search": {"num_samples": MISSING}},
        ["search.num_samples: missing required key"],
    ),
    (
        "unknown metric",
        {"search": {"metric": "accuracy"}},
        [
            "search.metric: expected one of val_acc, val_loss, train_loss, train_acc, epoch_time_s, "
            "images_per_s or a list of two of them, got 'accuracy'"
        ],
    ),
    (
        "nsga2 with one metric",
        {"search": {"sampler": {"type": "nsga2"}}},
        ["search.sampler.type: nsga2 needs a list of two metrics, got search.metric 'val_acc'"],
    ),
    (
        "two metrics without nsga2",
        {"search": {"metric": ["val_acc", "epoch_time_s"], "mode": ["max", "min"]}},
        ["search.metric: two metrics need search.sampler.type nsga2, got 'tpe'"],
    ),
    (
        "two metrics, one mode",
        {"search": {"metric": ["val_acc", "epoch_time_s"], "sampler": {"type": "nsga2"}}},
        ["search.mode: expected a list of two modes to match search.metric, got 'max'"],
    ),
    (
        "grace period beyond the budget",
        {"search": {"scheduler": {"grace_period": 5}}},
        [
            "search.scheduler.grace_period: must be <= the budget of 4 epochs "
            "(search.scheduler.max_t, else train.epochs), got 5"
        ],
    ),
    (
        "budget beyond the epochs",
        {"search": {"scheduler": {"max_t": 5}}},
        ["search.scheduler.max_t: must be <= train.epochs (4), got 5"],
    ),
    (
        "distribution not a mapping",
        space(norm__eps=0.1),
        [
            "search.space.norm.eps: expected a mapping such as {choice: [a, b]} or "
            "{loguniform: [low, high]}, "
            "got 0.1"
        ],
    ),
    (
        "unknown distribution",
        space(norm__eps={"normal": [0, 1]}),
        [
            "search.space.norm.eps: expected one of choice, uniform, loguniform, int, logint, quniform "
            "(and optionally when), got 'normal'"
        ],
    ),
    (
        "two distributions",
        space(norm__eps={"uniform": [0.1, 1], "loguniform": [0.1, 1]}),
        [
            "search.space.norm.eps: expected exactly one of choice, uniform, loguniform, int, logint, "
            "quniform, got uniform and loguniform"
        ],
    ),
    (
        "empty choice",
        space(norm__fft_norm={"choice": []}),
        ["search.space.norm.fft_norm: choice needs a non-empty list of values, got []"],
    ),
    (
        "choice of lists",
        space(train__milestones={"choice": [[1, 2]]}),
        [
            "search.space.train.milestones: choice values must be strings, numbers, booleans or null, "
            "got [1, 2]"
        ],
    ),
    (
        "inverted loguniform",
        space(norm__eps={"loguniform": [1e-2, 1e-6]}),
        ["search.space.norm.eps: loguniform needs 0 < low < high, got [0.01, 1e-06]"],
    ),
    (
        "non-positive loguniform",
        space(norm__eps={"loguniform": [0.0, 1e-2]}),
        ["search.space.norm.eps: loguniform needs 0 < low < high, got [0.0, 0.01]"],
    ),
    (
        "uniform with one bound",
        space(norm__eps={"uniform": [0.1]}),
        ["search.space.norm.eps: uniform needs two numbers [low, high], got [0.1]"],
    ),
    (
        "inverted int",
        space(train__batch_size={"int": [256, 64]}),
        ["search.space.train.batch_size: int needs low <= high, got [256, 64]"],
    ),
    (
        "fractional int",
        space(train__batch_size={"int": [64.5, 128]}),
        ["search.space.train.batch_size: int needs two integers [low, high], got [64.5, 128]"],
    ),
    (
        "logint from 0",
        space(model__width={"logint": [0, 64]}),
        ["search.space.model.width: logint needs 1 <= low < high, got [0, 64]"],
    ),
    (
        "quniform without a step",
        space(train__lr={"quniform": [0.1, 0.5, 0]}),
        [
            "search.space.train.lr: quniform needs low < high and a step q > 0 that divides high - low, got [0.1, 0.5, 0]"
        ],
    ),
    (
        "floats for an integer",
        space(train__epochs={"uniform": [1, 10]}),
        [
            "search.space.train.epochs: expected choice, int, logint or quniform with integral low and q "
            "(an integer setting), got uniform"
        ],
    ),
    (
        "numbers for a string",
        space(norm__fft_norm={"int": [1, 2]}),
        ["search.space.norm.fft_norm: expected choice (not a numeric setting), got int"],
    ),
    (
        "unknown searched key",
        space(norm__epsilon={"loguniform": [1e-6, 1e-2]}),
        ["search.space.norm.epsilon: not a key of the base configuration (did you mean norm.eps?)"],
    ),
    (
        "unknown searched key, nothing close",
        space(foo__bar={"choice": [1]}),
        ["search.space.foo.bar: not a key of the base configuration"],
    ),
    (
        "searched key outside the trial config",
        space(resources__gpu={"choice": [0.5, 1]}),
        [
            "search.space.resources.gpu: cannot be searched: "
            "only keys of data, model, norm, train, features can"
        ],
    ),
    (
        "searched section",
        space(data__synthetic={"choice": [1]}),
        [
            "search.space.data.synthetic: a section, not a single setting (search its keys: "
            "data.synthetic.train_size, data.synthetic.test_size, data.synthetic.num_classes, "
            "data.synthetic.seed)"
        ],
    ),
    (
        "invalid choice value",
        space(norm__fft_norm={"choice": ["backward", "sideways"]}),
        ["search.space.norm.fft_norm: choice: expected one of backward, ortho, forward, got 'sideways'"],
    ),
    (
        "range outside the field",
        space(norm__momentum={"uniform": [0.0, 2]}),
        [
            "search.space.norm.momentum: low: must be > 0 and <= 1, got 0.0",
            "search.space.norm.momentum: high: must be > 0 and <= 1, got 2",
        ],
    ),
    (
        "searched arch unknown",
        space(model__arch={"choice": ["tiny", "resnet19"]}),
        [f"search.space.model.arch: choice: expected one of {', '.join(ARCHITECTURES)}, got 'resnet19'"],
    ),
    (
        "searched placement outside the arch",
        space(norm__placement={"choice": ["none", 4, "all"]}),
        ["search.space.norm.placement: choice: stage 4 does not exist in tiny (stages 1-3)"],
    ),
    (
        "base placement outside a searched arch",
        {"norm": {"placement": "4"}, **space(model__arch={"choice": ["resnet18", "resnet20"]})},
        ["norm.placement: stage 4 does not exist in resnet20 (stages 1-3)"],
    ),
    (
        "condition on an unknown key",
        space(norm__momentum={"uniform": [0.01, 0.5], "when": {"norm.knid": "sbn"}}),
        [
            "search.space.norm.momentum.when.norm.knid: not a key of the base configuration "
            "(did you mean norm.kind?)"
        ],
    ),
    (
        "nesterov without momentum",
        {"train": {"nesterov": True, "momentum": 0}},
        ["train.nesterov: Nesterov momentum needs train.momentum > 0, got 0"],
    ),
    (
        "a validation metric without a validation split",
        {"data": {"val_size": 0}},
        [
            "data.val_size: search.metric val_acc is measured on the validation split, "
            "which needs at least 1 image, got 0"
        ],
    ),
    (
        "a probe too small for batch statistics",
        {"features": {"probe_size": 1}},
        ["features.probe_size: must be >= 2, got 1"],
    ),
    (
        "conditions in a cycle",
        space(
            norm__kind={"choice": ["sbn", "2bn"], "when": {"norm.fft_norm": "ortho"}},
            norm__fft_norm={"choice": ["backward", "ortho"], "when": {"norm.kind": "sbn"}},
        ),
        [
            "search.space: the when conditions form a cycle (norm.kind → norm.fft_norm → norm.kind): "
            "none could be sampled first"
        ],
    ),
    (
        "condition never met by the choices",
        space(
            norm__kind={"choice": ["sbn", "2bn"]},
            norm__fft_norm={"choice": ["backward", "ortho"], "when": {"norm.kind": ["sbn", "bn"]}},
        ),
        [
            "search.space.norm.fft_norm.when.norm.kind: "
            "expected one of the choices of norm.kind (sbn, 2bn), got 'bn'"
        ],
    ),
]


@pytest.mark.parametrize(
    ("patch", "expected"), [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN]
)
def test_broken_spec_reports_exact_lines(patch: dict[str, Any], expected: list[str]) -> None:
    assert errors_of(merged(BASE, patch)) == expected


def test_base_is_valid() -> None:
    spec = spec_from_dict(BASE)
    assert spec.search.space == {"norm.eps": Distribution.model_validate({"loguniform": [1e-6, 1e-2]})}
    assert spec.warnings() == []


def test_all_errors_are_reported_at_once() -> None:
    data = merged(
        BASE,
        {
            "data": {"bogus": 1},
            "model": {"arch": "resnet19"},
            "search": {"num_samples": 0, "space": {"norm.epsilon": {"loguniform": [1e-6, 1e-2]}}},
        },
    )
    assert errors_of(data) == [
        "data.bogus: unknown key",
        "search.num_samples: must be >= 1, got 0",
        "search.space.norm.epsilon: not a key of the base configuration (did you mean norm.eps?)",
        f"model.arch: expected one of {', '.join(ARCHITECTURES)}, got 'resnet19'",
    ]


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of(["name", "t"]) == ["spec: expected a mapping at the top level, got list"]


def test_overrides_change_values_before_validation() -> None:
    spec = spec_from_dict(
        BASE,
        [
            "search.num_samples=4",
            "norm.placement=3",
            "search.space.norm.momentum={loguniform: [1e-3, 0.5]}",
            "search.space.norm.eps=null",
            "search.space.norm.placement={choice: [none, 3, 23]}",
            "tracking.uri=",
        ],
    )
    assert spec.search.num_samples == 4
    assert spec.norm.placement == "3"
    assert spec.tracking.uri is None
    assert list(spec.search.space) == ["norm.momentum", "norm.placement"]
    assert spec.search.space["norm.momentum"].args == [1e-3, 0.5]
    # Choices are stored as the trial config stores them, so trials sample (and MLflow logs) "3", not 3.
    assert spec.search.space["norm.placement"].args == ["none", "3", "23"]
    assert BASE["search"]["num_samples"] == 2  # the caller's data is left alone


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=0", ["train.epochs: must be >= 1, got 0"]),
        ("foo", ["--set foo: expected key=value"]),
        ("=3", ["--set =3: expected key=value"]),
        ("train..epochs=3", ["--set train..epochs=3: expected key=value"]),
        (
            "name.first=x",
            ["--set name.first=x: name is not a mapping, got 't'"],
        ),
        (
            "train.epochs=[1",
            [
                "--set train.epochs=[1: value is not valid YAML: "
                "line 1: expected ',' or ']', but got '<stream end>'"
            ],
        ),
    ],
)
def test_overrides_are_validated_like_the_file(override: str, expected: list[str]) -> None:
    assert errors_of(BASE, [override]) == expected


def test_trial_config_applies_sampled_values() -> None:
    spec = spec_from_dict(merged(BASE, space(norm__placement={"choice": ["none", "3"]})))
    config = spec.trial_config({"norm.placement": 3, "norm.eps": 1e-3, "train.lr": 0.05})
    assert isinstance(config, TrialConfig) and not isinstance(config, StudySpec)
    assert (config.norm.placement, config.norm.eps, config.train.lr) == ("3", 1e-3, 0.05)
    assert spec.norm.eps == 1e-5  # the base is not changed
    assert spec.max_budget == 4
    with pytest.raises(SpecError, match=r"^norm\.eps: must be > 0, got -1$"):
        spec.trial_config({"norm.eps": -1})
    with pytest.raises(SpecError, match=r"^norm\.epsilon: not a key of the trial configuration$"):
        spec.trial_config({"norm.epsilon": 1e-3})


def test_max_budget_prefers_max_t() -> None:
    assert spec_from_dict(merged(BASE, {"search": {"scheduler": {"max_t": 3}}})).max_budget == 3


def test_spec_round_trips_through_its_dump() -> None:
    data = merged(
        BASE,
        space(
            norm__kind={"choice": ["sbn", "2bn"]},
            norm__fft_norm={"choice": ["backward", "ortho"], "when": {"norm.kind": "sbn"}},
            train__batch_size={"quniform": [64, 256, 64]},
        ),
    )
    spec = spec_from_dict(data)
    dumped = spec.model_dump(mode="json")
    assert dumped["search"]["space"]["norm.fft_norm"] == {
        "choice": ["backward", "ortho"],
        "when": {"norm.kind": ["sbn"]},
    }
    assert spec_from_dict(dumped) == spec


def test_settings_a_sampler_or_scheduler_ignores_are_warned_about() -> None:
    data = merged(
        BASE,
        {
            "search": {
                "sampler": {"type": "random", "n_startup_trials": 5},
                "scheduler": {"type": "hyperband", "grace_period": 2},
            }
        },
    )
    assert spec_from_dict(data).warnings() == [
        "search.sampler.n_startup_trials: sampler 'random' has no start-up phase; ignored",
        "search.scheduler.grace_period: scheduler 'hyperband' takes none; ignored",
    ]


def test_warnings() -> None:
    data = merged(
        merged(BASE, {"search": {"sampler": {"type": "cmaes"}}}), space(norm__fft_norm={"choice": ["ortho"]})
    )
    assert spec_from_dict(data).warnings() == [
        "sampler 'cmaes' samples categorical parameters (norm.fft_norm) at random"
    ]
    data = merged(BASE, space(train__epochs={"int": [2, 8]}))
    assert spec_from_dict(data).warnings() == [
        "train.epochs is searched but search.scheduler.max_t is not set: the scheduler's budget is "
        "the base train.epochs (4)"
    ]


def test_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict(
        merged(BASE, {"data": {"root": "data"}, "storage": "ray", "tracking": {"uri": "sqlite:///mlflow.db"}})
    )
    assert spec.data.root == str(tmp_path / "data")
    assert spec.storage == str(tmp_path / "ray")
    assert spec.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert spec.trial_config({}).data.root == str(tmp_path / "data")
    home = spec_from_dict(
        merged(BASE, {"storage": "s3://bucket/ray", "tracking": {"uri": "http://mlflow:5000"}})
    )
    assert home.data.root == str(tmp_path / "home" / ".cache" / "sbn-study" / "data")
    assert (home.storage, home.tracking.uri) == ("s3://bucket/ray", "http://mlflow:5000")


def test_relative_paths_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "s.yaml"
    path.write_text(
        "name: t\nmodel: {arch: tiny}\nnorm: {placement: '3'}\ndata: {root: data, val_size: 512}\n"
        "search: {num_samples: 1}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_spec(os.path.join("specs", "s.yaml")).data.root == str(tmp_path / "data")


GOOD_YAML = (
    "name: t\ndata: {val_size: 512}\nmodel: {arch: tiny}\nnorm: {placement: '3'}\nsearch: {num_samples: 2}\n"
)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (GOOD_YAML, ["search.num_samples"], ["--set search.num_samples: expected key=value"]),
        ("name: [t\n", [], ["{path}: not valid YAML: line 2: expected ',' or ']', but got '<stream end>'"]),
        (
            "name: t\nnorm: !!python/object/apply:os.system [echo pwned]\n",
            [],
            [
                "{path}: not valid YAML: line 2: could not determine a constructor for the tag "
                "'tag:yaml.org,2002:python/object/apply:os.system'"
            ],
        ),
        (
            GOOD_YAML + "search: {num_samples: 3}\n",
            [],
            ["{path}: not valid YAML: line 6: duplicate key 'search'"],
        ),
        ("- name: t\n", [], ["{path}: expected a mapping at the top level, got list"]),
        ("", [], ["{path}: expected a mapping at the top level, got an empty document"]),
        (None, [], ["{path}: cannot read spec: No such file or directory"]),
    ],
    ids=[
        "bad override",
        "not YAML",
        "python tag",
        "duplicate key",
        "top-level list",
        "empty",
        "missing file",
    ],
)
def test_spec_files(tmp_path: Path, text: str | None, overrides: list[str], expected: list[str]) -> None:
    path = tmp_path / "spec.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(path, overrides)
    assert caught.value.errors == [line.format(path=path) for line in expected]


def test_yaml_reads_exponents_without_a_dot_as_floats(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD_YAML + "train: {weight_decay: 5e-4}\n")
    assert load_spec(path, ["search.space.norm.eps={loguniform: [1e-6, 1e-2]}"]).train.weight_decay == 5e-4


@pytest.mark.parametrize("path", sorted(SEARCH_SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path: Path) -> None:
    spec = load_spec(path)
    assert spec.search.space
    assert spec.warnings() == []


def test_the_readme_example_validates_without_a_warning(tmp_path: Path) -> None:
    readme = (SEARCH_SPACES.parent / "README.md").read_text()
    section = readme[readme.index("## The study spec") :]
    path = tmp_path / "spec.yaml"
    path.write_text(section[section.index("```yaml\n") + 8 : section.index("```\n\n")])
    assert load_spec(path).warnings() == []


def test_quickstart_runs_on_a_cpu_without_downloads() -> None:
    spec = load_spec(SEARCH_SPACES / "quickstart.yaml")
    assert (spec.data.dataset, spec.resources.gpu) == ("synthetic", 0)
