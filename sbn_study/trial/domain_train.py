"""A leave-one-domain-out trial (domain generalization) on a multi-domain dataset (`sbn_study.trial.domains`).

The protocol:
- A fold trains on every domain but one, its target, and tests on the target. `data.target: all` runs every
  fold in one trial, one epoch of each in turn, so that each epoch's result is the folds' mean: what ASHA
  compares and the sampler models is the configuration's score over all targets, the quantity the field
  reports. `data.target: <domain>` runs that fold alone; to spread the folds of one configuration over a
  cluster, run a study per target (a study's trials are what Ray spreads).
- No choice sees the target. The search metric is measured on the sources only: `val_acc` and `val_loss`
  on `data.val_fraction` of each source, held out, each source predicted as the method predicts an unseen
  domain (as one domain, its label unused; a batch never mixes sources), pooled over a fold's sources and
  averaged over folds. The target's accuracy is reported every epoch (`target_acc`, the mean over folds, and
  `target_acc/<domain>`), but no search metric may name it, nothing ranks by it, and no epoch is chosen by it:
  selecting on the target ("oracle" model selection) would report a best case no deployment can pick.
- Methods (`data.dg_method`), all on the same pooled, shuffled source batches:
  - `deepall`: the backbone with its norms as configured (any kind and placement), trained on the pooled
    sources; it predicts with the statistics it learned there.
  - `adabn` (Li et al., 2016): the same training; before predicting a domain, a copy of the model re-estimates
    every norm with BatchNorm's running-statistics API (BN and its subclasses such as IEBN, SBN and its
    ablations) as the cumulative average over that domain's batches. The others keep what they learned on the
    sources (BGN's, CBN's and MBN's statistics) or have none (GN).
  - `bne` (Segu et al., `sbn_study.trial.bne`): every plain BatchNorm2d (the BN of a composite `sbn`/`2bn` site
    included) becomes domain-specific, trained with each sample's source index; a domain's images are predicted
    by the inverse-distance ensemble over the sources, placed by each test batch's statistics
    (`data.bne_statistics: batch`) or each image's own (`instance`, the paper's). Per-batch is the default: on
    held-out images of a known source, an image's own statistics picked that source only about 60 % of the time
    and a batch's reliably; a test batch is a shuffled sample of one domain (`leave_one_domain_out`).

Results carry BNE's view of the domains too, in the model of the fold whose target is `<t>`:
`target_w2/<t>/<a>/<b>`, the layer-averaged squared W2 distance between the embeddings of domains a and b
(the target's: its test batches' statistics, averaged), and `target_weight/<t>/<s>`, the ensemble's mean weight
of source s on the target.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sbn_study.errors import UserError
from sbn_study.spec.config import DOMAINS, DataConfig, TrialConfig
from sbn_study.trial.bne import (
    DomainBatchNorm2d,
    bne_predict,
    set_domain,
    source_distances,
    to_domain_specific,
    using_domain,
)
from sbn_study.trial.data import DeviceLoader, ImageDataset, Split, _seed_of, load_dataset
from sbn_study.trial.domains import DomainDataset, DomainSplit, leave_one_domain_out, load_domains
from sbn_study.trial.featstats import measure_feature_stats
from sbn_study.trial.models import create_model_from_config
from sbn_study.trial.norms import NORM_MODULE_TYPES, norm_sites
from sbn_study.trial.system import SystemSampler
from sbn_study.trial.train import (
    Checkpoint,
    Metrics,
    ReportFn,
    _autocast,
    evaluate,
    lr_at,
    make_optimizer,
    on_device,
    probe_batch,
    resolve_device,
)


def load_study_data(config: TrialConfig) -> ImageDataset | DomainDataset:
    """What a study's driver loads once for all its trials, refusing before any trial starts what every trial
    would fail on: a target that is not a domain, `model.weights` that do not fit, `bne` without a BN."""
    data = config.data
    if data.dataset not in DOMAINS:
        images = load_dataset(data)
        if config.model.weights is not None:
            create_model_from_config(config.model, config.norm, images.num_classes)
        return images
    dataset = load_domains(data.dataset, data.root, data.image_resolution, data.synthetic_domains)
    fold_targets(data, dataset)
    if config.model.weights is not None or data.dg_method == "bne":
        build_model(config, dataset.num_classes, len(dataset.domains) - 1)
    return dataset


def fold_targets(data: DataConfig, dataset: DomainDataset) -> tuple[str, ...]:
    """The target of every fold a trial runs, in the dataset's domain order."""
    if data.target == "all":
        return dataset.domain_names
    if data.target not in dataset.domains:
        raise UserError(
            f"data.target: {data.target!r} is not a domain of {dataset.name}: {', '.join(dataset.domains)}"
        )
    return (data.target,)


