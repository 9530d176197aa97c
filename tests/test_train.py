"""The training core on the CPU: it learns, it resumes exactly, it reports, it detects divergence."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from sbn_study.errors import UserError
from sbn_study.spec.config import TrialConfig
from sbn_study.trial.data import load_dataset
from sbn_study.trial.featstats import (
    MECHANISM_STATS,
    PERCENTILES,
    STAT_NAMES,
    _site_stats,
    measure_feature_stats,
)
from sbn_study.trial.models import create_model
from sbn_study.trial.norms import norm_parameters, norm_sites
from sbn_study.trial.train import lr_at, make_optimizer, train


def tiny_config(**train_overrides: object) -> TrialConfig:
    config = TrialConfig.model_validate(
        {
            "data": {
                "dataset": "synthetic",
                "val_size": 256,
                "synthetic": {"train_size": 1280, "test_size": 128},
            },
            "model": {"arch": "tiny", "width": 8},
            "norm": {"kind": "sbn", "placement": "3"},
            "train": {
                "epochs": 4,
                "batch_size": 64,
                "lr": 0.05,
                "schedule": "cosine",
                "weight_decay": 5e-4,
                **train_overrides,
            },
            "features": {"interval": 2, "probe_size": 64},
        }
    )
    return config


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(tiny_config().data)


@pytest.mark.parametrize(
    ("kind", "placement", "fft_norm"),
    [("bn", "none", "backward"), ("sbn", "23", "ortho"), ("iebn", "all", "backward")],
)
def test_tiny_model_learns_synthetic_data_well_above_chance(
    dataset, kind: str, placement: str, fft_norm: str
) -> None:
    config = tiny_config(epochs=5, lr=0.2)
    config.norm = config.norm.model_copy(update={"kind": kind, "placement": placement, "fft_norm": fft_norm})
    config.features.enabled = False
    reports: list[dict[str, float]] = []
    result = train(config, dataset=dataset, report=lambda metrics, _ckpt: reports.append(metrics))
    chance = 1 / dataset.num_classes
    assert result.status == "completed"
    assert result.best_val_acc > 4 * chance, [round(m["val_acc"], 3) for m in reports]
    assert [m["epoch"] for m in reports] == [1, 2, 3, 4, 5]
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s"):
        assert all(math.isfinite(m[key]) for m in reports), key


def test_batch_larger_than_the_training_split_is_a_clear_error(dataset) -> None:
    with pytest.raises(UserError, match=r"^train.batch_size: 4096 is larger than the 1024 training images$"):
        train(tiny_config(batch_size=4096), dataset=dataset)


def test_reports_feature_statistics_at_init_and_every_interval(dataset) -> None:
    reports: list[tuple[dict[str, float], bool]] = []
    train(
        tiny_config(epochs=4), dataset=dataset, report=lambda m, ckpt: reports.append((m, ckpt is not None))
    )
    with_stats = [int(m["epoch"]) for m, _ in reports if any(k.startswith("fm/") for k in m)]
    assert with_stats == [0, 2, 4]
    initial, has_checkpoint = reports[0]
    assert not has_checkpoint  # epoch 0 has nothing to resume from
    assert {"fm/layer3.bn.sbn/norm", "fm/layer3.bn.bn/p93", "fm/bn1/flatness"} <= initial.keys()


def test_feature_statistics_disabled_add_nothing(dataset) -> None:
    config = tiny_config(epochs=1)
    config.features.enabled = False
    reports: list[dict[str, float]] = []
    train(config, dataset=dataset, report=lambda m, _: reports.append(m))
    assert [k for m in reports for k in m if k.startswith("fm/")] == []


def test_resume_from_checkpoint_continues_exactly(dataset) -> None:
    config = tiny_config(epochs=3)
    full = train(config, dataset=dataset)
    checkpoints = []
    # A checkpoint references the live tensors (Tune serializes it at once): keep a copy of epoch 2's.
    train(
        config,
        dataset=dataset,
        report=lambda m, ckpt: (
            ckpt is not None and m["epoch"] == 2 and checkpoints.append(copy.deepcopy(ckpt()))
        ),
    )
    resumed = train(config, dataset=dataset, resume=checkpoints[0])
    assert resumed.epochs_run == 3
    # The checkpoint carries what was reported up to it (epoch 0's statistics too), so a resumed trial can
    # send again whatever a killed driver never logged.
    assert [m["epoch"] for m in checkpoints[0]["history"]] == [0, 1, 2]
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:3] == checkpoints[0]["history"]
    assert resumed.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-5)
    assert resumed.history[-1]["val_acc"] == pytest.approx(full.history[-1]["val_acc"], abs=1e-9)


def test_same_seed_same_result_other_seed_differs(dataset) -> None:
    a = train(tiny_config(epochs=1, seed=3), dataset=dataset).history[-1]["train_loss"]
    b = train(tiny_config(epochs=1, seed=3), dataset=dataset).history[-1]["train_loss"]
    c = train(tiny_config(epochs=1, seed=4), dataset=dataset).history[-1]["train_loss"]
    assert a == b
    assert a != c


def test_divergence_ends_the_run_at_once(dataset) -> None:
    reports: list[dict[str, float]] = []
    result = train(
        tiny_config(epochs=4, lr=1e6, schedule="constant"),
        dataset=dataset,
        report=lambda m, _: reports.append(m),
    )
    assert result.status == "diverged"
    assert reports[-1]["diverged"] == 1.0
    assert result.epochs_run < 4 or reports[-1]["epoch"] == 4


def test_step_schedule_defaults_to_the_papers_milestones() -> None:
    config = TrialConfig()  # 200 epochs, lr 0.1, ×0.2 at 60/120/160
    assert [round(lr_at(config, e), 6) for e in (0, 59, 60, 119, 120, 160, 199)] == [
        0.1,
        0.1,
        0.02,
        0.02,
        0.004,
        0.0008,
        0.0008,
    ]


def test_sbn_sites_have_far_smaller_feature_norm_than_the_bn_before_them() -> None:
    """The paper's qualitative claim, on the untrained ResNet-18 with SBN34.

    SBN (backward norm) gives every spectral bin unit variance, so by Parseval a map's energy drops from about
    H·W (after BN) to about 1: the norm shrinks by about sqrt(H·W) — 8 on stage 3's 8×8 maps, 4 on stage 4's.
    """
    torch.manual_seed(0)
    model = create_model("resnet18", 100, norm="sbn", placement="34")
    probe = torch.randn(16, 3, 32, 32)
    stats = measure_feature_stats(model, probe)
    sbn_sites = [s for s in norm_sites(model) if s.endswith(".sbn")]
    assert len(sbn_sites) == 10
    side = {"layer3": 8, "layer4": 4}
    for site in sbn_sites:
        ratio = stats[f"fm/{site}/norm"] / stats[f"fm/{site.removesuffix('.sbn')}.bn/norm"]
        assert ratio < 1.25 / side[site.split(".")[0]], (site, ratio)
    # Every site's statistics, SBN's rescale and additive share at its 10 SBN sites, and the logit norm.
    assert len(stats) == len(norm_sites(model)) * len(STAT_NAMES) + len(sbn_sites) * len(MECHANISM_STATS) + 1


@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (128, 64, 16, 16), (5, 3, 7, 9)])
def test_site_statistics_match_a_float64_reference(shape: tuple[int, ...]) -> None:
    y = torch.randn(shape) * torch.rand(shape[1])[:, None, None] + torch.randn(shape[1])[:, None, None]
    y64 = y.double().numpy()
    values = y64.ravel()
    power = np.abs(np.fft.rfft2(y64)) ** 2 + 1e-12
    expected = {
        "norm": np.linalg.norm(y64.reshape(shape[0], -1), axis=1).mean(),
        "max": np.abs(values).max(),
        **{f"p{p}": np.percentile(values, p) for p in PERCENTILES},
        "flatness": (np.exp(np.log(power).mean(axis=(2, 3))) / power.mean(axis=(2, 3))).mean(),
    }
    got = dict(zip(STAT_NAMES, _site_stats(y).tolist(), strict=True))
    spread = np.percentile(values, 93) - np.percentile(values, 7)
    for stat in ("norm", "max", "p0", "p100", "flatness"):
        assert got[stat] == pytest.approx(expected[stat], rel=1e-5), stat
    # Inner percentiles come from a subsample of large maps: close on the scale of the distribution's spread.
    for p in PERCENTILES[1:-1]:
        assert abs(got[f"p{p}"] - expected[f"p{p}"]) < 0.01 * spread, p


def test_a_one_image_validation_split_lends_the_probe_training_images() -> None:
    config = tiny_config(epochs=1)
    config.data = config.data.model_copy(update={"val_size": 1})
    reports: list[dict[str, float]] = []
    train(config, report=lambda metrics, _ckpt: reports.append(metrics))
    # SBN's batch statistics would refuse a one-image probe; the statistics exist for every site.
    assert {"fm/layer3.bn.sbn/norm", "fm/layer3.bn.bn/norm"} <= reports[0].keys()


def test_nesterov_and_norm_weight_decay_exclusion_reach_the_optimizer() -> None:
    config = tiny_config(nesterov=True, norm_weight_decay=False, weight_decay=1e-3)
    model = create_model("tiny", 10, norm="sbn", placement="3", width=8)
    optimizer = make_optimizer(model, config)
    decayed, exempt = optimizer.param_groups
    assert decayed["nesterov"] and (decayed["weight_decay"], exempt["weight_decay"]) == (1e-3, 0.0)
    norm_ids = {id(p) for p in norm_parameters(model)}
    assert {id(p) for p in exempt["params"]} == norm_ids and norm_ids
    assert not norm_ids & {id(p) for p in decayed["params"]}


def test_cosine_schedule_runs_from_lr_to_near_zero() -> None:
    config = tiny_config(epochs=10, lr=0.2, schedule="cosine")
    assert [round(lr_at(config, e), 6) for e in (0, 5, 9)] == [
        0.2,
        0.1,
        round(0.1 * (1 + math.cos(0.9 * math.pi)), 6),
    ]


@pytest.mark.parametrize("schedule", ["step", "cosine", "constant"])
def test_warm_up_ramps_the_lr_linearly_into_the_schedule(schedule: str) -> None:
    cold = tiny_config(epochs=10, lr=0.4, schedule=schedule)
    warm = tiny_config(epochs=10, lr=0.4, schedule=schedule, warmup_epochs=3)
    ramp = [0.25, 0.5, 0.75]
    assert [lr_at(warm, e) for e in range(3)] == pytest.approx(
        [f * lr_at(cold, e) for e, f in enumerate(ramp)]
    )
    assert [lr_at(warm, e) for e in range(3, 10)] == [lr_at(cold, e) for e in range(3, 10)]


def test_feature_statistics_leave_the_model_untouched() -> None:
    model = create_model("tiny", 10, norm="sbn", placement="all", width=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.randn(8, 3, 32, 32)
    rng = torch.get_rng_state()
    measure_feature_stats(model, probe)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
