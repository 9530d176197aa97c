"""A norm of the user's own, `norm.kind: "package.module:Factory"` (tests/custom_norm_module.py): `validate`
refuses what cannot be built in one line, the placement tells the factory its site, a study and a final
training run with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sbn_study import cli
from sbn_study.errors import UserError
from sbn_study.spec.catalog import ARCHITECTURES
from sbn_study.spec.config import ModelConfig, NormConfig
from sbn_study.trial.models import create_model, create_model_from_config
from sbn_study.trial.norms import NormPlacement, norm_sites
from tests.conftest import QUICKSTART, run_small_study
from tests.custom_norm_module import ScaledBatchNorm2d

MODULE = "tests.custom_norm_module"
# The quick-start searches SBN's settings, which a custom kind does not read.
NOT_SEARCHED = [f"search.space.norm.{key}=null" for key in ("momentum", "eps", "fft_norm")]


def validate(capsys: pytest.CaptureFixture[str], kind: str, *sets: str) -> tuple[int, str]:
    overrides = [arg for s in (f"norm.kind={kind}", *NOT_SEARCHED, *sets) for arg in ("--set", s)]
    code = cli.main(["validate", str(QUICKSTART), *overrides])
    out, err = capsys.readouterr()
    return code, err or out


@pytest.mark.parametrize("name", ["ScaledBatchNorm2d", "layer_norm"])
def test_a_class_or_a_function_is_a_valid_custom_kind(capsys: pytest.CaptureFixture[str], name: str) -> None:
    assert validate(capsys, f"{MODULE}:{name}") == (
        0,
        "ok: sbn-quickstart: 12 trials over 3 searched parameters (sampler tpe, scheduler asha)\n",
    )
    assert validate(capsys, f"{MODULE}:ScaledBatchNorm2d", "norm.options={gain: 0.5}")[0] == 0


@pytest.mark.parametrize(
    ("kind", "sets", "message"),
    [
        (
            "nope.missing:Norm",
            (),
            "cannot import nope.missing for nope.missing:Norm: ModuleNotFoundError: No module named 'nope'",
        ),
        (f"{MODULE}:Missing", (), f"{MODULE} has no callable Missing"),
        (f"{MODULE}:NOT_CALLABLE", (), f"{MODULE} has no callable NOT_CALLABLE"),
        (
            f"{MODULE}:takes_no_site",
            (),
            f"{MODULE}:takes_no_site cannot be called as takes_no_site(channels, stage=, spatial=, "
            "**norm.options): got an unexpected keyword argument 'stage'",
        ),
        (
            f"{MODULE}:ScaledBatchNorm2d",
            ("norm.options={gian: 0.5}",),
            f"{MODULE}:ScaledBatchNorm2d cannot be called as ScaledBatchNorm2d(channels, stage=, spatial=, "
            "**norm.options): got an unexpected keyword argument 'gian'",
        ),
        (
            f"{MODULE}:returns_a_number",
            (),
            f"{MODULE}:returns_a_number returned an object of type int, not a torch.nn.Module",
        ),
        (
            "tests/custom_norm_module.py:Norm",
            (),
            "expected a custom norm as package.module:Factory, got 'tests/custom_norm_module.py:Norm'",
        ),
    ],
)
def test_validate_refuses_a_custom_kind_that_cannot_be_built_in_one_line(
    capsys: pytest.CaptureFixture[str], kind: str, sets: tuple[str, ...], message: str
) -> None:
    assert validate(capsys, kind, *sets) == (2, f"error: norm.kind: {message}\n")


def test_building_refuses_a_custom_kind_and_tells_no_size_where_the_architecture_is_not_in_the_catalog() -> (
    None
):
    with pytest.raises(UserError) as refused:
        create_model("tiny", 10, f"{MODULE}:Missing", "all")
    assert str(refused.value) == f"norm.kind: {MODULE} has no callable Missing"
    placement = NormPlacement(NormConfig(kind=f"{MODULE}:ScaledBatchNorm2d", placement="1"), "toy", 1)
    layer = placement(8, 1)
    assert (layer.stage, layer.spatial) == (1, None)


@pytest.mark.parametrize(
    ("arch", "side", "model"),
    [*((arch, 32, {}) for arch in ARCHITECTURES), ("resnet18", 64, {"stem": "imagenet"})],
)
def test_the_factory_is_told_each_sites_stage_and_map_size(
    arch: str, side: int, model: dict[str, str]
) -> None:
    norm = NormConfig(kind=f"{MODULE}:ScaledBatchNorm2d", placement="all")
    net = create_model_from_config(ModelConfig(arch=arch, **model), norm, 10, (side, side))
    layers = {name: m for name, m in net.named_modules() if isinstance(m, ScaledBatchNorm2d)}
    assert list(layers) == norm_sites(net)  # a subclass of BatchNorm2d: feature statistics see it
    seen: dict[str, tuple[int, ...]] = {}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(
            lambda _, args, name=name: seen.__setitem__(name, tuple(args[0].shape[2:]))
        )
    with torch.no_grad():
        net(torch.randn(2, 3, side, side))
    assert {name: (layer.stage, layer.spatial) for name, layer in layers.items()} == {
        name: (int(name[len("layer")]) if name.startswith("layer") else 0, seen[name]) for name in layers
    }


def test_norm_options_reach_the_factory_and_the_builtin_kinds_ignore_them() -> None:
    config = NormConfig(kind=f"{MODULE}:ScaledBatchNorm2d", placement="3", options={"gain": 0.5})
    model = create_model_from_config(ModelConfig(arch="tiny", width=4), config, 10)
    assert model.layer3.bn.gain == 0.5 and type(model.layer2.bn) is nn.BatchNorm2d


@pytest.mark.slow
def test_a_study_and_a_final_training_run_with_a_custom_norm(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    kind = f"{MODULE}:ScaledBatchNorm2d"
    overrides = [f"norm.kind={kind}", "norm.options={gain: 0.5}", "search.num_samples=2", *NOT_SEARCHED]
    study = run_small_study(tmp_path / "study", overrides)
    assert study.outcome.status == "finished"
    client = MlflowClient(study.tracking_uri)
    experiment = client.get_experiment_by_name(study.spec.name)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "sbn.trial_id" in r.data.tags]
    assert len(runs) == 2 and {r.data.tags["sbn.status"] for r in runs} <= {"completed", "stopped_early"}
    assert {(r.data.params["norm.kind"], r.data.params["norm.options.gain"]) for r in runs} == {(kind, "0.5")}
    # Its layers subclass BatchNorm2d: feature statistics are measured at them.
    assert any(key.startswith("fm/layer3.bn/") for key in runs[0].data.metrics)

    config = study.spec.base_config().model_dump(mode="json")
    config["norm"]["placement"] = "23"
    config["train"]["epochs"] = 2
    path = tmp_path / "final.yaml"
    path.write_text(yaml.safe_dump(config))
    output = tmp_path / "final"
    assert cli.main(["train", str(path), "--seeds", "0", "--output", str(output)]) == 0, capsys.readouterr()
    final = MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    (run,) = [
        r
        for e in final.search_experiments()
        for r in final.search_runs([e.experiment_id])
        if "sbn.seed" in r.data.tags
    ]
    assert run.data.params["norm.kind"] == kind and "test_acc" in run.data.metrics
