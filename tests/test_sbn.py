"""SpectralBatchNorm2d against an independent float64 reference of Algorithm 1, and auto against fft."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from sbn_study.trial.sbn import DENSE_ROW, SpectralBatchNorm2d

SHAPES = [(2, 3, 5, 7), (4, 3, 8, 8), (3, 2, 6, 9), (5, 4, 7, 4)]
NORMS = ["backward", "ortho", "forward"]
IMPLS = ["auto", "fft"]


@pytest.fixture
def gen() -> Iterator[torch.Generator]:
    # Fresh inputs on every run; the seed is printed so that pytest shows it with a failure.
    seed = secrets.randbits(63)
    print(f"generator seed: {seed}")
    yield torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _input(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Tensor:
    # A per-channel offset and scale, as after a BN with learned affine, so that the complex mean matters.
    c = shape[1]
    x = _randn(gen, *shape) * (0.5 + _randn(gen, 1, c, 1, 1).abs()) + _randn(gen, 1, c, 1, 1)
    return x.to(dtype)


def _rel(actual: Tensor, expected: Tensor) -> float:
    wide = torch.complex128 if expected.is_complex() else torch.float64
    return ((actual.to(wide) - expected.to(wide)).norm() / expected.to(wide).norm()).item()


def _layer(
    gen: torch.Generator, channels: int, dtype: torch.dtype = torch.float64, **kwargs: object
) -> SpectralBatchNorm2d:
    layer = SpectralBatchNorm2d(channels, **kwargs).to(dtype)  # type: ignore[arg-type]
    if layer.weight is not None and layer.bias is not None:
        with torch.no_grad():
            layer.weight.copy_(0.5 + _randn(gen, channels).abs())
            layer.bias.copy_(_randn(gen, channels))
    return layer


# --- the reference: explicit DFT matrices in float64, nothing from sbn_study --------------------------------


def _dft(h: int, w: int, norm: str) -> tuple[float, Tensor, Tensor, Tensor]:
    kappa = {"backward": 1.0, "ortho": 1.0 / math.sqrt(h * w), "forward": 1.0 / (h * w)}[norm]
    rows = torch.arange(h, dtype=torch.float64)
    cols = torch.arange(w, dtype=torch.float64)
    bins = torch.arange(w // 2 + 1, dtype=torch.float64)
    f_h = torch.exp(-2j * math.pi * torch.outer(rows, rows) / h)  # [kh, h]
    f_w = torch.exp(-2j * math.pi * torch.outer(cols, bins) / w)  # [w, kw]
    # The real inverse counts each kw other than 0 and W/2 twice (its conjugate twin is not stored).
    multiplicity = torch.where((bins == 0) | (2 * bins == w), 1.0, 2.0).to(torch.float64)
    return kappa, f_h, f_w, multiplicity


def ref_rfft2(x: Tensor, norm: str) -> Tensor:
    kappa, f_h, f_w, _ = _dft(*x.shape[-2:], norm)
    return kappa * (f_h @ x.to(torch.complex128) @ f_w)


def ref_irfft2(spectrum: Tensor, w: int, norm: str) -> Tensor:
    """irfft2(Y, s=(H, W)) of a half spectrum that need not be Hermitian: y = λ·Re(Σ_kh Σ_kw m_kw·Y·e^{+iθ})."""
    h = spectrum.shape[-2]
    kappa, f_h, f_w, multiplicity = _dft(h, w, norm)
    return (f_h.conj() @ spectrum @ (multiplicity[:, None] * f_w.conj().T)).real / (kappa * h * w)


def ref_sbn(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    norm: str,
    running: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1: (y, complex mean, biased variance) with batch statistics, or with `running` (mean, var)."""
    spectrum = ref_rfft2(x, norm)
    if running is None:
        mean = spectrum.mean(dim=(0, 2, 3))
        var = (spectrum - mean[:, None, None]).abs().square().mean(dim=(0, 2, 3))
    else:
        mean, var = running
    normalized = (spectrum - mean[:, None, None]) / torch.sqrt(var + eps)[:, None, None]
    if weight is not None and bias is not None:
        normalized = normalized * weight[:, None, None] + bias[:, None, None]
    return ref_irfft2(normalized, x.shape[-1], norm), mean, var


