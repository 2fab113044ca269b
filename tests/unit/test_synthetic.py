"""The embedded synthetic ocean: real file layouts and encodings, determinism, physics, predictability."""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError
from conv2dlstm.fsutil import sha256_tree
from conv2dlstm.steps import synthetic

SMALL_OISST = {
    "kind": "oisst",
    "start": "2019-01-30",
    "end": "2019-02-02",
    "lat": [30.125, 33.875],
    "lon": [290.125, 293.875],
}
SEED_BOX = {"lat": [5.75, 17.5], "lon": [73.0, 79.75]}


def synth_cfg(**synthetic_keys: object) -> dict:
    return validate_config({"synthetic": dict(synthetic_keys)})


@pytest.fixture(scope="module")
def oisst_year() -> xr.Dataset:
    """One year of OISST on the default box at 0.5 degrees (in memory)."""
    lat = synthetic.axis_centres(20.25, 45.75, 0.5)
    lon = synthetic.axis_centres(280.25, 305.75, 0.5)
    return synthetic.oisst_dataset(pd.date_range("2019-01-01", "2019-12-31"), lat, lon, seed=0)


@pytest.fixture(scope="module")
def bgc_two_years() -> xr.Dataset:
    lat = synthetic.axis_centres(*SEED_BOX["lat"], 0.25)
    lon = synthetic.axis_centres(*SEED_BOX["lon"], 0.25)
    return synthetic.cmems_bgc_dataset(pd.date_range("2019-01-01", "2020-12-31"), lat, lon, seed=0)


def test_oisst_files_have_the_ncei_layout_and_packing(tmp_path: Path) -> None:
    out = tmp_path / "oisst"
    synthetic.main(synth_cfg(**SMALL_OISST), out_dir=out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "201901/oisst-avhrr-v02r01.20190130.nc",
        "201901/oisst-avhrr-v02r01.20190131.nc",
        "201902/oisst-avhrr-v02r01.20190201.nc",
        "201902/oisst-avhrr-v02r01.20190202.nc",
    ]
    assert not list(tmp_path.glob(".*partial"))
    path = out / files[2]
    with netCDF4.Dataset(path) as nc:
        assert nc.data_model == "NETCDF4"
        assert dict((k, len(v)) for k, v in nc.dimensions.items()) == {"time": 1, "zlev": 1, "lat": 16, "lon": 16}
        assert nc.Conventions.startswith("CF-1.6")
        assert "OISST" in nc.title
        assert nc["time"].units == "days since 1978-01-01 12:00:00"
        assert nc["time"][:].tolist() == [(pd.Timestamp("2019-02-01") - pd.Timestamp("1978-01-01")).days]
        for name, units in (("sst", "Celsius"), ("anom", "Celsius"), ("err", "Celsius"), ("ice", "%")):
            var = nc[name]
            assert var.dtype == np.int16 and var.dimensions == ("time", "zlev", "lat", "lon")
            assert var.scale_factor == np.float32(0.01) and var.add_offset == 0
            assert var._FillValue == -999 and var.units == units and var.long_name
        assert (nc["sst"].valid_min, nc["sst"].valid_max) == (-300, 4500)
        nc.set_auto_maskandscale(False)
        raw = nc["sst"][0, 0]
        assert nc["lat"].dtype == np.float32 and nc["lat"].units == "degrees_north"
    land = synthetic.land_mask(
        synthetic.axis_centres(30.125, 33.875, 0.25), synthetic.axis_centres(290.125, 293.875, 0.25)
    )
    ds = xr.open_dataset(path)
    assert ds["sst"].dtype == np.float32
    assert ds["time"].values[0] == np.datetime64("2019-02-01T12:00")
    assert ds["lat"].values[0] == 30.125 and np.all(np.diff(ds["lat"].values) > 0)
    assert 0 <= ds["lon"].min() and ds["lon"].max() <= 360
    sst = ds["sst"].values[0, 0]
    np.testing.assert_array_equal(np.isnan(sst), land)
    np.testing.assert_array_equal(raw == -999, land)
    np.testing.assert_allclose(sst[~land], raw[~land] * np.float32(0.01), rtol=1e-6)
    # the file holds the in-memory generator's values, quantized to 0.01 degC
    expected = synthetic.oisst_dataset(pd.DatetimeIndex(["2019-02-01"]), ds["lat"].values, ds["lon"].values, seed=0)
    for name in synthetic.OISST_VARIABLES:
        np.testing.assert_allclose(ds[name].values, expected[name].values, atol=0.0051, equal_nan=True)
    assert ds["sst"].attrs["units"] == "Celsius"
    assert ds["lat"].attrs["units"] == "degrees_north" and ds["lon"].attrs["units"] == "degrees_east"


