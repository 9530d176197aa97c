"""The configuration of one trial: what `train()` consumes and what every MLflow run records.

A study spec (`sbn_study.spec`) is this configuration plus `name`, `resources`, `tracking` and `search`.
Every model is `extra="forbid"` so a typo in a spec is an error, never a silently ignored key.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from sbn_study.spec.messages import show, spec_error

# The multi-domain datasets (`sbn_study.trial.domains`) and their domains, in the order folds run; the generic
# `domains` layout takes every folder under data.root as a domain, so its domains are known once it is read.
DOMAINS: dict[str, tuple[str, ...]] = {
    "synthetic_domains": ("plain", "tinted", "faded", "grey"),
    "pacs": ("art_painting", "cartoon", "photo", "sketch"),
    "office31": ("amazon", "dslr", "webcam"),
    "office_caltech_10": ("amazon", "caltech", "dslr", "webcam"),
    "domains": (),
}
DatasetName = Literal[
    "synthetic",
    "cifar10",
    "cifar100",
    "synthetic_domains",
    "pacs",
    "office31",
    "office_caltech_10",
    "domains",
]
DgMethod = Literal["deepall", "adabn", "bne"]
FftNorm = Literal["backward", "ortho", "forward"]

# numpy's generators, and so Optuna's samplers, take seeds in [0, 2**32 - 1], the narrowest range of the
# generators a seed reaches (torch's take 64 bits): one range for every seed keeps them interchangeable.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

# What `torch.device` parses of the devices a trial can run on (`sbn_study.trial.train.resolve_device`), plus
# "auto"; an index of more than 3 digits would not parse.
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]{0,2}))?")


def _usable_path(path: str) -> str:
    # The operating system takes no NUL in a path: every use of the path would fail with a traceback.
    if "\0" in path:
        raise spec_error(f"a path cannot contain a NUL character, got {show(path)}")
    return path


PathText = Annotated[str, AfterValidator(_usable_path)]


def _number_type(annotation: Any) -> str | None:
    """The pydantic error type of a wrong value for a numeric field (`int`, `float | None`, `Seed | None`)."""
    types = {get_args(a)[0] if get_origin(a) is Annotated else a for a in (annotation, *get_args(annotation))}
    return "int_type" if int in types else "float_type" if float in types else None


class Strict(BaseModel):
    # A YAML `.inf` or `.nan` is a float to pydantic, and no setting of a study means either.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true as 1: `epochs: true` would train for one epoch.
        kind = _number_type(cls.model_fields[info.field_name].annotation) if info.field_name else None
        if isinstance(value, bool) and kind:
            raise PydanticCustomError(kind, "a number, not a boolean")
        return value


class SyntheticConfig(Strict):
    """Size of the embedded synthetic dataset (CIFAR-shaped 3×32×32 images)."""

    # The driver renders the images in its memory, 3 KB each: the caps keep a typo from taking gigabytes.
    train_size: int = Field(
        2560, ge=2, le=1_000_000, description="images in the training split (before the validation hold-out)"
    )
    test_size: int = Field(512, ge=1, le=1_000_000)
    num_classes: int = Field(10, ge=2, le=1000)
    seed: Seed = 0


class SyntheticDomainsConfig(Strict):
    """The embedded multi-domain set: the same classes rendered in every style of `DOMAINS["synthetic_domains"]`."""

    num_classes: int = Field(7, ge=2, le=1000)
    images_per_domain: int = Field(768, ge=2, le=1_000_000)
    seed: Seed = 0


class DataConfig(Strict):
    dataset: DatasetName = "synthetic"
    # Where `cifar-10-batches-py/` and `cifar-100-python/` live (or are downloaded to), and the multi-domain
    # datasets' folders (`PACS/`, `office31/`, ...; never downloaded). `~` is expanded.
    root: PathText = "~/.cache/sbn-study/data"
    # The paper holds out 5,000 of CIFAR's 50,000 training images; search optimizes on them, never on test.
    # The multi-domain datasets hold out `val_fraction` of each source domain instead.
    val_size: int = Field(5000, ge=0)
    split_seed: Seed = 0
    download: bool = True
    augment: bool = True
    synthetic: SyntheticConfig = SyntheticConfig()
    # The rest is for the multi-domain datasets: leave-one-domain-out (`sbn_study.trial.domain_train`).
    # The held-out target domain, or "all": every domain in turn, all of them in one trial.
    target: str = "all"
    # Side of the decoded square images; None: 32 for synthetic_domains (their rendered size), else 224.
    resolution: int | None = Field(None, ge=8, le=1024)
    # Of each source domain, held out as the validation split the search optimizes; the target never is.
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    dg_method: DgMethod = "deepall"
    # How BNE places target images among the sources: by each test batch's statistics, or each image's own
    # (the paper's; on held-out source images it picked the image's own source far less reliably).
    bne_statistics: Literal["batch", "instance"] = "batch"
    synthetic_domains: SyntheticDomainsConfig = SyntheticDomainsConfig()

    @field_validator("target")
    @classmethod
    def _a_domain_of_the_dataset(cls, target: str, info: ValidationInfo) -> str:
        dataset = info.data.get("dataset")
        if target == "all" or dataset is None:  # an invalid dataset has its own error
            return target
        if dataset not in DOMAINS:
            raise spec_error(
                f"a held-out domain needs a multi-domain dataset ({', '.join(DOMAINS)}), got data.dataset "
                f"{dataset}: use all"
            )
        if DOMAINS[dataset] and target not in DOMAINS[dataset]:
            raise spec_error(
                f"expected all or a domain of {dataset} ({', '.join(DOMAINS[dataset])}), got {show(target)}"
            )
        return target

    @property
    def image_resolution(self) -> int:
        """The side the multi-domain images are decoded to."""
        if self.resolution is not None:
            return self.resolution
        return 32 if self.dataset == "synthetic_domains" else 224


class ModelConfig(Strict):
    arch: str = "resnet18"  # the paper's CIFAR model; the quick-start uses "tiny"
    width: int = Field(16, ge=1, description="base channel width of the tiny model only")
    dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="classifier dropout of the VGG models (paper: 0.5)"
    )
    # The ResNets' stem: "cifar" (3×3 stride 1, no max-pool: 32-pixel images), "imagenet" (torchvision's 7×7
    # stride 2 and a max-pool: 224-pixel images, and what ImageNet weights were trained with).
    stem: Literal["cifar", "imagenet"] = "cifar"
    # A torchvision state dict (e.g. resnet18-f37072fd.pth) the model starts from; its classifier is not loaded.
    weights: PathText | None = None

    @field_validator("weights")
    @classmethod
    def _absolute_weights(cls, weights: str | None) -> str | None:
        # Ray Tune runs each trial in its own working directory.
        return None if weights is None else os.path.abspath(os.path.expanduser(weights))


class NormConfig(Strict):
    # `kind` names the norm placed at the placement's sites; every other site keeps plain BN.
    kind: str = "sbn"
    # Digits of the stages that get `kind` ("34" = the paper's SBN34), or "all" / "none".
    placement: str = "34"
    momentum: float | None = Field(0.1, gt=0.0, le=1.0)
    eps: float = Field(1e-5, gt=0.0)
    fft_norm: FftNorm = "backward"
    affine: bool = True
    impl: Literal["auto", "fft"] = "auto"
    groups: int = Field(32, ge=1, description="groups of GroupNorm / Batch Group Norm / Proxy Norm's GN")
    # Cross-Iteration BN: statistics pooled over the last `cbn_window` iterations (the current one included),
    # plain BN for the first `cbn_burnin` training iterations, while the weights still move fast.
    cbn_window: int = Field(4, ge=1, le=64, description="iterations CBN pools statistics over (k)")
    cbn_burnin: int = Field(1000, ge=0, description="training iterations of plain BN before CBN pools")
    # Memorized BN: statistics of the last `mbn_window` batches, in training and inference alike.
    mbn_window: int = Field(4, ge=1, le=1024, description="batches MBN memorizes (k)")
    mbn_double_forward: bool = Field(
        True, description="MBN re-measures each batch after the update (one extra forward per step)"
    )
    proxynorm_base: Literal["gn", "ln"] = Field("gn", description="the batch-independent norm before PN")
    # The keyword arguments of a custom kind's factory (`kind: "package.module:Factory"`); no built-in kind
    # reads them.
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Strict):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=2)
    eval_batch_size: int = Field(1024, ge=1)
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    # timm and airbench exclude norm gains/biases from decay; the paper decays everything (the default).
    norm_weight_decay: bool = True
    schedule: Literal["step", "cosine", "constant"] = "step"
    # Epochs of linear warm-up, multiplying the schedule's lr by (epoch + 1)/(warmup_epochs + 1) (Goyal et al.
    # 2017, per epoch here): what a large lr, e.g. one scaled up with the batch size, starts with.
    warmup_epochs: int = Field(0, ge=0)
    # Epochs at which the step schedule multiplies the lr by `gamma`; `None` = 30/60/80 % of `epochs`,
    # which is the paper's 60/120/160 at 200 epochs and scales when a study shortens training.
    milestones: list[Annotated[int, Field(ge=1)]] | None = None
    gamma: float = Field(0.2, gt=0.0, le=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    amp: bool = True  # bf16 autocast, on CUDA only; SBN keeps float32 inside
    channels_last: bool = True  # on CUDA only
    compile: bool = False
    seed: Seed = 0
    device: str = "auto"  # "auto" = cuda when the trial was given a GPU, else cpu

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.fullmatch(device):
            raise spec_error(f"expected auto, cpu, cuda, cuda:N or mps, got {show(device)}")
        return device


class FeatureStatsConfig(Strict):
    enabled: bool = True
    interval: int = Field(5, ge=1, description="epochs between measurements; epoch 0 (init) always")
    # 128 images give each site's statistics over 10^5–10^6 values; twice that doubled the measurement's cost
    # (benchmarks/feature_stats.py) without moving a percentile visibly.
    probe_size: int = Field(
        128,
        ge=2,
        description="fixed validation images the statistics are measured on (batch statistics: ≥ 2)",
    )


class TrialConfig(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    norm: NormConfig = NormConfig()
    train: TrainConfig = TrainConfig()
    features: FeatureStatsConfig = FeatureStatsConfig()


def multi_domain_refusal(data: DataConfig, command: str) -> str | None:
    """Why `command` cannot take `data`, or None: final training and the probe read one dataset's train and
    test splits, while a multi-domain dataset is trained and evaluated fold by fold (`trial.domain_train`)."""
    if data.dataset not in DOMAINS:
        return None
    single = ", ".join(name for name in get_args(DatasetName) if name not in DOMAINS)
    return (
        f"data.dataset: {command} takes a single-domain dataset ({single}), got the multi-domain "
        f"{data.dataset}: compare its methods and norms with a study's leave-one-domain-out trials "
        "(sbn-study run, e.g. search_spaces/domains_quickstart.yaml)"
    )


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; the dotted keys are the ones specs, `--set` and MLflow params use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Sets `tree["a"]["b"] = value` for `"a.b"`, creating intermediate dicts."""
    *parents, leaf = dotted_key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
