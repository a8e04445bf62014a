"""Runtime for encode/language disaggregated DeepStack serving."""

__version__ = "0.1.0"
