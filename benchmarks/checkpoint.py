"""What a trial's own checkpoint costs per epoch (`sbn_study.tune.checkpoints.TrialStates.save`) on local disk,
against the compute of the epoch it follows, for ResNet-18 (the CIFAR-100 study's base configuration, SBN34)
and the quick-start's tiny model.

The state is what `train()` hands to the trainable: the model's state dict, the optimizer's (SGD with its
momentum buffers, filled by real steps), the RNG state, and the history of what the trial reported, at the
length it has in the trial's last epoch (the study's `train.epochs`, feature statistics every
`features.interval` epochs, measured once on the model for their names). A save is the whole of it:
`torch.save` into memory, the write under a temporary name, fsync, rename, fsync of the folder; the median of
`ROUNDS` saves into a temporary folder on the disk that holds the system's temporary files. A load (what a
restarted trial does once) stands beside it.

The epoch it is compared with, at torch's default thread count on this machine (a trial with fewer threads
trains slower, so the share would be smaller):
- tiny: measured, one whole epoch of the quick-start (`train()` with one epoch: training, evaluation and the
  feature statistics it measures that epoch), as `epoch_time_s` says;
- ResNet-18: estimated, from `STEPS` measured training steps (forward, backward, SGD step at the spec's batch
  size, after one warm-up step) times the steps of an epoch of CIFAR-100's 45,000 training images; evaluation
  is left out, which makes the epoch shorter than it is and the share larger.

Run: `python -m benchmarks checkpoint` from the repository root.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sbn_study.spec import load_spec
from sbn_study.spec.config import TrialConfig
from sbn_study.trial.featstats import measure_feature_stats
from sbn_study.trial.models import create_model_from_config
from sbn_study.trial.train import make_optimizer, train
from sbn_study.tune.checkpoints import TrialStates

NAME = "checkpoint"
TARGET = "save < 2 % of an epoch"

SPECS = Path(__file__).resolve().parents[1] / "search_spaces"
SHARE_LIMIT = 0.02
ROUNDS = 7
STEPS = 3
CIFAR100_TRAIN_IMAGES = 50_000 - 5_000  # the study's val_size is held out
CIFAR100_CLASSES = 100


def _history(config: TrialConfig, model: torch.nn.Module) -> list[dict[str, float]]:
    """What a trial reported by its last epoch: every epoch's metrics, feature statistics at the interval."""
    features = measure_feature_stats(model, torch.randn(8, 3, 32, 32))
    epoch = {
        "train_loss": 1.0,
        "train_acc": 0.5,
        "lr": 0.1,
        "images_per_s": 1e3,
        "val_loss": 1.0,
        "val_acc": 0.5,
        "epoch_time_s": 10.0,
    }
    interval = config.features.interval
    return [
        {"epoch": float(e), **epoch, **(features if interval and e % interval == 0 else {})}
        for e in range(1, config.train.epochs + 1)
    ]


def _state(config: TrialConfig, num_classes: int, steps: int) -> tuple[dict[str, Any], float]:
    """The checkpoint of a trial in its last epoch, after `steps` timed training steps (and one warm-up) that
    fill the optimizer's momentum; and the median seconds of those steps."""
    torch.manual_seed(0)
    model = create_model_from_config(config.model, config.norm, num_classes)
    optimizer = make_optimizer(model, config)
    batch = config.train.batch_size
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, num_classes, (batch,))
    seconds = []
    for _ in range(1 + steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    state = {
        "epoch": config.train.epochs,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": None,
        "best_val_acc": 0.5,
        "best_epoch": config.train.epochs,
        "history": _history(config, model),
    }
    return state, statistics.median(seconds[1:])


def _megabytes(tensors: Any) -> float:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size() / 1e6
    if isinstance(tensors, dict):
        return sum(_megabytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(_megabytes(v) for v in tensors)
    return 0.0


def _save_and_load(state: dict[str, Any], rounds: int) -> tuple[float, float]:
    """Median seconds of a save and of a load, into and from a fresh study folder on local disk."""
    with tempfile.TemporaryDirectory() as folder:
        states = TrialStates(folder)
        states.prepare(keep=())
        saves, loads = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            states.save("bench", state)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            states.load("bench")
            loads.append(time.perf_counter() - start)
    return statistics.median(saves), statistics.median(loads)


def _row(name: str, state: dict[str, Any], epoch_s: float, epoch_kind: str, rounds: int) -> dict[str, object]:
    file, history = io.BytesIO(), io.BytesIO()
    torch.save(state, file)
    torch.save(state["history"], history)
    save_s, load_s = _save_and_load(state, rounds)
    return {
        "model": name,
        "parameters": f"{sum(t.numel() for t in state['model'].values() if t.is_floating_point()):,}",
        "file MB": f"{file.tell() / 1e6:.2f}",
        "model MB": f"{_megabytes(state['model']):.2f}",
        "optimizer MB": f"{_megabytes(state['optimizer']):.2f}",
        "history KB": f"{history.tell() / 1e3:.0f} ({len(state['history'])} epochs)",
        "save ms": f"{save_s * 1e3:.1f}",
        "load ms": f"{load_s * 1e3:.1f}",
        "epoch s": f"{epoch_s:.2f} ({epoch_kind})",
        "save / epoch": f"{save_s / epoch_s:.3%}",
    }


def run(quick: bool = False) -> list[dict[str, object]]:
    rounds, steps = (2, 1) if quick else (ROUNDS, STEPS)

    tiny = load_spec(SPECS / "quickstart.yaml").base_config()
    one_epoch = tiny.model_copy(update={"train": tiny.train.model_copy(update={"epochs": 1})})
    epoch_s = train(one_epoch).history[-1]["epoch_time_s"]
    state, _ = _state(tiny, tiny.data.synthetic.num_classes, steps)
    rows = [_row("tiny (quick-start)", state, epoch_s, "measured", rounds)]

    resnet = load_spec(SPECS / "cifar100.yaml").base_config()
    state, step_s = _state(resnet, CIFAR100_CLASSES, steps)
    per_epoch = CIFAR100_TRAIN_IMAGES // resnet.train.batch_size
    estimate = f"estimated: {per_epoch} steps × {step_s:.2f} s"
    rows.append(_row("ResNet-18 SBN34 (CIFAR-100)", state, step_s * per_epoch, estimate, rounds))
    return rows


def verdict(rows: list[dict[str, object]]) -> str:
    worst = max(rows, key=lambda row: float(str(row["save / epoch"]).rstrip("%")))
    share = float(str(worst["save / epoch"]).rstrip("%")) / 100
    met = "met" if share < SHARE_LIMIT else "NOT met"
    return (
        f"{met}: at most {worst['save / epoch']} of an epoch ({worst['model']}, {worst['save ms']} ms a save)"
    )
