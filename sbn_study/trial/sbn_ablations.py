"""The arms that separate SBN's mechanism: norm kinds for exactly the sites SBN takes.

After a BN, SBN is exactly y = s·x + Re(c)·P_re + Im(c)·P_im (`sbn_study.trial.sbn`): a per-channel rescale
s = γ/√(σ² + ε) and an additive map of fixed shape (zero outside row 0, "the spike") with c = β − s·μ, where μ
and σ² are the complex mean and the variance of the rfft2 spectrum X of x. On a map of variance v, σ² is about
H·W·v under the default `backward` FFT norm, so after BN s is about 1/√(H·W). The arms take it apart:

- `scale` (`FixedScaleBatchNorm2d`): y = g·BN(x), with the fixed gain g that `fft_norm` implies at the site,
  1/√(H·W) for `backward`, 1 for `ortho`, √(H·W) for `forward` (`fft_norm_gain`), H×W taken from the input.
- `bnscale` (`LearnedScaleBatchNorm2d`): one BN whose γ starts at the same g: the downscale, learned.
- `sbn_nospike` (`SpectralNoSpike2d`): y = s·x. There is no β: it would only enter the additive map.
- `spike` (`SpectralSpikeOnly2d`): y = x + Re(c)·P_re + Im(c)·P_im with SBN's c = β − s·μ from SBN's own
  statistics of x: the additive term SBN would add to this input, without SBN's rescale. γ remains, as a
  factor of the spike's −s·μ part.
- `sbn_center` (`SpectralCenterOnly2d`), the paper's "mean subtraction only": Y = γ·(X − μ) + β.
- `sbn_var` (`SpectralDivideOnly2d`), the paper's "division by σ only": Y = γ·X/√(σ² + ε) + β. σ² stays SBN's
  variance about the mean: only the subtraction of μ goes; a variance about zero would swap the statistic too.
- `sbn_noaffine` has no class here: it is SBN with `affine=False`.

The spectral arms sit after a plain BN, under the name `sbn` as SBN does (`nn.Sequential(bn=..., sbn=...)`,
so that feature statistics and the analysis treat their sites as SBN's). They are SpectralBatchNorm2d
subclasses that drop terms of its closed form (`sbn_study.trial.sbn.Terms`), so `impl` ("auto" or "fft"),
`fft_norm`, `eps`, `momentum` and `affine` work as for SBN, and every arm keeps SBN's statistics: batch
statistics in training, running averages (all of SBN's buffers, updated as SBN updates them) in eval mode,
where the arm uses them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sbn_study.trial.sbn import FFT_NORMS, FftNorm, SpectralBatchNorm2d, Terms


def fft_norm_gain(height: int, width: int, fft_norm: str) -> float:
    """About the rescale 1/σ of SBN without affine on an H×W map of zero mean and unit mean square: by Parseval,
    the mean |X|² over the spectrum is H·W times the mean square under "backward", equal to it under "ortho" and
    1/(H·W) times it under "forward"."""
    exponent = {"backward": -0.5, "ortho": 0.0, "forward": 0.5}[fft_norm]
    return float(height * width) ** exponent


class _GainBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that knows the gain `fft_norm` implies at its site."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        fft_norm: FftNorm = "backward",
    ) -> None:
        if fft_norm not in FFT_NORMS:
            raise ValueError(f"fft_norm must be one of {', '.join(FFT_NORMS)}; got {fft_norm!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.fft_norm: FftNorm = fft_norm

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fft_norm={self.fft_norm}"

    def gain(self, input: Tensor) -> float:
        return fft_norm_gain(input.shape[-2], input.shape[-1], self.fft_norm)


class FixedScaleBatchNorm2d(_GainBatchNorm2d):
    """`scale`: y = g·BN(x), g = `fft_norm_gain` of the input's H×W, fixed (not learned)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input) * self.gain(input)


class LearnedScaleBatchNorm2d(_GainBatchNorm2d):
    """`bnscale`: a BN whose γ starts at g = `fft_norm_gain` of the site's H×W instead of at 1.

    H×W is known only when the first input arrives, and the optimizer is built from the parameters before that:
    γ is an ordinary parameter from construction on, and the first forward in any mode (the feature-statistics
    probe at initialization, when it runs first) sets its value once, in place, outside autograd. Whether that
    happened goes into the state dict as extra state, so that a restored checkpoint keeps its trained γ. Extra
    state rather than a buffer: the check runs on every forward and a Python flag costs nothing there, where a
    device buffer would cost a host-device synchronization.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        fft_norm: FftNorm = "backward",
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, fft_norm=fft_norm)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # γ is back at BN's 1: the next forward sets it to the gain again.
        self.gain_initialized = False

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.gain_initialized)

    def set_extra_state(self, state: Tensor) -> None:
        self.gain_initialized = bool(state)

    def forward(self, input: Tensor) -> Tensor:
        if not self.gain_initialized:
            with torch.no_grad():
                self.weight.fill_(self.gain(input))
            self.gain_initialized = True
        return super().forward(input)


class SpectralNoSpike2d(SpectralBatchNorm2d):
    """`sbn_nospike`: y = s·x, s = γ/√(σ² + ε) with SBN's spectral variance; no additive map, no β."""

    terms = Terms(center=False, shift=False)


class SpectralSpikeOnly2d(SpectralBatchNorm2d):
    """`spike`: y = x + Re(c)·P_re + Im(c)·P_im, c = β − s·μ, s = γ/√(σ² + ε): SBN's additive map alone."""

    terms = Terms(rescale=False)


class SpectralCenterOnly2d(SpectralBatchNorm2d):
    """`sbn_center`: Y = γ·(X − μ) + β, i.e. y = γ·x + the additive map of c = β − γ·μ."""

    terms = Terms(divide=False)


class SpectralDivideOnly2d(SpectralBatchNorm2d):
    """`sbn_var`: Y = γ·X/√(σ² + ε) + β with σ² about the mean, i.e. y = s·x + the additive map of c = β."""

    terms = Terms(center=False)