def test_output_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.main(synth_cfg(**SMALL_OISST, seed=seed), out_dir=tmp_path / name)
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")
    assert sha256_tree(tmp_path / "a") != sha256_tree(tmp_path / "c")


def test_a_day_does_not_depend_on_the_requested_period() -> None:
    lat = synthetic.axis_centres(30.0, 34.0, 0.5)
    lon = synthetic.axis_centres(290.0, 296.0, 0.5)
    full = synthetic.oisst_dataset(pd.date_range("2019-01-01", "2019-03-31"), lat, lon, seed=1)
    part = synthetic.oisst_dataset(pd.date_range("2019-02-10", "2019-02-12"), lat, lon, seed=1)
    xr.testing.assert_identical(part, full.sel(time=part.time))


def test_oisst_is_physically_plausible(oisst_year: xr.Dataset) -> None:
    ds = oisst_year.isel(zlev=0)
    land = synthetic.land_mask(ds.lat.values, ds.lon.values)
    assert 0.15 <= land.mean() <= 0.30
    assert land[:, 0].mean() > 0.9 and land[:, -1].mean() < 0.1  # the coast is on the western side
    sst, anom = ds["sst"].values, ds["anom"].values
    ocean = ~land
    assert np.isnan(sst[:, land]).all() and np.isfinite(sst[:, ocean]).all()
    assert np.nanmin(sst) >= -1.8 and np.nanmax(sst) <= 33
    annual = np.nanmean(sst, axis=(0, 2))  # (lat,)
    assert 26 <= annual[:3].mean() <= 30 and 8 <= annual[-3:].mean() <= 13
    month = ds["time"].dt.month.values
    north = np.nanmean(sst[:, -10:], axis=(1, 2))
    south = np.nanmean(sst[:, :10], axis=(1, 2))
    seasonal_north = north[month == 8].mean() - north[month == 2].mean()
    seasonal_south = south[month == 8].mean() - south[month == 2].mean()
    assert seasonal_north > 8 and 1 < seasonal_south < seasonal_north
    assert north.argmax() in range(220, 260)  # late August
    # anomalies: ~1 degC scale, mean ~0; err small positive; ice 0 over the ocean
    assert 0.4 < np.nanstd(anom) < 1.2 and abs(np.nanmean(anom)) < 0.2
    clim = synthetic.sst_climatology(pd.DatetimeIndex(ds.time.values), ds.lat.values, ds.lon.values)
    np.testing.assert_allclose(anom[:, ocean], (sst - clim)[:, ocean], atol=1e-4)
    err = ds["err"].values[:, ocean]
    assert (err > 0).all() and err.max() < 1
    assert (ds["ice"].values[:, ocean] == 0).all()


def _shift_correlation(a: np.ndarray, lag: int, shift: int) -> float:
    """corr(a[t + lag, :, x], a[t, :, x + shift]) over t and x (shift > 0: the source lies east)."""
    nx, margin = a.shape[-1], 10
    later = a[lag:, :, margin : nx - margin]
    earlier = a[:-lag, :, margin + shift : nx - margin + shift]
    ok = np.isfinite(later) & np.isfinite(earlier)
    return float(np.corrcoef(later[ok], earlier[ok])[0, 1])


