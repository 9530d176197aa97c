"""Memorized Batch Normalization (Guo, Wu, Deng, Chen, Tan, AAAI 2018), with its Double-Forward scheme.

MBN normalizes with statistics memorized over the last k batches, in training and in inference alike (no
running averages, so the two rules agree). With μ_i and s²_i the mean and the unbiased variance of batch i,
and uniform weights over the n = min(k, batches seen) batches of the memory,

    E = 1/n Σ_i μ_i,   Var = 1/n Σ_i s²_i,   y = γ·(x − E)/√(Var + ε) + β

as BN's inference rule (E[x] = E_B[μ_B], Var[x] = m/(m−1)·E_B[σ²_B]) reads, over the recent batches. In
training the current batch is one of the k, with its gradient; the memorized ones are constants. In eval mode
the memory holds the last k batches (a model that never trained normalizes with 0 and 1, as BN's initial
running statistics would).

Double-Forward: the weights change at every step, so a batch's statistics measured before the update are stale
after it. With `double_forward`, each training batch goes through the model a second time after the optimizer's
update, without gradients, and its entry in every memory is replaced by the statistics under the new weights.
`install_double_forward` does this with a forward pre-hook on the model: the extra forward of step t runs when
the model is next called (step t + 1's forward, or the evaluation after the last step), in training mode, with
every buffer but the memories and the random state restored afterwards. The paper leaves its weights α_i of the
batches open as "normalized weights": they are uniform here.

Compute, for compute-matched comparisons (benchmarks): with `double_forward`, every training step costs one
more forward pass of the whole model, without backward — about a third of a step more (a backward costs about
two forwards), so an MBN run of E epochs matches a BN run of about 4E/3 epochs. The extra forward of step t runs
inside step t + 1 and is counted in `epoch_time_s` and `images_per_s`, except the last step's, which runs
inside the validation pass.
"""

from __future__ import annotations

import torch
from torch import nn

from sbn_study.trial.norm_state import add_affine


class MemorizedBatchNorm2d(nn.Module):
    """MBN with a memory of `window` batches; `refreshing` is set by the Double-Forward's extra forward."""

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        eps: float = 1e-5,
        affine: bool = True,
        double_forward: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.window = window
        self.eps = eps
        self.double_forward = double_forward
        self.refreshing = False
        add_affine(self, num_features, affine)
        self.memory_mean: torch.Tensor
        self.memory_var: torch.Tensor
        self.memorized: torch.Tensor
        self.register_buffer("memory_mean", torch.zeros(window, num_features))
        self.register_buffer("memory_var", torch.ones(window, num_features))
        self.register_buffer("memorized", torch.tensor(0, dtype=torch.long))  # batches written so far

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.window}, eps={self.eps}, affine={self.weight is not None}, "
            f"double_forward={self.double_forward}"
        )

    def _ages(self) -> torch.Tensor:
        """How many batches ago each slot was written (0 = the newest); on the device, so that no step waits
        on it."""
        slots = torch.arange(self.window, device=self.memorized.device)
        return (self.memorized - 1 - slots).remainder(self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.float()
        ages = self._ages()
        if self.training:
            mean, var = values.mean((0, 2, 3)), values.var((0, 2, 3))
            # The newest entry is this very batch when refreshing: it is replaced, not pooled with itself.
            skip = int(self.refreshing)
            pooled = (ages >= skip) & (ages < self.memorized.clamp(max=self.window - 1 + skip))
            count = 1 + pooled.sum()
            weights = pooled.float()[:, None]
            mean_used = (mean + (self.memory_mean * weights).sum(0)) / count
            var_used = (var + (self.memory_var * weights).sum(0)) / count
            with torch.no_grad():
                slot = (self.memorized - skip).remainder(self.window)
                self.memory_mean[slot] = mean
                self.memory_var[slot] = var
                self.memorized.add_(1 - skip)
        else:
            filled = (ages < self.memorized).float()[:, None]
            count = filled.sum()
            mean_used = torch.where(count > 0, (self.memory_mean * filled).sum(0) / count.clamp(min=1), 0.0)
            var_used = torch.where(count > 0, (self.memory_var * filled).sum(0) / count.clamp(min=1), 1.0)
        scale = torch.rsqrt(var_used + self.eps)
        shift = -mean_used * scale
        if self.weight is not None and self.bias is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return (values * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


class _DoubleForward:
    """The forward pre-hook that runs the extra forward of the last training batch before the model's next
    forward, once the optimizer has updated the weights."""

    def __init__(self, layers: list[MemorizedBatchNorm2d]) -> None:
        self.layers = layers
        self.pending: tuple[torch.Tensor, ...] | None = None
        self.running = False

    def __call__(self, model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.running:
            return
        if self.pending is not None:
            batch, self.pending = self.pending, None
            self._refresh(model, batch)
        if model.training and torch.is_grad_enabled():
            self.pending = args

    def _refresh(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> None:
        modes = [(module, module.training) for module in model.modules()]
        # The memories change; every other buffer (plain BNs' running statistics) stays as the step left it.
        saved = [
            (buffer, buffer.clone())
            for module in model.modules()
            if not isinstance(module, MemorizedBatchNorm2d)
            for buffer in module.buffers(recurse=False)
        ]
        devices = [batch[0].device] if batch[0].is_cuda else []
        self.running = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices):
                model.train()
                for layer in self.layers:
                    layer.refreshing = True
                model(*batch)
        finally:
            self.running = False
            for layer in self.layers:
                layer.refreshing = False
            for module, training in modes:
                module.training = training
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)


def install_double_forward(model: nn.Module) -> None:
    """Makes `model` run the Double-Forward scheme for its MBN layers that ask for it (none: nothing to do)."""
    layers = [m for m in model.modules() if isinstance(m, MemorizedBatchNorm2d) and m.double_forward]
    if layers:
        model.register_forward_pre_hook(_DoubleForward(layers))
