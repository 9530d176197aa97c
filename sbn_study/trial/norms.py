"""Which normalization goes where: the norm registry and the paper's stage placement, timm-style.

A model asks `norm_layer(num_features, stage)` at every normalization site (stage 0 is the stem, stages count
from 1) and never learns which module it got; where the norm is followed by the activation it asks
`norm_layer.norm_act(num_features, stage)` for the pair (norm, activation) instead, as timm's norm-act layers
do: every kind answers (its norm, ReLU) there, except `proxynorm`, whose activation step is its own.
`NormPlacement` answers with the configured kind at the placed stages and with a plain `nn.BatchNorm2d`
(PyTorch defaults) everywhere else, and `NormPlacement.bind(model)` hands the built model to the kinds that
need it (CBN: the conv before each of its layers; MBN: the model's extra forward).

The `NormConfig` hyperparameters (eps, momentum, affine, ...) apply only to the layer a kind *places*:
- `bn`: the BatchNorm itself;
- `sbn`: the SpectralBatchNorm2d; the BatchNorm in front of it is a plain one (the paper puts SBN after BN);
- `2bn`: the second BatchNorm (the paper's control arm); the first is a plain one;
- `gn`: the GroupNorm (eps, affine, groups; it has no running statistics, so no momentum);
- `bgn`: the Batch Group Norm (eps, momentum, affine, groups);
- `iebn`: Instance Enhancement BN (eps, momentum, affine), a BN with a per-sample channel gate;
- `none`: nothing (an identity), so the site has no normalization at all;
- `scale`: the BatchNorm (eps, momentum, affine), times the fixed gain `fft_norm` implies at the site;
- `bnscale`: the BatchNorm (eps, momentum), its γ starting at that gain; `affine: false` is an error;
- `sbn_nospike`, `spike`, `sbn_center`, `sbn_var`: as `sbn`, with that SBN ablation in the SBN's place;
- `sbn_noaffine`: as `sbn` with the SBN's affine off, whatever `affine` says;
- `cbn`: Cross-Iteration BN (eps, momentum, affine, cbn_window, cbn_burnin), `sbn_study.trial.cbn`;
- `mbn`: Memorized BN (eps, affine, mbn_window, mbn_double_forward), `sbn_study.trial.mbn`;
- `proxynorm`: GN (or LN, `proxynorm_base`) then PN-Act at norm-act sites, `sbn_study.trial.proxynorm`; at a
  site without activation (before a residual addition, on a shortcut) the GN/LN with its affine (eps, affine,
  groups);
- `package.module:Factory`: the user's own layer, `Factory(channels, stage=, spatial=, **norm.options)`,
  spatial being the site's (H, W) where the model is built for a known input size (`measure`), else None.
The ablations are `sbn_study.trial.sbn_ablations`.
For `gn`, `bgn` and `proxynorm`, `groups` is clamped to the largest divisor of the site's width that does not
exceed it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbn_study.errors import UserError
from sbn_study.spec.catalog import (
    NORM_KINDS,
    custom_norm_factory,
    is_custom_norm,
    parse_placement,
)
from sbn_study.spec.config import NormConfig
from sbn_study.trial.bne import DomainBatchNorm2d
from sbn_study.trial.cbn import CrossIterationBatchNorm2d, link_preceding_convs
from sbn_study.trial.mbn import MemorizedBatchNorm2d, install_double_forward
from sbn_study.trial.norm_state import add_affine, add_running_statistics
from sbn_study.trial.proxynorm import ProxyNormAct2d
from sbn_study.trial.sbn import SpectralBatchNorm2d
from sbn_study.trial.sbn_ablations import (
    FixedScaleBatchNorm2d,
    LearnedScaleBatchNorm2d,
    SpectralCenterOnly2d,
    SpectralDivideOnly2d,
    SpectralNoSpike2d,
    SpectralSpikeOnly2d,
)

NormFactory = Callable[[int, NormConfig], nn.Module]
NormActFactory = Callable[[int, NormConfig], tuple[nn.Module, nn.Module]]


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


class BatchGroupNorm2d(nn.Module):
    """Batch Group Normalization (Zhou et al., ICLR 2020): the C·H·W features of a sample are split into
    `num_groups` groups of whole channels and each group is normalized with statistics pooled over the batch
    and the group, i.e. over (N, C/G, H, W); running statistics per group replace them in eval mode, as in BN.
    The affine transform stays per channel.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if num_features % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide num_features={num_features}")
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        add_affine(self, num_features, affine)
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.num_batches_tracked: torch.Tensor
        add_running_statistics(self, num_groups)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            # momentum=None means a cumulative average, exactly as nn.BatchNorm2d treats it.
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Viewed as N×G×(C/G·H·W), BN's per-channel statistics are exactly BGN's per-group ones, so the fused
        # kernel (and its unbiased running-variance update) does the work.
        grouped = F.batch_norm(
            x.reshape(n, self.num_groups, -1),
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=factor,
            eps=self.eps,
        ).reshape(n, c, h, w)
        if self.weight is None or self.bias is None:
            return grouped
        return grouped * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


