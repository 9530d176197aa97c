"""Batch Normalization Embeddings: domain-specific BN against plain BatchNorm2d, the distance and the weights
against independent float64 references, and the ensemble against the per-domain forwards it combines."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from sbn_study.trial.bne import (
    DomainBatchNorm2d,
    bne_predict,
    domain_embeddings,
    inverse_distance_weights,
    set_domain,
    source_distances,
    to_domain_specific,
    using_domain,
    wasserstein2,
)
from sbn_study.trial.models import create_model


def _close(actual: torch.Tensor, expected: np.ndarray | torch.Tensor, rtol: float = 1e-12) -> None:
    np.testing.assert_allclose(
        np.asarray(actual.detach(), dtype=np.float64), expected, rtol=rtol, atol=1e-300
    )


# --------------------------------------------------------------------------------- distance, weights


def _gaussian_w2_squared(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """The general closed form ‖μa−μb‖² + tr(Σa + Σb − 2 (Σb^½ Σa Σb^½)^½), with matrix square roots."""
    root_b = scipy.linalg.sqrtm(cov_b).real
    cross = scipy.linalg.sqrtm(root_b @ cov_a @ root_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))


def test_wasserstein2_is_the_gaussian_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(size=(2, 5, 6))
    variances = rng.uniform(0.1, 3.0, size=(2, 5, 6))
    got = wasserstein2(*(torch.from_numpy(a) for a in (means[0], variances[0], means[1], variances[1])))
    expected = [
        _gaussian_w2_squared(means[0, i], np.diag(variances[0, i]), means[1, i], np.diag(variances[1, i]))
        for i in range(5)
    ]
    _close(got, np.array(expected), rtol=1e-9)  # sqrtm is an iterative float64 algorithm


def test_wasserstein2_by_hand() -> None:
    # means differ by (1, 2), standard deviations (1, 2) vs (2, 1): (1 + 4) + (1 + 1) = 7
    a = (torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64))
    b = (torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert wasserstein2(*a, *b).item() == 7.0
    assert wasserstein2(*a, *a).item() == 0.0
    # broadcasting: one input against three sources
    sources = (torch.stack([a[0], b[0], a[0]]), torch.stack([a[1], b[1], a[1]]))
    assert wasserstein2(a[0], a[1], *sources).tolist() == [0.0, 7.0, 0.0]


def test_inverse_distance_weights() -> None:
    distances = torch.tensor(
        [[1.0, 2.0, 4.0], [3.0, 3.0, 3.0], [0.0, 5.0, 1.0], [0.0, 0.0, 2.0]], dtype=torch.float64
    )
    weights = inverse_distance_weights(distances)
    _close(weights[0], np.array([1.0, 0.5, 0.25]) / 1.75)
    _close(weights[1], np.full(3, 1 / 3))
    _close(weights[2], np.array([1.0, 0.0, 0.0]))
    _close(weights[3], np.array([0.5, 0.5, 0.0]))
    rng = np.random.default_rng(1)
    random = rng.uniform(1e-3, 10.0, size=(20, 4))
    _close(
        inverse_distance_weights(torch.from_numpy(random)), (1 / random) / (1 / random).sum(1, keepdims=True)
    )
    # float32 with distances spanning 1e-30..1e30 stays finite
    extreme = inverse_distance_weights(torch.tensor([1e-30, 1.0, 1e30]))
    assert torch.isfinite(extreme).all() and extreme[0].item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------- domain-specific BN


def _randomized(layer: DomainBatchNorm2d, seed: int) -> DomainBatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*layer.parameters(), *(b for b in layer.buffers() if b.is_floating_point())]:
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    return layer


def _plain(layer: DomainBatchNorm2d, domain: int) -> nn.BatchNorm2d:
    """A BatchNorm2d holding `domain`'s statistics and the affine parameters that domain uses."""
    source = layer.bns[domain]
    bn = nn.BatchNorm2d(layer.num_features, source.eps, source.momentum, affine=layer.affine != "none")
    bn = bn.double()
    with torch.no_grad():
        bn.running_mean.copy_(source.running_mean)
        bn.running_var.copy_(source.running_var)
        if layer.affine != "none":
            owner = source if layer.affine == "domain" else layer
            bn.weight.copy_(owner.weight)
            bn.bias.copy_(owner.bias)
    return bn


