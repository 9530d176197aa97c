"""The training core of one trial, in the order it runs (airbench style): device, data, model, optimizer,
epochs. Usable on its own from Python; the Ray trainable and final training wrap it.

`train(config, report=...)` calls `report(metrics, make_checkpoint)` once per finished epoch. The step loop
never synchronises with the host: losses and correct counts accumulate on the device and are read once per
epoch, which is also when divergence (a non-finite training loss) is detected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbn_study.errors import UserError
from sbn_study.spec.config import TrialConfig
from sbn_study.trial.data import DeviceLoader, ImageDataset, Split, load_dataset
from sbn_study.trial.featstats import measure_feature_stats
from sbn_study.trial.models import create_model_from_config
from sbn_study.trial.norms import norm_parameters
from sbn_study.trial.system import SystemSampler

Metrics = dict[str, float]
Checkpoint = dict[str, Any]
# `make_checkpoint` is None for the epoch-0 report (feature statistics of the untrained network only).
ReportFn = Callable[[Metrics, Callable[[], Checkpoint] | None], None]


@dataclass
class TrainResult:
    status: str  # "completed" | "diverged"
    epochs_run: int
    best_val_acc: float
    best_epoch: int
    history: list[Metrics] = field(default_factory=list)
    model: nn.Module | None = None
    # Weights of the best-validation epoch, kept on the CPU when `keep_best=True` (final training).
    best_state: dict[str, torch.Tensor] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(config: TrialConfig, epoch: int) -> float:
    """Learning rate of a whole epoch (0-based); a pure function of the epoch so resuming needs no state."""
    train = config.train
    lr = train.lr * min(1.0, (epoch + 1) / (train.warmup_epochs + 1))
    if train.schedule == "constant":
        return lr
    if train.schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * epoch / train.epochs))
    milestones = train.milestones or [round(train.epochs * f) for f in (0.3, 0.6, 0.8)]
    return lr * train.gamma ** sum(epoch >= m for m in milestones)


def make_optimizer(model: nn.Module, config: TrialConfig) -> torch.optim.SGD:
    train = config.train
    params: list[dict[str, Any]] = [{"params": list(model.parameters()), "weight_decay": train.weight_decay}]
    if not train.norm_weight_decay:
        norm_ids = {id(p) for p in norm_parameters(model)}
        params = [
            {
                "params": [p for p in model.parameters() if id(p) not in norm_ids],
                "weight_decay": train.weight_decay,
            },
            {"params": [p for p in model.parameters() if id(p) in norm_ids], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov)


def _autocast(device: torch.device, enabled: bool):
    # bf16 needs no loss scaling; SBN upcasts to float32 internally because bf16 FFTs do not exist.
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader, *, amp: bool = False) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader's split, with the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for images, labels in loader.epoch(0):
        with _autocast(device, amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    n = max(loader.num_images, 1)
    return loss_sum.item() / n, correct.item() / n


def on_device(
    model: nn.Module, dataset: ImageDataset, channels_last: bool, device: torch.device
) -> tuple[nn.Module, dict[str, Any]]:
    """The model on `device` in the memory format training uses there, and the DeviceLoader options that feed
    it in the same format with the dataset's normalization."""
    # channels_last pays off only in CUDA's convolution kernels.
    memory_format = (
        torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    )
    options = {
        "device": device,
        "mean": dataset.mean,
        "std": dataset.std,
        "channels_last": memory_format is torch.channels_last,
    }
    return model.to(device, memory_format=memory_format), options


def probe_batch(dataset: ImageDataset, config: TrialConfig, device: torch.device) -> torch.Tensor:
    # A fixed batch (the first images of the validation split, unaugmented) so that every measurement,
    # in every trial, looks at the same inputs.
    # Batch statistics need 2 images at least: a smaller validation split lends the probe training images.
    source = dataset.val if dataset.val.labels.numel() >= 2 else dataset.train
    probe = Split(source.images[: config.features.probe_size], source.labels[: config.features.probe_size])
    loader = DeviceLoader(
        probe,
        config.features.probe_size,
        device=device,
        train=False,
        augment=False,
        mean=dataset.mean,
        std=dataset.std,
    )
    images, _ = next(iter(loader.epoch(0)))
    return images


