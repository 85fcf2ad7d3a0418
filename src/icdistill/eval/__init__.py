"""Experiments, baselines, metrics, reports and plots."""
