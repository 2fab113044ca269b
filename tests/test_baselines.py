"""Persistence and climatology baselines on synthetic fields with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm import baselines, metrics
from conv2dlstm.errors import DataError

LAT = np.array([10.0, 20.0, 30.0])
LON = np.array([-50.0, -49.0])
MASK = xr.DataArray(
    np.array([[True, True], [True, False], [True, True]]), dims=("lat", "lon"), coords={"lat": LAT, "lon": LON}
)


def _init_field(values: np.ndarray, times) -> xr.DataArray:
    return xr.DataArray(
        values,
        dims=("time", "variable", "lat", "lon"),
        coords={"time": times, "variable": ["sst"], "lat": LAT, "lon": LON},
    )


def test_persistence_repeats_the_initial_state_for_every_lead():
    rng = np.random.default_rng(0)
    times = pd.date_range("2021-07-01", periods=4, freq="D")
    x_last = _init_field(rng.normal(size=(4, 1, 3, 2)), times)
    out = baselines.persistence(x_last, 3)
    assert out.dims == ("time", "lead", "variable", "lat", "lon")
    np.testing.assert_array_equal(out["lead"].values, [1, 2, 3])
    for k in (1, 2, 3):
        np.testing.assert_array_equal(out.sel(lead=k).values, x_last.values)
    with pytest.raises(DataError, match="lead_steps"):
        baselines.persistence(x_last, 0)


def test_persistence_is_perfect_on_a_constant_field():
    n_time, input_steps, lead_steps = 10, 3, 2
    values = np.full((n_time, 2, 3, 2), 7.5, dtype="float32")
    values[:, 1] = -1.25  # a second variable, not the target
    values[:, :, 1, 1] = 0.0  # land, as stored in the windows cube
    starts = np.arange(0, n_time - input_steps - lead_steps + 1)
    init = starts + input_steps - 1
    times = pd.date_range("2021-07-01", periods=n_time, freq="D")
    last = _init_field(values[init][:, [0]], times[init]).where(MASK)
    forecast = baselines.persistence(last, lead_steps)
    valid = init[:, None] + np.arange(1, lead_steps + 1)
    truth = xr.DataArray(
        values[valid][:, :, [0]], dims=forecast.dims, coords=forecast.coords
    ).where(MASK)
    rmse = metrics.rmse(forecast, truth, metrics.area_weights(LAT, MASK))
    np.testing.assert_array_equal(rmse.values, np.zeros((lead_steps, 1)))


def _seasonal_stats(variables=("sst",)) -> xr.Dataset:
    doy = np.arange(1, 367)
    cycle = 15 + 5 * np.sin(2 * np.pi * (doy - 1) / 366)  # (dayofyear,)
    offsets = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])  # (lat, lon)
    clim = np.stack([cycle[:, None, None] + offsets[None] * (i + 1) for i in range(len(variables))], axis=1)
    return xr.Dataset(
        {"climatology": (("dayofyear", "variable", "lat", "lon"), clim)},
        coords={"dayofyear": doy, "variable": list(variables), "lat": LAT, "lon": LON},
    )


def test_climatology_is_perfect_on_a_pure_seasonal_cycle():
    stats = _seasonal_stats(("sst", "no3"))
    # 2020 is a leap year: Feb 29 is day 60 and Dec 31 is day 366
    init = pd.date_range("2020-02-26", "2021-01-03", freq="D")
    leads = np.arange(1, 4)
    valid = init.values[:, None] + leads[None, :] * np.timedelta64(1, "D")
    valid_times = xr.DataArray(valid, dims=("time", "lead"), coords={"time": init, "lead": leads})
    forecast = baselines.climatology(valid_times, stats, ["sst"])
    assert forecast.dims == ("time", "lead", "variable", "lat", "lon")
    assert "dayofyear" not in forecast.coords
    doy = pd.DatetimeIndex(valid.ravel()).day_of_year.values.reshape(valid.shape)
    cycle = 15 + 5 * np.sin(2 * np.pi * (doy - 1) / 366)
    offsets = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    truth = xr.DataArray(
        (cycle[:, :, None, None, None] + offsets[None, None, None]),
        dims=forecast.dims,
        coords=forecast.coords,
    ).where(MASK)
    np.testing.assert_allclose(forecast.where(MASK).values, truth.values)
    rmse = metrics.rmse(forecast, truth, metrics.area_weights(LAT, MASK))
    np.testing.assert_allclose(rmse.values, 0.0, atol=1e-12)
    # Dec 31 2020 (day 366) and Jan 1 2021 (day 1) are looked up by their own day of year
    dec31 = forecast.sel(time="2020-12-30", lead=1, variable="sst").values
    np.testing.assert_allclose(dec31, stats["climatology"].sel(dayofyear=366, variable="sst").values)


def test_climatology_selects_variables_in_order():
    stats = _seasonal_stats(("sst", "no3"))
    vt = xr.DataArray(pd.date_range("2021-03-01", periods=2).values, dims="time")
    out = baselines.climatology(vt, stats, ["no3", "sst"])
    assert list(out["variable"].values) == ["no3", "sst"]
    np.testing.assert_allclose(out.sel(variable="no3").values, stats["climatology"].sel(dayofyear=[60, 61], variable="no3").values)


def test_climatology_errors():
    stats = _seasonal_stats()
    vt = xr.DataArray(pd.date_range("2021-03-01", periods=2).values, dims="time")
    with pytest.raises(DataError, match="no3"):
        baselines.climatology(vt, stats, ["no3"])
    with pytest.raises(DataError, match="no 'climatology'"):
        baselines.climatology(vt, stats.drop_vars("climatology"))
    with pytest.raises(DataError, match="day"):
        baselines.climatology(vt, stats.isel(dayofyear=slice(0, 30)))
    with pytest.raises(DataError, match="datetime64"):
        baselines.climatology(xr.DataArray([1, 2], dims="time"), stats)