def build_model(config: TrialConfig, num_classes: int, num_sources: int) -> nn.Module:
    """The configured model; for `bne`, with its plain BNs made specific to each of `num_sources` sources."""
    model = create_model_from_config(config.model, config.norm, num_classes)
    if config.data.dg_method != "bne":
        return model
    to_domain_specific(model, num_sources)
    if not any(isinstance(module, DomainBatchNorm2d) for module in model.modules()):
        raise UserError(
            f"data.dg_method: bne makes the model's BatchNorm2d layers domain-specific, and norm.kind "
            f"{config.norm.kind} at placement {config.norm.placement} leaves none"
        )
    return model


# ------------------------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class Score:
    """A method's predictions on one domain's images."""

    loss: float  # mean cross-entropy (BNE: of the ensemble's probabilities)
    acc: float
    count: int
    distances: torch.Tensor | None = None  # BNE: mean layer-averaged W2 to each source (D)
    weights: torch.Tensor | None = None  # BNE: mean ensemble weight of each source (D)


def predict_domain(model: nn.Module, loader: DeviceLoader, data: DataConfig, amp: bool = False) -> Score:
    """`data.dg_method`'s predictions on the images of `loader`, all of one domain (the model is unchanged)."""
    if data.dg_method == "bne":
        return _ensemble_score(model, loader, data.bne_statistics == "instance", amp)
    if data.dg_method == "adabn":
        model = adapted(model, loader, amp)
    loss, acc = evaluate(model, loader, amp=amp)
    return Score(loss, acc, loader.num_images)


@torch.no_grad()
def adapted(model: nn.Module, loader: DeviceLoader, amp: bool = False) -> nn.Module:
    """A copy of `model` in eval mode whose norms with BatchNorm's running-statistics API hold the cumulative
    average of `loader`'s batch statistics instead of the sources' (AdaBN)."""
    target = copy.deepcopy(model).eval()
    for module in target.modules():
        if isinstance(module, NORM_MODULE_TYPES) and hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every batch, in BatchNorm's convention
            module.train()
    device = loader.device
    for images, _ in loader.epoch(0):
        with _autocast(device, amp):
            target(images)
    return target.eval()


@torch.no_grad()
def _ensemble_score(model: nn.Module, loader: DeviceLoader, per_instance: bool, amp: bool) -> Score:
    was_training = model.training
    model.eval()
    nll = torch.zeros((), device=loader.device, dtype=torch.float64)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    distances = weights = torch.zeros((), device=loader.device, dtype=torch.float64)
    for images, labels in loader.epoch(0):
        with _autocast(loader.device, amp):
            out = bne_predict(model, images, per_instance=per_instance)
        probs = out.probs.double()
        nll -= probs.gather(1, labels[:, None]).clamp_min(torch.finfo(probs.dtype).tiny).log().sum()
        correct += (probs.argmax(1) == labels).sum()
        distances = distances + out.distances.double().sum(0)
        weights = weights + out.weights.double().sum(0)
    model.train(was_training)
    n = max(loader.num_images, 1)
    return Score(
        nll.item() / n, correct.item() / n, loader.num_images, (distances / n).cpu(), (weights / n).cpu()
    )


# ------------------------------------------------------------------------------------------------- folds


@dataclass
class Fold:
    split: DomainSplit
    model: nn.Module
    forward: nn.Module  # the model, compiled when `train.compile` says so
    optimizer: torch.optim.Optimizer
    train: DeviceLoader
    train_domains: torch.Tensor  # the source of every training image, on the device
    sources: list[DeviceLoader]  # each source's validation images
    target: DeviceLoader
    probe: torch.Tensor | None  # the feature-statistics probe (validation images) and their sources
    probe_domains: torch.Tensor | None

    @property
    def name(self) -> str:
        return self.split.target


