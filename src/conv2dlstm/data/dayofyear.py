"""The window over the days of the year that every climatology of the project uses.

A climatology is smoothed over the 366 days of the year by a circular running mean: day ``d``
averages days ``d - window//2 .. d - window//2 + window - 1``, wrapping around from December to
January. Normalization (the climatology the anomalies are taken from), the climatology baseline's
support and the event thresholds all use :func:`circular_running_mean`, so the three agree on which
days a window covers.
"""

from __future__ import annotations

import numpy as np

from conv2dlstm.errors import DataError


def circular_running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """NaN-aware circular running mean of ``window`` days along axis 0 (the 366 days of the year):
    day ``d`` averages the finite values of days ``d - window//2 .. d - window//2 + window - 1``
    (wrapping around), float64; NaN where none is finite. ``window`` 1 returns a float64 copy."""
    if window < 1:
        raise DataError(f"circular_running_mean: window must be at least 1 day, got {window}")
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0).astype(np.float64)
    total = np.zeros_like(filled)
    count = np.zeros(values.shape, dtype=np.float64)
    for offset in range(-(window // 2), window - window // 2):
        total += np.roll(filled, -offset, axis=0)  # day d sees day d + offset
        count += np.roll(finite, -offset, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1.0), np.nan)
