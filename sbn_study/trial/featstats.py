"""Feature-map statistics at every norm site: the paper's evidence, measured on a fixed probe batch.

Hooks exist only while `measure_feature_stats` runs, so disabled statistics cost nothing. The probe is
normalized with *batch* statistics (norm layers in training mode, everything else in eval mode, norm
buffers restored afterwards): that is what the network computes while it trains, and at initialization
the running statistics (0 and 1) would make every norm an identity and hide the effect the paper shows.
"""

from __future__ import annotations

import torch
from torch import nn

from sbn_study.trial.norms import norm_sites

PERCENTILES = (0, 7, 16, 31, 50, 69, 84, 93, 100)
STAT_NAMES = ("norm", "max", *(f"p{p}" for p in PERCENTILES), "flatness")
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


@torch.no_grad()
def measure_feature_stats(
    model: nn.Module, probe: torch.Tensor, sites: list[str] | None = None
) -> dict[str, float]:
    """Runs `probe` through `model` and returns `{"fm/<site>/<stat>": value}` for every norm site."""
    sites = norm_sites(model) if sites is None else sites
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        modules[site].register_forward_hook(
            lambda _m, _i, out, site=site: outputs.__setitem__(site, _site_stats(out))
        )
        for site in sites
    ]
    norm_modules = [modules[site] for site in sites]
    saved_buffers = [{k: b.clone() for k, b in m.named_buffers()} for m in norm_modules]
    was_training = model.training
    try:
        model.eval()
        for m in norm_modules:
            m.train()
        model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for m, buffers in zip(norm_modules, saved_buffers, strict=True):
            for name, value in buffers.items():
                m.get_buffer(name).copy_(value)
        model.train(was_training)
    # One host transfer for all sites instead of one per number.
    table = torch.stack([outputs[site] for site in sites]).cpu().tolist()
    return {
        metric_name(site, stat): value
        for site, row in zip(sites, table, strict=True)
        for stat, value in zip(STAT_NAMES, row, strict=True)
    }
