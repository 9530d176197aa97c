"""The study spec: typed schema, cross-field rules, error messages with YAML key paths, and the loader.

`config` (a trial's sections), `catalog` (architectures and norm kinds as data), `distributions`, `schema`,
`rules` (the cross-field checks), `effects` (whether searched settings can change a trial), `messages` (errors
as one line each) and `loader` (the ways in). Imports neither torch, Ray nor MLflow, so that `sbn-study
validate` answers at once.
"""

from sbn_study.spec.distributions import Distribution, sampling_order
from sbn_study.spec.loader import load_spec, load_trial_config, spec_from_dict
from sbn_study.spec.messages import SpecError
from sbn_study.spec.schema import Mode, StudySpec

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
