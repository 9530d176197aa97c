"""What the evaluation suites share: a model seen as a classifier of images in [0, 1] pixel units, and seeded
random streams.

The suites perturb images in pixel units (a corruption works on uint8 images, a Fourier perturbation on floats
in [0, 1]), so the classifier normalizes them itself, with the training split's statistics as `DeviceLoader`
does. It runs the model in eval mode (running statistics for BN and SBN, so the batch size changes nothing but
memory) and under whatever autocast context the caller set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sbn_study.trial.data import _seed_of

# Images per random stream: a corruption or perturbation of an image depends on the seed and on the block the
# image falls in, never on the evaluation batch size.
BLOCK = 1000


@dataclass(frozen=True)
class Classifier:
    model: nn.Module  # on `device`
    mean: Sequence[float]  # per channel, in [0, 1] units
    std: Sequence[float]
    device: torch.device
    batch_size: int = 500

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 N×classes logits on `device` of uint8 images (0..255) or floating ones in [0, 1] units."""
        mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
        # DeviceLoader's constants and operations for uint8 images: the model gets the very inputs `evaluate`
        # gives it. Out of place, since a float batch may be the caller's own tensor.
        levels = 255.0 if images.dtype == torch.uint8 else 1.0
        scale = (1.0 / (levels * std)).to(self.device, torch.float32)
        shift = (mean / std).to(self.device, torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [
                self.model(batch.to(self.device).float() * scale - shift).float()
                for batch in images.split(self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(parts)

    def errors(self, images: torch.Tensor, labels: torch.Tensor) -> int:
        """How many of `images` the model misclassifies."""
        predictions = self.logits(images).argmax(1)
        return int((predictions != labels.to(self.device)).sum())


def generator(device: torch.device, *key: object) -> torch.Generator:
    """A generator on `device` seeded by a hash of `key`: one independent stream per (seed, what, block)."""
    return torch.Generator(device=device).manual_seed(_seed_of(*key))
