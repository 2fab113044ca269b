"""harmonize.fill_max_days: short gaps of a cell filled linearly in time, the same in memory and
chunk by chunk with Dask (a gap across chunks too), longer gaps, the ends and land left alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.data import gapfill

TIMES = pd.date_range("2020-01-01", periods=20).delete(10)  # 2020-01-11 absent from the time axis


def cube() -> xr.DataArray:
    """Values = the day number (0 on 2020-01-01) in 2 x 3 cells, with gaps; linear, so a fill is exact."""
    day = ((TIMES - TIMES[0]) / pd.Timedelta(days=1)).to_numpy(np.float32)
    v = np.broadcast_to(day[:, None, None], (TIMES.size, 2, 3)).copy()
    v[:, 0, 0] = np.nan  # land
    v[3, 1, 1] = np.nan  # 1 day
    v[5:7, 1, 2] = np.nan  # 2 days
    v[9, 0, 1] = np.nan  # 2020-01-10, and 2020-01-11 is absent: 2 days
    v[0, 0, 2] = v[-1, 0, 2] = np.nan  # before the first value and after the last
    return xr.DataArray(v, dims=("time", "lat", "lon"), coords={"time": TIMES, "lat": [0.0, 1.0], "lon": [0.0, 1, 2]})


@pytest.mark.parametrize("chunks", [None, 2, 3, 7])
def test_short_gaps_are_filled_linearly_in_time(chunks: int | None) -> None:
    raw = cube()
    src = raw if chunks is None else raw.chunk({"time": chunks})
    one, two = gapfill.fill_gaps(src, 1), gapfill.fill_gaps(src, 2)
    if chunks is not None:
        assert one.chunks == src.chunks  # lazy, chunks kept
    one, two = one.values, two.values
    assert one[3, 1, 1] == 3.0  # a 1-day gap
    assert np.isnan(one[5:7, 1, 2]).all() and np.isnan(one[9, 0, 1])  # 2-day gaps (one across the absent day)
    np.testing.assert_array_equal(two[5:7, 1, 2], [5.0, 6.0])
    assert two[9, 0, 1] == 9.0  # between 2020-01-09 (8) and 2020-01-12 (11): weights from the dates
    for out in (one, two):
        assert np.isnan(out[:, 0, 0]).all() and np.isnan(out[[0, -1], 0, 2]).all()  # land, ends
        finite = np.isfinite(raw.values)
        np.testing.assert_array_equal(out[finite], raw.values[finite])  # no value changed
    assert gapfill.fill_gaps(src, 0) is src


def test_a_dataset_is_filled_variable_by_variable() -> None:
    raw = cube()
    ds = xr.Dataset({"sst": raw, "chl": raw * 2, "depth": (("lat", "lon"), np.ones((2, 3)))})
    out = gapfill.fill_gaps(ds.chunk({"time": 4}), 1).compute()
    assert out["sst"].values[3, 1, 1] == 3.0 and out["chl"].values[3, 1, 1] == 6.0
    xr.testing.assert_identical(out["depth"], ds["depth"])
