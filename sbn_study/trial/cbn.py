"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang, Lin, CVPR 2021).

BN whose statistics pool the current batch with those of the last k − 1 iterations. An old batch's statistics
were measured under old weights, so each is carried to the current weights θ_t by the first-order Taylor term
in the weights of the conv that feeds the layer (the paper truncates the gradient there: the terms of earlier
layers are small):

    μ_{t−τ}(θ_t) ≈ μ_{t−τ}(θ_{t−τ}) + ∂μ_{t−τ}/∂θ_{t−τ} · (θ_t − θ_{t−τ})        (ν = E[x²] likewise)
    μ̄ = 1/k Σ_τ μ_{t−τ}(θ_t),   ν̄ = 1/k Σ_τ max(ν_{t−τ}(θ_t), μ_{t−τ}(θ_t)²),   σ̄² = ν̄ − μ̄²
    y = γ·(x − μ̄)/√(σ̄² + ε) + β,                                               τ = 0 … k − 1

For the first `burnin` training iterations it is plain BN (the window starts empty after them and fills), and
in eval mode BN with running statistics, which follow the current batch's statistics with BN's momentum.

What the paper leaves open follows the authors' code (github.com/Howal/Cross-iterationBatchNorm): gradients
flow through the current batch's statistics only (the old ones and θ_t in the Taylor term are constants);
∂μ/∂θ and ∂ν/∂θ of a batch are the autograd gradients of Σ_c μ_c and Σ_c ν_c w.r.t. the conv weight (μ_c
depends on the weights of output channel c only, so that is the per-channel Jacobian the paper computes in
closed form); nothing is recorded during burn-in. Where the code differs from the paper, the paper wins: ν
is clipped by max(ν, μ²) (the code drops such entries), ε sits inside the square root and σ̄² is the biased
estimate (the code adds ε to σ̄ and normalizes with the unbiased variance while the window is empty).

Each entry is stored as a + ⟨g, θ_t⟩, with g = ∂μ/∂θ and a = μ − ⟨g, θ_{t−τ}⟩ taken when it was recorded: the
same Taylor term without keeping a copy of every old weight. The window (g, a for μ and ν, flattened per output
channel) and the step counts are buffers, so a checkpoint carries them and a resumed trial continues its
window. Cost: two weight-gradient passes of the conv per training step, and 2(k − 1) copies of its weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbn_study.trial.norm_state import add_affine, add_running_statistics


class CrossIterationBatchNorm2d(nn.Module):
    """CBN over a window of `window` iterations; `follow(conv)` names the conv whose output it normalizes
    (`link_preceding_convs` does it for a built model)."""

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        burnin: int = 0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.window = window
        self.burnin = burnin
        self.eps = eps
        self.momentum = momentum
        add_affine(self, num_features, affine)
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.num_batches_tracked: torch.Tensor
        add_running_statistics(self, num_features)
        self.register_buffer("recorded", torch.tensor(0, dtype=torch.long))
        self._allocate(0)
        # Mirrors of the two counts: reading the buffers would wait on the device at every step.
        self._steps = 0
        self._recorded = 0
        self._conv: nn.Conv2d | None
        self._set_conv(None)

    def _allocate(self, weight_size: int) -> None:
        slots = (self.window - 1, self.num_features)
        for name in ("mean_grads", "square_grads"):
            self.register_buffer(name, torch.zeros(*slots, weight_size))
        for name in ("mean_offsets", "square_offsets"):
            self.register_buffer(name, torch.zeros(*slots))

    def follow(self, conv: nn.Conv2d) -> None:
        """Compensates with the weights of `conv`, whose output this layer normalizes."""
        if conv.out_channels != self.num_features:
            raise ValueError(
                f"a conv with {conv.out_channels} outputs cannot feed CBN of {self.num_features}"
            )
        self._set_conv(conv)
        self._allocate(conv.weight[0].numel())

    def _set_conv(self, conv: nn.Conv2d | None) -> None:
        # Not a submodule: the conv is the model's, and registering it here too would copy its weight into
        # this layer's state dict.
        object.__setattr__(self, "_conv", conv)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps = int(self.num_batches_tracked)
        self._recorded = int(self.recorded)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.window}, burnin={self.burnin}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.weight is not None}"
        )

    def _factor(self) -> float:
        # momentum=None means a cumulative average, exactly as nn.BatchNorm2d treats it.
        return 1.0 / self._steps if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        # A training-mode forward without autograd (a measurement of the network) changes no state.
        learning = torch.is_grad_enabled()
        if learning:
            self._steps += 1
            self.num_batches_tracked.add_(1)
        if self.window == 1 or self._steps <= self.burnin:
            if not learning:
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            stats = (self.running_mean, self.running_var)
            return F.batch_norm(x, *stats, self.weight, self.bias, True, self._factor(), self.eps)
        if self._conv is None:
            raise RuntimeError("CrossIterationBatchNorm2d needs the conv that feeds it: call follow(conv)")
        values = x.float()
        mean = values.mean((0, 2, 3))
        square = values.square().mean((0, 2, 3))
        weight = self._conv.weight.detach().reshape(self.num_features, -1).float()
        filled = min(self._recorded, self.window - 1)
        means = torch.cat(
            [mean[None], self.mean_offsets[:filled] + (self.mean_grads[:filled] * weight).sum(-1)]
        )
        squares = torch.cat(
            [square[None], self.square_offsets[:filled] + (self.square_grads[:filled] * weight).sum(-1)]
        )
        pooled_mean = means.mean(0)
        pooled_var = torch.maximum(squares, means.square()).mean(0) - pooled_mean.square()
        if learning:
            self._remember(x, mean, square, weight)
        scale = torch.rsqrt(pooled_var + self.eps)
        shift = -pooled_mean * scale
        if self.weight is not None and self.bias is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (values * scale[:, None, None] + shift[:, None, None]).to(x.dtype)

    def _remember(
        self, x: torch.Tensor, mean: torch.Tensor, square: torch.Tensor, weight: torch.Tensor
    ) -> None:
        """Records the batch's statistics and their gradients w.r.t. the conv weight; updates the running
        statistics with the batch's own, as BN does."""
        assert self._conv is not None
        with torch.no_grad():
            variance = x.detach().float().var((0, 2, 3))
            self.running_mean.lerp_(mean, self._factor())
            self.running_var.lerp_(variance, self._factor())
        if not (x.requires_grad and self._conv.weight.requires_grad):
            return  # a frozen conv: its weights cannot move, there is nothing to compensate
        ones = torch.ones_like(mean)
        grads = [
            torch.autograd.grad(statistic, self._conv.weight, ones, retain_graph=True)[0]
            for statistic in (mean, square)
        ]
        slot = self._recorded % (self.window - 1)
        with torch.no_grad():
            for statistic, grad, grads_name, offsets_name in zip(
                (mean, square),
                grads,
                ("mean_grads", "square_grads"),
                ("mean_offsets", "square_offsets"),
                strict=True,
            ):
                flat = grad.reshape(self.num_features, -1).float()
                self.get_buffer(grads_name)[slot] = flat
                self.get_buffer(offsets_name)[slot] = statistic - (flat * weight).sum(-1)
        self._recorded += 1
        self.recorded.add_(1)


def link_preceding_convs(model: nn.Module) -> None:
    """Gives every CBN of `model` the conv registered just before it: the models register each norm right
    after the conv that feeds it (`sbn_study.trial.models`), and tests check that it is that conv's output."""
    conv: nn.Conv2d | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, CrossIterationBatchNorm2d):
            if conv is None:
                raise ValueError(f"CBN at {name} has no conv registered before it")
            module.follow(conv)
