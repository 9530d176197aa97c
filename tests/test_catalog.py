"""The catalog (`sbn_study.spec.catalog`) describes, as data, what the trial side builds: the two must agree."""

from __future__ import annotations

import importlib
import inspect

from sbn_study.spec.catalog import ARCHITECTURES, NORM_KINDS
from sbn_study.spec.config import ModelConfig
from sbn_study.trial.norms import _REGISTRY


def test_norm_kinds_are_the_registered_factories() -> None:
    assert set(NORM_KINDS) == set(_REGISTRY)
    assert list(NORM_KINDS) == sorted(NORM_KINDS)


def test_every_builder_exists_and_takes_its_options() -> None:
    for arch, entry in ARCHITECTURES.items():
        module, _, function = entry.builder.partition(":")
        builder = getattr(importlib.import_module(module), function)
        parameters = inspect.signature(builder).parameters
        assert set(entry.options) <= set(ModelConfig.model_fields), arch
        assert set(entry.options) <= set(parameters), arch
