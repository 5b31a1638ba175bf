"""Evaluation and pictures: reconstruction metrics (:mod:`.reconstruction`) and PNG
grids, curves and histograms (:mod:`.plots`)."""

from .reconstruction import evaluate

__all__ = ["evaluate"]
