"""Evaluation libraries: metrics, scores with intervals, baselines, inference, plots and the results summary."""
