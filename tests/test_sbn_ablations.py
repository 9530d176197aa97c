"""The arms that separate SBN's mechanism (sbn_study.trial.sbn_ablations), each against an independent float64
reference written from its equation with torch.fft, and placed at exactly the sites SBN takes."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from sbn_study.errors import UserError
from sbn_study.spec.config import NormConfig
from sbn_study.trial.featstats import measure_feature_stats
from sbn_study.trial.models import create_model
from sbn_study.trial.norms import get_norm_layer, norm_parameters, norm_sites
from sbn_study.trial.sbn import SpectralBatchNorm2d
from sbn_study.trial.sbn_ablations import (
    FixedScaleBatchNorm2d,
    LearnedScaleBatchNorm2d,
    SpectralCenterOnly2d,
    SpectralDivideOnly2d,
    SpectralNoSpike2d,
    SpectralSpikeOnly2d,
)
from tests.test_sbn import _bins, _input, _randn, _rel

NORMS = ["backward", "ortho", "forward"]
IMPLS = ["auto", "fft"]
# Odd and even widths; W = 17 takes the closed form's low-rank backward, the others its dense one.
SHAPES = [(2, 3, 5, 7), (4, 3, 8, 8), (3, 2, 6, 9), (2, 2, 3, 17)]
TOLERANCE = 1e-10


@pytest.fixture
def gen() -> Iterator[torch.Generator]:
    # Fresh inputs on every run, as in tests/test_sbn.py; pytest shows the printed seed with a failure.
    seed = secrets.randbits(63)
    print(f"generator seed: {seed}")
    yield torch.Generator().manual_seed(seed)


Equation = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
# Y from the spectrum X, the statistics mu and sigma = sqrt(var + eps), gamma and beta (all C×1×1 but X).
EQUATIONS: dict[str, Equation] = {
    "sbn": lambda X, mu, sigma, g, b: g * (X - mu) / sigma + b,
    "sbn_noaffine": lambda X, mu, sigma, g, b: (X - mu) / sigma,
    "sbn_nospike": lambda X, mu, sigma, g, b: g * X / sigma,
    "spike": lambda X, mu, sigma, g, b: X + b - g / sigma * mu,
    "sbn_center": lambda X, mu, sigma, g, b: g * (X - mu) + b,
    "sbn_var": lambda X, mu, sigma, g, b: g * X / sigma + b,
}
ARMS: dict[str, type[SpectralBatchNorm2d]] = {
    "sbn": SpectralBatchNorm2d,
    "sbn_noaffine": SpectralBatchNorm2d,
    "sbn_nospike": SpectralNoSpike2d,
    "spike": SpectralSpikeOnly2d,
    "sbn_center": SpectralCenterOnly2d,
    "sbn_var": SpectralDivideOnly2d,
}
VARIANTS = ["sbn_nospike", "spike", "sbn_center", "sbn_var"]


def ref_spectral(
    kind: str,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    norm: str,
    running: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, complex mean, biased variance) of `kind` in float64, with batch statistics or `running`."""
    spectrum = torch.fft.rfft2(x.to(torch.float64), norm=norm)
    if running is None:
        mean = spectrum.mean(dim=(0, 2, 3))
        var = (spectrum - mean[:, None, None]).abs().square().mean(dim=(0, 2, 3))
    else:
        mean, var = running
    ones = torch.ones(x.shape[1], dtype=torch.float64)
    gamma = ones if weight is None else weight
    beta = 0 * ones if bias is None else bias
    out = EQUATIONS[kind](spectrum, *(t[:, None, None] for t in (mean, torch.sqrt(var + eps), gamma, beta)))
    return torch.fft.irfft2(out, s=x.shape[-2:], norm=norm), mean, var


def ref_gain(h: int, w: int, norm: str) -> float:
    return {"backward": 1 / math.sqrt(h * w), "ortho": 1.0, "forward": math.sqrt(h * w)}[norm]


