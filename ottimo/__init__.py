"""Ottimo: a production loop for PyTorch classifiers (Prefect, MLflow, DVC, ONNX Runtime, Evidently)."""

from ottimo.spec import InputSpec

__all__ = ["InputSpec"]