def test_anomalies_propagate_westward(oisst_year: xr.Dataset) -> None:
    anom = oisst_year["anom"].isel(zlev=0).values  # (time, lat, lon) at 0.5 deg
    lag = 3  # days; at 0.3-0.8 deg/day the pattern moves 1-2.4 deg = 2-5 cells west
    corr = {s: _shift_correlation(anom, lag, s) for s in range(-8, 9)}
    best = max(corr, key=corr.get)
    assert 1 <= best <= 6, corr
    assert corr[best] > corr[0] + 0.1 and corr[best] > corr[-best] + 0.2
    # a forecast that advects today's anomaly west beats persistence by a wide margin
    assert 1 - corr[best] < 0.6 * (1 - corr[0])


def test_cmems_bgc_file_has_the_seed_layout(tmp_path: Path) -> None:
    out = tmp_path / "seed"
    synthetic.main(synth_cfg(kind="cmems_bgc", start="2019-06-01", end="2019-07-10", **SEED_BOX), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["CROCO.nc"]
    ds = xr.open_dataset(out / "CROCO.nc")
    assert dict(ds.sizes) == {"time": 40, "depth": 3, "latitude": 48, "longitude": 28}
    assert set(ds.data_vars) == {"fe", "po4", "si", "no3"}
    with netCDF4.Dataset(out / "CROCO.nc") as nc:
        assert nc["time"].units == "days since 1950-01-01"
        assert nc["no3"].dtype == np.float32 and nc["no3"].dimensions == ("time", "depth", "latitude", "longitude")
    assert float(ds.latitude[0]) == 5.75 and float(ds.latitude[-1]) == 17.5
    assert float(ds.longitude[0]) == 73.0 and float(ds.longitude[-1]) == 79.75
    np.testing.assert_allclose(ds.depth.values, [0.494, 9.823, 29.445], atol=1e-3)
    assert pd.Timestamp(ds.time.values[0]) == pd.Timestamp("2019-06-01")
    land = synthetic.land_mask(ds.latitude.values, ds.longitude.values, coast="east")
    assert 0.2 < land.mean() < 0.4
    assert land[-10:, -3:].all() and not land[-10:, :5].any()  # India on the north-east side
    assert land[:4, -3:].any() and not land[:4, :15].any()  # an island near the south-east corner
    for name in ("fe", "po4", "si", "no3"):
        values = ds[name].values
        assert ds[name].attrs["units"] == "mmol m-3" and "standard_name" in ds[name].attrs
        assert np.isnan(values[:, :, land]).all() and (values[:, :, ~land] > 0).all()
    surface = {n: float(ds[n].isel(depth=0).mean()) for n in ds.data_vars}
    assert 1e-4 < surface["fe"] < 2e-3 and 0.1 < surface["po4"] < 1.0
    assert 1 < surface["si"] < 8 and 0.5 < surface["no3"] < 6


def _eofs(a: np.ndarray, train: np.ndarray, n: int) -> np.ndarray:
    """Projections ``(time, n)`` of standardized fields ``a (time, cell)`` on their leading training EOFs."""
    mean, std = a[train].mean(0), a[train].std(0)
    z = ((a - mean) / std).astype(np.float64)
    gram = z[train] @ z[train].T  # (train, train): cheaper than an SVD of (train, cell)
    eigval, eigvec = np.linalg.eigh(gram)
    patterns = z[train].T @ eigvec[:, ::-1][:, :n] / np.sqrt(eigval[::-1][:n])  # (cell, n), orthonormal
    return z @ patterns


def test_no3_is_predictable_from_lagged_inputs(bgc_two_years: xr.Dataset) -> None:
    """Next-day surface no3 from the previous 5 days of fe, po4, si: a linear model fitted on the
    first year explains most of the second year's variance, and beats the training mean and a
    day-of-year climatology by far."""
    surface = bgc_two_years.isel(depth=0)
    ocean = np.isfinite(surface["no3"].values[0])
    fields = {n: surface[n].values[:, ocean] for n in ("fe", "po4", "si", "no3")}  # (time, cell)
    n_time = fields["no3"].shape[0]
    train, test = np.arange(5, 365), np.arange(365, n_time)
    target_times = np.arange(n_time)
    features = np.concatenate(
        [_eofs(fields[n], train, 8)[target_times - lag] for n in ("fe", "po4", "si") for lag in range(1, 6)], axis=1
    )
    design = np.c_[features, np.ones(n_time)]
    y = fields["no3"]
    weights, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
    mse_model = np.mean((design[test] @ weights - y[test]) ** 2)
    mse_mean = np.mean((y[train].mean(0) - y[test]) ** 2)
    doy = surface["time"].dt.dayofyear.values
    clim = np.stack([y[train][np.abs((doy[train] - d + 182) % 365 - 182) <= 15].mean(0) for d in doy[test]])
    mse_clim = np.mean((clim - y[test]) ** 2)
    r2 = 1 - mse_model / np.mean((y[test] - y[test].mean(0)) ** 2)
    assert r2 > 0.9
    assert mse_model < 0.1 * mse_mean and mse_model < 0.1 * mse_clim


def test_inputs_are_not_driven_by_no3(bgc_two_years: xr.Dataset) -> None:
    """The causal direction is inputs -> no3: po4 today is no better explained by yesterday's no3
    than by its own past (no3 adds nothing), while no3 gains from po4."""
    surface = bgc_two_years.isel(depth=0)
    ocean = np.isfinite(surface["no3"].values[0])
    po4 = surface["po4"].values[:, ocean]
    no3 = surface["no3"].values[:, ocean]
    train = np.arange(5, 500)
    own = _eofs(po4, train, 8)
    other = _eofs(no3, train, 8)

    def fit(target: np.ndarray, *feats: np.ndarray) -> float:
        x = np.c_[np.concatenate([f[train - 1] for f in feats], 1), np.ones(len(train))]
        w, *_ = np.linalg.lstsq(x, target[train], rcond=None)
        return float(np.mean((x @ w - target[train]) ** 2))

    assert fit(po4, own, other) > 0.95 * fit(po4, own)
    assert fit(no3, other, own) < 0.8 * fit(no3, other)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"kind": "none"}, "synthetic.kind"),
        ({"kind": "oisst", "lat": None}, "synthetic.lat"),
        ({"kind": "oisst", "lat": [20.125, 21.0]}, "whole number"),
        ({"kind": "cmems_bgc", "start": "2020-01-02", "end": "2020-01-01"}, "synthetic.end"),
    ],
)
def test_bad_configuration_is_a_clear_error_and_writes_nothing(tmp_path: Path, keys: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        synthetic.main(synth_cfg(**keys), out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "oisst"
    synthetic.main(synth_cfg(**SMALL_OISST), out_dir=out)
    before = sha256_tree(out)
    with pytest.raises(ConfigError):
        synthetic.main(synth_cfg(**{**SMALL_OISST, "lon": [290.125, 290.2]}), out_dir=out)
    assert sha256_tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oisst"]


def test_main_discards_partials_of_a_killed_attempt(tmp_path: Path, caplog) -> None:
    import logging

    out = tmp_path / "oisst"
    (tmp_path / ".oisst.1234abcd.partial" / "201901").mkdir(parents=True)  # left by a killed attempt
    (tmp_path / ".cmems.1234abcd.partial").mkdir()  # another output's
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        synthetic.main(synth_cfg(**SMALL_OISST), out_dir=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cmems.1234abcd.partial", "oisst"]
    assert "discarded" in caplog.text and ".oisst.1234abcd.partial" in caplog.text
