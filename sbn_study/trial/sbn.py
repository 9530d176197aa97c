"""Spectral Batch Normalization (Cakaj, Mehnert, Yang, IJCNN 2023): batch normalization in the 2-D DFT domain.

Algorithm 1 of the paper, per channel c of an N×C×H×W input x:

    X = rfft2(x)                              N×C×H×(W//2+1) complex bins
    mu = mean(X)                              complex, pooled over the batch and all bins
    var = mean(|X - mu|²)                     one real variance
    Y = gamma·(X - mu)/sqrt(var + eps) + beta   real gamma, beta
    y = irfft2(Y, s=(H, W))

`impl="fft"` runs exactly that. `impl="auto"` (the default) runs the exact closed form in the spatial domain:
the statistics and the affine parameters are one scalar per channel and the DFT is linear, so

    y = s·x + Re(c)·P_re + Im(c)·P_im,   s = gamma/sqrt(var + eps),   c = beta - s·mu,

with the fixed maps P_re = irfft2(1) and P_im = irfft2(i) over the half spectrum, which are zero outside row 0.
Summing the DFT over all vertical frequencies leaves only row 0 of the map, so mu is a fixed weighting of row 0
of the batch-summed map; Parseval's theorem in 2-D (full spectrum) and in 1-D (the kw=0 and, for even W, kw=W/2
columns, which the half spectrum holds once instead of twice) gives the energy of the half spectrum from Σx²,
the row sums and the alternating row sums. No FFT runs at all, and a hand-written backward keeps the gradient
to a few passes over the data. `fft_norm` only changes constant factors of both forms.

The running variance takes the unbiased factor M/(M-1) with M = N·H·(W//2+1), the number of bins the statistic
actually pools; the paper's Algorithm 1 writes n = C·H·W/2 instead, which is neither that count nor per channel.

Everything runs in float32 at least, even under autocast, since FFTs of half-precision inputs do not exist:
half and bfloat16 inputs are upcast and the output is cast back to the input's dtype.

The ablations of `sbn_study.trial.sbn_ablations` are subclasses that drop terms of the same closed form
(`Terms`): both forms and the hand-written backward take the terms, so each ablation is exact in both.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

FftNorm = Literal["backward", "ortho", "forward"]
Impl = Literal["auto", "fft"]

FFT_NORMS: tuple[str, ...] = ("backward", "ortho", "forward")
IMPLS: tuple[str, ...] = ("auto", "fft")


class Terms(NamedTuple):
    """Which terms of y = a·x + Re(c)·P_re + Im(c)·P_im a layer keeps; all of them make SBN.

    s = gamma·(1/sqrt(var + eps) if divide else 1) and c = (beta if shift) - (s·mu if center), i.e. in the
    spectrum Y = a·X + beta - s·mu with the dropped terms left out. The statistics and their running averages
    are SBN's in every case, used or not, so an ablation's buffers are SBN's.
    """

    divide: bool = True  # s divides by the spectral standard deviation
    center: bool = True  # c subtracts s·mu: the mean's part of the additive map
    rescale: bool = True  # a = s; without it a = 1 and x passes unscaled, plus the additive map alone
    shift: bool = True  # beta is learned (with affine) and added to c


class _Constants(NamedTuple):
    """The fixed per-(H, W, fft_norm) pieces of the closed form."""

    # Rows of the input go through one GEMM `basis @ rows.T` in groups of `block` consecutive rows: a GEMM
    # over rows of only W = 4 or 8 values runs far below memory speed, one over 16 values does not.
    block: int
    # (block·terms)×(block·W): block-diagonal copies of [1, (-1)^w] (the alternating row only for even W), the
    # row sums and alternating row sums whose squares give the energy of the kw=0 and kw=W/2 columns.
    basis: Tensor
    # (block·W)×(block·W): W·I + basisᵀ·basis, the quadratic form of a group of rows' energy (up to `energy`).
    gram: Tensor
    # 2×W: [Re, Im] of κ/Wr · Σ_{kw<Wr} exp(-2πi·kw·w/W), which weights row 0 of a map into its share of the mean.
    mean_weights: Tensor
    # 2×W row 0 of [irfft2(1), irfft2(i)], the maps that a constant complex spectrum becomes.
    spike: Tensor
    # κ²/(2·Wr): mean |X|² = energy · (W·Σx² + Σ(row sums)²) / N.
    energy: float


def _build_constants(
    height: int, width: int, block: int, fft_norm: str, device: torch.device, dtype: torch.dtype
) -> _Constants:
    half = width // 2 + 1
    # rfft2 with this norm is κ times the unnormalized DFT; irfft2 is 1/(κ·H·W) times the unnormalized inverse.
    kappa = {"backward": 1.0, "ortho": 1.0 / math.sqrt(height * width), "forward": 1.0 / (height * width)}[
        fft_norm
    ]
    w = torch.arange(width, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(torch.arange(half, dtype=torch.float64), w) / width
    row_basis = [torch.ones(width, dtype=torch.float64)]
    if width % 2 == 0:
        row_basis.append(1.0 - 2.0 * (w % 2))
    mean_weights = torch.stack([angle.cos().sum(0), -angle.sin().sum(0)]) * (kappa / half)
    # irfft2 of a constant spectrum a: the sum over kh leaves H·δ(h); along W, c2r counts the bins other than
    # kw=0 and kw=W/2 twice and takes Re(a·exp(iθ)), i.e. cos θ for a=1 and -sin θ for a=i.
    multiplicity = torch.full((half, 1), 2.0, dtype=torch.float64)
    multiplicity[0] = 1.0
    if width % 2 == 0:
        multiplicity[-1] = 1.0
    spike = torch.stack([(multiplicity * angle.cos()).sum(0), -(multiplicity * angle.sin()).sum(0)]) / (
        kappa * width
    )
    basis = torch.block_diag(*[torch.stack(row_basis)] * block)
    gram = width * torch.eye(block * width, dtype=torch.float64) + basis.T @ basis
    return _Constants(
        block=block,
        basis=basis.to(device, dtype),
        gram=gram.to(device, dtype),
        mean_weights=mean_weights.to(device, dtype),
        spike=spike.to(device, dtype),
        energy=kappa * kappa / (2 * half),
    )


@lru_cache(maxsize=64)
def _cached_constants(
    height: int, width: int, block: int, fft_norm: str, device: torch.device, dtype: torch.dtype
) -> _Constants:
    # Built outside inference mode and autograd so that a first call under torch.inference_mode() does not
    # leave inference tensors in the cache that a later training step could not use.
    with torch.inference_mode(False), torch.no_grad():
        return _build_constants(height, width, block, fft_norm, device, dtype)


def _constants(
    height: int, width: int, block: int, fft_norm: str, device: torch.device, dtype: torch.dtype
) -> _Constants:
    # torch.compile would trace through the cache anyway (and warn); traced, the constants become part of the
    # graph, built from the shapes alone.
    if torch.compiler.is_compiling():
        return _build_constants(height, width, block, fft_norm, device, dtype)
    return _cached_constants(height, width, block, fft_norm, device, dtype)


# The most values one GEMM row takes. Up to this many, the backward multiplies by the dense `gram` (still
# memory-bound at 16×16); wider rows keep to the low-rank basis, since a W×W GEMM at W = 32 costs more than the
# passes it saves.
DENSE_ROW = 16


def _block_rows(x: Tensor) -> int:
    """How many rows of an NCHW-contiguous x one GEMM row takes: the most that divide H and fit in DENSE_ROW."""
    height, width = x.shape[-2:]
    if _channels_last(x) or width >= DENSE_ROW:
        return 1
    return max(b for b in range(1, height + 1) if height % b == 0 and b * width <= DENSE_ROW)


def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _project(x: Tensor, consts: _Constants, out: Tensor | None = None) -> Tensor:
    """`basis @ rows.T` as an R×C×S tensor, per channel C: one GEMM over x's own layout, written into the memory
    of `out` (a tensor of x's shape and layout) when given."""
    n, c, h, w = x.shape
    k = consts.basis.shape[0]
    if _channels_last(x):
        shape: tuple[int, ...] = (n, h, k, c)
        rows = x.permute(0, 2, 3, 1)
        memory = None if out is None else out.permute(0, 2, 3, 1).view(-1)[: math.prod(shape)].view(shape)
        return torch.matmul(consts.basis, rows, out=memory).view(-1, c, 1)
    shape = (k, x.numel() // (consts.block * w))
    memory = None if out is None else out.view(-1)[: math.prod(shape)].view(shape)
    return torch.mm(consts.basis, x.view(-1, consts.block * w).T, out=memory).view(k * n, c, -1)


def _add_projection_(out: Tensor, coef: Tensor, consts: _Constants) -> None:
    """`out += coef.T @ basis` over the rows of out (coef laid out as `_project` returns it), in place."""
    n, c, h, w = out.shape
    k = consts.basis.shape[0]
    if _channels_last(out):
        rows = out.permute(0, 2, 3, 1).view(n * h, w, c)
        rows.baddbmm_(consts.basis.T.expand(n * h, w, k), coef.view(n * h, k, c))
    else:
        out.view(-1, consts.block * w).addmm_(coef.view(k, -1).T, consts.basis)


def _channel_sum(z: Tensor) -> Tensor:
    """Σ over dims 0 and 2 of an R×C×S tensor from `_project`."""
    # Two steps: one reduction over both dims, with a short contiguous inner dim, is several times slower.
    return z.sum(0).sum(-1)


def _batch_sum_of_row0(x: Tensor) -> Tensor:
    """Σ_n x[n, :, 0, :] as C×W."""
    if _channels_last(x):
        return x.permute(0, 2, 3, 1)[:, 0].sum(0).T
    return x[:, :, 0, :].sum(0)


def _row0_map(x: Tensor, row: Tensor) -> Tensor:
    """A C×H×W map in x's own layout that is `row` (C×W) on row 0 and zero elsewhere."""
    c, h, w = x.shape[1:]
    # In x's layout, so that an elementwise op with x walks both in the same order.
    out = x.new_zeros(h, w, c).permute(2, 0, 1) if _channels_last(x) else x.new_zeros(c, h, w)
    out[:, 0, :] = row
    return out


def _channel_sum_of_squares(x: Tensor) -> Tensor:
    # A reduction over a contiguous inner dimension vectorizes; one over dims (0, 2, 3) does not, in either
    # layout. Channels last, BN's own statistics kernel is the one-pass reduction: Σx² = M·(var + mean²).
    n, c = x.shape[:2]
    if _channels_last(x):
        mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        return (var + mean.square()) * (x.numel() // c)
    return torch.linalg.vector_norm(x.view(n, c, -1), dim=-1).square().sum(0)


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a·b per channel, for a and b of the same layout."""
    # BN's backward reduction Σ grad·(x - mean)·invstd at mean 0, invstd 1: one vectorized pass in either layout
    # without a temporary, where a batched dot per (n, c) plane pays a GEMV call per plane.
    c = a.shape[1]
    _, dot, _ = torch.ops.aten.native_batch_norm_backward(
        a, b, None, None, None, a.new_zeros(c), a.new_ones(c), True, 0.0, [False, True, False]
    )
    return dot


class _ClosedForm(torch.autograd.Function):
    """SBN in the spatial domain with a hand-written backward.

    Forward inputs: x (N×C×H×W, float32/64, NCHW- or channels-last-contiguous), weight and bias (C or None),
    mean (C×2 [Re, Im]) and var (C) of the running statistics, or None for batch statistics, and the terms.
    Outputs: y, and the batch mean (C×2) and biased variance (C) that the running statistics are updated with.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor | None,
        var: Tensor | None,
        eps: float,
        consts: _Constants,
        terms: Terms,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, w = x.shape[0], x.shape[-1]
        y = torch.empty_like(x)
        batch_stats = mean is None or var is None
        if batch_stats:
            # The projection lives in y's memory until y overwrites it: no activation-sized temporary (whose
            # fresh pages can cost more than the GEMM), and none kept for backward, which recomputes what it needs.
            row_sums = _channel_sum(_project(x, consts, out=y).square_())
            mean = _batch_sum_of_row0(x) @ consts.mean_weights.T / n
            second_moment = torch.add(row_sums, _channel_sum_of_squares(x), alpha=w).mul_(consts.energy / n)
            # E|X|² - |mu|² may round below zero when |mu|² dominates; the true value never is.
            var = second_moment.sub_(mean.square().sum(1)).clamp_min_(0)
        inv_std = (var + eps).rsqrt()
        gain = inv_std if terms.divide else torch.ones_like(inv_std)
        scale = gain if weight is None else weight * gain
        x_scale = scale if terms.rescale else torch.ones_like(scale)
        # The spike of c = beta - s·mu: -s·(mu @ spike) + beta ⊗ spike[0].
        row0 = (mean @ consts.spike).mul_(-scale[:, None]) if terms.center else x.new_zeros(len(scale), w)
        if bias is not None:
            row0.addr_(bias, consts.spike[0])
        torch.addcmul(_row0_map(x, row0), x, x_scale[:, None, None], out=y)
        ctx.save_for_backward(x, mean, gain, scale, x_scale)
        ctx.consts = consts  # type: ignore[attr-defined]
        ctx.terms = terms  # type: ignore[attr-defined]
        ctx.batch_stats = batch_stats  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(mean, var)
        # The statistics are never differentiated: no zero gradients need to be made for them.
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor | None, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if grad_y is None:
            return (None,) * 8
        x, mean, gain, scale, x_scale = ctx.saved_tensors
        consts: _Constants = ctx.consts
        terms: Terms = ctx.terms
        batch_stats: bool = ctx.batch_stats
        n, w = x.shape[0], x.shape[-1]
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        memory_format = torch.channels_last if _channels_last(x) else torch.contiguous_format
        grad_y = grad_y.contiguous(memory_format=memory_format)

        # dL/dc for c = [Re, Im] of beta - s·mu: the spike only touches row 0.
        grad_shift = _batch_sum_of_row0(grad_y) @ consts.spike.T
        grad_x = grad_weight = grad_bias = None
        if need_bias:
            grad_bias = grad_shift[:, 0]
        if need_weight or (need_x and batch_stats and terms.divide):
            # dL/ds, through a·x and through c's -s·mu, where the terms have them.
            grad_scale = _channel_dot(grad_y, x) if terms.rescale else torch.zeros_like(scale)
            if terms.center:
                grad_scale -= (grad_shift * mean).sum(1)
            if need_weight:
                grad_weight = grad_scale * gain
        if need_x and not batch_stats:
            grad_x = grad_y * x_scale[:, None, None]
        elif need_x:
            # dL/dx = a·dL/dy + (dL/dmu / N)·mean_weights on row 0 + coef·(W·x + Σ_k projection_k·basis_k), the
            # last the derivative of E|X|² with coef = 2·energy/N · dL/dvar. With g = dL/ds·inv_std²,
            # dL/dvar = -s·g/2 and dL/dmu = s·(g·mu - dL/dc): the variance's part only where s divides by it,
            # the additive map's only where c holds -s·mu.
            if terms.divide:
                g = grad_scale * gain.square()
                grad_mean = mean * g[:, None]
                coef = g.mul_(scale).mul_(-consts.energy / n)
            else:
                grad_mean = torch.zeros_like(mean)
            if terms.center:
                grad_mean -= grad_shift
            row0 = _row0_map(x, (grad_mean @ consts.mean_weights).mul_((scale / n)[:, None]))
            if terms.divide and not _channels_last(x) and consts.gram.shape[0] <= DENSE_ROW:
                # Short rows: W·x + Σ_k projection_k·basis_k is x·gram, one GEMM straight into grad_x, which
                # saves two passes and the projection temporary for the price of a denser GEMM.
                grad_x = torch.mm(x.view(-1, consts.gram.shape[0]), consts.gram).view_as(x)
                torch.addcmul(row0, grad_x, coef[:, None, None], out=grad_x)
                grad_x.addcmul_(grad_y, x_scale[:, None, None])
            else:
                grad_x = torch.addcmul(row0, grad_y, x_scale[:, None, None], out=torch.empty_like(x))
                if terms.divide:
                    grad_x.addcmul_(x, (w * coef)[:, None, None])
                    _add_projection_(grad_x, _project(x, consts).mul_(coef[:, None]), consts)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _fft_form(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor | None,
    var: Tensor | None,
    eps: float,
    fft_norm: str,
    terms: Terms,
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 1 literally, differentiated by autograd; same contract as `_ClosedForm`."""
    spectrum = torch.fft.rfft2(x, norm=fft_norm)
    if mean is None or var is None:
        center = spectrum.mean(dim=(0, 2, 3))
        deviation = spectrum - center[:, None, None]
        var = (deviation.real.square() + deviation.imag.square()).mean(dim=(0, 2, 3))
        mean = torch.view_as_real(center)
    else:
        center = torch.view_as_complex(mean.contiguous())
        deviation = spectrum - center[:, None, None]
    scale = (var + eps).rsqrt() if terms.divide else torch.ones_like(var)
    if weight is not None:
        scale = weight * scale
    if terms.rescale:
        normalized = (deviation if terms.center else spectrum) * scale[:, None, None]
    else:
        normalized = spectrum - (center * scale)[:, None, None] if terms.center else spectrum
    if bias is not None:
        normalized = normalized + bias[:, None, None]
    y = torch.fft.irfft2(normalized, s=x.shape[-2:], norm=fft_norm)
    return y, mean.detach(), var.detach()


class SpectralBatchNorm2d(nn.Module):
    """Spectral Batch Normalization over a 4-D input (N, C, H, W), with BatchNorm2d's interface.

    Args:
        num_features: C.
        eps: added to the spectral variance.
        momentum: of the running statistics, `running = (1 - momentum)·running + momentum·batch`;
            None gives the cumulative moving average, as in `nn.BatchNorm2d`.
        affine: learn a real per-channel gain (init 1) and bias (init 0) applied in the spectrum.
        track_running_stats: keep running statistics and use them in eval mode; without them the batch
            statistics are used in both modes.
        fft_norm: the `norm` of `torch.fft.rfft2` / `irfft2`: "backward" (PyTorch's default, which the paper
            implies), "ortho" or "forward".
        impl: "auto", the exact FFT-free closed form, or "fft", the literal FFT form (the reference).

    Buffers: `running_mean_real`, `running_mean_imag` (the complex running mean, init 0), `running_var`
    (init 1, unbiased with M/(M-1), M = N·H·(W//2+1) pooled bins) and `num_batches_tracked`.

    A subclass that sets `terms` drops terms of the closed form; without `terms.shift` there is no bias.
    """

    terms: ClassVar[Terms] = Terms()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        fft_norm: FftNorm = "backward",
        impl: Impl = "auto",
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        if fft_norm not in FFT_NORMS:
            raise ValueError(f"fft_norm must be one of {', '.join(FFT_NORMS)}; got {fft_norm!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.fft_norm: FftNorm = fft_norm
        self.impl: Impl = impl
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
        if affine and self.terms.shift:
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("bias", None)
        self.running_mean_real: Tensor | None
        self.running_mean_imag: Tensor | None
        self.running_var: Tensor | None
        self.num_batches_tracked: Tensor | None
        if track_running_stats:
            self.register_buffer("running_mean_real", torch.zeros(num_features))
            self.register_buffer("running_mean_imag", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            for name in ("running_mean_real", "running_mean_imag", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            assert self.running_mean_real is not None and self.running_mean_imag is not None
            assert self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean_real.zero_()
            self.running_mean_imag.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, fft_norm={self.fft_norm}, impl={self.impl}"
        )

    @torch.no_grad()
    def effective_scale(self, input: Tensor) -> Tensor:
        """The per-channel factor a of y = a·x + (additive map) that this layer applies to `input` with batch
        statistics: what the feature statistics report as SBN's rescale (`sbn_study.trial.featstats`)."""
        x = input.detach().double()
        gamma = torch.ones(self.num_features, dtype=x.dtype, device=x.device)
        if self.weight is not None:
            gamma = self.weight.detach().to(x.dtype)
        if not self.terms.rescale:
            return torch.ones_like(gamma)
        if not self.terms.divide:
            return gamma
        spectrum = torch.fft.rfft2(x, norm=self.fft_norm)
        centered = spectrum - spectrum.mean(dim=(0, 2, 3), keepdim=True)
        var = centered.abs().square().mean(dim=(0, 2, 3))
        return gamma / torch.sqrt(var + self.eps)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(
                f"SpectralBatchNorm2d expects a 4-D input (N, C, H, W), got {input.dim()}-D input"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SpectralBatchNorm2d({self.num_features}) got an input with {input.shape[1]} channels"
            )
        if not input.is_floating_point():
            raise ValueError(f"SpectralBatchNorm2d expects a floating-point input, got {input.dtype}")
        if self.training and input.shape[0] < 2:
            raise ValueError(
                "Expected more than 1 value per channel when training (SpectralBatchNorm2d pools its "
                f"statistics over a batch of at least 2 samples), got input size {input.size()}"
            )
        n, _, h, w = input.shape
        batch_stats = self.training or not self.track_running_stats
        with torch.autocast(device_type=input.device.type, enabled=False):
            compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
            x = input.to(compute_dtype)
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous()
            weight = None if self.weight is None else self.weight.to(compute_dtype)
            bias = None if self.bias is None else self.bias.to(compute_dtype)
            mean = var = None
            if not batch_stats:
                assert self.running_mean_real is not None and self.running_mean_imag is not None
                assert self.running_var is not None
                mean = torch.stack([self.running_mean_real, self.running_mean_imag], dim=1).to(compute_dtype)
                var = self.running_var.to(compute_dtype)
            if self.impl == "fft":
                y, batch_mean, batch_var = _fft_form(
                    x, weight, bias, mean, var, self.eps, self.fft_norm, self.terms
                )
            else:
                consts = _constants(h, w, _block_rows(x), self.fft_norm, x.device, compute_dtype)
                y, batch_mean, batch_var = _ClosedForm.apply(
                    x, weight, bias, mean, var, self.eps, consts, self.terms
                )
            if self.training and self.track_running_stats:
                self._update_running_stats(batch_mean, batch_var, bins=n * h * (w // 2 + 1))
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, bins: int) -> None:
        assert self.running_mean_real is not None and self.running_mean_imag is not None
        assert self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        # A 0-dim tensor rather than float(...) so that torch.compile does not specialize on the step count.
        factor: Tensor | float = (
            self.num_batches_tracked.to(self.running_var.dtype).reciprocal()
            if self.momentum is None
            else self.momentum
        )
        for running, batch in (
            (self.running_mean_real, mean[:, 0]),
            (self.running_mean_imag, mean[:, 1]),
            (self.running_var, var * (bins / (bins - 1))),
        ):
            running.lerp_(batch.to(running.dtype), factor)