@pytest.mark.parametrize("affine", ["shared", "domain", "none"])
@pytest.mark.parametrize("training", [True, False])
def test_domain_bn_is_plain_bn_of_the_selected_domain(affine: str, training: bool) -> None:
    layer = _randomized(DomainBatchNorm2d(5, 3, momentum=0.3, affine=affine).double(), seed=2)
    x = torch.randn(8, 5, 4, 3, dtype=torch.float64) * 3 + 1
    for domain in range(3):
        untouched = [
            (b.running_mean.clone(), b.running_var.clone()) for i, b in enumerate(layer.bns) if i != domain
        ]
        reference = _plain(layer, domain).train(training)
        layer.train(training)
        layer.domain = domain
        _close(layer(x), reference(x).detach().numpy())
        # training updated this domain's statistics exactly as BN does, and no other domain's
        _close(layer.bns[domain].running_mean, reference.running_mean.numpy())
        _close(layer.bns[domain].running_var, reference.running_var.numpy())
        after = [(b.running_mean, b.running_var) for i, b in enumerate(layer.bns) if i != domain]
        for (mean0, var0), (mean1, var1) in zip(untouched, after, strict=True):
            assert torch.equal(mean0, mean1) and torch.equal(var0, var1)


@pytest.mark.parametrize("training", [True, False])
def test_a_mixed_batch_is_normalized_per_source(training: bool) -> None:
    mixed = _randomized(DomainBatchNorm2d(4, 3, affine="domain").double(), seed=3).train(training)
    separate = _randomized(DomainBatchNorm2d(4, 3, affine="domain").double(), seed=3).train(training)
    x = torch.randn(12, 4, 3, 3, dtype=torch.float64)
    domains = torch.tensor([2, 0, 0, 2, 1, 0, 2, 2, 1, 0, 1, 2])
    mixed.domain = domains
    out = mixed(x)
    for index in range(3):
        separate.domain = index
        keep = domains == index
        _close(out[keep], separate(x[keep]).detach().numpy())
        _close(mixed.bns[index].running_var, separate.bns[index].running_var.numpy())


def test_domain_selection() -> None:
    layer = DomainBatchNorm2d(2, 2).eval()
    with pytest.raises(RuntimeError, match="set_domain"):
        layer(torch.randn(2, 2, 2, 2))
    model = nn.Sequential(nn.Conv2d(3, 2, 1), layer, nn.Sequential(DomainBatchNorm2d(2, 2)))
    set_domain(model, 1)
    assert [m.domain for m in model.modules() if isinstance(m, DomainBatchNorm2d)] == [1, 1]
    with using_domain(model, 0):
        assert layer.domain == 0
    assert layer.domain == 1
    with pytest.raises(ValueError, match="no DomainBatchNorm2d"):
        set_domain(nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match="disagree"):
        set_domain(nn.Sequential(DomainBatchNorm2d(2, 2), DomainBatchNorm2d(2, 3)), 0)


def _tiny(num_domains: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return to_domain_specific(create_model("tiny", 5, width=4), num_domains).double()


def test_to_domain_specific_replaces_every_plain_bn_and_keeps_the_function() -> None:
    torch.manual_seed(4)
    original = create_model("tiny", 5, width=4).double().eval()
    with torch.no_grad():  # statistics and affine parameters that are not the identity
        for module in original.modules():
            if isinstance(module, nn.BatchNorm2d):
                _randomize_bn(module)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    expected = original(x).detach().numpy()
    converted = to_domain_specific(original, 3, affine="shared")
    plain = [
        name for name, m in converted.named_modules() if type(m) is nn.BatchNorm2d and ".bns." not in name
    ]
    assert plain == []
    assert len(domain_embeddings(converted)) == 4  # the stem and three stages
    for domain in range(3):
        with using_domain(converted, domain):
            _close(converted(x), expected)


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        tensor.uniform_(0.5, 1.5)


# ----------------------------------------------------------------------------------------- ensemble


def _trained_domains(model: nn.Module, num_domains: int) -> None:
    """Distinct statistics per domain: training-mode forwards of differently shifted and scaled inputs."""
    generator = torch.Generator().manual_seed(5)
    model.train()
    with torch.no_grad():
        for domain in range(num_domains):
            with using_domain(model, domain):
                for _ in range(3):
                    model(
                        torch.randn(16, 3, 16, 16, generator=generator, dtype=torch.float64) * (1 + domain)
                        + domain
                    )
    model.eval()


def _reference_ensemble(model: nn.Module, x: torch.Tensor, num_domains: int, per_instance: bool):
    """float64 numpy: per domain, the layer inputs seen on that domain's path, their statistics, the mean
    over layers of Σ_c (μ−μ_d)² + (σ−σ_d)², inverse-distance weights, and the weighted softmax."""
    layers = [m for m in model.modules() if isinstance(m, DomainBatchNorm2d)]
    distances, probs = [], []
    for domain in range(num_domains):
        logits, inputs = _layer_inputs(model, layers, x, domain)
        per_layer = []
        for layer, features in zip(layers, inputs, strict=True):
            flat = features.transpose(1, 0, 2, 3).reshape(features.shape[1], len(x), -1)
            if not per_instance:
                flat = flat.reshape(flat.shape[0], 1, -1)
            mean, std = flat.mean(-1).T, flat.std(-1, ddof=1).T
            running_mean = layer.bns[domain].running_mean.numpy()
            running_std = np.sqrt(layer.bns[domain].running_var.numpy())
            per_layer.append(((mean - running_mean) ** 2 + (std - running_std) ** 2).sum(-1))
        distances.append(np.broadcast_to(np.mean(per_layer, axis=0), (len(x),)))
        exp = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(exp / exp.sum(1, keepdims=True))
    distances_ = np.stack(distances, axis=1)
    weights = (1 / distances_) / (1 / distances_).sum(1, keepdims=True)
    return distances_, weights, np.einsum("nd,dnk->nk", weights, np.stack(probs))


def _layer_inputs(
    model: nn.Module, layers: list[DomainBatchNorm2d], x: torch.Tensor, domain: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    inputs: list[np.ndarray] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach().numpy()))
        for layer in layers
    ]
    with using_domain(model, domain):
        logits = model(x).detach().numpy()
    for hook in hooks:
        hook.remove()
    return logits, inputs


