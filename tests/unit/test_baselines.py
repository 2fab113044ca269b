"""Persistence and climatology baselines on synthetic fields with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import baselines, metrics

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
    truth = xr.DataArray(values[valid][:, :, [0]], dims=forecast.dims, coords=forecast.coords).where(MASK)
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
    np.testing.assert_allclose(
        out.sel(variable="no3").values, stats["climatology"].sel(dayofyear=[60, 61], variable="no3").values
    )


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


# ---------------------------------------------------------------------------------------------
# damped anomaly persistence on a synthetic AR(1) anomaly field


PHI = 0.8
GRID_LAT = np.array([-10.0, 0.0, 10.0, 20.0])
GRID_LON = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
GRID_MASK = xr.DataArray(
    np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=bool),
    dims=("lat", "lon"),
    coords={"lat": GRID_LAT, "lon": GRID_LON},
)


def _grid_stats() -> xr.Dataset:
    doy = np.arange(1, 367)
    cycle = 15 + 5 * np.sin(2 * np.pi * (doy - 1) / 366)
    clim = cycle[:, None, None, None] + np.linspace(0, 3, 20).reshape(1, 1, 4, 5)
    clim = np.where(GRID_MASK.values, clim, np.nan)
    return xr.Dataset(
        {"climatology": (("dayofyear", "variable", "lat", "lon"), clim)},
        coords={"dayofyear": doy, "variable": ["sst"], "lat": GRID_LAT, "lon": GRID_LON},
    )


def _ar1_field(times: pd.DatetimeIndex, phi: float, seed: int, stats: xr.Dataset) -> xr.DataArray:
    """``clim(day) + a_t`` with ``a_t = phi a_{t-1} + e_t`` of unit variance, independent per cell; NaN on land."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(times.size, 1, 4, 5))
    a = np.empty_like(noise)
    a[0] = noise[0]
    for t in range(1, times.size):
        a[t] = phi * a[t - 1] + np.sqrt(1 - phi**2) * noise[t]
    clim = baselines.climatology(xr.DataArray(times, dims="time", coords={"time": times}), stats)
    return (clim + a).where(GRID_MASK).rename("sst")


def test_damped_persistence_on_ar1_anomalies_matches_the_analytic_mse():
    stats = _grid_stats()
    times = pd.date_range("2019-01-01", "2021-12-31", freq="D")
    x = _ar1_field(times, PHI, seed=11, stats=stats)
    weights = metrics.area_weights(GRID_LAT, GRID_MASK)
    leads = np.arange(1, 4)
    train = x.sel(time=slice("2019-01-01", "2020-12-31"))
    rho = baselines.anomaly_autocorrelation(baselines.anomalies(train, stats), max_lag=3, weights=weights)
    assert rho.dims == ("lag", "variable")
    # pooled over 16 cells x 731 days: sampling standard error below 0.01 at these lags
    np.testing.assert_allclose(rho.sel(variable="sst").values, PHI**leads, atol=0.03)

    init = pd.date_range("2021-01-01", "2021-12-28", freq="D")
    valid = init.values[:, None] + leads[None, :] * np.timedelta64(1, "D")
    valid_times = xr.DataArray(valid, dims=("time", "lead"), coords={"time": init, "lead": leads})
    x_last = x.sel(time=init)
    forecast = baselines.damped_persistence(
        x_last,
        baselines.climatology(x_last["time"], stats),
        baselines.climatology(valid_times, stats),
        rho,
    )
    assert forecast.dims == ("time", "lead", "variable", "lat", "lon")
    truth = xr.concat([x.sel(time=init + pd.Timedelta(days=int(k))).assign_coords(time=init) for k in leads], "lead")
    truth = truth.assign_coords(lead=leads).transpose(*forecast.dims)
    damped = metrics.mse(forecast.where(GRID_MASK), truth, weights).sel(variable="sst").values
    plain = metrics.mse(baselines.persistence(x_last, 3), truth, weights).sel(variable="sst").values
    np.testing.assert_allclose(damped, 1 - PHI ** (2 * leads), rtol=0.08)
    np.testing.assert_allclose(plain, 2 * (1 - PHI**leads), rtol=0.08)
    assert np.all(damped < plain)


