"""Proxy Normalization (Labatie, Masters, Eaton-Rosen, Luschi, NeurIPS 2021): the activation step of a
batch-independent norm (LN or GN) normalized with a proxy distribution instead of the batch.

After LN/GN without affine gives x̂, the proxy-normalized activation step (PN-Act) of channel c is

    z = φ(γ_c x̂ + β_c),   ỹ = (z − E[φ(γ_c Y_c + β_c)]) / √(Var[φ(γ_c Y_c + β_c)] + ε),   Y_c ~ N(β̃_c, (1 + γ̃_c)²)

with the additional proxy parameters β̃, γ̃ starting at 0 (Y_c ~ N(0, 1): the distribution x̂ would have if the
network did not collapse towards channel-wise constants). φ is ReLU, the models' activation, and for ReLU the
proxy's moments have a closed form: with γY + β ~ N(m, s²), a = m/s, Φ and ϕ the standard normal CDF and PDF,

    E[ReLU] = m·Φ(a) + s·ϕ(a),   E[ReLU²] = (m² + s²)·Φ(a) + m·s·ϕ(a).

The authors' code, written for any φ, estimates the two moments on n Gaussian quantiles Φ⁻¹((i + ½)/n); the
closed form is the expectation the paper defines, which that estimate approaches (at n = 256 it is about 1 %
low in the variance; tests/test_proxynorm.py). The moments are per-channel scalars, computed in float64 (the
variance is a difference of two moments). Inference is the same computation: nothing depends on the batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sbn_study.trial.norm_state import add_affine


def relu_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and variance of ReLU(Z) for Z ~ N(mean, std²), elementwise."""
    # A proxy of zero width (γ = 0) is a point mass at mean: the limit of the formulas as std → 0.
    std = std.clamp_min(1e-12)
    a = mean / std
    cdf = torch.special.ndtr(a)
    pdf = torch.exp(-0.5 * a.square()) / math.sqrt(2 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean.square() + std.square()) * cdf + mean * std * pdf
    return first, (second - first.square()).clamp_min(0.0)


class ProxyNormAct2d(nn.Module):
    """PN-Act: the affine transform, ReLU and Proxy Normalization of channel-wise normalized inputs."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        add_affine(self, num_features, affine)
        self.proxy_bias = nn.Parameter(torch.zeros(num_features))
        self.proxy_weight = nn.Parameter(torch.zeros(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(self.proxy_bias)
        gamma = ones if self.weight is None else self.weight
        beta = ones - 1 if self.bias is None else self.bias
        proxy_mean = (gamma * self.proxy_bias + beta).double()
        proxy_std = (gamma * (1 + self.proxy_weight)).abs().double()
        mean, var = relu_moments(proxy_mean, proxy_std)
        scale = torch.rsqrt(var + self.eps).float()[:, None, None]
        activated = torch.relu(x.float() * gamma[:, None, None] + beta[:, None, None])
        return ((activated - mean.float()[:, None, None]) * scale).to(x.dtype)
