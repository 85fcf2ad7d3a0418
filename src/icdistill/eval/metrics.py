"""A run's summary metrics, for the eval's modules: they live beside the run (``icdistill.run_metrics``),
which needs them below the eval."""

from __future__ import annotations

from icdistill.run_metrics import copy_rate, never_pooled, summarize

__all__ = ["copy_rate", "never_pooled", "summarize"]