def train(
    config: TrialConfig,
    *,
    dataset: ImageDataset | None = None,
    report: ReportFn | None = None,
    resume: Checkpoint | None = None,
    keep_best: bool = False,
) -> TrainResult:
    """Trains `config` to `config.train.epochs` (or until the loss diverges); see the module docstring."""
    tc = config.train
    device = resolve_device(tc.device)
    on_cuda = device.type == "cuda"
    torch.manual_seed(tc.seed)
    dataset = dataset if dataset is not None else load_dataset(config.data)

    input_size = (dataset.train.images.shape[-2], dataset.train.images.shape[-1])
    model = create_model_from_config(config.model, config.norm, dataset.num_classes, input_size)
    model, loader_options = on_device(model, dataset, tc.channels_last, device)
    optimizer = make_optimizer(model, config)
    forward = torch.compile(model) if tc.compile else model

    train_loader = DeviceLoader(
        dataset.train, tc.batch_size, train=True, augment=config.data.augment, seed=tc.seed, **loader_options
    )
    val_loader = DeviceLoader(dataset.val, tc.eval_batch_size, train=False, augment=False, **loader_options)
    if len(train_loader) == 0:
        raise UserError(
            f"train.batch_size: {tc.batch_size} is larger than the {dataset.train.labels.numel()} training images"
        )
    probe = probe_batch(dataset, config, device) if config.features.enabled else None

    result = TrainResult(status="completed", epochs_run=0, best_val_acc=-1.0, best_epoch=0, model=model)
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["rng"])
        if on_cuda and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        start_epoch = resume["epoch"]
        result.best_val_acc, result.best_epoch = resume["best_val_acc"], resume["best_epoch"]
        result.epochs_run = start_epoch
        result.history = list(resume["history"])

    def features_due(epoch: int) -> bool:
        return probe is not None and epoch % config.features.interval == 0

    if start_epoch == 0 and features_due(0):
        # Epoch 0 = the untrained network, reported as its own step so curves start at initialization.
        initial: Metrics = {"epoch": 0.0, **measure_feature_stats(model, probe)}
        result.history.append(initial)
        if report is not None:
            report(initial, None)

    system = SystemSampler(device)
    for epoch in range(start_epoch, tc.epochs):
        epoch_start = time.perf_counter()
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for images, labels in train_loader.epoch(epoch):
            with _autocast(device, tc.amp):
                logits = forward(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=tc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * labels.numel()
            correct += (logits.argmax(1) == labels).sum()
        n_train = len(train_loader) * tc.batch_size
        train_loss = loss_sum.item() / n_train
        train_seconds = time.perf_counter() - epoch_start
        metrics: Metrics = {
            "epoch": float(epoch + 1),
            "train_loss": train_loss,
            "train_acc": correct.item() / n_train,
            "lr": lr,
            "images_per_s": n_train / train_seconds,
        }
        diverged = not math.isfinite(train_loss)
        if diverged:
            result.status = "diverged"
            metrics["diverged"] = 1.0
        else:
            metrics["val_loss"], metrics["val_acc"] = evaluate(model, val_loader, amp=tc.amp)
            if features_due(epoch + 1):
                metrics.update(measure_feature_stats(model, probe))
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        metrics.update(system.sample())
        result.epochs_run = epoch + 1
        val_acc = metrics.get("val_acc", -1.0)
        if val_acc > result.best_val_acc:
            result.best_val_acc, result.best_epoch = val_acc, epoch + 1
            if keep_best:
                result.best_state = {
                    k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
                }
        result.history.append(metrics)

        def make_checkpoint(epoch_done: int = epoch + 1) -> Checkpoint:
            return {
                "epoch": epoch_done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if on_cuda else None,
                "best_val_acc": result.best_val_acc,
                "best_epoch": result.best_epoch,
                # What was reported so far (a few KB per epoch): a resumed trial can send it again.
                "history": list(result.history),
            }

        if report is not None:
            report(metrics, make_checkpoint)
        if diverged:
            break
    return result
