"""The circular running mean over the days of the year that normalization, the climatology
baseline's support and the event thresholds share."""

from __future__ import annotations

import numpy as np
import pytest

from conv2dlstm.data.dayofyear import circular_running_mean
from conv2dlstm.errors import DataError


def test_the_window_wraps_around_the_year_and_skips_nan() -> None:
    days = np.arange(366, dtype=np.float32)
    days[1] = np.nan
    out = circular_running_mean(days[:, None], 3)[:, 0]
    assert out.dtype == np.float64
    # day 0 averages days 365 and 0 (day 1 is NaN); day 2 averages days 2 and 3
    assert out[0] == pytest.approx((365 + 0) / 2) and out[2] == pytest.approx(2.5)
    assert out[100] == pytest.approx(100.0)


def test_an_even_window_reaches_one_day_further_back() -> None:
    days = np.arange(366, dtype=np.float64)
    # window 4: day d averages d-2 .. d+1
    assert circular_running_mean(days, 4)[10] == pytest.approx((8 + 9 + 10 + 11) / 4)


def test_no_finite_value_in_the_window_is_nan_and_window_one_is_a_copy() -> None:
    values = np.full((366, 2), np.nan)
    values[:, 1] = 1.0
    out = circular_running_mean(values, 5)
    assert np.isnan(out[:, 0]).all() and (out[:, 1] == 1.0).all()
    once = circular_running_mean(values, 1)
    np.testing.assert_array_equal(once, values)
    assert once is not values


def test_a_window_below_one_day_names_the_value() -> None:
    with pytest.raises(DataError, match="window must be at least 1 day, got 0"):
        circular_running_mean(np.zeros(366), 0)