def _reference_rho(values: np.ndarray, max_lag: int, w: np.ndarray) -> np.ndarray:
    """Direct sums over all pairs of a ``(time, variable, cell)`` array."""
    out = np.empty((max_lag, values.shape[1]))
    for k in range(1, max_lag + 1):
        x, y = values[:-k], values[k:]
        ok = np.isfinite(x) & np.isfinite(y) & (w > 0)
        x, y = np.where(ok, x, 0), np.where(ok, y, 0)
        sxy, sxx, syy = ((p * w).sum(axis=(0, 2)) for p in (x * y, x * x, y * y))
        out[k - 1] = sxy / np.sqrt(sxx * syy)
    return out


def test_anomaly_autocorrelation_streaming_equals_one_shot_whatever_the_chunking():
    rng = np.random.default_rng(12)
    n, max_lag = 60, 4
    times = pd.date_range("2020-01-01", periods=n, freq="D")
    values = np.cumsum(rng.normal(size=(n, 2, 4, 5)), axis=0) * 0.3 + rng.normal(size=(n, 2, 4, 5))
    values[rng.random(values.shape) < 0.05] = np.nan  # scattered missing values
    anom = xr.DataArray(
        values,
        dims=("time", "variable", "lat", "lon"),
        coords={"time": times, "variable": ["sst", "no3"], "lat": GRID_LAT, "lon": GRID_LON},
    ).where(GRID_MASK)
    weights = metrics.area_weights(GRID_LAT, GRID_MASK)
    one_shot = baselines.anomaly_autocorrelation(anom, max_lag, weights)
    whole = baselines.AnomalyAutocorrelation(max_lag, weights)
    whole.add(anom)
    pairs = whole.pairs().values
    w = weights.values.reshape(-1)
    np.testing.assert_allclose(one_shot.values, _reference_rho(anom.values.reshape(n, 2, -1), max_lag, w), rtol=1e-12)
    for sizes in ([1] * n, [3, 1, 2, 54], [30, 30], [7] * 8 + [4], list(rng.integers(1, 9, size=40))):
        acc = baselines.AnomalyAutocorrelation(max_lag, weights)
        bounds = np.cumsum([0, *sizes])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            acc.add(anom.isel(time=slice(int(lo), int(min(hi, n)))).transpose("lat", "time", "lon", "variable"))
        np.testing.assert_allclose(acc.result().values, one_shot.values, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(acc.pairs().values, pairs)


def test_anomaly_autocorrelation_unweighted_excludes_nan_land_and_rejects_gaps():
    times = pd.date_range("2020-01-01", periods=5, freq="D")
    a = np.array([1.0, 2.0, 1.0, 2.0, 1.0])
    values = np.stack([a, np.full(5, np.nan)], axis=1)[:, None, :]  # (time, variable, cell): cell 1 is land
    anom = xr.DataArray(values, dims=("time", "variable", "cell"), coords={"time": times, "variable": ["v"]})
    rho = baselines.anomaly_autocorrelation(anom, 2)
    # lag 1: sum a_t a_{t+1} = 8, sum a_t^2 = 10 (first four), sum a_{t+1}^2 = 10 (last four)
    np.testing.assert_allclose(rho.sel(variable="v").values, [8 / 10, 6 / np.sqrt(6 * 6)])
    acc = baselines.AnomalyAutocorrelation(1)
    acc.add(anom.isel(time=[0, 1]))
    with pytest.raises(DataError, match="equally spaced"):
        acc.add(anom.isel(time=[3, 4]))
    with pytest.raises(DataError, match="max_lag"):
        baselines.AnomalyAutocorrelation(0)
    grid = xr.DataArray(np.ones((2, 1, 2)), dims=("time", "variable", "cell"), coords={"cell": [0, 1]})
    with pytest.raises(DataError, match="differ in grid"):
        baselines.anomaly_autocorrelation(grid, 1, xr.DataArray([1.0, 1.0], dims="cell", coords={"cell": [0, 2]}))
    with pytest.raises(DataError, match="no chunk"):
        baselines.AnomalyAutocorrelation(1).result()


def test_damped_persistence_limits_and_errors():
    rng = np.random.default_rng(13)
    times = pd.date_range("2021-07-01", periods=4, freq="D")
    x_last = _init_field(rng.normal(size=(4, 1, 3, 2)), times)
    clim_init = _init_field(rng.normal(size=(4, 1, 3, 2)), times)
    clim_valid = baselines.persistence(_init_field(rng.normal(size=(4, 1, 3, 2)), times), 2)
    rho = xr.DataArray([[1.0], [0.0]], dims=("lag", "variable"), coords={"lag": [1, 2], "variable": ["sst"]})
    out = baselines.damped_persistence(x_last, clim_init, clim_valid, rho)
    assert out.dims == ("time", "lead", "variable", "lat", "lon")
    # rho = 1: the anomaly persists; rho = 0: the climatology
    np.testing.assert_allclose(out.sel(lead=1).values, (clim_valid.sel(lead=1) + x_last - clim_init).values)
    np.testing.assert_allclose(out.sel(lead=2).values, clim_valid.sel(lead=2).values)
    with pytest.raises(DataError, match="lead"):
        baselines.damped_persistence(x_last, clim_init, baselines.persistence(clim_init, 3), rho)
    with pytest.raises(DataError, match="different coordinates"):
        baselines.damped_persistence(x_last, clim_init.isel(time=slice(1, None)), clim_valid, rho)


# ---------------------------------------------------------------------------------------------
# climatology support


def _doy(dates: str | list[str]) -> np.ndarray:
    return pd.DatetimeIndex(pd.to_datetime(dates if isinstance(dates, list) else [dates])).day_of_year.to_numpy()


def test_climatology_support_eight_months_leaves_the_unseen_months_unsupported():
    train = pd.date_range("2021-01-01", "2021-08-31", freq="D")  # days of year 1..243
    support = baselines.climatology_support(train, 31)
    assert support.dims == ("dayofyear",) and support.sizes["dayofyear"] == 366
    supported = np.flatnonzero(support.values) + 1
    # day d is supported when a training day lies in d-15..d+15 (circular over 366 days)
    expected = np.r_[1 : 244 + 15, 366 - 14 : 367]
    np.testing.assert_array_equal(supported, expected)
    oct_nov = pd.date_range("2021-10-01", "2021-11-30", freq="D").day_of_year.to_numpy()
    assert not support.sel(dayofyear=oct_nov).any()
    valid = xr.DataArray(
        pd.to_datetime(["2021-03-15", "2021-09-20", "2021-10-15", "2021-12-20", "2022-01-02"]).values, dims="time"
    )
    flags = baselines.unsupported_times(valid, support)
    assert flags.dims == ("time",)
    np.testing.assert_array_equal(flags.values, [False, True, True, False, False])


def test_climatology_support_full_year_supports_every_day():
    support = baselines.climatology_support(pd.date_range("2021-01-01", "2021-12-31", freq="D"), 31)
    assert bool(support.all())  # day 366 too: its window holds days 351..365 and 1..15
    # without smoothing a non-leap year leaves day 366 (Dec 31 of a leap year) unsupported
    narrow = baselines.climatology_support(pd.date_range("2021-01-01", "2021-12-31", freq="D"), 1)
    assert not bool(narrow.sel(dayofyear=366)) and int(narrow.sum()) == 365
    assert not bool(baselines.climatology_support(np.array([], dtype="datetime64[ns]"), 31).any())


def test_climatology_support_is_where_circular_smooth_needs_no_interpolation(monkeypatch):
    from conv2dlstm.steps import normalize

    # Without the gap interpolation, normalize.circular_smooth leaves NaN exactly on the days whose
    # window holds no training day: those must be the unsupported days. This stand-in for np.interp
    # keeps the values at the sample points and interpolates nothing.
    def no_interp(x, xp, fp):
        known = dict(zip(np.asarray(xp).tolist(), np.asarray(fp).tolist(), strict=True))
        return np.array([known.get(v, np.nan) for v in np.asarray(x).tolist()])

    monkeypatch.setattr(normalize.np, "interp", no_interp)
    rng = np.random.default_rng(14)
    for window in (1, 4, 7, 30, 31):
        days = np.sort(rng.choice(365, size=6, replace=False))
        train = pd.Timestamp("2021-01-01") + pd.to_timedelta(days, unit="D")
        support = baselines.climatology_support(train, window).values
        observed = np.full((366, 1), np.nan)
        observed[days] = 1.0
        smooth = normalize.circular_smooth(observed, window)
        np.testing.assert_array_equal(support, np.isfinite(smooth[:, 0]))
        assert support.sum() < 366
    assert normalize.DAYS == baselines.DAYS_OF_YEAR


# ---------------------------------------------------------------------------------------------
# fit_damping: the training part of a windows store, streamed, with gaps


class _Store:
    """The interface fit_damping reads (conv2dlstm.artifacts.windows_store.WindowsStore) over an in-memory
    normalized cube."""

    def __init__(self, physical: xr.DataArray, mean: float, std: float) -> None:
        self.time = physical["time"].values
        self.lat, self.lon = GRID_LAT, GRID_LON
        self.mask = GRID_MASK.values
        self.target_variables, self.target_channels = ["sst"], [0]
        self._data = ((physical - mean) / std).fillna(0.0).transpose("time", "variable", "lat", "lon").values
        self.reads: list[int] = []

    def read_time_range(self, start: int, stop: int) -> np.ndarray:
        self.reads.append(stop - start)
        return self._data[start:stop].astype("float32")


@pytest.mark.parametrize("chunk_steps", [1, 7, 64, 10_000])
def test_fit_damping_equals_the_nan_filled_training_record_whatever_the_chunks(chunk_steps):
    stats = _grid_stats().assign(mean=("variable", [15.0]), std=("variable", [2.0]))
    stats.attrs.update(train_start="2019-01-01", train_end="2019-12-31")
    times = pd.date_range("2019-01-01", "2020-03-31", freq="D")
    field = _ar1_field(times, PHI, seed=3, stats=stats)
    missing = pd.DatetimeIndex(["2019-02-10", "2019-06-01", "2019-06-02", "2019-06-03", "2019-06-04", "2019-06-05"])
    present = field.drop_sel(time=missing)  # a store's time axis skips the missing days
    store = _Store(present, 15.0, 2.0)
    weights = metrics.area_weights(GRID_LAT, GRID_MASK)
    rho = baselines.fit_damping(store, stats, max_lag=3, weights=weights, chunk_steps=chunk_steps)
    # reference: the training year on its full daily axis, the missing days NaN, in one piece
    train = field.sel(time=slice("2019-01-01", "2019-12-31")).copy()
    train.loc[{"time": missing}] = np.nan
    stored = ((train - 15.0) / 2.0).astype("float32") * np.float32(2.0) + np.float32(15.0)  # float32 round trip
    expected = baselines.anomaly_autocorrelation(baselines.anomalies(stored, stats), 3, weights)
    np.testing.assert_allclose(rho.values, expected.values, rtol=1e-5)
    assert np.allclose(rho.sel(variable="sst").values, PHI ** np.arange(1, 4), atol=0.05)
    assert max(store.reads) <= chunk_steps  # memory: one chunk at a time
    assert sum(store.reads) == 365 - missing.size  # only the training steps are read


def test_fit_damping_needs_the_training_period():
    stats = _grid_stats().assign(mean=("variable", [15.0]), std=("variable", [2.0]))
    times = pd.date_range("2019-01-01", periods=20, freq="D")
    store = _Store(_ar1_field(times, PHI, seed=3, stats=stats), 15.0, 2.0)
    with pytest.raises(DataError, match="no attribute.*train_start.*normalize step"):
        baselines.fit_damping(store, stats, max_lag=2)
    stats.attrs.update(train_start="2018-01-01", train_end="2018-12-31")
    with pytest.raises(DataError, match="holds 0 time step.*2018-01-01..2018-12-31"):
        baselines.fit_damping(store, stats, max_lag=2)


def test_not_meaningful_leads_flag_initial_and_valid_days_per_baseline():
    support = baselines.climatology_support(pd.date_range("2019-01-01", "2019-03-31"), window=1)  # Jan-Mar
    init = pd.DatetimeIndex(["2019-03-30", "2019-03-31"]).values  # supported initial days
    valid = init[:, None] + np.arange(1, 3)[None, :] * np.timedelta64(1, "D")  # 31 Mar .. 2 Apr
    flags = baselines.not_meaningful_leads(init, valid, support)
    assert set(flags) == set(baselines.BASELINE_NAMES)
    assert flags["persistence"].values.tolist() == [False, False]
    assert flags["climatology"].values.tolist() == [True, True]  # 1 Apr (lead 1 of 31 Mar) is unsupported
    assert flags["damped_persistence"].values.tolist() == [True, True]
    late = pd.DatetimeIndex(["2019-04-02"]).values  # unsupported initial day, valid days in the next January
    flags = baselines.not_meaningful_leads(late, np.array([[np.datetime64("2020-01-05")]]), support)
    assert flags["climatology"].values.tolist() == [False]
    assert flags["damped_persistence"].values.tolist() == [True]  # its initial anomaly needs clim(2 Apr)


def test_the_outputs_page_describes_every_baseline_and_no_other():
    """docs/outputs.md's table of baselines names exactly the registered ones, in their order."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "outputs.md").read_text()
    table = text.split("| baseline | the forecast | meaningful |", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert names == list(baselines.BASELINE_NAMES), names
