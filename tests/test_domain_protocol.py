"""Leave-one-domain-out trials: the target cannot reach what the search sees, each method predicts as it says
(AdaBN's statistics, BNE's ensemble) on batches whose source indices are the images' own, a trial resumes
exactly, the driver refuses what every trial would fail on, pretrained weights load into the ResNets, the spec
is checked with key paths; then the quick start through Ray Tune, Optuna, ASHA and MLflow (slow)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
from torch import nn

from sbn_study.errors import UserError
from sbn_study.protocol import SYSTEM_PREFIX
from sbn_study.spec import SpecError, load_spec
from sbn_study.spec.config import (
    DOMAINS,
    DatasetName,
    ModelConfig,
    NormConfig,
    TrialConfig,
)
from sbn_study.trial import domain_train
from sbn_study.trial.bne import DomainBatchNorm2d, bne_predict
from sbn_study.trial.data import DeviceLoader, Split
from sbn_study.trial.domain_train import (
    adapted,
    load_study_data,
    predict_domain,
    train_domains,
)
from sbn_study.trial.domains import LAYOUTS, SYNTHETIC_STYLES, DomainDataset, synthetic_domains
from sbn_study.trial.models import create_model_from_config
from sbn_study.trial.norms import norm_parameters
from sbn_study.trial.train import make_optimizer
from tests.conftest import DOMAINS_QUICKSTART, FinishedStudy
from tests.test_domains import _write_tree

PACS_BNE = DOMAINS_QUICKSTART.parent / "pacs_bne.yaml"


def config(**sections: dict[str, Any]) -> TrialConfig:
    """A CPU trial of a 4-channel tiny model on 48 images per synthetic domain at 16 pixels."""
    base: dict[str, dict[str, Any]] = {
        "data": {
            "dataset": "synthetic_domains",
            "resolution": 16,
            "val_fraction": 0.25,
            "synthetic_domains": {"num_classes": 3, "images_per_domain": 48},
        },
        "model": {"arch": "tiny", "width": 4},
        "norm": {"kind": "bn", "placement": "none"},
        "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 24, "lr": 0.05, "device": "cpu"},
        "features": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrialConfig.model_validate(base)


def dataset_of(cfg: TrialConfig) -> DomainDataset:
    return synthetic_domains(cfg.data.synthetic_domains, cfg.data.image_resolution)


def test_every_multi_domain_dataset_is_known_by_the_spec_and_loaded_by_the_trial() -> None:
    assert set(DOMAINS) <= set(get_args(DatasetName))
    assert tuple(SYNTHETIC_STYLES) == DOMAINS["synthetic_domains"]
    assert {name: layout.domains for name, layout in LAYOUTS.items()} == {
        name: domains for name, domains in DOMAINS.items() if name != "synthetic_domains"
    }


# ---------------------------------------------------------------------------------------------- protocol

SEARCH_VIEW = ("train_loss", "train_acc", "val_loss", "val_acc")


@pytest.mark.parametrize("method", ["deepall", "adabn", "bne"])
def test_the_target_domain_cannot_move_what_the_search_sees(method: str) -> None:
    cfg = config(data={"target": "faded", "dg_method": method})
    dataset = dataset_of(cfg)
    faded = dataset.domains["faded"]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, faded.images.shape, dtype=torch.uint8, generator=generator)
    other = DomainDataset(
        dataset.name,
        dataset.classes,
        {**dataset.domains, "faded": Split(noise, faded.labels.flip(0))},
        dataset.resolution,
    )
    first, second = (train_domains(cfg, dataset=d).history for d in (dataset, other))
    assert [[epoch[k] for k in SEARCH_VIEW] for epoch in first] == [
        [epoch[k] for k in SEARCH_VIEW] for epoch in second
    ]
    assert [epoch["target_loss"] for epoch in first] != [epoch["target_loss"] for epoch in second]
    # One fold: its target's values are the trial's.
    assert all(epoch["target_acc"] == epoch["target_acc/faded"] for epoch in first)


def test_all_targets_run_in_one_trial_and_report_their_mean() -> None:
    cfg = config(
        data={"dg_method": "bne"},
        train={"epochs": 1},
        features={"enabled": True, "probe_size": 8, "interval": 1},
    )
    reports: list[dict[str, float]] = []
    result = train_domains(cfg, dataset=dataset_of(cfg), report=lambda metrics, _: reports.append(metrics))
    initial, last = reports
    domains = DOMAINS["synthetic_domains"]
    assert [fold.name for fold in result.folds] == list(domains)
    assert last["target_acc"] == pytest.approx(np.mean([last[f"target_acc/{d}"] for d in domains]))
    for target in domains:
        sources = [d for d in domains if d != target]
        weights = [last[f"target_weight/{target}/{s}"] for s in sources]
        assert sum(weights) == pytest.approx(1.0) and all(w > 0 for w in weights)
        assert all(last[f"target_w2/{target}/{target}/{s}"] > 0 for s in sources)
        assert f"target_w2/{target}/{sources[0]}/{sources[2]}" in last
        # Feature statistics per fold, a domain-specific layer measured as one site.
        for stats in (initial, last):
            assert f"fm/{target}/layer1.bn/norm" in stats and f"fm/{target}/layer1.bn.bns.0/norm" not in stats


def test_training_batches_carry_each_images_own_source() -> None:
    # Every image of a domain is one solid grey level, so an input's source can be read off its centre pixel
    # (the random crop pads with 4 pixels at most).
    names = ("a", "b", "c", "d")
    count = 40
    labels = torch.arange(count) % 2
    domains = {
        name: Split(torch.full((count, 3, 16, 16), 40 * (i + 1), dtype=torch.uint8), labels)
        for i, name in enumerate(names)
    }
    dataset = DomainDataset("coded", ("x", "y"), domains, 16)
    cfg = config(
        data={"dataset": "domains", "target": "c", "dg_method": "bne"}, train={"epochs": 2, "batch_size": 12}
    )
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_fold = domain_train._fold

    def watched(*args: Any) -> domain_train.Fold:
        fold = real_fold(*args)
        layer = next(m for m in fold.model.modules() if isinstance(m, DomainBatchNorm2d))

        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                seen.append((inputs[0][:, 0, 8, 8].clone(), layer.domain.clone()))

        fold.model.register_forward_pre_hook(record)
        return fold

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(domain_train, "_fold", watched)
        train_domains(cfg, dataset=dataset)
    assert len(seen) == 2 * (3 * 30 // 12)  # 2 epochs of whole batches of the 90 training images
    pixels = torch.cat([p for p, _ in seen])
    indices = torch.cat([d for _, d in seen])
    # Sources a, b, d are indices 0, 1, 2 and the grey levels 40, 80, 160, in that order.
    levels = sorted(set(pixels.tolist()))
    assert len(levels) == 3 and [levels.index(p) for p in pixels.tolist()] == indices.tolist()
    assert set(indices.tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------- methods


def _loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> DeviceLoader:
    split = Split((images * 255).round().clamp(0, 255).to(torch.uint8), labels)
    return DeviceLoader(
        split, batch_size, device="cpu", train=False, augment=False, mean=(0, 0, 0), std=(1, 1, 1)
    )


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def test_adabn_averages_the_domains_batch_statistics_in_a_copy() -> None:
    torch.manual_seed(0)
    model = _ConvBn().eval()
    with torch.no_grad():
        model.bn.running_mean.fill_(5.0)
    before = copy.deepcopy(model.state_dict())
    loader = _loader(torch.rand(20, 3, 6, 6) * 0.5 + 0.3, torch.arange(20) % 3, batch_size=8)
    target = adapted(model, loader)
    # BatchNorm's cumulative average (momentum None): every batch weighs the same, the last short one too.
    batches = [images for images, _ in loader.epoch(0)]
    conv = copy.deepcopy(model.conv).double()
    with torch.no_grad():
        features = [conv(images.double()) for images in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    variances = torch.stack([f.var(dim=(0, 2, 3)) for f in features]).mean(0)
    np.testing.assert_allclose(target.bn.running_mean.double(), means, rtol=1e-5)
    np.testing.assert_allclose(target.bn.running_var.double(), variances, rtol=1e-5)
    assert not target.training
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    score = predict_domain(model, loader, config(data={"dg_method": "adabn"}).data)
    with torch.no_grad():
        logits = target(torch.cat(batches))
    assert score.acc == pytest.approx((logits.argmax(1) == loader.labels).double().mean().item())


@pytest.mark.parametrize("statistics", ["batch", "instance"])
def test_bne_scores_a_domain_with_the_ensemble_of_its_batches(statistics: str) -> None:
    cfg = config(
        data={"dg_method": "bne", "bne_statistics": statistics, "target": "grey"}, train={"epochs": 1}
    )
    fold = train_domains(cfg, dataset=dataset_of(cfg)).folds[0]
    score = predict_domain(fold.model, fold.target, cfg.data)
    fold.model.eval()
    probs, weights, distances = [], [], []
    with torch.no_grad():
        for images, _ in fold.target.epoch(0):
            out = bne_predict(fold.model, images, per_instance=statistics == "instance")
            probs.append(out.probs)
            weights.append(out.weights)
            distances.append(out.distances)
    p, labels = torch.cat(probs).double(), fold.target.labels
    assert score.count == len(labels) == 48
    assert score.acc == pytest.approx((p.argmax(1) == labels).double().mean().item())
    assert score.loss == pytest.approx(-p[torch.arange(len(p)), labels].log().mean().item(), rel=1e-6)
    np.testing.assert_allclose(score.weights, torch.cat(weights).double().mean(0), rtol=1e-6)
    np.testing.assert_allclose(score.distances, torch.cat(distances).double().mean(0), rtol=1e-6)
    if statistics == "batch":  # one placement per batch of 24
        assert len(set(torch.cat(weights)[:24, 0].tolist())) == 1


def test_a_resumed_trial_continues_exactly() -> None:
    cfg = config(data={"dg_method": "bne", "target": "tinted"}, train={"epochs": 3})
    dataset = dataset_of(cfg)
    checkpoints: list[dict[str, Any]] = []
    # A copy, as saving it does: the state dicts hold the live tensors.
    straight = train_domains(
        cfg, dataset=dataset, report=lambda _, make: checkpoints.append(copy.deepcopy(make()))
    )
    resumed = train_domains(cfg, dataset=dataset, resume=checkpoints[0])

    def kept(history: list[dict[str, float]]) -> list[dict[str, float]]:
        # What the machine did differs between any two runs; what the network learned must not.
        measured = ("epoch_time_s", "images_per_s")
        return [
            {k: v for k, v in epoch.items() if k not in measured and not k.startswith(SYSTEM_PREFIX)}
            for epoch in history
        ]

    assert kept(resumed.history) == kept(straight.history)
    assert resumed.epochs_run == 3 and checkpoints[-1]["epoch"] == 3


def test_domain_bn_parameters_count_as_norm_parameters() -> None:
    cfg = config(data={"dg_method": "bne"}, train={"norm_weight_decay": False, "weight_decay": 0.1})
    model = domain_train.build_model(cfg, 3, 3)
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
    assert len(layers) == 4
    norm_ids = {id(p) for p in norm_parameters(model)}
    assert all(id(layer.weight) in norm_ids and id(layer.bias) in norm_ids for layer in layers)
    groups = make_optimizer(model, cfg).param_groups
    assert {id(p) for p in groups[1]["params"]} == norm_ids and groups[1]["weight_decay"] == 0.0


# -------------------------------------------------------------------------------------- driver, weights


def test_the_driver_refuses_what_every_trial_would_fail_on(tmp_path: Path) -> None:
    _write_tree(tmp_path / "folders", ("d1", "d2"), ("x", "y"))
    folders = {"dataset": "domains", "root": str(tmp_path / "folders")}
    with pytest.raises(UserError, match=r"^data.target: 'd3' is not a domain of domains: d1, d2$"):
        load_study_data(config(data={**folders, "target": "d3"}))
    assert load_study_data(config(data=folders)).domain_names == ("d1", "d2")
    with pytest.raises(
        UserError, match=r"^data.dg_method: bne .* norm.kind gn at placement all leaves none$"
    ):
        load_study_data(config(data={"dg_method": "bne"}, norm={"kind": "gn", "placement": "all"}))
    # an sbn placement keeps a plain BN in front of each SBN: that one becomes domain-specific
    load_study_data(config(data={"dg_method": "bne"}, norm={"kind": "sbn", "placement": "all"}))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(
        UserError, match=r"^model.weights: .*wrong.pth does not fit tiny \(width 4\): conv1.weight"
    ):
        load_study_data(config(model={"weights": str(tmp_path / "wrong.pth")}))


def test_torchvision_weights_load_into_the_imagenet_stem_resnets(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=1000).eval()
    with torch.no_grad():  # statistics that are not BN's initial ones, so that loading them shows
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model_from_config(
        ModelConfig(arch="resnet18", stem="imagenet", weights=str(path)),
        NormConfig(kind="bn", placement="none"),
        7,
    ).eval()
    assert ours.fc.out_features == 7
    reference.fc = ours.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    # an SBN site takes the file's BN into its own first BN
    sbn = create_model_from_config(
        ModelConfig(arch="resnet18", stem="imagenet", weights=str(path)),
        NormConfig(kind="sbn", placement="4"),
        7,
    )
    assert torch.equal(sbn.layer4[0].bn1.bn.running_var, reference.layer4[0].bn1.running_var)
    with pytest.raises(UserError) as excinfo:
        create_model_from_config(ModelConfig(arch="resnet18", weights=str(path)), NormConfig(), 7)
    assert str(excinfo.value) == (
        f"model.weights: {path} does not fit resnet18 (stem cifar): conv1.weight is 64×3×7×7 in the file, "
        "64×3×3×3 in the model"
    )
    with pytest.raises(
        UserError, match=r"does not fit resnet34 \(stem imagenet\): the file has no layer1.2.conv1"
    ):
        create_model_from_config(
            ModelConfig(arch="resnet34", stem="imagenet", weights=str(path)), NormConfig(), 7
        )


# ----------------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["data.target=sketch"],
            "data.target: expected all or a domain of synthetic_domains (plain, tinted, faded, grey), got 'sketch'",
        ),
        (
            ["search.metric=target_acc"],
            "search.metric: expected one of val_acc, val_loss, train_loss, train_acc, epoch_time_s, images_per_s or a list of two of them, got 'target_acc'",
        ),
        (
            ["search.space.data.target={choice: [plain, grey]}"],
            "search.space.data.target: cannot be searched: the driver loads the dataset once per study",
        ),
        (["data.val_fraction=0"], "data.val_fraction: must be > 0 and < 1, got 0"),
        (
            [
                "search.space.data.dg_method=null",
                "data.dg_method=deepall",
                "search.space.data.bne_statistics={choice: [batch, instance]}",
            ],
            "search.space.data.bne_statistics: can never act: it acts only when data.dg_method is bne",
        ),
    ],
)
def test_domain_settings_are_checked_with_key_paths(overrides: list[str], line: str) -> None:
    with pytest.raises(SpecError) as excinfo:
        load_spec(DOMAINS_QUICKSTART, overrides)
    assert any(error.startswith(line) for error in excinfo.value.errors), excinfo.value.errors


def test_the_target_needs_a_multi_domain_dataset() -> None:
    with pytest.raises(SpecError) as excinfo:
        load_spec(
            DOMAINS_QUICKSTART,
            ["data.dataset=cifar10", "data.target=plain", "search.space.data.dg_method=null"],
        )
    assert excinfo.value.errors[0].startswith("data.target: a held-out domain needs a multi-domain dataset")


@pytest.mark.parametrize("command", ["train", "probe", "validate"])
def test_final_training_and_the_probe_refuse_a_multi_domain_config_in_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sbn_study import cli
    from sbn_study.spec.loader import dump_yaml

    config = load_spec(DOMAINS_QUICKSTART).base_config()
    path = tmp_path / "dg-top1.yaml"
    path.write_text(dump_yaml(config.model_dump(mode="json")))
    assert cli.main([command, str(path)]) == 2
    assert not list(tmp_path.glob("sbn-runs*"))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: data.dataset: final training takes a single-domain dataset (synthetic, cifar10, cifar100), "
        "got the multi-domain synthetic_domains"
    ), err
    assert cli.main(["probe", str(DOMAINS_QUICKSTART)]) == 2
    assert capsys.readouterr().err.startswith("error: data.dataset: the probe takes a single-domain dataset")


def test_the_pacs_study_is_the_papers_protocol() -> None:
    spec = load_spec(PACS_BNE)
    assert (spec.data.dataset, spec.data.target, spec.data.image_resolution) == ("pacs", "all", 224)
    assert (spec.model.arch, spec.model.stem, spec.data.bne_statistics) == (
        "resnet18",
        "imagenet",
        "instance",
    )
    assert spec.model.weights is not None and Path(spec.model.weights).is_absolute()
    assert spec.search.metric == "val_acc" and spec.warnings() == []


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_the_quick_start_runs_through_tune_optuna_asha_and_mlflow(domain_study: FinishedStudy) -> None:
    from sbn_study.results.analysis import curves, trials

    spec, uri = domain_study.spec, domain_study.tracking_uri
    assert spec.data.dataset == "synthetic_domains" and domain_study.outcome.status == "finished"
    table = trials(uri, spec.name, all_params=True)
    assert len(table) == 4 and set(table["status"]) <= {"completed", "stopped_early"}
    assert set(table["data.dg_method"]) <= {"deepall", "adabn", "bne"}
    # the search's view: source validation only, the best trial by it
    assert domain_study.outcome.best is not None and domain_study.outcome.best["metric"] == "val_acc"
    assert "best_target_acc" not in table.columns
    domains = DOMAINS["synthetic_domains"]
    targets = curves(uri, spec.name, ["target_acc", *(f"target_acc/{d}" for d in domains)])
    for trial_id, group in targets.groupby("trial_id"):
        epochs = int(table.set_index("trial_id").loc[trial_id, "epochs"])
        for metric, history in group.groupby("metric"):
            assert sorted(history.epoch) == list(range(1, epochs + 1)), (trial_id, metric)
        last = group[group.epoch == epochs].set_index("metric").value
        assert last["target_acc"] == pytest.approx(np.mean([last[f"target_acc/{d}"] for d in domains]))
    # the best trial exports, and the export says why `train` would refuse it instead of suggesting it
    from sbn_study.results.export import export_best

    (exported,) = export_best(uri, spec.name, 1, domain_study.output / "exports")
    assert exported.not_trainable and "# Note: data.dataset: final training" in exported.path.read_text()
    bne = table[table["data.dg_method"] == "bne"]
    if len(bne):  # BNE's view of the domains reaches MLflow too
        distances = curves(uri, spec.name, [f"target_weight/plain/{s}" for s in domains[1:]])
        assert set(distances.trial_id) == set(bne.trial_id)
