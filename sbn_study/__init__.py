"""sbn-study: hyperparameter studies of Spectral Batch Normalization on Ray Tune, Optuna and MLflow.

Kept free of heavy imports so that `sbn-study --help` starts fast; import submodules directly.
"""

__version__ = "0.1.0"
