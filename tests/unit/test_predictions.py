"""The forecasts' files (conv2dlstm.artifacts.predictions): CF and WeatherBench 2's layout, written in
batches as netCDF and Zarr, the same layout as the forecast step's, one reader, the format version."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.errors import DataError
from conv2dlstm.steps import forecast
from tests.support import reference as _reference
from tests.support.cases import LAT, LON, MASK, batch_slices, cube_shape, forecast_cube

UNITS = {"sst": "degC", "no3": "mmol m-3"}
WB2_DIMS = ("time", "prediction_timedelta", "latitude", "longitude")


def _cube(n: int = 5, n_lead: int = 3, seed: int = 5) -> xr.DataArray:
    values = np.random.default_rng(seed).normal(20, 2, size=cube_shape(n=n, n_lead=n_lead, n_var=2))
    return forecast_cube(values.astype("float32"), variables=("sst", "no3"), n_lead=n_lead).where(MASK)


def _write(fc: xr.DataArray, nc, zarr=None, *, batches=(2, 2, 1), attrs=None) -> None:
    with predictions_file.PredictionsWriter(
        nc,
        init_times=fc["time"].values,
        valid_times=fc["valid_time"].values,
        variables=[str(v) for v in fc["variable"].values],
        lat=LAT,
        lon=LON,
        units=UNITS,
        attrs=attrs or {"run": "exp1"},
        zarr_path=zarr,
    ) as writer:
        for sl in batch_slices(fc.sizes["time"], list(batches)):
            writer.write(sl.start, fc.isel(time=sl).values)


def test_predictions_netcdf_is_cf_and_decodes(tmp_path):
    fc = _cube(n=4, seed=3)
    ds = _reference.predictions_dataset(fc, units=UNITS, attrs={"run": "exp1"})
    path = tmp_path / "predictions.nc"
    _reference.write_netcdf(ds, path)
    assert not list(tmp_path.glob(".*partial"))
    with xr.open_dataset(path) as back:
        back = back.load()
    assert back.attrs["Conventions"] == "CF-1.8"
    assert back.attrs["run"] == "exp1"
    assert set(back.data_vars) == {"sst", "no3"}
    sst = back["sst"]
    assert sst.dims == WB2_DIMS
    assert sst.dtype == np.float32
    assert sst.attrs["units"] == "degC"
    assert sst.attrs["standard_name"] == "sea_surface_temperature"
    assert back["no3"].attrs["standard_name"] == "mole_concentration_of_nitrate_in_sea_water"
    assert np.issubdtype(back["time"].dtype, np.datetime64)
    assert back["time"].attrs["standard_name"] == "forecast_reference_time"
    assert np.issubdtype(back["prediction_timedelta"].dtype, np.timedelta64)
    np.testing.assert_array_equal(back["prediction_timedelta"].values, np.arange(1, 4) * np.timedelta64(1, "D"))
    assert back["prediction_timedelta"].attrs["standard_name"] == "forecast_period"
    assert back["valid_time"].dims == ("time", "prediction_timedelta")
    assert np.issubdtype(back["valid_time"].dtype, np.datetime64)
    np.testing.assert_array_equal(back["valid_time"].values, fc["valid_time"].values)
    assert back["latitude"].attrs["units"] == "degrees_north" and back["longitude"].attrs["units"] == "degrees_east"
    np.testing.assert_allclose(back["no3"].values, fc.sel(variable="no3").values, rtol=1e-6)
    assert np.isnan(back["sst"].values[:, :, ~MASK.values]).all()
    assert np.isfinite(back["sst"].values[:, :, MASK.values]).all()


def test_predictions_writer_in_batches_equals_in_memory_file(tmp_path):
    """The netCDF and Zarr written batch by batch both decode exactly as the reference file written at once."""
    fc = _cube()
    reference = tmp_path / "reference.nc"
    _reference.write_netcdf(_reference.predictions_dataset(fc, units=UNITS, attrs={"run": "exp1"}), reference)
    streamed, store = tmp_path / "streamed.nc", tmp_path / "streamed.zarr"
    _write(fc, streamed, store)
    with predictions_file.PredictionsWriter(
        tmp_path / "other.nc",
        init_times=fc["time"].values,
        valid_times=fc["valid_time"].values,
        variables=["sst", "no3"],
        lat=LAT,
        lon=LON,
        units=UNITS,
    ) as writer:
        with pytest.raises(DataError, match="do not fit"):
            writer.write(4, fc.isel(time=slice(0, 2)).values)  # rows 4..5 of 5
    with xr.open_dataset(reference) as a, xr.open_dataset(streamed) as b, xr.open_zarr(store) as c:
        a, b, c = a.load(), b.load(), c.load()
    for ds in (a, b, c):
        del ds.attrs["history"]  # a timestamp
    xr.testing.assert_identical(b, a)
    xr.testing.assert_identical(c, a)
    assert b["sst"].encoding["zlib"] and b["sst"].encoding["complevel"] == 4
    assert b["sst"].encoding["chunksizes"] == (1, 1, LAT.size, LON.size)
    assert c["sst"].encoding["chunks"] == (1, 3, LAT.size, LON.size)  # one chunk per initial time
    assert (store / ".zmetadata").is_file()  # Zarr v2, consolidated, as the forecast step writes its Zarr
    assert np.isnan(b["sst"].values[..., ~MASK.values]).all()


def test_evaluate_and_forecast_outputs_share_weatherbench2_layout(tmp_path):
    """WeatherBench 2's naming holds on both steps' outputs, netCDF and Zarr, and one reader returns the
    forecast step's forecast of an initial time in the layout of the evaluate step's row for it.

    WB2 conventions relied on (google-research/weatherbench2): ``weatherbench2/schema.py`` builds forecasts
    as a truth on ``time``, ``latitude``, ``longitude`` with a ``prediction_timedelta`` dim of timedeltas
    (``mock_forecast_data``) and renames it to ``lead_time`` itself (``apply_time_conventions``);
    ``docs/source/init-vs-valid-time.md``: ``time`` is the initial time (init-time convention);
    ``weatherbench2/evaluation.py`` ``make_latitude_increasing``: latitude ascending.
    """
    fc = _cube(n=4)
    evaluate_nc, evaluate_zarr = tmp_path / "predictions.nc", tmp_path / "predictions.zarr"
    _write(fc, evaluate_nc, evaluate_zarr, batches=(3, 1))
    k = 2
    out = forecast.forecast_dataset(fc.isel(time=[k]), units=UNITS, attrs={"model_name": "convlstm"})
    forecast_nc, forecast_zarr = tmp_path / "f.nc", tmp_path / "f.zarr"
    forecast.write_outputs(out, out_nc=forecast_nc, out_zarr=forecast_zarr)

    opened = {}
    for path in (evaluate_nc, evaluate_zarr, forecast_nc, forecast_zarr):
        with predictions_file.open(path) as ds:
            ds = ds.load()
        opened[path.name] = ds
        assert set(ds.data_vars) == {"sst", "no3"}, path  # named as the targets
        for name in ds.data_vars:
            assert ds[name].dims == WB2_DIMS and ds[name].dtype == np.float32, (path, name)
            assert ds[name].attrs["units"] == UNITS[name], (path, name)
        assert set(ds.coords) == {*WB2_DIMS, "valid_time"}, path
        assert ds["time"].dtype.kind == "M" and ds["valid_time"].dtype.kind == "M", path
        assert ds["prediction_timedelta"].dtype.kind == "m", path  # timedelta64, not lead steps
        assert ds["latitude"].dtype == ds["longitude"].dtype == np.float64, path
        assert (np.diff(ds["latitude"].values) > 0).all(), path  # ascending
        np.testing.assert_array_equal(
            ds["valid_time"].values, ds["time"].values[:, None] + ds["prediction_timedelta"].values[None, :]
        )
        assert ds["time"].attrs["standard_name"] == "forecast_reference_time", path
        assert ds["prediction_timedelta"].attrs["standard_name"] == "forecast_period", path
        assert int(ds.attrs["format_version"]) == predictions_file.FORMAT_VERSION, path

    row = opened["predictions.nc"].isel(time=[k])
    for name, ds in opened.items():
        if name.startswith("f."):
            assert pd.Timestamp(ds["time"].values[0]) == pd.Timestamp(fc["time"].values[k])
            for var in ("sst", "no3"):
                assert ds[var].dims == row[var].dims and ds[var].attrs == row[var].attrs, (name, var)
            for coord in row.coords:
                assert ds[coord].dtype == row[coord].dtype and ds[coord].attrs == row[coord].attrs, (name, coord)
            xr.testing.assert_equal(ds, row)  # the same values, coordinates and dims
    xr.testing.assert_identical(opened["predictions.zarr"], opened["predictions.nc"])


def test_predictions_file_format_version_and_layout_are_checked(tmp_path):
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
        nc.setncattr("format_version", 1)  # the former (time, lead, lat, lon) layout
    with pytest.raises(DataError, match=rf"{path} has format_version 1.*re-run the evaluate step"):
        predictions_file.open(path)
    with netCDF4.Dataset(path, "a") as nc:
        nc.delncattr("format_version")
    with pytest.raises(DataError, match=rf"{path} has format_version None.*re-run the evaluate step"):
        predictions_file.open(path)
    (tmp_path / "garbage.nc").write_text("not a netCDF file\n")
    for bad in (tmp_path / "garbage.nc", tmp_path / "missing.nc"):
        with pytest.raises(DataError, match=rf"(?s){bad} .*re-run the evaluate step"):
            predictions_file.open(bad)
    # the right version on another layout: named, with the step that wrote it
    other = tmp_path / "other.nc"
    xr.Dataset(
        {"sst": (("time", "lead", "lat", "lon"), np.zeros((2, 2, LAT.size, LON.size), "float32"))},
        coords={"time": fc["time"].values, "lat": LAT[::-1], "lon": LON},
        attrs={"format_version": predictions_file.FORMAT_VERSION, "provenance": '{"step": "forecast"}'},
    ).to_netcdf(other)
    with pytest.raises(DataError, match=r"variable sst has dims \('time', 'lead', 'lat', 'lon'\).*re-run the forecast"):
        predictions_file.open(other)


def test_zarr_template_stores_no_data_and_needs_no_dask_cluster_code(tmp_path):
    """Opening the writer stores the Zarr's coordinates and metadata only (no chunk until a batch is
    written: one chunk per initial time then), and does not import distributed (0.6 s in every
    evaluate and forecast job), which a Dask graph of the template would."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import numpy as np
        import zarr
        from conv2dlstm.artifacts import predictions
        zarr.config.set({{"array.write_empty_chunks": True}})  # a user's global setting changes nothing
        init = np.arange(6).astype("datetime64[D]").astype("datetime64[ns]")
        valid = init[:, None] + np.array([1, 2], dtype="timedelta64[D]").astype("timedelta64[ns]")
        with predictions.PredictionsWriter({str(tmp_path / "p.nc")!r}, init_times=init, valid_times=valid,
                variables=["sst"], lat=np.arange(3.0), lon=np.arange(4.0), units={{"sst": "degC"}},
                zarr_path={str(tmp_path / "p.zarr")!r}) as writer:
            assert "distributed" not in sys.modules, "distributed imported"
            assert not list(Path({str(tmp_path / "p.zarr")!r}).glob("sst/[0-9]*")), "a chunk before any batch"
            writer.write(2, np.ones((2, 2, 1, 3, 4), dtype="float32"))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    chunks = sorted(p.name for p in (tmp_path / "p.zarr" / "sst").glob("[0-9]*"))
    assert chunks == ["2.0.0.0", "3.0.0.0"]
    with xr.open_zarr(tmp_path / "p.zarr") as back:
        sst = back["sst"].load()
    assert back["sst"].encoding["chunks"] == (1, 2, 3, 4)
    assert np.isnan(sst.isel(time=[0, 1, 4, 5])).all() and (sst.isel(time=[2, 3]) == 1).all()
