"""Pretrained weights from a local file in torchvision's state-dict format (`model.weights`): nothing downloads.

The models here keep torchvision's module names, so a torchvision ResNet's tensors land on the same names, with
two exceptions. The classifier `fc` is not loaded: the dataset has its own classes. A norm site where the
placement put another kind than plain BN takes the file's BN into that kind's own first BN where it has one
(`sbn` and `2bn` sites are a plain BN followed by the placed layer: `<site>.bn`); any other placed norm starts
from its own initialization. Every convolution must come from the file with its shape: a file of another
architecture or stem is refused in one line, naming the first tensor that does not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sbn_study.errors import UserError, one_line

# The classifier's prefix in torchvision's ResNets (and here): trained for ImageNet's 1,000 classes.
CLASSIFIER = "fc."


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(map(str, tensor.shape)) or "a scalar"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The name → tensor mapping saved at `path` (on the CPU); UserError naming `model.weights` otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a missing file, a pickle of something else, a truncated download
        raise UserError(
            f"model.weights: cannot read {path}: {one_line(exc, with_type=True, limit=200)}"
        ) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"model.weights: {path} is not a state dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: str | Path, described: str) -> nn.Module:
    """Loads the file at `path` into `model` (see the module docstring) and returns it; `described` names the
    model in errors ("resnet18 (stem imagenet)")."""
    state = read_state_dict(path)
    modules = dict(model.named_modules())
    ours = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}

    def refuse(problem: str) -> UserError:
        return UserError(f"model.weights: {path} does not fit {described}: {problem}")

    for key, tensor in state.items():
        if key.startswith(CLASSIFIER):
            continue
        site, _, leaf = key.rpartition(".")
        if site not in modules:
            raise refuse(f"the file has {key}, which the model lacks")
        target = _target(modules, site, leaf)
        if target is None:
            continue  # a placed norm without a plain BN to take the file's: it keeps its own initialization
        if target not in ours:
            raise refuse(f"the file has {key}, which the model lacks")
        if ours[target].shape != tensor.shape:
            raise refuse(f"{key} is {_shape(tensor)} in the file, {_shape(ours[target])} in the model")
        loaded[target] = tensor
    missing = [
        name
        for name, module in modules.items()
        if isinstance(module, nn.Conv2d | nn.Linear)
        and not f"{name}.".startswith(CLASSIFIER)
        and f"{name}.weight" not in loaded
    ]
    if missing:
        raise refuse(
            f"the file has no {missing[0]}.weight"
            + (f" (nor {len(missing) - 1} more)" if missing[1:] else "")
        )
    model.load_state_dict(loaded, strict=False)
    return model


def _target(modules: dict[str, nn.Module], site: str, leaf: str) -> str | None:
    """Where the file's `<site>.<leaf>` goes in the model, or None when that site's norm cannot take it."""
    if type(modules[site]) is nn.BatchNorm2d or isinstance(modules[site], nn.Conv2d | nn.Linear):
        return f"{site}.{leaf}"
    if type(modules.get(f"{site}.bn")) is nn.BatchNorm2d:
        return f"{site}.bn.{leaf}"
    return None
