"""Kubernetes operator for DeepStackDisaggregation resources."""

__version__ = "0.1.0"