def ref_bn(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, biased variance) of BatchNorm2d in float64."""
    x = x.to(torch.float64)
    if running is None:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = running
    y = (x - mean[:, None, None]) / torch.sqrt(var + eps)[:, None, None]
    if weight is not None and bias is not None:
        y = y * weight[:, None, None] + bias[:, None, None]
    return y, mean, var


def _randomize(gen: torch.Generator, layer: nn.Module) -> None:
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(
                0.5 + _randn(gen, *param.shape).abs() if name == "weight" else _randn(gen, *param.shape)
            )


def _placed(kind: str, channels: int, **cfg: object) -> nn.Module:
    return get_norm_layer(kind)(channels, NormConfig(kind=kind, **cfg)).double()  # type: ignore[arg-type]


def _grad_errors(y: Tensor, expected: Tensor, inputs: list[Tensor], grad: Tensor) -> list[float]:
    return [
        _rel(actual, reference)
        for actual, reference in zip(
            torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, inputs, grad), strict=True
        )
    ]


def spectral_errors(
    gen: torch.Generator, kind: str, shape: tuple[int, int, int, int], norm: str, impl: str, affine: bool
) -> list[float]:
    """Relative errors of one arm against `ref_spectral`: a training step (y, gradients, running statistics),
    then eval mode on a fresh batch (y, gradients)."""
    momentum, eps = 0.3, 1e-3
    layer = _placed(kind, shape[1], eps=eps, momentum=momentum, affine=affine, fft_norm=norm, impl=impl).sbn
    _randomize(gen, layer)
    params = list(layer.parameters())
    x = _input(gen, shape).requires_grad_()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    expected, mean, var = ref_spectral(kind, x, layer.weight, layer.bias, eps, norm)
    errors = [_rel(y, expected), *_grad_errors(y, expected, [x, *params], _randn(gen, *shape))]
    unbiased = var * _bins(x) / (_bins(x) - 1)
    errors += [
        _rel(layer.running_mean_real, momentum * mean.real),
        _rel(layer.running_mean_imag, momentum * mean.imag),
        _rel(layer.running_var, 1 - momentum + momentum * unbiased),
    ]
    layer.eval()
    x = _input(gen, (2, *shape[1:])).requires_grad_()
    running = (torch.complex(layer.running_mean_real, layer.running_mean_imag), layer.running_var)
    y = layer(x)
    expected, _, _ = ref_spectral(kind, x, layer.weight, layer.bias, eps, norm, running)
    return [*errors, _rel(y, expected), *_grad_errors(y, expected, [x, *params], _randn(gen, *x.shape))]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(EQUATIONS))
def test_spectral_arms_match_their_equations(
    gen: torch.Generator, kind: str, shape: tuple[int, int, int, int], norm: str, impl: str, affine: bool
) -> None:
    # `sbn` itself checks the reference against the layer that tests/test_sbn.py checks on its own.
    assert max(spectral_errors(gen, kind, shape, norm, impl, affine)) < TOLERANCE


def test_spike_adds_to_x_exactly_what_sbn_adds_to_its_rescaled_x(gen: torch.Generator) -> None:
    shape, cfg = (4, 3, 6, 5), {"fft_norm": "ortho"}
    sbn, spike = _placed("sbn", 3, **cfg).sbn, _placed("spike", 3, **cfg).sbn
    _randomize(gen, sbn)
    spike.load_state_dict(sbn.state_dict())
    x = _input(gen, shape)
    _, _, var = ref_spectral("sbn", x, None, None, sbn.eps, "ortho")
    scale = (sbn.weight / torch.sqrt(var + sbn.eps))[:, None, None]
    assert _rel(spike(x) - x, sbn(x) - scale * x) < TOLERANCE


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("impl", IMPLS)
# NCHW maps this narrow take the closed form's dense backward, channels-last ones its low-rank one.
@pytest.mark.parametrize(("shape", "channels_last"), [((3, 2, 4, 4), False), ((2, 2, 3, 5), True)])
@pytest.mark.parametrize("kind", VARIANTS)
def test_gradcheck(
    gen: torch.Generator,
    kind: str,
    shape: tuple[int, int, int, int],
    channels_last: bool,
    impl: str,
    mode: str,
) -> None:
    layer = _placed(kind, shape[1], impl=impl, fft_norm=NORMS[shape[-1] % 3]).sbn
    _randomize(gen, layer)
    if mode == "eval":
        with torch.no_grad():
            layer.running_mean_real.copy_(_randn(gen, shape[1]))
            layer.running_mean_imag.copy_(_randn(gen, shape[1]))
            layer.running_var.copy_(0.5 + _randn(gen, shape[1]).abs())
        layer.eval()
    x = _input(gen, shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    names = [name for name, _ in layer.named_parameters()]
    values = [param.detach().clone().requires_grad_() for param in layer.parameters()]

    def function(x: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    # The full Jacobian for the hand-written backward in training; a random projection of it for "fft", whose
    # gradients are autograd's, and in eval mode, where the backward is a per-channel multiplication.
    fast = impl == "fft" or mode == "eval"
    assert torch.autograd.gradcheck(function, (x.requires_grad_(), *values), fast_mode=fast)


@pytest.mark.parametrize("kind", VARIANTS)
def test_compiles_to_one_graph(gen: torch.Generator, kind: str) -> None:
    torch._dynamo.reset()
    eager = _placed(kind, 3, momentum=None).sbn
    _randomize(gen, eager)
    compiled_layer = _placed(kind, 3, momentum=None).sbn
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x, grad = _input(gen, (4, 3, 6, 5)), _randn(gen, 4, 3, 6, 5)
        results = []
        for layer in (compiled, eager):
            x_copy = x.clone().requires_grad_()
            y = layer(x_copy)
            results.append([y, *torch.autograd.grad(y, [x_copy, *layer.parameters()], grad)])
        for actual, expected in zip(*results, strict=True):
            assert _rel(actual, expected) < 1e-12
    for name, buffer in compiled_layer.named_buffers():
        assert _rel(buffer, eager.get_buffer(name)) < 1e-12, name


# --- scale and bnscale: one BatchNorm at the site ---------------------------------------------------------------


def scale_errors(
    gen: torch.Generator, shape: tuple[int, int, int, int], norm: str, affine: bool
) -> list[float]:
    """Relative errors of `scale` against g·BN(x): a training step, then eval mode on a fresh batch."""
    momentum, eps = 0.3, 1e-3
    layer = _placed("scale", shape[1], eps=eps, momentum=momentum, affine=affine, fft_norm=norm)
    _randomize(gen, layer)
    params = list(layer.parameters())
    gain = ref_gain(*shape[-2:], norm)
    x = _input(gen, shape).requires_grad_()
    y = layer(x)
    expected, mean, var = ref_bn(x, layer.weight, layer.bias, eps)
    errors = [_rel(y, gain * expected), *_grad_errors(y, gain * expected, [x, *params], _randn(gen, *shape))]
    count = x.numel() // shape[1]
    errors += [
        _rel(layer.running_mean, momentum * mean),
        _rel(layer.running_var, 1 - momentum + momentum * var * count / (count - 1)),
    ]
    layer.eval()
    x = _input(gen, (2, *shape[1:])).requires_grad_()
    y = layer(x)
    expected, _, _ = ref_bn(x, layer.weight, layer.bias, eps, (layer.running_mean, layer.running_var))
    return [
        *errors,
        _rel(y, gain * expected),
        *_grad_errors(y, gain * expected, [x, *params], _randn(gen, *x.shape)),
    ]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_scale_is_bn_times_the_gain_of_fft_norm(
    gen: torch.Generator, shape: tuple[int, int, int, int], norm: str, affine: bool
) -> None:
    assert max(scale_errors(gen, shape, norm, affine)) < TOLERANCE


@pytest.mark.parametrize("kind", ["scale", "bnscale"])
def test_scale_and_bnscale_gradcheck(gen: torch.Generator, kind: str) -> None:
    layer = _placed(kind, 2, fft_norm="forward")
    x = _input(gen, (3, 2, 4, 5)).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))
    layer.eval()
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("norm", NORMS)
def test_bnscale_sets_gamma_once_at_the_first_forward_and_the_optimizer_trains_it(
    gen: torch.Generator, norm: str
) -> None:
    shape = (4, 3, 6, 5)
    layer = _placed("bnscale", 3, eps=1e-3, momentum=0.3, fft_norm=norm)
    assert type(layer) is LearnedScaleBatchNorm2d
    weight = layer.weight
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)  # built before any forward, as in training
    assert (layer.weight == 1).all()

    x = _input(gen, shape).requires_grad_()
    y = layer(x)
    gain = ref_gain(*shape[-2:], norm)
    assert layer.weight is weight and torch.equal(weight, torch.full((3,), gain, dtype=torch.float64))
    expected, _, _ = ref_bn(x, layer.weight, layer.bias, layer.eps)
    grad = _randn(gen, *shape)
    assert max(_rel(y, expected), *_grad_errors(y, expected, [x, layer.weight, layer.bias], grad)) < TOLERANCE

    layer(x).square().sum().backward()
    optimizer.step()
    trained = weight.detach().clone()
    assert not torch.equal(trained, torch.full_like(trained, gain))
    layer(_input(gen, (2, 3, 4, 4)))  # another size does not set γ again
    assert torch.equal(layer.weight, trained)

    layer.reset_parameters()
    layer(x)
    assert torch.equal(layer.weight, torch.full_like(trained, gain))


def test_bnscale_restored_from_a_checkpoint_keeps_its_trained_gamma(gen: torch.Generator) -> None:
    model = create_model("tiny", 10, "bnscale", "all", width=8).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # The feature-statistics probe at initialization is the first forward, as in a trial.
    measure_feature_stats(model, _input(gen, (4, 3, 32, 32)))
    model(_input(gen, (4, 3, 32, 32))).square().mean().backward()
    optimizer.step()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    sites = norm_sites(model)
    assert all(type(module) is LearnedScaleBatchNorm2d for module in map(model.get_submodule, sites))
    for site in sites:
        assert bool(state[f"{site}._extra_state"]), site
        # Trained away from the constant it started at, so that a re-initialization would show.
        assert len(state[f"{site}.weight"].unique()) > 1, site

    restored = create_model("tiny", 10, "bnscale", "all", width=8).double()
    restored.load_state_dict(state)
    restored(_input(gen, (4, 3, 32, 32)))
    for site in sites:
        assert torch.equal(restored.get_submodule(site).weight, state[f"{site}.weight"]), site


def test_bnscale_refuses_affine_false() -> None:
    with pytest.raises(UserError, match=r"norm\.affine: bnscale learns its downscale"):
        _placed("bnscale", 3, affine=False)


# --- placement --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*VARIANTS, "sbn_noaffine"])
def test_spectral_arms_are_a_plain_bn_followed_by_the_configured_arm_named_sbn(kind: str) -> None:
    cfg = {"eps": 1e-3, "momentum": 0.2, "fft_norm": "ortho", "impl": "fft"}
    site = _placed(kind, 8, **cfg)
    assert [name for name, _ in site.named_children()] == ["bn", "sbn"]
    assert type(site.bn) is nn.BatchNorm2d and (site.bn.eps, site.bn.momentum) == (1e-5, 0.1)
    assert type(site.sbn) is ARMS[kind]
    assert (site.sbn.eps, site.sbn.momentum, site.sbn.fft_norm, site.sbn.impl) == (1e-3, 0.2, "ortho", "fft")
    params = {name for name, _ in site.sbn.named_parameters()}
    assert params == {"sbn_noaffine": set(), "sbn_nospike": {"weight"}}.get(kind, {"weight", "bias"})
    assert not list(_placed(kind, 8, affine=False).sbn.parameters())


def test_scale_takes_the_config() -> None:
    layer = _placed("scale", 8, eps=1e-3, momentum=None, affine=False, fft_norm="forward")
    assert type(layer) is FixedScaleBatchNorm2d
    assert (layer.eps, layer.momentum, layer.affine, layer.fft_norm) == (1e-3, None, False, "forward")


@pytest.mark.parametrize("kind", ["scale", "bnscale", *VARIANTS, "sbn_noaffine"])
def test_arms_take_exactly_the_sites_of_sbn34(kind: str) -> None:
    sbn_sites = norm_sites(create_model("resnet18", 10, "sbn", "34"))
    placed = {site.removesuffix(".sbn") for site in sbn_sites if site.endswith(".sbn")}
    model = create_model("resnet18", 10, kind, "34")
    modules = dict(model.named_modules())
    arm_parameters = {id(p) for base in placed for p in modules[base].parameters()}
    assert arm_parameters and arm_parameters <= {id(p) for p in norm_parameters(model)}
    if kind in ("scale", "bnscale"):
        assert norm_sites(model) == norm_sites(create_model("resnet18", 10))
        arm = FixedScaleBatchNorm2d if kind == "scale" else LearnedScaleBatchNorm2d
        assert {site for site in norm_sites(model) if type(modules[site]) is arm} == placed
    else:
        assert norm_sites(model) == sbn_sites
        assert {
            site.removesuffix(".sbn") for site in sbn_sites if type(modules[site]) is ARMS[kind]
        } == placed
