"""Experiment tracking: the MLflow store (runs, metrics, models) and the model registry (the champion)."""
