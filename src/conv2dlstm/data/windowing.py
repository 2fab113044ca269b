"""Windows of consecutive time steps: where every window of a split starts.

A window is ``input_steps + lead_steps`` consecutive time steps; it lies wholly inside its split's
period (whole days, both ends included: :func:`conv2dlstm.data.harmonize.day_bounds`) and spans no
gap. The windows step stores the starts of every split (:mod:`conv2dlstm.steps.windows`); the
evaluate step finds the test windows that reach a longer horizon the same way
(:class:`conv2dlstm.evaluation.inference.Horizon`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from conv2dlstm.data import harmonize as hz
from conv2dlstm.data.checks import nominal_step
from conv2dlstm.errors import DataError


def window_starts(
    times: np.ndarray,
    *,
    start: str | pd.Timestamp,
    end: str | pd.Timestamp,
    input_steps: int,
    lead_steps: int,
    stride: int = 1,
    step: np.timedelta64 | None = None,
) -> np.ndarray:
    """Indices ``i`` into ``times`` (sorted) of the first step of every valid window, as int64.

    A window ``times[i : i + input_steps + lead_steps]`` is valid when all its times lie in the days
    ``start..end`` (inclusive) and consecutive times differ by exactly ``step`` (default: the most
    common difference), so no window crosses a split boundary or a gap. Every ``stride``-th valid
    start is kept.
    """
    if input_steps < 1 or lead_steps < 1 or stride < 1:
        raise ValueError(f"input_steps {input_steps}, lead_steps {lead_steps}, stride {stride} must be >= 1")
    times = np.asarray(times, dtype="datetime64[ns]")
    length = input_steps + lead_steps
    n = times.size
    if n < length:
        return np.zeros(0, dtype=np.int64)
    if np.any(np.diff(times) <= np.timedelta64(0, "ns")):
        raise DataError("window_starts needs strictly increasing times")
    step = nominal_step(times) if step is None else np.timedelta64(step, "ns")
    inside = hz.in_period(times, start, end)
    # good[k]: times[k] -> times[k + 1] is one nominal step; a window needs length - 1 good steps.
    good = np.diff(times) == step
    csum = np.concatenate([[0], np.cumsum(good)])
    first = np.arange(n - length + 1)
    last = first + length - 1
    consecutive = (csum[last] - csum[first]) == length - 1
    valid = first[consecutive & inside[first] & inside[last]]
    return valid[::stride].astype(np.int64)