class InstanceEnhancementBatchNorm2d(nn.BatchNorm2d):
    """Instance Enhancement BN (Liang, Huang, Liang, Yang, AAAI 2020): BN whose per-channel gain each sample
    rescales by a sigmoid gate of that channel's spatial mean in the input,

        y = BN(x)·γ·σ(a·mean_hw(x) + b) + β,   a = 0 and b = −1 at initialization,

    so that instance information tempers the batch noise BN brings in. BN's statistics and running buffers are
    BatchNorm2d's own (it is one, without its affine); `affine` keeps or drops γ and β, the gate stays.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self.gain = nn.Parameter(torch.ones(num_features)) if affine else None
        self.shift = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.gate_weight = nn.Parameter(torch.zeros(num_features))
        self.gate_bias = nn.Parameter(torch.full((num_features,), -1.0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(input.mean((2, 3)) * self.gate_weight + self.gate_bias)  # N×C
        scale = gate if self.gain is None else gate * self.gain
        normalized = super().forward(input) * scale[:, :, None, None]
        return normalized if self.shift is None else normalized + self.shift[:, None, None]


def _bn(num_features: int, cfg: NormConfig) -> nn.Module:
    return nn.BatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine)


def _sbn(
    num_features: int, cfg: NormConfig, layer: type[SpectralBatchNorm2d] = SpectralBatchNorm2d
) -> nn.Module:
    spectral = layer(
        num_features,
        eps=cfg.eps,
        momentum=cfg.momentum,
        affine=cfg.affine,
        fft_norm=cfg.fft_norm,
        impl=cfg.impl,
    )
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(num_features), sbn=spectral))


def _two_bn(num_features: int, cfg: NormConfig) -> nn.Module:
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(num_features), bn2=_bn(num_features, cfg)))


def _gn(num_features: int, cfg: NormConfig) -> nn.Module:
    # A width that cfg.groups does not divide (e.g. 16 channels, 32 groups) gets the largest group count that
    # divides it, so one `groups` value serves every layer of every architecture.
    groups = _largest_divisor_at_most(num_features, cfg.groups)
    return nn.GroupNorm(groups, num_features, eps=cfg.eps, affine=cfg.affine)


def _bgn(num_features: int, cfg: NormConfig) -> nn.Module:
    groups = _largest_divisor_at_most(num_features, cfg.groups)
    return BatchGroupNorm2d(num_features, groups, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine)


def _iebn(num_features: int, cfg: NormConfig) -> nn.Module:
    return InstanceEnhancementBatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine)


def _none(num_features: int, cfg: NormConfig) -> nn.Module:
    return nn.Identity()


def _scale(num_features: int, cfg: NormConfig) -> nn.Module:
    return FixedScaleBatchNorm2d(
        num_features, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine, fft_norm=cfg.fft_norm
    )


def _bnscale(num_features: int, cfg: NormConfig) -> nn.Module:
    if not cfg.affine:
        raise UserError(
            "norm.affine: bnscale learns its downscale as the BatchNorm's γ, so it needs affine: true"
        )
    return LearnedScaleBatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum, fft_norm=cfg.fft_norm)


def _sbn_noaffine(num_features: int, cfg: NormConfig) -> nn.Module:
    return _sbn(num_features, cfg.model_copy(update={"affine": False}))


def _cbn(num_features: int, cfg: NormConfig) -> nn.Module:
    return CrossIterationBatchNorm2d(
        num_features, cfg.cbn_window, cfg.cbn_burnin, eps=cfg.eps, momentum=cfg.momentum, affine=cfg.affine
    )


def _mbn(num_features: int, cfg: NormConfig) -> nn.Module:
    return MemorizedBatchNorm2d(
        num_features, cfg.mbn_window, eps=cfg.eps, affine=cfg.affine, double_forward=cfg.mbn_double_forward
    )


def _proxynorm_base(num_features: int, cfg: NormConfig, affine: bool) -> nn.GroupNorm:
    # LN of a conv net normalizes each sample over channels and positions: GN with one group.
    groups = 1 if cfg.proxynorm_base == "ln" else _largest_divisor_at_most(num_features, cfg.groups)
    return nn.GroupNorm(groups, num_features, eps=cfg.eps, affine=affine)


def _proxynorm(num_features: int, cfg: NormConfig) -> nn.Module:
    return _proxynorm_base(num_features, cfg, cfg.affine)


def _proxynorm_act(num_features: int, cfg: NormConfig) -> tuple[nn.Module, nn.Module]:
    # The affine transform moves into PN-Act, which needs γ and β to build its proxy.
    act = ProxyNormAct2d(num_features, eps=cfg.eps, affine=cfg.affine)
    return _proxynorm_base(num_features, cfg, affine=False), act


_REGISTRY: dict[str, NormFactory] = {
    "bn": _bn,
    "sbn": _sbn,
    "2bn": _two_bn,
    "gn": _gn,
    "bgn": _bgn,
    "iebn": _iebn,
    "none": _none,
    "scale": _scale,
    "bnscale": _bnscale,
    "sbn_nospike": partial(_sbn, layer=SpectralNoSpike2d),
    "spike": partial(_sbn, layer=SpectralSpikeOnly2d),
    "sbn_center": partial(_sbn, layer=SpectralCenterOnly2d),
    "sbn_var": partial(_sbn, layer=SpectralDivideOnly2d),
    "sbn_noaffine": _sbn_noaffine,
    "cbn": _cbn,
    "mbn": _mbn,
    "proxynorm": _proxynorm,
}
# The kinds whose norm-act sites are not (their norm, ReLU).
_NORM_ACT: dict[str, NormActFactory] = {"proxynorm": _proxynorm_act}

# The leaf modules that normalize: feature statistics hook them, weight decay may skip their parameters.
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    SpectralBatchNorm2d,
    nn.GroupNorm,
    BatchGroupNorm2d,
    CrossIterationBatchNorm2d,
    MemorizedBatchNorm2d,
    ProxyNormAct2d,
    DomainBatchNorm2d,
)


def get_norm_layer(kind: str) -> NormFactory:
    """The constructor `(num_features, cfg) -> nn.Module` registered under `kind`."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise UserError(f"norm.kind: unknown norm {kind!r}; known: {', '.join(NORM_KINDS)}") from None


