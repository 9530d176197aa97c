"""The suites of `sbn_study.evaluate` on final-training weights: what `train` runs on every seed's
best-validation checkpoint (in the seed's Ray task, right after its test pass) and `evaluate` on a finished run.

- `EvaluationOptions`: which suites, and the Fourier heat map's grid. By default all three suites, and the heat
  map at stride 2 (the 16×16 frequencies whose f_h and f_w are even: 136 measured, by symmetry) on the first 256
  test images. On the quick start's tiny model (512 test images, one CPU thread) that is 9.6 s, as long as
  stride 4 on 512 images (an 8×8 map), against about 224 s for Yin et al.'s full 32×32 grid
  (`--fourier-stride 1`); the corruptions take 14 s and calibration 0.3 s. 256 images put the standard error of
  one entry near 3 points; the mean over the map, the figure the arms are compared on, is far steadier.
- The checkpoint (`checkpoint.pt`): the tested weights with the resolved configuration they belong to and
  their epoch, so that a file alone can be evaluated again.
- The files (`evaluation/` beside it, and in the run's artifacts): `fourier_heat_map.csv` (error per frequency,
  centred as `fourier` returns it, NaN where not measured) and `.png`, `reliability.csv` (per ECE bin, before
  and after temperature scaling: what a reliability diagram draws).
- `COMPARED`: the figures the arms are compared on, seed by seed, as accuracy is (`compare_suites`); and
  `versus_bn`, the corruption errors relative to the BN arm on the same seed, as the robustness literature
  reports them.
The suites run in float32 whatever `train.amp` says, so that a figure does not depend on the device's autocast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbn_study.errors import UserError
from sbn_study.final.comparison import ArmSummary, PairedDifference, SeedScore, compare_arms
from sbn_study.protocol import TrialStatus

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sbn_study.evaluate.suites import SuiteConfig
    from sbn_study.results.export import FinalConfig
    from sbn_study.trial.data import ImageDataset

SUITE_NAMES = ("corruptions", "fourier", "calibration")  # evaluate.suites.SUITES, without importing torch
CHECKPOINT = "checkpoint.pt"
# A seed run's MLflow model (`final.model`): the folder of its artifacts that holds the checkpoint.
MODEL = "model"
FOLDER = "evaluation"  # the files' folder beside the checkpoint, and in the run's artifacts
HEAT_MAP_CSV, HEAT_MAP_PNG, RELIABILITY_CSV = (
    "fourier_heat_map.csv",
    "fourier_heat_map.png",
    "reliability.csv",
)
_CHECKPOINT_FORMAT = "sbn-study final checkpoint 1"

# Figure → what the table calls it; lower is better for every one.
COMPARED = {
    "robust/mce": "mean corruption error",
    "fourier/heat_map/mean_error": "Fourier heat map: mean error",
    "fourier/heat_map/max_error": "Fourier heat map: max error",
    "calib/ece": "ECE",
    "calib/nll": "NLL",
    "calib/brier": "Brier",
    "calib/ece_ts": "ECE after temperature scaling",
}
# Each seed's figures relative to the BN arm's on the same seed (`robustness.versus_reference`).
BN_ARM = "bn"

Comparison = tuple[dict[str, ArmSummary], list[PairedDifference]]


@dataclass(frozen=True)
class EvaluationOptions:
    suites: tuple[str, ...] = SUITE_NAMES
    fourier_stride: int = 2
    fourier_images: int = 256

    def suite_config(self) -> SuiteConfig:
        from sbn_study.evaluate.fourier import FourierConfig
        from sbn_study.evaluate.suites import SuiteConfig

        return SuiteConfig(
            fourier=FourierConfig(stride=self.fourier_stride, heat_map_images=self.fourier_images)
        )


NO_SUITES = EvaluationOptions(suites=())


def check_suites(names: Sequence[str] | None, option: str = "--suites") -> tuple[str, ...]:
    """`names` in the order given (None: every suite), refused in one line when one is unknown; "none" alone
    is no suite."""
    if names is None:
        return SUITE_NAMES
    if tuple(names) == ("none",):
        return ()
    unknown = [name for name in names if name not in SUITE_NAMES]
    if unknown:
        raise UserError(
            f"{option}: unknown suite {', '.join(map(repr, unknown))}; expected some of "
            f"{', '.join(SUITE_NAMES)}, or none"
        )
    return tuple(names)


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    heat_map: torch.Tensor | None  # without the fourier suite: None
    reliability: (
        torch.Tensor | None
    )  # bins × (count, Σ correct, Σ confidence, the same scaled); no calibration


def evaluate_model(model: nn.Module, dataset: ImageDataset, options: EvaluationOptions) -> Evaluation:
    """The suites of `options` for `model` (on its device, weights loaded) on `dataset`'s test split."""
    import torch

    from sbn_study.evaluate.calibration import reliability
    from sbn_study.evaluate.inference import Classifier
    from sbn_study.evaluate.suites import run_suites

    device = next(model.parameters()).device
    config = options.suite_config()
    result = run_suites(model, dataset, device, options.suites, config)
    bins = None
    if "calibration" in options.suites:
        classifier = Classifier(model, dataset.mean, dataset.std, device, config.batch_size)
        logits, labels = classifier.logits(dataset.test.images).double(), dataset.test.labels.to(device)
        temperature = result.metrics.get("calib/temperature", 1.0)
        bins = torch.cat(
            [
                reliability(logits, labels, config.ece_bins),
                reliability(logits / temperature, labels, config.ece_bins),
            ],
            1,
        ).cpu()
    return Evaluation(result.metrics, result.heat_map, bins)


