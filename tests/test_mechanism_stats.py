"""The mechanism numbers of a spectral site (effective scale, additive share) and the logit norm, against an
independent float64 computation from the site's captured input and output."""

from __future__ import annotations

import pytest
import torch

from sbn_study.trial.featstats import LOGIT_NORM, measure_feature_stats
from sbn_study.trial.models import create_model
from sbn_study.trial.norms import norm_sites


def captured(model: torch.nn.Module, site: str, probe: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The site's input and output on `probe` with batch statistics, as `measure_feature_stats` runs it."""
    seen = {}
    module = dict(model.named_modules())[site]
    handle = module.register_forward_hook(lambda _m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    modules = dict(model.named_modules())
    for name in norm_sites(model):
        modules[name].train()
    with torch.no_grad():
        logits = model(probe)
    handle.remove()
    model.load_state_dict(state)
    return seen["x"].double(), seen["y"].double(), logits.double()


@pytest.mark.parametrize("kind", ["sbn", "sbn_nospike", "spike", "sbn_center", "sbn_var"])
@pytest.mark.parametrize("fft_norm", ["backward", "ortho", "forward"])
def test_spectral_sites_report_their_rescale_and_the_share_of_the_additive_map(kind, fft_norm):
    torch.manual_seed(0)
    model = create_model("tiny", 10, norm=kind, placement="3", width=8)
    site = "layer3.bn.sbn"
    layer = dict(model.named_modules())[site]
    layer.fft_norm = fft_norm
    with torch.no_grad():  # a trained γ, not the initial ones
        layer.weight.uniform_(0.5, 2.0)
    probe = torch.randn(16, 3, 32, 32)
    stats = measure_feature_stats(model, probe)
    x, y, logits = captured(model, site, probe)

    gamma = layer.weight.detach().double()
    spectrum = torch.fft.rfft2(x, norm=fft_norm)
    var = (spectrum - spectrum.mean(dim=(0, 2, 3), keepdim=True)).abs().square().mean(dim=(0, 2, 3))
    scale = {
        "sbn": gamma / torch.sqrt(var + layer.eps),
        "sbn_nospike": gamma / torch.sqrt(var + layer.eps),
        "sbn_var": gamma / torch.sqrt(var + layer.eps),
        "sbn_center": gamma,
        "spike": torch.ones_like(gamma),
    }[kind]
    share = (y - scale[None, :, None, None] * x).norm() / y.norm()
    assert stats[f"fm/{site}/scale"] == pytest.approx(scale.mean().item(), rel=1e-5)
    assert stats[f"fm/{site}/additive_share"] == pytest.approx(share.item(), rel=1e-4, abs=1e-6)
    if kind == "sbn_nospike":
        assert stats[f"fm/{site}/additive_share"] < 1e-5
    assert stats[LOGIT_NORM] == pytest.approx(logits.flatten(1).norm(dim=1).mean().item(), rel=1e-5)


def test_plain_bn_sites_have_no_mechanism_numbers_but_the_logit_norm_is_always_there():
    torch.manual_seed(0)
    stats = measure_feature_stats(
        create_model("tiny", 10, norm="bn", placement="none", width=8), torch.randn(8, 3, 32, 32)
    )
    assert not [k for k in stats if k.endswith(("/scale", "/additive_share"))]
    assert stats[LOGIT_NORM] > 0
