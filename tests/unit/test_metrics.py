"""Scores against hand-computed values on tiny grids (WeatherBench 2 definitions)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import metrics

# Two ocean cells at latitudes 0 and 60 (cos 1 and 0.5): normalized weights 4/3 and 2/3.
LAT = np.array([0.0, 60.0])
LON = np.array([10.0])
W0, W60 = 4 / 3, 2 / 3


def _mask(values, lat=LAT, lon=LON) -> xr.DataArray:
    return xr.DataArray(np.asarray(values, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})


def _field(values, lat=LAT, lon=LON, chunked: bool = False) -> xr.DataArray:
    values = np.asarray(values, dtype="float64")
    da = xr.DataArray(
        values,
        dims=("time", "lat", "lon"),
        coords={"time": np.arange(values.shape[0]), "lat": lat, "lon": lon},
    )
    return da.chunk({"time": 1}) if chunked else da


# ---------------------------------------------------------------------------------------------
# area weights


def test_area_weights_hand_values_zero_on_land_mean_one_over_ocean():
    lat = np.array([0.0, 60.0])
    lon = np.array([0.0, 1.0])
    mask = _mask([[True, True], [True, False]], lat, lon)
    w = metrics.area_weights(lat, mask)
    # cos(0)=1, cos(60)=0.5; ocean sum 2.5 over 3 cells -> factor 3/2.5 = 1.2
    np.testing.assert_allclose(w.values, [[1.2, 1.2], [0.6, 0.0]], rtol=1e-12)
    assert w.dims == ("lat", "lon")
    assert float(w.values[mask.values].mean()) == pytest.approx(1.0)
    assert float(w.values[~mask.values].max()) == 0.0


def test_area_weights_are_cosines_of_cell_centres():
    lat = np.array([-60.0, 0.0, 30.0, 45.0])
    lon = np.array([0.0, 5.0, 10.0])
    w = metrics.area_weights(lat, _mask(np.ones((4, 3)), lat, lon))
    expected_cos = np.array([0.5, 1.0, math.sqrt(3) / 2, math.sqrt(2) / 2])
    np.testing.assert_allclose(w.values[:, 0] / w.values[1, 0], expected_cos, rtol=1e-12)
    assert float(w.mean()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "lat", [np.arange(80.5, 90.0, 1.0), np.arange(85.0, 90.01, 1.25), np.arange(-90.0, -84.0, 2.0)]
)
def test_area_weights_regional_polar_box_stays_finite(lat):
    lon = np.array([0.0, 1.0])
    w = metrics.area_weights(lat, _mask(np.ones((lat.size, 2)), lat, lon))
    assert np.all(np.isfinite(w.values))
    assert np.all(w.values >= 0)
    assert float(w.mean()) == pytest.approx(1.0)
    # proportional to cos(lat) of the centres (the row at exactly +-90 gets ~0)
    cos = np.cos(np.deg2rad(lat))
    np.testing.assert_allclose(w.values[:, 0], cos * lat.size / cos.sum(), rtol=1e-9, atol=1e-12)
    assert float(w.max()) < lat.size  # nothing blows up


def test_area_weights_errors():
    with pytest.raises(DataError, match="no ocean"):
        metrics.area_weights(LAT, _mask([[False], [False]]))
    with pytest.raises(DataError, match=r"\[-90, 90\]"):
        metrics.area_weights(np.array([0.0, 95.0]), _mask([[True], [True]], lat=np.array([0.0, 95.0])))
    with pytest.raises(DataError, match="latitudes"):
        metrics.area_weights(np.array([0.0]), _mask([[True], [True]]))
    with pytest.raises(DataError, match="differ from the mask"):
        metrics.area_weights(np.array([0.0, 50.0]), _mask([[True], [True]]))


# ---------------------------------------------------------------------------------------------
# rmse / mae / bias


@pytest.mark.parametrize("chunked", [False, True], ids=["eager", "dask"])
def test_rmse_mae_bias_hand_computed(chunked):
    # errors: time 0 = [1, 2], time 1 = [2, -1] at latitudes [0, 60]
    truth = _field([[[10.0], [20.0]], [[11.0], [21.0]]], chunked=chunked)
    forecast = truth + _field([[[1.0], [2.0]], [[2.0], [-1.0]]], chunked=chunked)
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    mse_t0 = (W0 * 1 + W60 * 4) / 2  # = 2
    mse_t1 = (W0 * 4 + W60 * 1) / 2  # = 3
    assert (mse_t0, mse_t1) == pytest.approx((2.0, 3.0))
    rmse = metrics.rmse(forecast, truth, w)
    assert float(rmse) == pytest.approx(math.sqrt((mse_t0 + mse_t1) / 2))  # sqrt(2.5)
    # the order matters: mean over time of per-time RMSEs would be (sqrt2 + sqrt3) / 2
    assert float(rmse) != pytest.approx((math.sqrt(2) + math.sqrt(3)) / 2)
    assert float(metrics.mse(forecast, truth, w)) == pytest.approx(2.5)
    assert float(metrics.mae(forecast, truth, w)) == pytest.approx(
        ((W0 * 1 + W60 * 2) / 2 + (W0 * 2 + W60 * 1) / 2) / 2
    )
    assert float(metrics.mae(forecast, truth, w)) == pytest.approx(1.5)
    assert float(metrics.bias(forecast, truth, w)) == pytest.approx(((W0 + 2 * W60) / 2 + (2 * W0 - W60) / 2) / 2)
    assert float(metrics.bias(forecast, truth, w)) == pytest.approx(7 / 6)


def test_rmse_time_mean_before_sqrt_with_unequal_errors():
    # one cell; per-time errors 1 and 3: MSE = (1 + 9) / 2 = 5 -> RMSE sqrt(5), not (1 + 3) / 2 = 2
    lat, lon = np.array([0.0]), np.array([0.0])
    truth = _field(np.zeros((2, 1, 1)), lat, lon)
    forecast = _field([[[1.0]], [[3.0]]], lat, lon)
    w = metrics.area_weights(lat, _mask([[True]], lat, lon))
    assert float(metrics.rmse(forecast, truth, w)) == pytest.approx(math.sqrt(5))


@pytest.mark.parametrize("chunked", [False, True], ids=["eager", "dask"])
@pytest.mark.parametrize("land_value", [np.nan, 1e6, np.inf, 0.0])
def test_land_never_affects_scores(chunked, land_value):
    lat = np.array([0.0, 60.0])
    lon = np.array([0.0, 1.0])
    mask = _mask([[True, False], [True, False]], lat, lon)
    w = metrics.area_weights(lat, mask)
    rng = np.random.default_rng(0)
    truth_v = rng.normal(size=(3, 2, 2))
    fc_v = truth_v + rng.normal(size=(3, 2, 2))
    clim_v = rng.normal(size=(3, 2, 2))
    results = []
    for land in (land_value, -7.0):
        t, f = truth_v.copy(), fc_v.copy()
        t[:, :, 1] = land
        f[:, :, 1] = -land
        truth, forecast = _field(t, lat, lon, chunked), _field(f, lat, lon, chunked)
        clim = _field(clim_v, lat, lon)
        results.append(
            [
                float(metrics.rmse(forecast, truth, w)),
                float(metrics.mae(forecast, truth, w)),
                float(metrics.bias(forecast, truth, w)),
                float(metrics.acc(forecast, truth, clim, w)),
            ]
        )
    assert np.all(np.isfinite(results[0]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)
    # and equal to the same scores on the ocean column alone
    truth_ocean = _field(truth_v[:, :, :1], lat, lon[:1])
    forecast_ocean = _field(fc_v[:, :, :1], lat, lon[:1])
    ocean_only = metrics.rmse(forecast_ocean, truth_ocean, metrics.area_weights(lat, mask.isel(lon=[0])))
    assert results[0][0] == pytest.approx(float(ocean_only))


def test_nan_in_ocean_is_left_out_with_its_weight():
    truth = _field([[[0.0], [0.0]], [[0.0], [0.0]]])
    forecast = _field([[[2.0], [np.nan]], [[1.0], [1.0]]])
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    # time 0: only the lat-0 cell (error 2) -> 4; time 1: 1
    assert float(metrics.rmse(forecast, truth, w)) == pytest.approx(math.sqrt((4 + 1) / 2))


def test_extra_dims_are_kept_and_time_dim_is_configurable():
    rng = np.random.default_rng(1)
    shape = (4, 3, 2, 2, 1)  # init, lead, variable, lat, lon
    dims = ("init", "lead", "variable", "lat", "lon")
    coords = {"init": np.arange(4), "lead": [1, 2, 3], "variable": ["sst", "no3"], "lat": LAT, "lon": LON}
    truth = xr.DataArray(rng.normal(size=shape), dims=dims, coords=coords)
    err = np.zeros(shape)
    err[:, :, 0] = 1.0  # sst off by 1 everywhere
    err[:, 1, 1] = 3.0  # no3 off by 3 at lead 2 only
    forecast = truth + err
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    rmse = metrics.rmse(forecast, truth, w, time_dim="init")
    assert set(rmse.dims) == {"lead", "variable"}
    np.testing.assert_allclose(rmse.sel(variable="sst").values, [1, 1, 1])
    np.testing.assert_allclose(rmse.sel(variable="no3").values, [0, 3, 0])
    np.testing.assert_allclose(metrics.bias(forecast, truth, w, time_dim="init").sel(variable="no3").values, [0, 3, 0])
    with pytest.raises(DataError, match="time_dim"):
        metrics.rmse(forecast, truth, w)  # no "time" dimension


def test_mismatched_coordinates_raise():
    truth = _field(np.zeros((2, 2, 1)))
    forecast = truth.assign_coords(time=[5, 6])
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    with pytest.raises(DataError, match="different coordinates"):
        metrics.rmse(forecast, truth, w)


# ---------------------------------------------------------------------------------------------
# ACC


@pytest.mark.parametrize("chunked", [False, True], ids=["eager", "dask"])
def test_acc_hand_computed_per_time_then_mean(chunked):
    clim = _field([[[10.0], [20.0]], [[12.0], [18.0]]], chunked=chunked)
    f_anom = _field([[[1.0], [2.0]], [[1.0], [-1.0]]])
    t_anom = _field([[[1.0], [1.0]], [[1.0], [1.0]]])
    forecast, truth = clim + f_anom, clim + t_anom
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    acc_t0 = (W0 * 1 + W60 * 2) / math.sqrt((W0 * 1 + W60 * 4) * (W0 + W60))  # = 2 sqrt2 / 3
    acc_t1 = (W0 * 1 - W60 * 1) / math.sqrt((W0 + W60) * (W0 + W60))  # = 1 / 3
    assert acc_t0 == pytest.approx(2 * math.sqrt(2) / 3)
    value = float(metrics.acc(forecast, truth, clim, w))
    assert value == pytest.approx((acc_t0 + acc_t1) / 2)
    pooled = (W0 + 2 * W60 + W0 - W60) / math.sqrt((W0 + 4 * W60 + W0 + W60) * 2 * (W0 + W60))
    assert value != pytest.approx(pooled)


def test_acc_perfect_forecast_is_one_and_climatology_is_nan():
    rng = np.random.default_rng(2)
    clim = _field(rng.normal(size=(3, 2, 1)))
    truth = clim + _field(rng.normal(size=(3, 2, 1)))
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    assert float(metrics.acc(truth, truth, clim, w)) == pytest.approx(1.0)
    assert float(metrics.acc(-(truth - clim) + clim, truth, clim, w)) == pytest.approx(-1.0)
    # a forecast equal to the climatology has zero anomalies: the correlation is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(float(metrics.acc(clim, truth, clim, w)))


# ---------------------------------------------------------------------------------------------
# skill score and per-cell RMSE


def test_skill_score():
    assert metrics.skill_score(1.0, 2.0) == pytest.approx(0.5)
    assert metrics.skill_score(2.0, 2.0) == pytest.approx(0.0)
    assert metrics.skill_score(3.0, 2.0) == pytest.approx(-0.5)
    model = xr.DataArray([1.0, 3.0], dims="lead", coords={"lead": [1, 2]})
    base = xr.DataArray([4.0, 3.0], dims="lead", coords={"lead": [1, 2]})
    np.testing.assert_allclose(metrics.skill_score(model, base).values, [0.75, 0.0])


def test_rmse_per_cell_masks_land():
    lat, lon = np.array([0.0]), np.array([0.0, 1.0])
    truth = _field(np.zeros((2, 1, 2)), lat, lon)
    forecast = _field([[[1.0, 5.0]], [[3.0, 5.0]]], lat, lon)
    out = metrics.rmse_per_cell(forecast, truth, _mask([[True, False]], lat, lon))
    assert out.dims == ("lat", "lon")
    assert float(out[0, 0]) == pytest.approx(math.sqrt(5))
    assert np.isnan(float(out[0, 1]))


@pytest.mark.parametrize(
    "change",
    ["shifted_time", "fewer_times", "other_grid"],
)
def test_acc_climatology_must_align_exactly(change):
    rng = np.random.default_rng(4)
    clim = _field(rng.normal(size=(3, 2, 1)))
    truth = clim + _field(rng.normal(size=(3, 2, 1)))
    forecast = clim + _field(rng.normal(size=(3, 2, 1)))
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    if change == "shifted_time":
        bad = clim.assign_coords(time=clim["time"] + 1)
    elif change == "fewer_times":
        bad = clim.isel(time=[0, 1])  # an inner join would silently score 2 of the 3 times
    else:
        bad = clim.assign_coords(lat=LAT + 0.5)
    with pytest.raises(DataError, match="forecast, truth, climatology and weights have different coordinates"):
        metrics.acc(forecast, truth, bad, w)
    # a climatology without the time dimension broadcasts over times
    static = clim.isel(time=0, drop=True)
    expected = metrics.acc(forecast, truth, clim.copy(data=np.broadcast_to(static.values, clim.shape)), w)
    assert float(metrics.acc(forecast, truth, static, w)) == pytest.approx(float(expected))


def test_per_time_scores_and_time_mean():
    # errors: time 0 = [1, 2], time 1 = [2, -1], time 2 all NaN (left out of the time means)
    truth = _field(np.zeros((3, 2, 1)))
    forecast = _field([[[1.0], [2.0]], [[2.0], [-1.0]], [[np.nan], [np.nan]]])
    w = metrics.area_weights(LAT, _mask([[True], [True]]))
    per_time = metrics.mse_per_time(forecast, truth, w)
    assert per_time.dims == ("time",)
    np.testing.assert_allclose(per_time.values[:2], [2.0, 3.0])
    assert np.isnan(per_time.values[2])
    np.testing.assert_allclose(
        metrics.mae_per_time(forecast, truth, w).values[:2], [(W0 + 2 * W60) / 2, (2 * W0 + W60) / 2]
    )
    np.testing.assert_allclose(
        metrics.bias_per_time(forecast, truth, w).values[:2], [(W0 + 2 * W60) / 2, (2 * W0 - W60) / 2]
    )
    assert float(metrics.time_mean(per_time)) == pytest.approx(2.5)
    assert float(metrics.mse(forecast, truth, w)) == pytest.approx(2.5)
    clim = _field(np.full((3, 2, 1), -1.0))
    acc_t = metrics.acc_per_time(forecast, truth, clim, w)
    # anomalies f' = [2, 3] vs t' = [1, 1] at time 0; [3, 0] vs [1, 1] at time 1
    expected0 = (W0 * 2 + W60 * 3) / math.sqrt((W0 * 4 + W60 * 9) * (W0 + W60))
    expected1 = (W0 * 3) / math.sqrt((W0 * 9) * (W0 + W60))
    np.testing.assert_allclose(acc_t.values[:2], [expected0, expected1])
    assert float(metrics.acc(forecast, truth, clim, w)) == pytest.approx((expected0 + expected1) / 2)


# ---------------------------------------------------------------------------------------------
# skill with a block-bootstrap confidence interval


def _per_time_mse(rng: np.random.Generator, n: int, sigma: float, phi: float = 0.0, cells: int = 4) -> np.ndarray:
    """Per-time MSE of errors ``sigma * a_t`` on ``cells`` independent cells, ``a`` AR(1) with unit variance."""
    noise = rng.normal(size=(n, cells))
    a = np.empty_like(noise)
    a[0] = noise[0]
    for t in range(1, n):
        a[t] = phi * a[t - 1] + math.sqrt(1 - phi**2) * noise[t]
    return ((sigma * a) ** 2).mean(axis=1)


SIGMA_M, SIGMA_B = 1.0, 1.5
ANALYTIC_SKILL = 1 - SIGMA_M / SIGMA_B


def test_bootstrap_skill_white_noise_contains_the_analytic_skill_and_shrinks_with_n():
    widths = []
    for n in (100, 1600):
        rng = np.random.default_rng(n)
        res = metrics.bootstrap_skill(_per_time_mse(rng, n, SIGMA_M), _per_time_mse(rng, n, SIGMA_B), seed=1)
        assert res.n == n
        assert res.lower < res.skill < res.upper
        assert res.lower <= ANALYTIC_SKILL <= res.upper
        assert res.significant
        widths.append(res.upper - res.lower)
    # width ~ 1/sqrt(n): 16 times more initial times, about a quarter of the width
    assert widths[1] < widths[0] / 2.5


def test_bootstrap_skill_coverage_close_to_95_percent():
    n, repeats, covered = 120, 200, 0
    for rep in range(repeats):
        rng = np.random.default_rng(10_000 + rep)
        res = metrics.bootstrap_skill(
            _per_time_mse(rng, n, SIGMA_M), _per_time_mse(rng, n, SIGMA_B), n_resamples=400, seed=rep
        )
        covered += res.lower <= ANALYTIC_SKILL <= res.upper
    assert 0.90 <= covered / repeats <= 0.99


def test_bootstrap_skill_autocorrelated_errors_longer_blocks_wider_interval():
    n = 600
    rng = np.random.default_rng(3)
    white = metrics.bootstrap_skill(_per_time_mse(rng, n, SIGMA_M), _per_time_mse(rng, n, SIGMA_B), seed=0)
    rng = np.random.default_rng(3)
    red = metrics.bootstrap_skill(
        _per_time_mse(rng, n, SIGMA_M, phi=0.95), _per_time_mse(rng, n, SIGMA_B, phi=0.95), seed=0
    )
    # squared AR(1) errors have autocorrelation phi^(2k): integral time scale (1+0.9025)/(1-0.9025) ~ 19.5
    assert white.block_length <= 3
    assert red.block_length >= 8
    assert red.upper - red.lower > 1.5 * (white.upper - white.lower)


def test_bootstrap_skill_identical_forecasts_zero_skill_not_significant():
    rng = np.random.default_rng(4)
    mse = _per_time_mse(rng, 200, 1.0)
    res = metrics.bootstrap_skill(mse, mse.copy())
    assert res.skill == 0.0 and res.lower == 0.0 and res.upper == 0.0
    assert res.block_length == 1
    assert not res.significant


def test_bootstrap_skill_is_reproducible_and_seeded():
    rng = np.random.default_rng(5)
    m, b = _per_time_mse(rng, 150, 1.0), _per_time_mse(rng, 150, 1.2)
    first = metrics.bootstrap_skill(m, b, seed=7)
    assert metrics.bootstrap_skill(m, b, seed=7) == first
    other = metrics.bootstrap_skill(m, b, seed=8)
    assert other.skill == first.skill and (other.lower, other.upper) != (first.lower, first.upper)


def test_bootstrap_skill_paired_nan_times_dropped_and_short_series():
    m = np.array([1.0, np.nan, 1.0, 2.0, 1.0, 1.0])
    b = np.array([4.0, 4.0, np.nan, 8.0, 4.0, 4.0])
    res = metrics.bootstrap_skill(m, b)
    assert res.n == 4
    assert res.skill == pytest.approx(1 - math.sqrt(5 / 4) / math.sqrt(20 / 4))
    one = metrics.bootstrap_skill(np.array([1.0]), np.array([4.0]))
    assert one.skill == pytest.approx(0.5) and math.isnan(one.lower) and not one.significant
    none = metrics.bootstrap_skill(np.array([np.nan]), np.array([4.0]))
    assert none.n == 0 and math.isnan(none.skill)
    with pytest.raises(DataError, match="same initial times"):
        metrics.bootstrap_skill(np.ones(3), np.ones(4))


def test_integral_time_scale_and_block_length_rules(monkeypatch):
    rng = np.random.default_rng(6)
    n, phi = 20_000, 0.8
    x = np.empty(n)
    x[0] = rng.normal()
    for t in range(1, n):
        x[t] = phi * x[t - 1] + rng.normal()
    # AR(1): (1 + phi) / (1 - phi) = 9 (over 30 seeds the estimates spread over about 8.3..10.6)
    assert metrics.integral_time_scale(x) == pytest.approx(9, abs=2)
    assert metrics.integral_time_scale(np.ones(10)) == 1.0
    assert metrics.block_length(np.ones(10)) == 1
    assert metrics.block_length(x) == math.ceil(metrics.integral_time_scale(x))
    assert metrics.block_length(np.arange(20.0)) == 7  # a trend: integral time scale 6.98
    monkeypatch.setattr(metrics, "integral_time_scale", lambda series: 100.0)
    assert metrics.block_length(np.zeros(11)) == 5  # capped at n // 2


def test_circular_block_indices_wrap_and_are_consecutive_within_blocks():
    idx = metrics.circular_block_indices(10, 4, 50, np.random.default_rng(0))
    assert idx.shape == (50, 10)
    assert idx.min() >= 0 and idx.max() <= 9
    steps = (np.diff(idx, axis=1) % 10)[:, [0, 1, 2, 4, 5, 6, 8]]  # within a block: +1 (mod n)
    assert np.all(steps == 1)


def test_excludes_zero_elementwise():
    assert metrics.excludes_zero(0.1, 0.3) and metrics.excludes_zero(-0.3, -0.1)
    assert not metrics.excludes_zero(0.0, 0.3) and not metrics.excludes_zero(math.nan, math.nan)
    lower = xr.DataArray([0.1, -0.2, np.nan])
    upper = xr.DataArray([0.2, 0.2, np.nan])
    np.testing.assert_array_equal(metrics.excludes_zero(lower, upper).values, [True, False, False])


def test_bootstrap_skill_table_matches_the_scalar_function_per_lead_and_variable():
    rng = np.random.default_rng(8)
    n, leads, variables = 80, [1, 2], ["sst", "no3"]
    model = np.stack([[_per_time_mse(rng, n, 1.0 + 0.2 * i) for _ in variables] for i in range(2)])
    base = np.stack([[_per_time_mse(rng, n, 1.5) for _ in variables] for _ in range(2)])
    coords = {"lead": leads, "variable": variables, "time": pd.date_range("2021-07-01", periods=n)}
    m = xr.DataArray(model, dims=("lead", "variable", "time"), coords=coords).transpose("time", "lead", "variable")
    b = xr.DataArray(base, dims=("lead", "variable", "time"), coords=coords)
    table = metrics.bootstrap_skill_table(m, b, n_resamples=200, seed=3)
    assert table["skill"].dims == ("lead", "variable")
    assert table.attrs["confidence"] == 0.95
    for i, lead in enumerate(leads):
        for j, var in enumerate(variables):
            res = metrics.bootstrap_skill(model[i, j], base[i, j], n_resamples=200, seed=3)
            row = table.sel(lead=lead, variable=var)
            assert (float(row["skill"]), float(row["lower"]), float(row["upper"])) == (res.skill, res.lower, res.upper)
            assert int(row["block_length"]) == res.block_length and int(row["n"]) == n
            assert bool(row["significant"]) == res.significant
    with pytest.raises(DataError, match="different coordinates"):
        metrics.bootstrap_skill_table(m, b.isel(time=slice(1, None)))
