"""Evaluation beyond accuracy: corruption robustness (`robustness`, built on `corruptions`), Fourier sensitivity
(`fourier`) and calibration (`calibration`) of a trained model; `suites.run_suites` runs them for one model and
returns flat MLflow-ready metrics.
"""
