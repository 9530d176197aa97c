"""Cross-Iteration BN against a float64 reference of the paper's equations, over a run of SGD steps; its
burn-in and window of one are BN; its window is state; every architecture links each CBN to its conv."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sbn_study.trial.cbn import CrossIterationBatchNorm2d, link_preceding_convs
from sbn_study.trial.data import load_dataset
from sbn_study.trial.models import create_model
from sbn_study.trial.train import train
from tests.test_train import tiny_config

CHANNELS, WINDOW, EPS, MOMENTUM = 5, 3, 1e-3, 0.3
CONV = {"kernel_size": 3, "stride": 2, "padding": 1}


def _model(burnin: int, window: int = WINDOW, momentum: float | None = MOMENTUM) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, CHANNELS, bias=False, **CONV)
    cbn = CrossIterationBatchNorm2d(CHANNELS, window, burnin, eps=EPS, momentum=momentum)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(conv, cbn)
    link_preceding_convs(model)
    return model


class Reference:
    """CBN by the paper's equations in float64. An old batch's statistics and their Jacobians are computed
    from its input patches and the weights of its step, the Jacobians in the paper's closed form (∂μ_c/∂W_c =
    the mean patch, ∂ν_c/∂W_c = 2·mean(x_c · patch)), and carried to the current weights by the first-order
    term; only the current batch's statistics carry gradients."""

    def __init__(self, burnin: int, window: int) -> None:
        self.burnin, self.window = burnin, window
        self.steps = 0
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (patches, weight) of recorded steps
        self.running_mean = torch.zeros(CHANNELS, dtype=torch.float64)
        self.running_var = torch.ones(CHANNELS, dtype=torch.float64)
        self.clipped = 0  # entries where max(ν, μ²) took μ²

    @staticmethod
    def statistics(patches: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.einsum("cd,ndl->ncl", weight, patches)
        count = patches.shape[0] * patches.shape[2]
        mean_grad = patches.mean((0, 2)).expand(CHANNELS, -1)
        square_grad = 2 * torch.einsum("ncl,ndl->cd", y, patches) / count
        return y, y.mean((0, 2)), y.square().mean((0, 2)), mean_grad, square_grad

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
        self.steps += 1
        patches = F.unfold(x, CONV["kernel_size"], padding=CONV["padding"], stride=CONV["stride"])
        y, mean, square, _, _ = self.statistics(patches, weight.flatten(1))
        with torch.no_grad():
            self.running_mean = (1 - MOMENTUM) * self.running_mean + MOMENTUM * mean
            self.running_var = (1 - MOMENTUM) * self.running_var + MOMENTUM * y.transpose(0, 1).flatten(
                1
            ).var(1)
        if self.steps <= self.burnin:
            pooled_mean, pooled_var = mean, square - mean.square()
        else:
            means, squares = [mean], [square]
            for old_patches, old_weight in self.history[len(self.history) - (self.window - 1) :]:
                _, old_mean, old_square, mean_grad, square_grad = self.statistics(old_patches, old_weight)
                change = weight.detach().flatten(1) - old_weight
                means.append(old_mean + (mean_grad * change).sum(1))
                squares.append(old_square + (square_grad * change).sum(1))
            stacked_means, stacked_squares = torch.stack(means), torch.stack(squares)
            self.clipped += int((stacked_squares < stacked_means.square()).sum())
            pooled_mean = stacked_means.mean(0)
            pooled_var = torch.maximum(stacked_squares, stacked_means.square()).mean(0) - pooled_mean.square()
            self.history.append((patches.detach(), weight.detach().flatten(1)))
        normalized = (y - pooled_mean[:, None]) / torch.sqrt(pooled_var[:, None] + EPS)
        side = int(normalized.shape[2] ** 0.5)
        return (normalized * gamma[:, None] + beta[:, None]).reshape(x.shape[0], CHANNELS, side, side)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize(
    ("growth", "offset"),
    [(1.0, 0.5), (2.0, 3.0)],
    ids=["SGD steps", "weights doubled at every step, inputs far from 0: max(nu, mu^2) clips"],
)
def test_cbn_matches_a_float64_reference_in_training_running_statistics_and_eval(
    growth: float, offset: float
) -> None:
    model, reference = _model(burnin=2), Reference(burnin=2, window=WINDOW)
    conv, cbn = model
    generator = torch.Generator().manual_seed(1)
    errors = []
    for _ in range(8):
        x = (torch.randn(4, 3, 6, 6, generator=generator) * 2 + offset).requires_grad_()
        upstream = torch.randn(4, CHANNELS, 3, 3, generator=generator)
        leaves = [t.detach().double().requires_grad_() for t in (x, conv.weight, cbn.weight, cbn.bias)]
        expected = reference(*leaves)
        (expected * upstream.double()).sum().backward()
        y = model(x)
        (y * upstream).sum().backward()
        errors.append(_relative(y, expected))
        for actual, leaf in zip((x, conv.weight, cbn.weight, cbn.bias), leaves, strict=True):
            errors.append(_relative(actual.grad, leaf.grad))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter -= 0.05 * parameter.grad
                parameter.grad = None
            conv.weight.mul_(growth)
    assert max(errors) < 1e-5, errors
    assert (reference.clipped > 0) == (growth > 1)
    assert _relative(cbn.running_mean, reference.running_mean) < 1e-6
    assert _relative(cbn.running_var, reference.running_var) < 1e-6
    model.eval()
    fresh = torch.randn(2, 3, 6, 6, generator=generator)
    mean, var = reference.running_mean[None, :, None, None], reference.running_var[None, :, None, None]
    expected = (conv(fresh).double() - mean) / torch.sqrt(var + EPS) * cbn.weight.double()[
        None, :, None, None
    ] + cbn.bias.double()[None, :, None, None]
    assert _relative(model(fresh), expected) < 1e-6


def test_a_compensated_mean_is_the_old_batchs_mean_under_the_new_weights() -> None:
    """μ is linear in the weights of a conv without bias: its first-order term is exact; ν's is first-order
    accurate, far closer than the uncompensated value."""
    model = _model(burnin=0, window=2)
    conv, cbn = model
    old = torch.randn(8, 3, 6, 6)
    model(old)
    with torch.no_grad():
        old_square = conv(old).square().mean((0, 2, 3))
        conv.weight.add_(5e-4 * torch.randn_like(conv.weight))
        weight = conv.weight.flatten(1)
        new = conv(old)
        compensated_mean = cbn.mean_offsets[0] + (cbn.mean_grads[0] * weight).sum(-1)
        compensated_square = cbn.square_offsets[0] + (cbn.square_grads[0] * weight).sum(-1)
    torch.testing.assert_close(compensated_mean, new.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    true_square = new.square().mean((0, 2, 3))
    assert (compensated_square - true_square).norm() < 0.1 * (old_square - true_square).norm()


@pytest.mark.parametrize(("burnin", "window", "momentum"), [(4, WINDOW, MOMENTUM), (0, 1, None)])
def test_burn_in_and_a_window_of_one_are_batch_norm(burnin: int, window: int, momentum: float | None) -> None:
    model = _model(burnin, window, momentum)
    bn = nn.BatchNorm2d(CHANNELS, eps=EPS, momentum=momentum)
    bn.load_state_dict(model[1].state_dict(), strict=False)
    for _ in range(4):
        x = torch.randn(4, 3, 6, 6)
        torch.testing.assert_close(model(x), bn(model[0](x)), rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, bn.running_var, rtol=0, atol=0)


def sgd_step(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One plain gradient step on the sum of squared outputs; the outputs it was taken on."""
    y = net(x)
    y.square().sum().backward()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter -= 0.01 * parameter.grad
            parameter.grad = None
    return y.detach()


def test_the_window_is_state_a_resumed_model_continues_exactly() -> None:
    model = _model(burnin=1)
    inputs = torch.randn(7, 4, 3, 6, 6, generator=torch.Generator().manual_seed(2))

    for x in inputs[:4]:
        sgd_step(model, x)
    state = copy.deepcopy(model.state_dict())
    assert {"1.mean_grads", "1.square_offsets", "1.recorded", "1.num_batches_tracked"} <= state.keys()
    resumed = _model(burnin=1)
    resumed.load_state_dict(state)
    for x in inputs[4:]:
        assert torch.equal(sgd_step(model, x), sgd_step(resumed, x))


@pytest.mark.parametrize(("burnin", "steps", "momentum"), [(1, 3, MOMENTUM), (5, 0, None)])
def test_a_training_forward_without_autograd_changes_nothing(
    burnin: int, steps: int, momentum: float | None
) -> None:
    model = _model(burnin, momentum=momentum)
    for _ in range(steps):
        model(torch.randn(4, 3, 6, 6)).sum().backward()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(torch.randn(4, 3, 6, 6))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20", "tiny", "vgg16_bn"])
def test_every_cbn_follows_the_conv_whose_output_it_normalizes(arch: str) -> None:
    model = create_model(arch, 10, "cbn", "all")
    outputs: dict[int, torch.Tensor] = {}
    followed: list[bool] = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, _, out: outputs.__setitem__(id(m), out))
        if isinstance(module, CrossIterationBatchNorm2d):
            module.register_forward_pre_hook(lambda m, args: followed.append(args[0] is outputs[id(m._conv)]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert followed and all(followed)
    assert len(followed) == sum(isinstance(m, CrossIterationBatchNorm2d) for m in model.modules())


def test_cbn_trains_the_tiny_model_well_above_chance() -> None:
    config = tiny_config(epochs=5, lr=0.2)
    # 16 steps per epoch: CBN pools from the second epoch on.
    config.norm = config.norm.model_copy(update={"kind": "cbn", "placement": "all", "cbn_burnin": 16})
    config.features.enabled = False
    dataset = load_dataset(config.data)
    result = train(config, dataset=dataset)
    assert result.status == "completed"
    assert result.best_val_acc > 4 / dataset.num_classes, [round(m["val_acc"], 3) for m in result.history]
