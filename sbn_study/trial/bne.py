"""Batch Normalization Embeddings (Segu, Tonioni, Tombari, "Batch Normalization Embeddings for Deep Domain
Generalization", Pattern Recognition 2023, arXiv:2011.12672): domain-specific BN, domains embedded by their
BN statistics, and the distance-weighted ensemble that predicts on an unseen domain.

- `DomainBatchNorm2d` keeps one BN (running statistics; affine parameters shared or per domain) per source
  domain and normalizes with the one `set_domain` selected: the models call `norm(x)` unchanged, and
  `to_domain_specific` swaps it in for every plain `BatchNorm2d` of a built model.
- A domain's embedding at a layer is that domain's population statistics there (per-channel running mean
  and variance); an input's is its own statistics at the same layer (per instance, or over its batch).
- `wasserstein2`: the squared 2-Wasserstein distance between the diagonal Gaussians N(μ₁, σ₁²), N(μ₂, σ₂²),
  Σ_c (μ₁−μ₂)² + (σ₁−σ₂)², summed over channels as the multivariate formula does; a model's distance is
  the mean of its layers' distances, so that it does not grow with depth.
- `bne_predict` runs the network once per source domain, measures at every layer the distance between the
  input's statistics (as they arrive on that domain's path) and that domain's, and mixes the domains'
  softmax outputs with weights proportional to the inverse distance (normalized to sum to 1), the paper's
  "similarity as the inverse of the distance in the latent space".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Affine = Literal["shared", "domain", "none"]
DomainIndex = int | torch.Tensor | None


class DomainBatchNorm2d(nn.Module):
    """`num_domains` BatchNorm2d layers behind one module; `domain` (an int, or an int64 tensor with one
    source per sample of a mixed batch) picks the one each sample is normalized by.

    `affine="shared"` (the default, as the paper's ensemble "shares all parameters except the normalization
    statistics") gives every domain the same weight and bias; `"domain"` gives each its own (domain-specific
    BN as in Chang et al., CVPR 2019); `"none"` has no affine parameters.
    """

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: Affine = "shared",
    ) -> None:
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"num_domains must be positive, got {num_domains}")
        if affine not in ("shared", "domain", "none"):
            raise ValueError(f"affine must be 'shared', 'domain' or 'none', got {affine!r}")
        self.num_features = num_features
        self.affine = affine
        self.bns = nn.ModuleList(
            nn.BatchNorm2d(num_features, eps, momentum, affine=affine == "domain") for _ in range(num_domains)
        )
        if affine == "shared":
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.domain: DomainIndex = None

    @classmethod
    def from_batchnorm(
        cls, bn: nn.BatchNorm2d, num_domains: int, affine: Affine = "shared"
    ) -> DomainBatchNorm2d:
        """Every domain starts as `bn` (its statistics, mode and affine parameters unless `affine` is "none")."""
        if not bn.track_running_stats:
            raise ValueError(
                "domain-specific BN needs running statistics: the BatchNorm2d does not track them"
            )
        layer = cls(bn.num_features, num_domains, bn.eps, bn.momentum, affine if bn.affine else "none")
        layer.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype).train(bn.training)
        with torch.no_grad():
            for domain_bn in layer.bns:
                domain_bn.running_mean.copy_(bn.running_mean)
                domain_bn.running_var.copy_(bn.running_var)
                domain_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
                if layer.affine == "domain":
                    domain_bn.weight.copy_(bn.weight)
                    domain_bn.bias.copy_(bn.bias)
            if layer.affine == "shared":
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
        return layer

    @property
    def num_domains(self) -> int:
        return len(self.bns)

    def running_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, variances), each num_domains×C: the layer's embedding of every domain."""
        means = torch.stack([bn.running_mean for bn in self.bns])
        return means, torch.stack([bn.running_var for bn in self.bns])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        domain = self.domain
        if domain is None:
            raise RuntimeError("DomainBatchNorm2d has no domain: select one with set_domain(model, index)")
        if not isinstance(domain, torch.Tensor):
            out = self.bns[domain](x)
        else:
            if domain.shape != x.shape[:1]:
                raise ValueError(f"{len(x)} samples but domain indices of shape {tuple(domain.shape)}")
            out = torch.empty_like(x)
            # Each source's samples are normalized by (and, training, update) that source's statistics only.
            for index in domain.unique().tolist():
                keep = domain == index
                out[keep] = self.bns[index](x[keep])
        if self.affine == "shared":
            out = out * self.weight[:, None, None] + self.bias[:, None, None]
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}, affine={self.affine!r}"


def to_domain_specific(model: nn.Module, num_domains: int, affine: Affine = "shared") -> nn.Module:
    """`model` with every plain `nn.BatchNorm2d` (not its subclasses) replaced, in place, by a
    `DomainBatchNorm2d` initialized from it; returns `model`."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(model, name, DomainBatchNorm2d.from_batchnorm(child, num_domains, affine))
        else:
            to_domain_specific(child, num_domains, affine)
    return model


def domain_layers(model: nn.Module) -> list[DomainBatchNorm2d]:
    """The model's `DomainBatchNorm2d` layers in definition order; an error unless they share a domain count."""
    layers = [module for module in model.modules() if isinstance(module, DomainBatchNorm2d)]
    if not layers:
        raise ValueError("the model has no DomainBatchNorm2d layers (see to_domain_specific)")
    counts = {layer.num_domains for layer in layers}
    if len(counts) > 1:
        raise ValueError(f"the DomainBatchNorm2d layers disagree on the number of domains: {sorted(counts)}")
    return layers


