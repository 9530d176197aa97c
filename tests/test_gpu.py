"""The CUDA paths (run when a GPU is present, skipped otherwise): SBN on the device in float32, channels-last
and under bf16 autocast against the float64 reference, and a trial trained with AMP and channels-last."""

from __future__ import annotations

import math

import pytest
import torch

from sbn_study.trial.sbn import SpectralBatchNorm2d
from sbn_study.trial.train import train
from tests.test_sbn import ref_sbn
from tests.test_train import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHAPES = [(8, 16, 32, 32), (32, 64, 8, 8), (16, 32, 7, 9)]


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_sbn_on_cuda_matches_the_float64_reference(shape: tuple[int, ...], channels_last: bool) -> None:
    torch.manual_seed(0)
    x64 = torch.randn(shape, dtype=torch.float64) * 2 + torch.randn(1, shape[1], 1, 1, dtype=torch.float64)
    layer = SpectralBatchNorm2d(shape[1]).cuda()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = x64.float().cuda()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    weight, bias = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()
    x_ref = x64.clone().requires_grad_()
    expected, _, _ = ref_sbn(x_ref, weight, bias, layer.eps, "backward")
    assert _rel(y, expected) < 1e-5
    (grad_x,) = torch.autograd.grad(y, x, grad.float().cuda())
    (expected_grad_x,) = torch.autograd.grad(expected, x_ref, grad)
    assert _rel(grad_x, expected_grad_x) < 1e-4


def test_sbn_under_bf16_autocast_computes_in_float32_and_returns_the_input_dtype() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32, 8, 8, device="cuda").bfloat16()
    layer = SpectralBatchNorm2d(32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected, _, _ = ref_sbn(x.double().cpu(), None, None, layer.eps, "backward")
    assert _rel(y, expected) < 1e-2  # bf16 output: 8 bits of mantissa


def test_a_trial_trains_on_cuda_with_amp_and_channels_last() -> None:
    config = tiny_config(epochs=5, lr=0.2, device="cuda", amp=True, channels_last=True)
    reports: list[dict[str, float]] = []
    result = train(config, report=lambda metrics, _ckpt: reports.append(metrics))
    epochs = [m for m in reports if "val_acc" in m]
    assert result.status == "completed" and [m["epoch"] for m in epochs] == [1, 2, 3, 4, 5]
    # The same learning check as on the CPU: bf16 and channels-last must not cost the network its learning.
    assert result.best_val_acc > 4 / 10, [round(m["val_acc"], 3) for m in epochs]
    assert all(math.isfinite(m["train_loss"]) for m in epochs)
    assert "fm/layer3.bn.sbn/norm" in reports[0]


def test_a_trial_on_cuda_reports_what_each_epoch_held_of_the_gpu() -> None:
    config = tiny_config(epochs=2, device="cuda")
    reports: list[dict[str, float]] = []
    train(config, report=lambda metrics, _ckpt: reports.append(metrics))
    epochs = [m for m in reports if "val_acc" in m]
    total = torch.cuda.mem_get_info()[1] / 2**20
    for metrics in epochs:
        # The trial's tensors stay within what its allocator reserved, which the whole card's use includes.
        allocated = metrics["system/gpu_memory_allocated_mb"]
        assert 0 < allocated <= metrics["system/gpu_memory_peak_reserved_mb"]
        assert metrics["system/gpu_memory_peak_reserved_mb"] <= metrics["system/gpu_memory_used_mb"] <= total
        if "system/gpu_utilization_percent" in metrics:  # NVML answers only with nvidia-ml-py installed
            assert 0 <= metrics["system/gpu_utilization_percent"] <= 100
