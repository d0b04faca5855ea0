"""Metric scripts shipped with the project, for `evaluate.load(path)` without a hub."""