def set_domain(model: nn.Module, domain: DomainIndex) -> None:
    """Select `domain` (an index, a per-sample int64 index tensor, or None) in every domain-specific BN."""
    for layer in domain_layers(model):
        layer.domain = domain


@contextmanager
def using_domain(model: nn.Module, domain: DomainIndex) -> Iterator[nn.Module]:
    """`set_domain` for the duration of a `with` block, restoring each layer's previous domain after it."""
    layers = domain_layers(model)
    previous = [layer.domain for layer in layers]
    for layer in layers:
        layer.domain = domain
    try:
        yield model
    finally:
        for layer, before in zip(layers, previous, strict=True):
            layer.domain = before


# ------------------------------------------------------------------------------------ embeddings, math


def wasserstein2(
    mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between N(mean_a, diag var_a) and N(mean_b, diag var_b), over the last
    dimension (channels), the others broadcast: Σ_c (μa−μb)² + (σa−σb)²."""
    return ((mean_a - mean_b) ** 2 + (var_a.sqrt() - var_b.sqrt()) ** 2).sum(dim=-1)


def inverse_distance_weights(distances: torch.Tensor) -> torch.Tensor:
    """Weights over the last dimension ∝ 1/distance, summing to 1: equal for equal distances, all the weight
    on the sources at distance 0 (shared equally) when there are any."""
    # softmax(−log d) is (1/d)/Σ(1/d) without overflow; the clamp turns a zero distance into a finite log.
    return torch.softmax(-distances.clamp_min(torch.finfo(distances.dtype).tiny).log(), dim=-1)


def domain_embeddings(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per domain-specific layer, (means, variances) of every source domain, each num_domains×C."""
    return [layer.running_stats() for layer in domain_layers(model)]


def source_distances(model: nn.Module) -> torch.Tensor:
    """num_domains×num_domains: the layer-averaged `wasserstein2` between every two source embeddings."""
    per_layer = [
        wasserstein2(means[:, None], variances[:, None], means[None], variances[None])
        for means, variances in domain_embeddings(model)
    ]
    return torch.stack(per_layer).mean(dim=0)


@dataclass(frozen=True)
class EnsembleOutput:
    probs: torch.Tensor  # N×K: Σ_d weights[:, d] · softmax(logits[d])
    weights: torch.Tensor  # N×D, rows sum to 1
    distances: torch.Tensor  # N×D, layer-averaged wasserstein2 between the input and each source
    logits: torch.Tensor  # D×N×K: the network's output with each source's BN


def bne_predict(model: nn.Module, x: torch.Tensor, per_instance: bool = True) -> EnsembleOutput:
    """The BNE prediction for a batch from an unseen domain: one forward per source domain, weighted by the
    inverse distance of `x`'s statistics to that domain's at every domain-specific layer.

    `per_instance`: each sample is placed by its own statistics (per channel over its H×W positions, as the
    paper projects test samples), else the whole batch by its pooled statistics (a batch of one domain).
    The model must be in eval mode: training-mode BN would normalize by, and update its running statistics
    with, the target batch. Gradients flow if enabled by the caller.
    """
    if model.training:
        raise RuntimeError("bne_predict needs model.eval(): training-mode BN would use the target batch")
    layers = domain_layers(model)
    outputs = [
        _domain_forward(model, layers, x, domain, per_instance) for domain in range(layers[0].num_domains)
    ]
    logits = torch.stack([logits for logits, _ in outputs])
    distances = torch.stack([distance.expand(len(x)) for _, distance in outputs], dim=1)
    weights = inverse_distance_weights(distances)
    probs = torch.einsum("nd,dnk->nk", weights, F.softmax(logits, dim=-1))
    return EnsembleOutput(probs=probs, weights=weights, distances=distances, logits=logits)


def _domain_forward(
    model: nn.Module, layers: list[DomainBatchNorm2d], x: torch.Tensor, domain: int, per_instance: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with `domain`'s BN, layer-averaged distance of `x` to `domain`: N values, or one per batch)."""
    per_layer: list[torch.Tensor] = []

    def measure(layer: DomainBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        means, variances = _input_stats(inputs[0], per_instance)
        bn = layer.bns[domain]
        per_layer.append(wasserstein2(means, variances, bn.running_mean, bn.running_var))

    hooks = [layer.register_forward_pre_hook(measure) for layer in layers]
    try:
        with using_domain(model, domain):
            logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, torch.stack(per_layer).mean(dim=0)


def _input_stats(x: torch.Tensor, per_instance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, variances) per channel: N×C per instance, else C over the batch. The variance is the
    unbiased one, as BN's running variance is."""
    # At least float32: under autocast the features are bf16, too coarse for a difference of variances.
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    dims = (2, 3) if per_instance else (0, 2, 3)
    count = x.shape[2] * x.shape[3] * (1 if per_instance else x.shape[0])
    if count < 2:
        raise ValueError(
            f"cannot estimate a variance from {count} value per channel (use per_instance=False)"
        )
    variances, means = torch.var_mean(x, dim=dims, correction=1)
    return means, variances