def _custom_factory(kind: str, options: dict[str, Any]) -> Callable[..., Any]:
    try:
        return custom_norm_factory(kind, options)
    except UserError as exc:
        raise UserError(f"norm.kind: {exc}") from None


class NormPlacement:
    """The `norm_layer(num_features, stage)` a model receives: `cfg.kind` at the placed stages, plain BN
    elsewhere. Constructing it validates both the kind and the placement, before any layer is built.
    """

    def __init__(self, cfg: NormConfig, arch: str, num_stages: int) -> None:
        self.cfg = cfg
        self.num_stages = num_stages
        self.custom = _custom_factory(cfg.kind, cfg.options) if is_custom_norm(cfg.kind) else None
        self.factory = None if self.custom else get_norm_layer(cfg.kind)
        self.stages = parse_placement(cfg.placement, num_stages, arch)
        # The (H, W) of every site a custom kind is placed at, in the order the model asks for them, once
        # `measure` has seen them.
        self.sizes: list[tuple[int, ...] | None] = []
        self._asked = 0
        self._stand_ins: list[nn.Module] | None = None

    def measure(self, build: Callable[[NormPlacement], nn.Module], input_size: tuple[int, int]) -> None:
        """Learns the map size at each placed site: `build(self)` with a plain BN at each, on PyTorch's meta
        device (no memory, no compute), and one `input_size` image through it."""
        self._stand_ins = []
        try:
            with torch.device("meta"):
                model = build(self)
        finally:
            stand_ins, self._stand_ins = self._stand_ins, None
        sizes: dict[int, tuple[int, ...]] = {}
        for index, stand_in in enumerate(stand_ins):
            stand_in.register_forward_pre_hook(
                lambda _, args, index=index: sizes.__setitem__(index, tuple(args[0].shape[2:]))
            )
        model.eval()(torch.empty(1, 3, *input_size, device="meta"))
        self.sizes = [sizes.get(index) for index in range(len(stand_ins))]

    def _placed(self, stage: int) -> bool:
        if not 0 <= stage <= self.num_stages:
            raise ValueError(
                f"stage {stage} outside 0-{self.num_stages}: the model disagrees with its catalog entry"
            )
        return stage in self.stages

    def _build(self, num_features: int, stage: int) -> nn.Module:
        if self.factory is not None:
            return self.factory(num_features, self.cfg)
        if self._stand_ins is not None:
            self._stand_ins.append(nn.BatchNorm2d(num_features))
            return self._stand_ins[-1]
        assert self.custom is not None
        spatial = self.sizes[self._asked] if self._asked < len(self.sizes) else None
        self._asked += 1
        layer = self.custom(num_features, stage=stage, spatial=spatial, **self.cfg.options)
        if not isinstance(layer, nn.Module):
            raise UserError(
                f"norm.kind: {self.cfg.kind} returned an object of type {type(layer).__name__}, "
                "not a torch.nn.Module"
            )
        return layer

    def __call__(self, num_features: int, stage: int) -> nn.Module:
        return self._build(num_features, stage) if self._placed(stage) else nn.BatchNorm2d(num_features)

    def norm_act(self, num_features: int, stage: int) -> tuple[nn.Module, nn.Module]:
        """(norm, activation) for a site whose norm the activation follows."""
        if self._placed(stage) and self.cfg.kind in _NORM_ACT:
            return _NORM_ACT[self.cfg.kind](num_features, self.cfg)
        return self(num_features, stage), nn.ReLU()

    def bind(self, model: nn.Module) -> nn.Module:
        """Hands the built `model` to the layers that need more than their input; returns `model`."""
        link_preceding_convs(model)
        install_double_forward(model)
        return model


def norm_sites(model: nn.Module) -> list[str]:
    """`named_modules` names of every normalizing leaf, in forward-definition order; an `sbn` site
    `layer3.0.bn1` contributes `layer3.0.bn1.bn` and `layer3.0.bn1.sbn`.
    """
    return [name for name, module in model.named_modules() if isinstance(module, NORM_MODULE_TYPES)]


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every normalizing module (for weight-decay exclusion)."""
    return [
        param
        for module in model.modules()
        if isinstance(module, NORM_MODULE_TYPES)
        for param in module.parameters(recurse=False)
    ]
