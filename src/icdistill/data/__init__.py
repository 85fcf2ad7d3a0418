"""Datasets and streams."""
