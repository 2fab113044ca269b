"""The predictions file (conv2dlstm.artifacts.predictions): CF, written in batches, its format version."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.errors import DataError
from tests.support import reference as _reference
from tests.support.cases import LAT, LON, MASK, batch_slices, cube_shape, forecast_cube


def test_predictions_netcdf_is_cf_and_decodes(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.normal(20, 2, size=cube_shape(n=4, n_lead=3, n_var=2)).astype("float32")
    fc = forecast_cube(values, variables=("sst", "no3"), n_lead=3).where(MASK)
    ds = _reference.predictions_dataset(fc, units={"sst": "degC", "no3": "mmol m-3"}, attrs={"run": "exp1"})
    path = tmp_path / "predictions.nc"
    _reference.write_netcdf(ds, path)
    assert not list(tmp_path.glob(".*partial"))
    with xr.open_dataset(path) as back:
        back = back.load()
    assert back.attrs["Conventions"] == "CF-1.8"
    assert back.attrs["run"] == "exp1"
    assert set(back.data_vars) == {"sst", "no3"}
    sst = back["sst"]
    assert sst.dims == ("time", "lead", "lat", "lon")
    assert sst.dtype == np.float32
    assert sst.attrs["units"] == "degC"
    assert sst.attrs["standard_name"] == "sea_surface_temperature"
    assert back["no3"].attrs["standard_name"] == "mole_concentration_of_nitrate_in_sea_water"
    assert np.issubdtype(back["time"].dtype, np.datetime64)
    assert back["time"].attrs["standard_name"] == "forecast_reference_time"
    np.testing.assert_array_equal(back["lead"].values, [1, 2, 3])
    assert np.issubdtype(back["lead_time"].dtype, np.timedelta64)
    np.testing.assert_array_equal(back["lead_time"].values, np.arange(1, 4) * np.timedelta64(1, "D"))
    assert back["valid_time"].dims == ("time", "lead")
    assert np.issubdtype(back["valid_time"].dtype, np.datetime64)
    np.testing.assert_array_equal(back["valid_time"].values, fc["valid_time"].values)
    assert back["lat"].attrs["units"] == "degrees_north" and back["lon"].attrs["units"] == "degrees_east"
    np.testing.assert_allclose(back["no3"].values, fc.sel(variable="no3").values, rtol=1e-6)
    assert np.isnan(back["sst"].values[:, :, ~MASK.values]).all()
    assert np.isfinite(back["sst"].values[:, :, MASK.values]).all()


def test_predictions_writer_in_batches_equals_in_memory_file(tmp_path):
    rng = np.random.default_rng(5)
    values = rng.normal(20, 2, size=cube_shape(n=5, n_lead=3, n_var=2)).astype("float32")
    fc = forecast_cube(values, variables=("sst", "no3"), n_lead=3).where(MASK)
    units = {"sst": "degC", "no3": "mmol m-3"}
    reference = tmp_path / "reference.nc"
    _reference.write_netcdf(_reference.predictions_dataset(fc, units=units, attrs={"run": "exp1"}), reference)
    streamed = tmp_path / "streamed.nc"
    with predictions_file.PredictionsWriter(
        streamed,
        init_times=fc["time"].values,
        valid_times=fc["valid_time"].values,
        variables=["sst", "no3"],
        lat=LAT,
        lon=LON,
        units=units,
        attrs={"run": "exp1"},
    ) as writer:
        for sl in batch_slices(5, [2, 2, 1]):
            writer.write(sl.start, fc.isel(time=sl).values)
        with pytest.raises(DataError, match="do not fit"):
            writer.write(4, fc.isel(time=slice(0, 2)).values)  # rows 4..5 of 5
    with xr.open_dataset(reference) as a, xr.open_dataset(streamed) as b:
        a, b = a.load(), b.load()
    for ds in (a, b):
        del ds.attrs["history"]  # a timestamp
    xr.testing.assert_identical(b, a)
    assert b["sst"].encoding["zlib"] and b["sst"].encoding["complevel"] == 4
    assert b["sst"].encoding["chunksizes"] == (1, 1, LAT.size, LON.size)
    assert np.isnan(b["sst"].values[..., ~MASK.values]).all()


def test_predictions_file_format_version_is_checked(tmp_path):
    import netCDF4

    fc = forecast_cube(np.ones(cube_shape(n=2, n_lead=2)), n_lead=2).where(MASK)
    path = tmp_path / "predictions.nc"
    with predictions_file.PredictionsWriter(
        path,
        init_times=fc["time"].values,
        valid_times=fc["valid_time"].values,
        variables=["sst"],
        lat=LAT,
        lon=LON,
        units={"sst": "degC"},
    ) as writer:
        writer.write(0, fc.values)
    with predictions_file.open(path) as ds:
        assert int(ds.attrs["format_version"]) == predictions_file.FORMAT_VERSION
        np.testing.assert_array_equal(ds["sst"].values, fc.sel(variable="sst").values)
    with netCDF4.Dataset(path, "a") as nc:
        nc.setncattr("format_version", predictions_file.FORMAT_VERSION + 1)
    with pytest.raises(DataError, match=rf"{path} has format_version 2.*re-run the evaluate step"):
        predictions_file.open(path)
    with netCDF4.Dataset(path, "a") as nc:
        nc.delncattr("format_version")
    with pytest.raises(DataError, match=rf"{path} has format_version None.*re-run the evaluate step"):
        predictions_file.open(path)
    (tmp_path / "garbage.nc").write_text("not a netCDF file\n")
    for bad in (tmp_path / "garbage.nc", tmp_path / "missing.nc"):
        with pytest.raises(DataError, match=rf"(?s){bad} .*re-run the evaluate step"):
            predictions_file.open(bad)
