"""Inference (conv2dlstm.evaluation.inference): forecast arrays, the nonnegative clip, the statistics it reads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import inference
from tests.support.cases import LAT, LON, MASK, cube_shape, forecast_cube


def test_forecast_array_coordinates():
    da = forecast_cube(np.zeros(cube_shape(n=3, n_lead=4)), n_lead=4)
    assert da.dims == ("time", "lead", "variable", "lat", "lon")
    np.testing.assert_array_equal(da["lead"].values, [1, 2, 3, 4])
    np.testing.assert_array_equal(da["lead_time"].values, np.arange(1, 5) * np.timedelta64(1, "D"))
    assert da["valid_time"].dims == ("time", "lead")
    assert pd.Timestamp(da["valid_time"].values[2, 3]) == pd.Timestamp("2021-07-07")
    with pytest.raises(DataError, match="shape"):
        inference.forecast_array(
            np.zeros((3, 2, 2, 3, 4)),
            init_times=da["time"].values,
            valid_times=da["valid_time"].values[:, :2],
            variables=["sst"],
            lat=LAT,
            lon=LON,
        )


def test_clip_nonnegative_only_the_named_variables():
    da = forecast_cube(np.full(cube_shape(n=2, n_var=2), -1.0), variables=("sst", "no3")).where(MASK)
    clipped = inference.clip_nonnegative(da, ["no3", "chl"])
    assert (clipped.sel(variable="no3").fillna(0) == 0).all() and clipped.dtype == da.dtype
    assert np.isnan(clipped.sel(variable="no3").values[..., ~MASK.values]).all()  # land stays NaN
    xr.testing.assert_identical(clipped.sel(variable="sst"), da.sel(variable="sst"))
