"""Feature-map statistics at every norm site: the paper's evidence, measured on a fixed probe batch.

Hooks exist only while `measure_feature_stats` runs, so disabled statistics cost nothing. At a spectral site
(SBN or one of its ablations) two more numbers say which part of y = s·x + (additive map) acts: the mean
effective per-channel scale `scale` and the additive map's share of the output, `additive_share` =
‖y − s·x‖/‖y‖; and the network's logit norm (`fm/logits/norm`, mean over the probe's samples) shows whether
a downscale inside the network reaches its output. The probe is
normalized with *batch* statistics (norm layers in training mode, everything else in eval mode, norm
buffers restored afterwards): that is what the network computes while it trains, and at initialization
the running statistics (0 and 1) would make every norm an identity and hide the effect the paper shows.
"""

from __future__ import annotations

import torch
from torch import nn

from sbn_study.trial.norms import norm_sites
from sbn_study.trial.sbn import SpectralBatchNorm2d

PERCENTILES = (0, 7, 16, 31, 50, 69, 84, 93, 100)
STAT_NAMES = ("norm", "max", *(f"p{p}" for p in PERCENTILES), "flatness")
MECHANISM_STATS = ("scale", "additive_share")
LOGIT_NORM = "fm/logits/norm"
# Inner percentiles come from a strided subsample of at most this many values: sorting a whole map batch
# would cost more than the probe's forward pass, and 2**16 samples keep the p7–p93 percentiles within about
# 0.5 % of their spread. p0 and p100 are exact (the subsample would miss the extremes).
_QUANTILE_SAMPLE = 1 << 16


def metric_name(site: str, stat: str) -> str:
    return f"fm/{site}/{stat}"


def _subsample(values: torch.Tensor) -> torch.Tensor:
    # An odd stride: an even one aliases with the (even) map width and would sample only some columns.
    return values[:: (values.numel() // _QUANTILE_SAMPLE) | 1]


def _site_stats(y: torch.Tensor) -> torch.Tensor:
    """One row per site: norm, max |y|, percentiles, spectral flatness (all float32, on y's device)."""
    y = y.detach().float()
    per_sample_norm = y.flatten(1).norm(dim=1).mean()
    low, high = torch.aminmax(y)
    inner = torch.tensor([p / 100 for p in PERCENTILES[1:-1]], device=y.device)
    percentiles = torch.cat([low[None], torch.quantile(_subsample(y.flatten()), inner), high[None]])
    max_abs = torch.maximum(-low, high)
    # Spectral flatness (Wiener entropy) of each map's rfft2 power: geometric over arithmetic mean,
    # 1 for a perfectly flat spectrum, → 0 when a few frequencies dominate; averaged over maps.
    # |X|² from the real and imaginary parts: the complex abs() takes a square root only to square it again.
    power = torch.view_as_real(torch.fft.rfft2(y)).square().sum(-1).flatten(2) + 1e-12
    flatness = (power.log().mean(dim=2).exp() / power.mean(dim=2)).mean()
    return torch.cat([per_sample_norm[None], max_abs[None], percentiles, flatness[None]])


def _mechanism_stats(module: SpectralBatchNorm2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    scale = module.effective_scale(x)
    rescaled = x.detach().double() * scale[None, :, None, None]
    y = y.detach().double()
    share = (y - rescaled).norm() / y.norm().clamp_min(1e-30)
    return torch.stack([scale.mean(), share]).float()


@torch.no_grad()
def measure_feature_stats(
    model: nn.Module, probe: torch.Tensor, sites: list[str] | None = None
) -> dict[str, float]:
    """Runs `probe` through `model` and returns `{"fm/<site>/<stat>": value}` for every norm site."""
    sites = norm_sites(model) if sites is None else sites
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    mechanisms: dict[str, torch.Tensor] = {}
    handles = [
        modules[site].register_forward_hook(
            lambda _m, _i, out, site=site: outputs.__setitem__(site, _site_stats(out))
        )
        for site in sites
    ]
    handles += [
        modules[site].register_forward_hook(
            lambda m, inputs, out, site=site: mechanisms.__setitem__(
                site, _mechanism_stats(m, inputs[0], out)
            )
        )
        for site in sites
        if isinstance(modules[site], SpectralBatchNorm2d)
    ]
    norm_modules = [modules[site] for site in sites]
    saved_buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in norm_modules]
    was_training = model.training
    try:
        model.eval()
        for m in norm_modules:
            m.train()
        logits = model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for m, buffers in zip(norm_modules, saved_buffers, strict=True):
            for name, value in buffers.items():
                m.get_buffer(name).copy_(value)
        model.train(was_training)
    # One host transfer for all sites instead of one per number.
    names = [(site, stat) for site in sites for stat in STAT_NAMES]
    names += [(site, stat) for site in mechanisms for stat in MECHANISM_STATS]
    logit_norm = logits.detach().float().flatten(1).norm(dim=1).mean()
    values = (
        torch.cat([*(outputs[site] for site in sites), *mechanisms.values(), logit_norm[None]]).cpu().tolist()
    )
    stats = {metric_name(site, stat): value for (site, stat), value in zip(names, values[:-1], strict=True)}
    stats[LOGIT_NORM] = values[-1]
    return stats