def _fold(config: TrialConfig, dataset: DomainDataset, target: str, device: torch.device) -> Fold:
    tc = config.train
    split = leave_one_domain_out(dataset, target, config.data.val_fraction, config.data.split_seed)
    data = split.data
    # Seeded by the target: a fold starts from the same weights whether its trial runs one fold or all.
    torch.manual_seed(_seed_of(tc.seed, "fold", target))
    model, options = on_device(
        build_model(config, data.num_classes, len(split.sources)), data, tc.channels_last, device
    )
    train = DeviceLoader(
        data.train, tc.batch_size, train=True, augment=config.data.augment, seed=tc.seed, **options
    )
    if len(train) == 0:
        raise UserError(
            f"train.batch_size: {tc.batch_size} is larger than the {len(data.train)} training images of the "
            f"sources of target {target}"
        )

    def evaluation(part: Split) -> DeviceLoader:
        return DeviceLoader(part, tc.eval_batch_size, train=False, augment=False, **options)

    sources = [
        evaluation(Split(data.val.images[split.val_domains == i], data.val.labels[split.val_domains == i]))
        for i in range(len(split.sources))
    ]
    probe = probe_domains = None
    if config.features.enabled:
        probe = probe_batch(data, config, device)
        # probe_batch's images: the first of the validation split, or of the training split when it is too small.
        origin = split.val_domains if len(data.val) >= 2 else split.train_domains
        probe_domains = origin[: len(probe)].to(device)
    return Fold(
        split=split,
        model=model,
        forward=torch.compile(model) if tc.compile else model,
        optimizer=make_optimizer(model, config),
        train=train,
        train_domains=split.train_domains.to(device),
        sources=sources,
        target=evaluation(data.test),
        probe=probe,
        probe_domains=probe_domains,
    )


def _domain_specific(fold: Fold) -> bool:
    return any(isinstance(module, DomainBatchNorm2d) for module in fold.model.modules())


def _train_epoch(fold: Fold, config: TrialConfig, epoch: int) -> tuple[float, float, int]:
    """(summed loss, correct predictions, images) of one training epoch of `fold`."""
    tc = config.train
    device, model = fold.train.device, fold.model
    specific = _domain_specific(fold)
    # The loader's batches are consecutive slices of this permutation (a pure function of seed and epoch).
    order = fold.train.draws(epoch).order
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch, (images, labels) in enumerate(fold.train.epoch(epoch)):
        if specific:
            set_domain(model, fold.train_domains[order[batch * tc.batch_size : (batch + 1) * tc.batch_size]])
        with _autocast(device, tc.amp):
            logits = fold.forward(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=tc.label_smoothing)
        fold.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fold.optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
    return loss_sum.item(), float(correct.item()), len(fold.train) * tc.batch_size


def _evaluate_fold(fold: Fold, config: TrialConfig) -> Metrics:
    """The fold's source validation (pooled over its sources) and target scores, keyed by the fold."""
    amp, name = config.train.amp, fold.name
    scores = [predict_domain(fold.model, loader, config.data, amp) for loader in fold.sources]
    count = sum(s.count for s in scores)
    target = predict_domain(fold.model, fold.target, config.data, amp)
    metrics = {
        "val_loss": sum(s.loss * s.count for s in scores) / max(count, 1),
        "val_acc": sum(s.acc * s.count for s in scores) / max(count, 1),
        "target_loss": target.loss,
        "target_acc": target.acc,
        f"target_loss/{name}": target.loss,
        f"target_acc/{name}": target.acc,
    }
    if target.distances is not None and target.weights is not None:
        sources = fold.split.sources
        between = source_distances(fold.model)
        for i, source in enumerate(sources):
            metrics[f"target_w2/{name}/{name}/{source}"] = float(target.distances[i])
            metrics[f"target_weight/{name}/{source}"] = float(target.weights[i])
            metrics.update(
                (f"target_w2/{name}/{source}/{other}", float(between[i, j]))
                for j, other in enumerate(sources)
                if j > i
            )
    return metrics