def _bins(x: Tensor) -> int:
    n, _, h, w = x.shape
    return n * h * (w // 2 + 1)


def _assert_matches_reference(
    layer: SpectralBatchNorm2d, x: Tensor, y: Tensor, grad: Tensor, params: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """y = layer(x) and its gradients against the float64 reference; returns the reference's batch mean, var."""
    expected, mean, var = ref_sbn(x, layer.weight, layer.bias, layer.eps, layer.fft_norm)
    assert _rel(y, expected) < 1e-10
    for actual_grad, expected_grad in zip(
        torch.autograd.grad(y, [x, *params], grad),
        torch.autograd.grad(expected, [x, *params], grad),
        strict=True,
    ):
        assert _rel(actual_grad, expected_grad) < 1e-10
    return mean, var


def test_reference_inverse_is_torch_irfft2_also_for_non_hermitian_spectra(gen: torch.Generator) -> None:
    # The layer's spectrum is not Hermitian once the complex mean is subtracted; the reference must follow
    # irfft2's convention for it (imaginary parts of the kw=0 and kw=W/2 bins dropped), as the paper's layer does.
    for h, w in [(5, 7), (6, 8), (1, 4), (4, 1)]:
        spectrum = torch.complex(_randn(gen, 2, h, w // 2 + 1), _randn(gen, 2, h, w // 2 + 1))
        for norm in NORMS:
            expected = torch.fft.irfft2(spectrum, s=(h, w), norm=norm)
            assert _rel(ref_irfft2(spectrum, w, norm), expected) < 1e-13
            assert _rel(ref_rfft2(expected, norm), torch.fft.rfft2(expected, norm=norm)) < 1e-13


# --- against the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(
    gen: torch.Generator, shape: tuple[int, int, int, int], norm: str, impl: str, affine: bool
) -> None:
    layer = _layer(gen, shape[1], fft_norm=norm, impl=impl, affine=affine, eps=1e-3)
    x = _input(gen, shape).requires_grad_()
    grad = _randn(gen, *shape)
    params = [p for p in (layer.weight, layer.bias) if p is not None]

    y = layer(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    mean, var = _assert_matches_reference(layer, x, y, grad, params)

    unbiased = var * _bins(x) / (_bins(x) - 1)
    assert _rel(layer.running_mean_real, 0.1 * mean.real) < 1e-10
    assert _rel(layer.running_mean_imag, 0.1 * mean.imag) < 1e-10
    assert _rel(layer.running_var, 0.9 + 0.1 * unbiased) < 1e-10

    layer.eval()
    x_eval = _input(gen, (1, *shape[1:])).requires_grad_()
    running = (torch.complex(layer.running_mean_real, layer.running_mean_imag), layer.running_var)
    y_eval = layer(x_eval)
    expected_eval, _, _ = ref_sbn(x_eval, layer.weight, layer.bias, layer.eps, norm, running)
    assert _rel(y_eval, expected_eval) < 1e-10
    grad_eval = _randn(gen, *x_eval.shape)
    for actual_grad, expected_grad in zip(
        torch.autograd.grad(y_eval, [x_eval, *params], grad_eval),
        torch.autograd.grad(expected_eval, [x_eval, *params], grad_eval),
        strict=True,
    ):
        assert _rel(actual_grad, expected_grad) < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_running_statistics_over_steps(gen: torch.Generator, momentum: float | None, impl: str) -> None:
    channels, norm = 3, "ortho"
    layer = _layer(gen, channels, momentum=momentum, fft_norm=norm, impl=impl)
    running_mean = torch.zeros(channels, dtype=torch.complex128)
    running_var = torch.ones(channels, dtype=torch.float64)
    # Batches of different sizes: the unbiased factor M/(M-1) follows each batch.
    for step, n in enumerate([2, 5, 3, 4], start=1):
        x = _input(gen, (n, channels, 6, 5))
        layer(x)
        _, mean, var = ref_sbn(x, None, None, layer.eps, norm)
        factor = 1 / step if momentum is None else momentum
        running_mean = (1 - factor) * running_mean + factor * mean
        running_var = (1 - factor) * running_var + factor * var * _bins(x) / (_bins(x) - 1)
        assert int(layer.num_batches_tracked) == step
        assert _rel(layer.running_mean_real, running_mean.real) < 1e-12
        assert _rel(layer.running_mean_imag, running_mean.imag) < 1e-12
        assert _rel(layer.running_var, running_var) < 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(2, 2, 3, 5), (3, 2, 4, 4)])
def test_gradcheck(gen: torch.Generator, shape: tuple[int, int, int, int], impl: str, mode: str) -> None:
    layer = _layer(gen, shape[1], impl=impl, fft_norm="ortho")
    if mode == "eval":
        with torch.no_grad():
            layer.running_mean_real.copy_(_randn(gen, shape[1]))
            layer.running_mean_imag.copy_(_randn(gen, shape[1]))
            layer.running_var.copy_(0.5 + _randn(gen, shape[1]).abs())
        layer.eval()
    x = _input(gen, shape).requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def function(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    # The custom backward of "auto" gets the full Jacobian check; "fft" is differentiated by autograd, whose
    # FFT gradients a random projection of the Jacobian checks at a fraction of the time.
    assert torch.autograd.gradcheck(function, (x, weight, bias), fast_mode=impl == "fft")


# NCHW maps up to DENSE_ROW wide take the dense-gram backward; wider ones and channels-last maps the low-rank one.
DENSE_SHAPES = [(3, 2, 4, 4), (2, 3, 6, 8), (2, 2, 3, DENSE_ROW)]
LOW_RANK_SHAPES = [(3, 2, 3, DENSE_ROW + 4), (2, 3, 2, DENSE_ROW + 1)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", DENSE_SHAPES + LOW_RANK_SHAPES)
def test_dense_and_low_rank_backward_match_reference(
    gen: torch.Generator, shape: tuple[int, int, int, int], channels_last: bool
) -> None:
    layer = _layer(gen, shape[1], fft_norm=NORMS[shape[-1] % 3])
    x = _input(gen, shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = _randn(gen, *shape)
    _assert_matches_reference(layer, x, layer(x), grad, [layer.weight, layer.bias])


@pytest.mark.parametrize("shape", [DENSE_SHAPES[0], LOW_RANK_SHAPES[1]])
def test_gradcheck_of_both_backward_paths_without_affine(
    gen: torch.Generator, shape: tuple[int, ...]
) -> None:
    layer = _layer(gen, shape[1], affine=False, fft_norm="forward")
    x = _input(gen, shape).requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,))


# --- impl="auto" against impl="fft" -----------------------------------------------------------------------

AGREEMENT_SHAPES = [
    (2, 3, 5, 7),
    (3, 4, 8, 8),
    (4, 2, 6, 9),
    (5, 3, 7, 4),
    (2, 8, 4, 4),
    (6, 4, 16, 16),
    (3, 2, 1, 6),
    (2, 3, 3, 20),
]


def _run(layer: SpectralBatchNorm2d, x: Tensor, grad: Tensor) -> list[Tensor]:
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return [y, *torch.autograd.grad(y, [x, *params], grad)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", AGREEMENT_SHAPES)
def test_auto_matches_fft(
    gen: torch.Generator,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    tolerance: float,
    channels_last: bool,
) -> None:
    norm = NORMS[shape[0] % 3]
    auto = _layer(gen, shape[1], dtype, fft_norm=norm, impl="auto", momentum=0.3)
    fft = SpectralBatchNorm2d(shape[1], fft_norm=norm, impl="fft", momentum=0.3).to(dtype)
    fft.load_state_dict(auto.state_dict())

    def batch(n: int) -> Tensor:
        x = _input(gen, (n, *shape[1:]), dtype)
        return x.to(memory_format=torch.channels_last) if channels_last else x

    for n in (shape[0], shape[0] + 1):  # two steps, so that the running statistics have some history
        x, grad = batch(n), batch(n)
        for actual, expected in zip(_run(auto, x, grad), _run(fft, x, grad), strict=True):
            assert actual.dtype == expected.dtype == dtype
            assert _rel(actual, expected) < tolerance
    for name, buffer in auto.named_buffers():
        assert _rel(buffer, fft.get_buffer(name)) < tolerance, name

    auto.eval()
    fft.eval()
    x = batch(1)
    grad = batch(1)
    for actual, expected in zip(_run(auto, x, grad), _run(fft, x, grad), strict=True):
        assert _rel(actual, expected) < tolerance
    if channels_last:
        assert auto(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_autocast_computes_in_float32(gen: torch.Generator, impl: str) -> None:
    layer = _layer(gen, 4, torch.float32, impl=impl)
    x32 = _input(gen, (3, 4, 8, 6), torch.float32)
    x16 = x32.to(torch.bfloat16)
    expected = layer(x32)
    expected_from_bf16 = layer(x16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = layer(x32)
        y16 = layer(x16.requires_grad_())
    assert y32.dtype == torch.float32 and _rel(y32, expected) < 1e-6
    assert y16.dtype == torch.bfloat16 and _rel(y16, expected_from_bf16) < 1e-2
    y16.float().square().sum().backward()
    assert x16.grad is not None and x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad).all()


# --- the nn.Module contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_of_one_is_rejected_in_training_and_works_in_eval(gen: torch.Generator, impl: str) -> None:
    layer = _layer(gen, 3, impl=impl)
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training.*\[1, 3, 4, 5\]"
    ):
        layer(_input(gen, (1, 3, 4, 5)))
    layer(_input(gen, (4, 3, 4, 5)))
    layer.eval()
    x = _input(gen, (4, 3, 4, 5))
    # Eval statistics are fixed: a sample alone gives what it gives within a batch.
    torch.testing.assert_close(layer(x[2:3]), layer(x)[2:3], rtol=1e-12, atol=1e-12)


def test_invalid_inputs_and_arguments_are_rejected(gen: torch.Generator) -> None:
    layer = SpectralBatchNorm2d(3)
    with pytest.raises(ValueError, match="4-D input"):
        layer(_randn(gen, 2, 3, 5))
    with pytest.raises(ValueError, match="4-D input"):
        layer(_randn(gen, 2, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="2 channels"):
        layer(_randn(gen, 2, 2, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="fft_norm"):
        SpectralBatchNorm2d(3, fft_norm="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="impl"):
        SpectralBatchNorm2d(3, impl="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_round_trip_reproduces_eval_outputs(gen: torch.Generator, impl: str) -> None:
    layer = _layer(gen, 3, impl=impl, fft_norm="forward")
    for _ in range(3):
        layer(_input(gen, (4, 3, 6, 6)))
    state = layer.state_dict()
    assert set(state) == {
        "weight",
        "bias",
        "running_mean_real",
        "running_mean_imag",
        "running_var",
        "num_batches_tracked",
    }
    restored = SpectralBatchNorm2d(3, impl=impl, fft_norm="forward").double()
    restored.load_state_dict(state)
    layer.eval()
    restored.eval()
    x = _input(gen, (2, 3, 6, 6))
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_reset_parameters_and_running_stats(gen: torch.Generator) -> None:
    layer = _layer(gen, 3)
    layer(_input(gen, (4, 3, 6, 6)))
    layer.reset_running_stats()
    assert (layer.running_mean_real == 0).all() and (layer.running_mean_imag == 0).all()
    assert (layer.running_var == 1).all() and int(layer.num_batches_tracked) == 0
    assert not (layer.weight == 1).all()  # the parameters are left alone
    layer(_input(gen, (4, 3, 6, 6)))
    layer.reset_parameters()
    assert (layer.weight == 1).all() and (layer.bias == 0).all() and (layer.running_var == 1).all()
    assert int(layer.num_batches_tracked) == 0


def test_extra_repr_names_the_choices() -> None:
    text = repr(SpectralBatchNorm2d(8, momentum=None, affine=False, fft_norm="ortho", impl="fft"))
    assert text.startswith("SpectralBatchNorm2d(8, ")
    for part in (
        "eps=1e-05",
        "momentum=None",
        "affine=False",
        "track_running_stats=True",
        "fft_norm=ortho",
        "impl=fft",
    ):
        assert part in text


@pytest.mark.parametrize("impl", IMPLS)
def test_buffers_have_no_grad_history_after_a_training_step(gen: torch.Generator, impl: str) -> None:
    layer = _layer(gen, 3, impl=impl)
    x = _input(gen, (4, 3, 6, 5)).requires_grad_()
    layer(x).square().sum().backward()
    for name, buffer in layer.named_buffers():
        assert not buffer.requires_grad and buffer.grad_fn is None, name
    assert layer.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_without_running_stats_the_batch_statistics_are_used_in_eval_too(
    gen: torch.Generator, impl: str
) -> None:
    layer = _layer(gen, 3, impl=impl, track_running_stats=False)
    assert all(
        buffer is None for buffer in (layer.running_mean_real, layer.running_var, layer.num_batches_tracked)
    )
    x = _input(gen, (4, 3, 6, 5))
    y_train = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), y_train, rtol=0, atol=0)
    expected, _, _ = ref_sbn(x, layer.weight, layer.bias, layer.eps, "backward")
    assert _rel(y_train, expected) < 1e-10


def test_compiles_to_one_graph(gen: torch.Generator) -> None:
    # aot_eager traces the layer (forward, the custom backward, the running-statistics update) the way
    # inductor would, without the C++ code generation that would take longer than this test may.
    torch._dynamo.reset()
    eager = _layer(gen, 3, momentum=None)
    compiled_layer = _layer(gen, 3, momentum=None)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = _input(gen, (4, 3, 6, 5))
        grad = _randn(gen, 4, 3, 6, 5)
        for actual, expected in zip(_run(compiled, x, grad), _run(eager, x, grad), strict=True):  # type: ignore[arg-type]
            assert _rel(actual, expected) < 1e-12
    for name, buffer in compiled_layer.named_buffers():
        assert _rel(buffer, eager.get_buffer(name)) < 1e-12, name