def save_checkpoint(path: Path, config: Mapping[str, Any], state: Mapping[str, Any], epoch: int) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": _CHECKPOINT_FORMAT, "config": dict(config), "state_dict": dict(state), "epoch": epoch},
        path,
    )


def load_checkpoint(path: Path) -> tuple[FinalConfig, dict[str, Any], int]:
    """The configuration, weights and epoch of a `checkpoint.pt`; a file that is none is refused in one line."""
    import pickle

    import torch

    from sbn_study.results.export import FinalConfig

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"{path}: not a checkpoint of `sbn-study train` ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of `sbn-study train` (no {_CHECKPOINT_FORMAT!r} in it)")
    return FinalConfig.model_validate(saved["config"]), saved["state_dict"], int(saved["epoch"])


def model_from_checkpoint(
    config: FinalConfig,
    state: Mapping[str, Any],
    num_classes: int,
    input_size: tuple[int, int],
    device: torch.device,
) -> nn.Module:
    from sbn_study.trial.models import create_model_from_config

    model = create_model_from_config(config.model, config.norm, num_classes, input_size)
    model.load_state_dict(state)
    return model.to(device)


def write_files(evaluation: Evaluation, folder: Path, title: str) -> list[Path]:
    """The heat map (CSV and PNG) and the reliability table of `evaluation` in `folder`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no window, whatever display the driver has
    import matplotlib.pyplot as plt
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if evaluation.heat_map is not None:
        np.savetxt(folder / HEAT_MAP_CSV, evaluation.heat_map.numpy(), delimiter=",", fmt="%.6g")
        figure = heat_map_figure({title: evaluation.heat_map})
        figure.savefig(folder / HEAT_MAP_PNG, dpi=120)
        plt.close(figure)
        written += [folder / HEAT_MAP_CSV, folder / HEAT_MAP_PNG]
    if evaluation.reliability is not None:
        header = "bin_low,bin_high,count,correct,confidence,count_ts,correct_ts,confidence_ts"
        edges = np.linspace(0, 1, evaluation.reliability.shape[0] + 1)
        table = np.column_stack([edges[:-1], edges[1:], evaluation.reliability.numpy()])
        np.savetxt(folder / RELIABILITY_CSV, table, delimiter=",", header=header, comments="", fmt="%.10g")
        written.append(folder / RELIABILITY_CSV)
    return written


def heat_map_figure(maps: Mapping[str, torch.Tensor], columns: int = 4) -> Any:
    """Centred Fourier heat maps side by side on one colour scale, each cut to the frequencies it measured
    (what the seeds' files hold, and what `dashboards/robustness.ipynb` draws).

    The scale spans the errors measured, and ends at the largest away from the constant: a constant perturbation shifts each channel's
    colour as a whole, often costs far more than any pattern, and would leave the rest of the map one colour;
    the constant then shows the top colour (the colour bar's arrow) whatever its error.
    """
    import matplotlib.pyplot as plt

    count = len(maps)
    rows, cols = math.ceil(count / columns), min(count, columns)
    figure, axes = plt.subplots(
        rows, cols, figsize=(3.4 * cols + 1.0, 3.2 * rows), squeeze=False, layout="constrained"
    )

    def patterns(heat: torch.Tensor) -> torch.Tensor:
        heat = heat.clone()
        heat[heat.shape[0] // 2, heat.shape[1] // 2] = math.nan  # the constant, centred by fftshift
        return heat[~heat.isnan()]

    every = [float(m[~m.isnan()].max()) for m in maps.values()]  # a grid so coarse it measured no pattern
    top = max((float(patterns(m).max()) for m in maps.values() if patterns(m).numel()), default=max(every))
    bottom = min(float(m[~m.isnan()].min()) for m in maps.values())
    image = None
    for ax, (title, heat) in zip(axes.flat, maps.items(), strict=False):
        rows_kept = (~heat.isnan()).any(1).nonzero().squeeze(1)
        cols_kept = (~heat.isnan()).any(0).nonzero().squeeze(1)
        shown = heat[rows_kept][:, cols_kept]
        # fftshift put frequency 0 at index H//2: an index's frequency is its offset from there.
        freq_h, freq_w = (rows_kept - heat.shape[0] // 2).tolist(), (cols_kept - heat.shape[1] // 2).tolist()
        image = ax.imshow(shown.numpy(), cmap="viridis", vmin=bottom, vmax=top, interpolation="nearest")
        step = max(1, len(freq_w) // 4)
        ax.set_xticks(range(0, len(freq_w), step), [str(f) for f in freq_w[::step]])
        ax.set_yticks(range(0, len(freq_h), step), [str(f) for f in freq_h[::step]])
        ax.set_title(title)
        ax.set_xlabel("f_w (cycles per image)")
        ax.set_ylabel("f_h")
    for ax in list(axes.flat)[count:]:
        ax.set_axis_off()
    figure.colorbar(image, ax=axes.ravel().tolist(), label="top-1 error under the perturbation", extend="max")
    return figure


def compare_suites(
    seeds: Sequence[tuple[str, int, str, Mapping[str, float]]], reference: str
) -> dict[str, Comparison]:
    """Every figure of `COMPARED` that some seed has, compared across arms as accuracy is: (arm, seed, status,
    metrics) per seed. A completed seed without the figure counts as failed for it."""
    comparisons = {}
    for figure in COMPARED:
        if not any(figure in metrics for *_, metrics in seeds):
            continue
        scores = []
        for arm, seed, status, metrics in seeds:
            value = metrics.get(figure, math.nan)
            measured = status != TrialStatus.COMPLETED or math.isfinite(value)
            scores.append(SeedScore(arm, seed, status if measured else TrialStatus.ERROR.value, value))
        comparisons[figure] = compare_arms(scores, reference)
    return comparisons


def versus_bn(metrics: Mapping[str, float], bn_metrics: Mapping[str, float]) -> dict[str, float]:
    """One seed's corruption errors relative to the BN arm's on the same seed; {} without both."""
    from sbn_study.evaluate.robustness import PREFIX, CorruptionResult, versus_reference

    clean = f"{PREFIX}/clean/error"
    if clean not in metrics or clean not in bn_metrics:
        return {}
    mine, bn = CorruptionResult.from_metrics(metrics), CorruptionResult.from_metrics(bn_metrics)
    return versus_reference(mine, bn)


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What `sbn-study evaluate` measured: on whose weights, the figures, and where they went."""

    what: str  # "run <id> (<arm>, seed <seed>)" or the checkpoint's path
    epoch: int
    metrics: dict[str, float]
    folder: Path | None  # where the files were written; None when they went to the run alone
    files: tuple[str, ...]
    run_id: str | None  # the run they were logged to


def _evaluate_weights(
    config: FinalConfig, state: Mapping[str, Any], options: EvaluationOptions
) -> Evaluation:
    from sbn_study.trial.data import load_dataset
    from sbn_study.trial.train import resolve_device

    dataset = load_dataset(config.data)
    input_size = (dataset.train.images.shape[-2], dataset.train.images.shape[-1])
    device = resolve_device(config.train.device)
    model = model_from_checkpoint(config, state, dataset.num_classes, input_size, device)
    return evaluate_model(model, dataset, options)


def evaluate_checkpoint(path: Path, options: EvaluationOptions) -> CheckpointEvaluation:
    """The suites on a checkpoint file; its files go to `evaluation/` beside it."""
    config, state, epoch = load_checkpoint(path)
    evaluation = _evaluate_weights(config, state, options)
    folder = path.parent / FOLDER
    files = write_files(evaluation, folder, path.parent.name)
    return CheckpointEvaluation(
        str(path), epoch, evaluation.metrics, folder, tuple(f.name for f in files), None
    )


def evaluate_run(uri: str, run_id: str, options: EvaluationOptions) -> CheckpointEvaluation:
    """The suites on the checkpoint of a seed run of `sbn-study train`, logged to that run: the figures at
    the tested epoch's step, as `train` logs them, and the files as its `evaluation/` artifacts."""
    import tempfile

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from sbn_study.store.runs import KIND_TAG, open_client
    from sbn_study.store.uri import redact_uri

    client = open_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(
            f"no run {run_id!r} in {redact_uri(uri)}, and no checkpoint file of that name"
        ) from None
    tags = run.data.tags
    if tags.get(KIND_TAG) != "final" or "sbn.seed" not in tags:
        raise UserError(f"run {run_id} is no seed run of `sbn-study train`: only those have a checkpoint")
    artifact = f"{MODEL}/{CHECKPOINT}"
    if artifact not in {found.path for found in client.list_artifacts(run_id, MODEL)}:
        raise UserError(
            f"run {run_id} has no {artifact} artifact (its seed never validated, or `train` ran before it "
            "kept the tested weights): nothing to evaluate"
        )
    what = f"run {run_id} ({tags['sbn.arm']}, seed {tags['sbn.seed']})"
    with tempfile.TemporaryDirectory() as local:
        config, state, epoch = load_checkpoint(Path(client.download_artifacts(run_id, artifact, local)))
        evaluation = _evaluate_weights(config, state, options)
        files = write_files(evaluation, Path(local) / FOLDER, f"{tags['sbn.arm']}, seed {tags['sbn.seed']}")
        metrics = [Metric(key, value, 0, epoch) for key, value in evaluation.metrics.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
        for path in files:
            client.log_artifact(run_id, str(path), FOLDER)
    return CheckpointEvaluation(what, epoch, evaluation.metrics, None, tuple(f.name for f in files), run_id)