def _fold_features(fold: Fold) -> Metrics:
    """The fold's feature statistics on its probe, sites named `<target>/<site>`; domain-specific layers are
    measured as one site each (after their shared affine), as plain BNs are in the other methods."""
    assert fold.probe is not None
    if not _domain_specific(fold):
        stats = measure_feature_stats(fold.model, fold.probe)
    else:
        sites = [site for site in norm_sites(fold.model) if ".bns." not in site]
        with using_domain(fold.model, fold.probe_domains):
            stats = measure_feature_stats(fold.model, fold.probe, sites)
    return {key.replace("fm/", f"fm/{fold.name}/", 1): value for key, value in stats.items()}


# ------------------------------------------------------------------------------------------------- trial


@dataclass
class DomainTrainResult:
    status: str  # "completed" | "diverged"
    epochs_run: int
    best_val_acc: float
    best_epoch: int
    history: list[Metrics] = field(default_factory=list)
    folds: list[Fold] = field(default_factory=list)


# Each is the mean over the trial's folds; the folds' own values are keyed by their target.
FOLD_MEANS = ("train_loss", "train_acc", "val_loss", "val_acc", "target_loss", "target_acc")


def train_domains(
    config: TrialConfig,
    *,
    dataset: DomainDataset,
    report: ReportFn | None = None,
    resume: Checkpoint | None = None,
) -> DomainTrainResult:
    """Trains every fold of `config.data.target` to `config.train.epochs` (or until a loss diverges),
    calling `report` once per epoch as `sbn_study.trial.train.train` does, with the folds' results."""
    tc = config.train
    device = resolve_device(tc.device)
    folds = [_fold(config, dataset, target, device) for target in fold_targets(config.data, dataset)]
    torch.manual_seed(tc.seed)
    result = DomainTrainResult(status="completed", epochs_run=0, best_val_acc=-1.0, best_epoch=0, folds=folds)
    start_epoch = 0
    if resume is not None:
        for fold, state in zip(folds, resume["folds"], strict=True):
            fold.model.load_state_dict(state["model"])
            fold.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(resume["rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        start_epoch = result.epochs_run = resume["epoch"]
        result.best_val_acc, result.best_epoch = resume["best_val_acc"], resume["best_epoch"]
        result.history = list(resume["history"])

    def features_due(epoch: int) -> bool:
        return config.features.enabled and epoch % config.features.interval == 0

    if start_epoch == 0 and features_due(0):
        initial: Metrics = {"epoch": 0.0}
        for fold in folds:
            initial.update(_fold_features(fold))
        result.history.append(initial)
        if report is not None:
            report(initial, None)

    system = SystemSampler(device)
    for epoch in range(start_epoch, tc.epochs):
        epoch_start = time.perf_counter()
        lr = lr_at(config, epoch)
        metrics: Metrics = {"epoch": float(epoch + 1)}
        per_fold: list[Metrics] = []
        train_seconds, trained = 0.0, 0
        for fold in folds:
            for group in fold.optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            loss_sum, correct, count = _train_epoch(fold, config, epoch)
            train_seconds += time.perf_counter() - started
            trained += count
            if not math.isfinite(loss_sum):
                result.status = "diverged"
                break
            per_fold.append({"train_loss": loss_sum / count, "train_acc": correct / count})
        if result.status == "diverged":
            metrics.update(train_loss=math.inf, diverged=1.0, lr=lr)
        else:
            for fold, values in zip(folds, per_fold, strict=True):
                values.update(_evaluate_fold(fold, config))
                metrics.update((k, v) for k, v in values.items() if k not in FOLD_MEANS)
                if features_due(epoch + 1):
                    metrics.update(_fold_features(fold))
            metrics.update((k, sum(values[k] for values in per_fold) / len(per_fold)) for k in FOLD_MEANS)
            metrics.update(lr=lr, images_per_s=trained / train_seconds)
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        metrics.update(system.sample())
        result.epochs_run = epoch + 1
        if metrics.get("val_acc", -1.0) > result.best_val_acc:
            result.best_val_acc, result.best_epoch = metrics["val_acc"], epoch + 1
        result.history.append(metrics)

        def make_checkpoint(epoch_done: int = epoch + 1) -> Checkpoint:
            return {
                "epoch": epoch_done,
                "folds": [
                    {"model": f.model.state_dict(), "optimizer": f.optimizer.state_dict()} for f in folds
                ],
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "best_val_acc": result.best_val_acc,
                "best_epoch": result.best_epoch,
                "history": list(result.history),
            }

        if report is not None:
            report(metrics, make_checkpoint)
        if result.status == "diverged":
            break
    return result