@pytest.mark.parametrize("per_instance", [True, False])
def test_ensemble_is_the_inverse_distance_weighted_mix_of_the_domain_forwards(per_instance: bool) -> None:
    model = _tiny(3)
    _trained_domains(model, 3)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64) * 2 + 1
    out = bne_predict(model, x, per_instance=per_instance)
    distances, weights, probs = _reference_ensemble(model, x, 3, per_instance)
    _close(out.distances, distances, rtol=1e-10)
    _close(out.weights, weights, rtol=1e-10)
    _close(out.probs, probs, rtol=1e-10)
    for domain in range(3):
        with using_domain(model, domain):
            _close(out.logits[domain], model(x).detach().numpy())
    _close(out.probs.sum(1), np.ones(6))
    assert len(set(out.weights[0].tolist())) == 3  # the domains were told apart


def test_bne_predict_needs_eval_mode() -> None:
    model = _tiny(2).train()
    with pytest.raises(RuntimeError, match="eval"):
        bne_predict(model, torch.randn(2, 3, 16, 16, dtype=torch.float64))


class _OneNorm(nn.Module):
    """conv → domain BN → pool → linear: the domain BN's input does not depend on the domain."""

    def __init__(self, num_domains: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = DomainBatchNorm2d(4, num_domains)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3)))


def test_a_target_with_a_sources_statistics_gets_all_the_weight() -> None:
    torch.manual_seed(6)
    model = _OneNorm(3).double().eval()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    features = model.conv(x).detach()
    with torch.no_grad():
        for domain, bn in enumerate(model.norm.bns):
            bn.running_mean.copy_(features.mean(dim=(0, 2, 3)) + 2.0 * domain)
            bn.running_var.copy_(features.var(dim=(0, 2, 3)) * (1 + domain))
    target_domain = 0
    out = bne_predict(model, x, per_instance=False)
    assert out.distances[:, target_domain].abs().max().item() < 1e-24
    _close(out.weights[:, target_domain], np.ones(10))
    _close(out.probs, torch.softmax(out.logits[target_domain], -1).detach().numpy())


def test_identical_domains_are_equidistant_and_equally_weighted() -> None:
    torch.manual_seed(7)
    model = _OneNorm(4).double().eval()
    with torch.no_grad():
        for bn in model.norm.bns:
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(2.0)
    out = bne_predict(model, torch.randn(5, 3, 8, 8, dtype=torch.float64))
    _close(out.weights, np.full((5, 4), 0.25))
    _close(out.probs, torch.softmax(out.logits[0], -1).detach().numpy())
    assert source_distances(model).abs().max().item() == 0.0


def test_source_distances_between_embeddings() -> None:
    model = _tiny(3)
    _trained_domains(model, 3)
    distances = source_distances(model).numpy()
    expected = np.zeros((3, 3))
    for means, variances in domain_embeddings(model):
        m, s = means.numpy(), np.sqrt(variances.numpy())
        expected += ((m[:, None] - m[None]) ** 2 + (s[:, None] - s[None]) ** 2).sum(-1)
    _close(torch.from_numpy(distances), expected / len(domain_embeddings(model)))
    assert np.all(np.diag(distances) == 0) and np.all(distances[~np.eye(3, dtype=bool)] > 0)
