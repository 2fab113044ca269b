"""normalize: statistics from the training period only, climatology, mask, the step on a real Zarr store."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts import provenance, regridded
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import DataError
from conv2dlstm.steps import normalize as nz
from conv2dlstm.zarrstore import write_store

LAT = np.array([21.0, 22.0, 23.0])
LON = np.array([-79.0, -78.0, -77.0, -76.0])
REGRID_RECORD = provenance.make_record("regrid", "a" * 16, {"manifest": "b" * 64})
"""The provenance of the regridded stores these tests write (as the regrid step records it)."""

REGRIDDED_ATTRS = {"format_version": regridded.FORMAT_VERSION}
"""What a regridded store written by hand needs to be read as one."""


def regridded(times: pd.DatetimeIndex, sst: np.ndarray, no3: np.ndarray | None = None) -> xr.Dataset:
    """A regrid-step-like dataset ``(time, lat, lon)`` with float32 ``sst`` (and ``no3``)."""
    data = {"sst": (("time", "lat", "lon"), sst.astype(np.float32), {"units": "Celsius"})}
    if no3 is not None:
        data["no3"] = (("time", "lat", "lon"), no3.astype(np.float32), {"units": "mmol m-3"})
    return xr.Dataset(data, coords={"time": times, "lat": LAT, "lon": LON})


def leaky_dataset(seed: int = 0) -> tuple[xr.Dataset, int]:
    """2019 (train) ~ N(0, 1) plus a land cell; 2020 (val/test) values of 1e6."""
    times = pd.date_range("2019-01-01", "2020-12-31", freq="D")
    n_train = int((times <= "2019-12-31").sum())
    rng = np.random.default_rng(seed)
    sst = rng.normal(size=(times.size, LAT.size, LON.size))
    sst[n_train:] = 1e6
    sst[:, 0, 0] = np.nan  # land
    no3 = 5 + 2 * rng.normal(size=sst.shape)
    no3[n_train:] = -1e6
    no3[:, 0, 0] = np.nan
    return regridded(times, sst, no3), n_train


def fit(ds: xr.Dataset, **kw: object) -> xr.Dataset:
    args = {
        "train_start": "2019-01-01",
        "train_end": "2019-12-31",
        "variables": ["sst", "no3"],
        "per_pixel": False,
        "climatology_window": 1,
    }
    args.update(kw)
    return nz.fit_stats(ds, **args)


@pytest.mark.parametrize("per_pixel", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_validation_and_test_data_do_not_leak(chunked: bool, per_pixel: bool) -> None:
    ds, n_train = leaky_dataset()
    sst = ds["sst"].values.copy()
    sst[n_train + 200, 2, 2] = np.nan  # a cell missing only in the test period
    ds = regridded(ds.indexes["time"], sst, ds["no3"].values)
    src = ds.chunk({"time": 50}) if chunked else ds
    stats = fit(src, climatology_window=31, per_pixel=per_pixel)

    # The mask is geography over all periods: the cell missing in the test period is not ocean.
    ocean = np.ones((LAT.size, LON.size), bool)
    ocean[0, 0] = ocean[2, 2] = False
    np.testing.assert_array_equal(stats["mask"].values, ocean)
    # Statistics equal those of the training year alone on the same cells (nothing else to leak there).
    alone = fit(ds.isel(time=slice(0, n_train)).where(stats["mask"]), climatology_window=31, per_pixel=per_pixel)
    for name in ("mean", "std", "climatology", "mask"):
        xr.testing.assert_allclose(stats[name], alone[name], rtol=1e-10)
    # Other validation/test values (same missing cells) change nothing.
    other = ds.copy(deep=True)
    for name, value in (("sst", -3e7), ("no3", 4e9)):
        later = other[name].values[n_train:]
        other[name].values[n_train:] = np.where(np.isfinite(later), value, np.nan)
    refit = fit(other.chunk({"time": 50}) if chunked else other, climatology_window=31, per_pixel=per_pixel)
    for name in ("mean", "std", "climatology", "mask"):
        xr.testing.assert_allclose(stats[name], refit[name], rtol=1e-12)
    # And against hand-computed numbers: ocean cells of 2019 only.
    train = sst[:n_train].astype(np.float64)
    if per_pixel:
        np.testing.assert_allclose(stats["mean"].sel(variable="sst").values[ocean], train[:, ocean].mean(0), rtol=1e-9)
        np.testing.assert_allclose(stats["std"].sel(variable="sst").values[ocean], train[:, ocean].std(0), rtol=1e-9)
        assert float(stats["mean"].sel(variable="sst")[2, 2]) == 0.0  # not ocean: neutral
    else:
        np.testing.assert_allclose(stats["mean"].sel(variable="sst"), train[:, ocean].mean(), rtol=1e-10)
        np.testing.assert_allclose(stats["std"].sel(variable="sst"), train[:, ocean].std(), rtol=1e-10)
        assert abs(float(stats["mean"].sel(variable="no3")) - 5) < 0.1
    assert np.nanmax(np.abs(stats["climatology"].values)) < 20
    assert np.isnan(stats["climatology"].values[:, :, 2, 2]).all()


def test_per_pixel_std_is_floored_relative_to_the_pooled_std() -> None:
    times = pd.date_range("2019-01-01", "2020-12-31", freq="D")
    n_train = int((times <= "2019-12-31").sum())
    rng = np.random.default_rng(11)
    sst = 10 + 3 * rng.normal(size=(times.size, LAT.size, LON.size))
    sst[:, 0, 0] = np.nan  # land
    sst[:, 1, 1] = -1.8 + 1e-6 * rng.normal(size=times.size)  # clamped under sea ice: nearly constant
    sst[:, 1, 2] = -1.8  # exactly constant in the training period
    sst[n_train:, 1, 1] = sst[n_train:, 1, 2] = -1.0  # the ice melts later
    ds = regridded(times, sst.astype(np.float64))
    stats = nz.fit_stats(ds, train_start="2019-01-01", train_end="2019-12-31", variables=["sst"], per_pixel=True)

    train = ds["sst"].values[:n_train].astype(np.float64)
    ocean = np.isfinite(train[0])
    pooled = train[:, ocean].std()
    std = stats["std"].sel(variable="sst").values
    assert train[:, 1, 1].std() < 1e-5 < nz.STD_FLOOR_FRACTION * pooled
    np.testing.assert_allclose(std[1, 1], nz.STD_FLOOR_FRACTION * pooled, rtol=1e-9)
    np.testing.assert_allclose(std[1, 2], nz.STD_FLOOR_FRACTION * pooled, rtol=1e-9)
    np.testing.assert_allclose(std[2, 3], train[:, 2, 3].std(), rtol=1e-9)  # ordinary cells unchanged
    assert std[0, 0] == 1.0  # land
    # The melted cell's z-score is bounded by the floor (it was ~1e5 with the cell's own std).
    z = stats_file.normalize(stats_file.stack_variables(ds.isel(time=[-1]), ["sst"]), stats).values[0, 0]
    np.testing.assert_allclose(z[1, 2], 0.8 / (nz.STD_FLOOR_FRACTION * pooled), rtol=1e-5)
    assert np.abs(z[1, 1]) < 1e3
    # A variable constant everywhere in the training period has no pooled spread: std 1.
    flat = regridded(times, np.where(np.isfinite(sst), 4.0, np.nan))
    flat_stats = nz.fit_stats(flat, train_start="2019-01-01", train_end="2019-12-31", variables=["sst"], per_pixel=True)
    assert (flat_stats["std"].values == 1.0).all()


def test_per_pixel_statistics() -> None:
    ds, n_train = leaky_dataset(1)
    stats = fit(ds, per_pixel=True)
    assert stats["mean"].dims == ("variable", "lat", "lon")
    no3 = ds["no3"].values[:n_train].astype(np.float64)
    np.testing.assert_allclose(stats["mean"].sel(variable="no3").values[1:, :], no3.mean(axis=0)[1:, :], rtol=1e-10)
    np.testing.assert_allclose(stats["std"].sel(variable="no3").values[2, 3], no3[:, 2, 3].std(), rtol=1e-10)
    # Land: neutral statistics (masked downstream).
    assert float(stats["mean"].sel(variable="no3")[0, 0]) == 0.0
    assert float(stats["std"].sel(variable="no3")[0, 0]) == 1.0
    assert stats.attrs["per_pixel"] == 1


def seasonal(times: pd.DatetimeIndex) -> np.ndarray:
    doy = times.day_of_year.values
    signal = 10 + 5 * np.cos(2 * np.pi * (doy - 1) / 366)
    return np.broadcast_to(signal[:, None, None], (times.size, LAT.size, LON.size)).copy()


def test_climatology_of_a_pure_seasonal_cycle() -> None:
    times = pd.date_range("2019-01-01", "2020-12-31", freq="D")  # 2020 is a leap year: every day-of-year
    ds = regridded(times, seasonal(times))
    doy = np.arange(1, 367)
    truth = 10 + 5 * np.cos(2 * np.pi * (doy - 1) / 366)
    exact = nz.fit_stats(ds, train_start="2019-01-01", train_end="2020-12-31", variables=["sst"], climatology_window=1)
    np.testing.assert_allclose(exact["climatology"].values[:, 0, 1, 1], truth, rtol=1e-6)
    # A circular running mean of w days scales a 366-day cosine by sin(pi w / 366) / (w sin(pi / 366)).
    w = 31
    smooth = nz.fit_stats(ds, train_start="2019-01-01", train_end="2020-12-31", variables=["sst"], climatology_window=w)
    gain = np.sin(np.pi * w / 366) / (w * np.sin(np.pi / 366))
    np.testing.assert_allclose(smooth["climatology"].values[:, 0, 2, 3], 10 + gain * (truth - 10), rtol=1e-5)
    assert smooth["climatology"].dims == ("dayofyear", "variable", "lat", "lon")
    np.testing.assert_array_equal(smooth["dayofyear"].values, doy)


def test_day_366_is_filled_without_a_leap_year() -> None:
    times = pd.date_range("2019-01-01", "2019-12-31", freq="D")
    ds = regridded(times, seasonal(times))
    stats = nz.fit_stats(ds, train_start="2019-01-01", train_end="2019-12-31", variables=["sst"], climatology_window=1)
    clim = stats["climatology"].values[:, 0, 0, 0]
    assert np.isfinite(clim).all()
    np.testing.assert_allclose(clim[365], (clim[364] + clim[0]) / 2, rtol=1e-6)


def test_circular_smooth_by_hand() -> None:
    x = np.zeros((366, 1))
    x[0] = 3.0
    x[5] = np.nan
    out = nz.circular_smooth(x, 3)
    np.testing.assert_allclose(out[[365, 0, 1, 2], 0], [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(out[4, 0], 0.0)  # days 3, 4 available; day 5 skipped
    gap = np.full((366, 1), np.nan)
    gap[[10, 20]] = [[1.0], [3.0]]
    np.testing.assert_allclose(nz.circular_smooth(gap, 1)[15, 0], 2.0)


def test_mask_semantics() -> None:
    ds, n_train = leaky_dataset(2)
    sst = ds["sst"].values.copy()
    sst[n_train + 10, 2, 1] = np.nan  # missing once, in the test period
    no3 = ds["no3"].values.copy()
    no3[3, 1, 3] = np.nan  # missing once in another variable
    ds = regridded(ds.indexes["time"], sst, no3)
    stats = fit(ds)
    expected = np.ones((LAT.size, LON.size), bool)
    expected[0, 0] = expected[2, 1] = expected[1, 3] = False
    np.testing.assert_array_equal(stats["mask"].values, expected)
    assert stats["mask"].dtype == bool
    # Non-ocean cells do not enter the statistics.
    train = ds["sst"].values[:n_train].astype(np.float64)
    np.testing.assert_allclose(stats["mean"].sel(variable="sst"), train[:, expected].mean(), rtol=1e-10)
    assert np.isnan(stats["climatology"].values[:, :, 0, 0]).all()


def test_cells_made_land_by_missing_days_are_named_not_silent(caplog) -> None:
    """Sparse missing values turn ocean into land for the whole record (the mask is 'data at every
    time'): the log says how many cells and on which days; a day of no data at all names that day."""
    ds, n_train = leaky_dataset(2)
    sst = ds["sst"].values.copy()
    sst[n_train + 10, 2, 1] = np.nan  # one cell missing on two days
    sst[40, 2, 1] = np.nan
    sst[7, 1, 2] = np.nan
    times = ds.indexes["time"]
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        stats = fit(regridded(times, sst, ds["no3"].values))
    assert stats.attrs["land_from_gaps_cells"] == 2  # recorded: the windows store carries it on, MLflow tags it
    assert stats.attrs["land_from_gaps_days"] == f"2019-01-08, 2019-02-10, {times[n_train + 10]:%Y-%m-%d}"
    assert stats.attrs["land_from_gaps_where"] == "(22, -77), (23, -78)"  # where, not only how many
    assert stats["mask"].attrs == {"long_name": "ocean: finite at every time of every variable"}
    (message,) = [r.getMessage() for r in caplog.records if "are missing on" in r.getMessage()]
    assert "2 grid cells with data at other time steps are missing on 3 of 731 steps" in message
    assert f"2019-01-08, 2019-02-10, {times[n_train + 10]:%Y-%m-%d}" in message and "land for the whole" in message
    assert "cells at lat, lon (22, -77), (23, -78);" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        fit(ds)  # only the land cell, missing every day: nothing to say
    assert not [r for r in caplog.records if "are missing on" in r.getMessage()]
    blank = ds["sst"].values.copy()
    blank[100] = np.nan  # a file of fill values only
    with pytest.raises(DataError, match=r"no ocean cell: .*missing on 1 of 731 steps \(2019-04-11\)"):
        fit(regridded(times, blank, ds["no3"].values))


def test_too_many_cells_made_land_by_gaps_stop_the_step_unless_filled() -> None:
    """harmonize.max_land_from_gaps: 2 of the 11 cells with data made land (18 %) is past 0.05 and
    below 0.2; filling gaps of a day (harmonize.fill_max_days) keeps them ocean."""
    ds, n_train = leaky_dataset(2)
    sst = ds["sst"].values.copy()
    sst[40, 2, 1] = sst[7, 1, 2] = np.nan
    gappy = regridded(ds.indexes["time"], sst, ds["no3"].values)
    with pytest.raises(DataError) as caught:
        fit(gappy, max_land_from_gaps=0.05)
    message = str(caught.value)
    assert (
        "2 grid cells with data at other time steps are missing on 2 of 731 steps (2019-01-08, 2019-02-10)" in message
    )
    assert "18.2% of the grid cells with data, more than harmonize.max_land_from_gaps = 0.05" in message
    assert "(cells at lat, lon (22, -77), (23, -78))" in message and "harmonize.fill_max_days (now 0" in message
    assert fit(gappy, max_land_from_gaps=0.2).attrs["land_from_gaps_cells"] == 2
    filled = fit(gappy, max_land_from_gaps=0.05, fill_max_days=1)
    assert filled["mask"].values.sum() == 11 and "land_from_gaps_cells" not in filled.attrs
    assert (filled.attrs["gap_filled_values"], filled.attrs["gap_filled_cells"], filled.attrs["fill_max_days"]) == (
        2,
        2,
        1,
    )


def test_empty_training_period_names_period_and_data_range() -> None:
    ds, _ = leaky_dataset()
    with pytest.raises(DataError, match=r"2015-01-01\.\.2015-12-31.*2019-01-01\.\.2020-12-31"):
        fit(ds, train_start="2015-01-01", train_end="2015-12-31")


def test_missing_variable_is_named() -> None:
    ds, _ = leaky_dataset()
    with pytest.raises(DataError, match=r"\['si'\].*\['no3', 'sst'\]"):
        fit(ds, variables=["sst", "si"])


@pytest.mark.parametrize("per_pixel", [False, True])
def test_normalize_denormalize_round_trip(per_pixel: bool) -> None:
    ds, _ = leaky_dataset(3)
    stats = fit(ds, per_pixel=per_pixel)
    x = stats_file.stack_variables(ds.isel(time=slice(0, 5)), ["no3", "sst"])  # other order than the stats
    z = stats_file.normalize(x, stats)
    mean = stats["mean"].sel(variable="sst")
    std = stats["std"].sel(variable="sst")
    np.testing.assert_allclose(z.sel(variable="sst"), (x.sel(variable="sst") - mean) / std, rtol=1e-6)
    xr.testing.assert_allclose(stats_file.denormalize(z, stats), x.astype(np.float64), rtol=1e-6)
    with pytest.raises(DataError, match="'variable' dimension"):
        stats_file.normalize(ds["sst"], stats)
    if per_pixel:
        with pytest.raises(DataError, match="grid"):
            stats_file.normalize(x.assign_coords(lat=x["lat"] + 0.5), stats)


def test_main_writes_stats_netcdf(tmp_path: Path, caplog) -> None:
    ds, n_train = leaky_dataset(4)
    data = tmp_path / "regrid" / "oisst.zarr"
    write_store(ds.chunk({"time": 128}).assign_attrs(REGRIDDED_ATTRS, **provenance.to_attrs(REGRID_RECORD)), data)
    cfg = validate_config(
        {
            "variables": {"inputs": ["sst", "no3"], "targets": ["sst"]},
            "splits": {
                "train": {"start": "2019-01-01", "end": "2019-12-31"},
                "val": {"start": "2020-01-01", "end": "2020-06-30"},
                "test": {"start": "2020-07-01", "end": "2020-12-31"},
            },
            "normalize": {"climatology_window": 15},
        }
    )
    out = tmp_path / "normalize" / "oisst.nc"
    out.parent.mkdir()
    (out.parent / ".oisst.nc.1234abcd.partial").write_bytes(b"left by a killed attempt")
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        nz.main(cfg, data=data, out=out, threads=1, memory_mb=1024)
    assert [p.name for p in out.parent.iterdir()] == ["oisst.nc"]
    assert "discarded" in caplog.text and ".oisst.nc.1234abcd.partial" in caplog.text
    assert provenance.read_netcdf(out) == provenance.for_step(cfg, "normalize", {"regrid": REGRID_RECORD["digest"]})
    with xr.open_dataset(out) as stats:
        assert list(stats["variable"].values) == ["sst", "no3"]
        assert stats["mean"].dims == ("variable",)
        assert stats["climatology"].shape == (366, 2, 3, 4)
        assert stats["mask"].dtype == bool and not bool(stats["mask"][0, 0])
        assert list(stats["variable_units"].values) == ["Celsius", "mmol m-3"]
        assert stats["variable_units"].attrs["no3"] == "mmol m-3"
        assert stats.attrs["train_start"] == "2019-01-01" and stats.attrs["train_end"] == "2019-12-31"
        assert stats.attrs["per_pixel"] == 0
        for name in ("mean", "std", "mask"):  # the regrid store's attributes do not leak into the statistics
            assert "provenance" not in stats[name].attrs, name
        sst = ds["sst"].values[:n_train].astype(np.float64)
        np.testing.assert_allclose(float(stats["mean"].sel(variable="sst")), np.nanmean(sst), rtol=1e-9)
    # A training period outside the data fails and leaves the previous output as it was.
    before = out.read_bytes()
    cfg["splits"]["train"] = {"start": "2010-01-01", "end": "2010-12-31"}
    with pytest.raises(DataError, match="2010-01-01"):
        nz.main(cfg, data=data, out=out)
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["oisst.nc"]


@pytest.mark.parametrize("how", ["missing", "corrupt", "not_a_store", "no_time"])
def test_main_bad_regridded_store_names_the_path_and_the_step(tmp_path: Path, how: str) -> None:
    ds, _ = leaky_dataset(5)
    data = tmp_path / "regrid" / "oisst.zarr"
    if how == "no_time":
        no_time = ds.isel(time=0).expand_dims("step").chunk({"step": 1})
        write_store(no_time.assign_attrs(REGRIDDED_ATTRS), data)  # no `time` dimension
        match = r"has no dimension\(s\) \['time'\].*re-run the regrid step"
    else:
        write_store(ds.chunk({"time": 128}).assign_attrs(REGRIDDED_ATTRS), data)
        if how == "missing":
            shutil.rmtree(data)
            match = "does not exist; run the regrid step first"
        elif how == "corrupt":
            (data / "zarr.json").write_text("{truncated")
            match = r"(?s)is damaged: metadata file zarr\.json .*; rebuild it with the regrid step"
        else:
            shutil.rmtree(data)
            data.write_text("not a store")
            match = r"(?s)cannot be opened \(.*\); delete it and re-run the regrid step"
    out = tmp_path / "normalize" / "oisst.nc"
    with pytest.raises(DataError, match=match) as info:
        nz.main(validate_config({"variables": {"inputs": ["sst"], "targets": ["sst"]}}), data=data, out=out)
    assert str(data) in str(info.value)
    assert not out.parent.exists()


def test_main_refuses_a_regridded_store_without_provenance(tmp_path: Path) -> None:
    ds, _ = leaky_dataset(5)
    data = tmp_path / "regrid" / "oisst.zarr"
    write_store(ds.chunk({"time": 128}).assign_attrs(REGRIDDED_ATTRS), data)  # no provenance record
    out = tmp_path / "normalize" / "oisst.nc"
    with pytest.raises(DataError, match=r"oisst.zarr has no provenance record.*rerun the regrid step"):
        nz.main(validate_config({"variables": {"inputs": ["sst"], "targets": ["sst"]}}), data=data, out=out)
    assert not out.exists()


def test_load_stats_round_trip_and_errors(tmp_path: Path) -> None:
    ds, _ = leaky_dataset(6)
    path = tmp_path / "stats.nc"
    stats = fit(ds)
    stats_file.write(stats, path)
    loaded = stats_file.load(path)
    for name in (*stats_file.REQUIRED, "variable_units"):
        xr.testing.assert_identical(loaded[name], stats[name])
    assert loaded["mask"].dtype == bool
    assert loaded.attrs["train_start"] == "2019-01-01"
    stats.drop_vars("mask").to_netcdf(path)
    with pytest.raises(DataError, match=r"has no \['mask'\].*re-run the normalize step") as info:
        stats_file.load(path)
    assert str(path) in str(info.value)
