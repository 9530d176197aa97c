"""Memorized BN against a float64 reference of the paper's equations, without and with the Double-Forward
scheme; the extra forward leaves everything but the memories as it was; the memory is state."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sbn_study.trial.data import load_dataset
from sbn_study.trial.mbn import MemorizedBatchNorm2d, install_double_forward
from sbn_study.trial.models import create_model
from sbn_study.trial.train import train
from tests.test_cbn import sgd_step
from tests.test_train import tiny_config

CHANNELS, WINDOW, EPS = 4, 3, 1e-3


def _layer(double_forward: bool = False) -> MemorizedBatchNorm2d:
    torch.manual_seed(0)
    layer = MemorizedBatchNorm2d(CHANNELS, WINDOW, eps=EPS, double_forward=double_forward)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's mean and unbiased variance per channel."""
    flat = x.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.var(1)


def _normalize(x: torch.Tensor, layer: MemorizedBatchNorm2d, statistics: list[tuple[torch.Tensor, ...]]):
    """y = γ·(x − E)/√(Var + ε) + β with E, Var the uniform averages of the batches' means and variances."""
    mean = torch.stack([m for m, _ in statistics]).mean(0)[None, :, None, None]
    var = torch.stack([v for _, v in statistics]).mean(0)[None, :, None, None]
    gamma, beta = layer.weight.double()[None, :, None, None], layer.bias.double()[None, :, None, None]
    return (x - mean) / torch.sqrt(var + EPS) * gamma + beta


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def test_mbn_matches_a_float64_reference_in_training_and_eval() -> None:
    layer = _layer()
    generator = torch.Generator().manual_seed(1)
    memory: list[tuple[torch.Tensor, torch.Tensor]] = []
    errors = []
    for step in range(6):
        # Batches drawn from shifting distributions, so that pooling shows.
        x = (torch.randn(3, CHANNELS, 5, 5, generator=generator) * (1 + step) + step).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        current = _statistics(x64)
        expected = _normalize(x64, layer, [current, *memory[len(memory) - (WINDOW - 1) :]])
        upstream = torch.randn(x.shape, generator=generator)
        (expected * upstream.double()).sum().backward()
        y = layer(x)
        (y * upstream).sum().backward()
        errors += [_relative(y, expected), _relative(x.grad, x64.grad)]
        memory.append(tuple(s.detach() for s in current))
    assert max(errors) < 1e-5, errors
    layer.eval()
    fresh = torch.randn(2, CHANNELS, 5, 5, generator=generator)
    assert _relative(layer(fresh), _normalize(fresh.double(), layer, memory[-WINDOW:])) < 1e-6


def test_an_untrained_mbn_normalizes_with_zero_and_one_in_eval() -> None:
    layer = _layer().eval()
    x = torch.randn(2, CHANNELS, 3, 3)
    expected = x / (1 + EPS) ** 0.5 * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), expected)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, CHANNELS, 3, padding=1, bias=False), _layer(double_forward=True))
    install_double_forward(model)
    return model


def test_double_forward_memorizes_each_batch_under_the_weights_after_its_update() -> None:
    model = _model()
    conv, layer = model
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3, 2, 5, 5, generator=generator) + step for step in range(6)]
    weights = [
        conv.weight.detach().double().clone()
    ]  # the weights of every forward, then after the last step
    errors = []
    for step, x in enumerate(inputs):
        # The memory as the reference has it: every earlier batch under the weights that followed its update.
        memory = [
            _statistics(nn.functional.conv2d(inputs[s].double(), weights[s + 1], padding=1))
            for s in range(step)
        ]
        features = nn.functional.conv2d(x.double(), weights[step], padding=1)
        expected = _normalize(features, layer, [_statistics(features), *memory[len(memory) - (WINDOW - 1) :]])
        y = model(x)
        errors.append(_relative(y, expected))
        y.square().sum().backward()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 0.05 * parameter.grad
                parameter.grad = None
        weights.append(conv.weight.detach().double().clone())
    assert max(errors) < 1e-5, errors
    model.eval()
    fresh = torch.randn(2, 2, 5, 5, generator=generator)
    memory = [
        _statistics(nn.functional.conv2d(inputs[s].double(), weights[s + 1], padding=1)) for s in range(6)
    ]
    expected = _normalize(
        nn.functional.conv2d(fresh.double(), weights[-1], padding=1), layer, memory[-WINDOW:]
    )
    assert _relative(model(fresh), expected) < 1e-6


def test_the_extra_forward_changes_the_memories_only_and_keeps_the_random_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, CHANNELS, 3, padding=1, bias=False),
        nn.BatchNorm2d(CHANNELS),
        nn.Dropout(0.5),
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False),
        _layer(double_forward=True),
    )
    install_double_forward(model)
    model(torch.randn(3, 2, 5, 5)).sum().backward()
    with torch.no_grad():
        model[0].weight.mul_(2)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 2, 5, 5)
    rng = torch.get_rng_state()
    # In eval mode the model's own forward changes nothing: whatever changes is the extra forward's.
    model.eval()(x)
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.training and not model[4].training
    changed = {key for key, value in model.state_dict().items() if not torch.equal(before[key], value)}
    assert changed == {"4.memory_mean", "4.memory_var"}


def test_the_memory_is_state_a_resumed_model_continues_exactly() -> None:
    model = _model()
    inputs = torch.randn(7, 3, 2, 5, 5, generator=torch.Generator().manual_seed(3))

    for x in inputs[:4]:
        sgd_step(model, x)
    model.eval()(inputs[0])  # the evaluation that ends an epoch runs the last extra forward
    state = copy.deepcopy(model.state_dict())
    assert {"1.memory_mean", "1.memory_var", "1.memorized"} <= state.keys()
    resumed = _model()
    resumed.load_state_dict(state)
    for net in (model, resumed):
        net.train()
    for x in inputs[4:]:
        assert torch.equal(sgd_step(model, x), sgd_step(resumed, x))


def test_the_double_forward_is_installed_once_and_only_when_asked() -> None:
    from sbn_study.spec.config import ModelConfig, NormConfig
    from sbn_study.trial.models import create_model_from_config

    def hooks(double_forward: bool) -> int:
        norm = NormConfig(kind="mbn", placement="all", mbn_double_forward=double_forward)
        return len(create_model_from_config(ModelConfig(arch="tiny", width=4), norm, 10)._forward_pre_hooks)

    assert (hooks(True), hooks(False), len(create_model("tiny", 10, "bn", "all")._forward_pre_hooks)) == (
        1,
        0,
        0,
    )


def test_mbn_trains_the_tiny_model_well_above_chance() -> None:
    config = tiny_config(epochs=5, lr=0.2)
    config.norm = config.norm.model_copy(update={"kind": "mbn", "placement": "all"})
    config.features.enabled = False
    dataset = load_dataset(config.data)
    result = train(config, dataset=dataset)
    assert result.status == "completed"
    assert result.best_val_acc > 4 / dataset.num_classes, [round(m["val_acc"], 3) for m in result.history]
