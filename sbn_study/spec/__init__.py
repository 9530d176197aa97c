"""The study spec: typed schema, cross-field rules, error messages with YAML key paths, and the loader.

Imports neither torch, Ray nor MLflow, so that `sbn-study validate` answers at once.
"""

from sbn_study.spec.schema import (
    Distribution,
    Mode,
    SpecError,
    StudySpec,
    load_spec,
    load_trial_config,
    sampling_order,
    spec_from_dict,
)

__all__ = [
    "Distribution",
    "Mode",
    "SpecError",
    "StudySpec",
    "load_spec",
    "load_trial_config",
    "sampling_order",
    "spec_from_dict",
]
