"""harmonize: any source naming -> (time, lat, lon), lazily; region and period selection."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.errors import DataError
from conv2dlstm.harmonize import (
    day_bounds,
    find_axis,
    harmonize,
    in_period,
    select_period,
    select_region,
    wrap_longitude,
)

TIMES = pd.date_range("2020-01-01", periods=4, freq="D").values


def oisst_like(lon: np.ndarray | None = None) -> xr.Dataset:
    """OISST layout: (time, zlev, lat, lon), longitudes 0..360, value = 100*lat_index + lon_index."""
    lat = np.array([10.5, 11.5, 12.5])
    lon = np.array([0.5, 5.5, 350.5, 355.5]) if lon is None else lon
    base = 100 * np.arange(lat.size)[:, None] + np.arange(lon.size)[None, :]
    sst = np.broadcast_to(base, (TIMES.size, 1, lat.size, lon.size)).astype("float64")
    sst = sst + np.arange(TIMES.size)[:, None, None, None] * 1000
    return xr.Dataset(
        {
            "sst": (("time", "zlev", "lat", "lon"), sst, {"units": "Celsius", "long_name": "sst"}),
            "time_bnds": (("time", "nv"), np.zeros((TIMES.size, 2))),
        },
        coords={"time": TIMES, "zlev": [0.0], "lat": lat, "lon": lon},
    )


def test_oisst_layout_wraps_and_sorts_longitude() -> None:
    out = harmonize(oisst_like())
    assert out["sst"].dims == ("time", "lat", "lon")
    assert list(out.data_vars) == ["sst"]  # time_bnds dropped
    np.testing.assert_array_equal(out["lon"].values, [-9.5, -4.5, 0.5, 5.5])
    # Columns moved with their coordinates: source columns 0.5, 5.5, 350.5, 355.5 -> 2, 3, 0, 1.
    np.testing.assert_array_equal(out["sst"].values[0, 0], [2, 3, 0, 1])
    np.testing.assert_array_equal(out["sst"].values[2, 1], [2102, 2103, 2100, 2101])
    assert out["sst"].dtype == np.float32
    assert out["sst"].attrs["units"] == "Celsius"
    assert "zlev" not in out.variables


def test_0_360_convention_and_sorting() -> None:
    ds = oisst_like(lon=np.array([-10.0, -5.0, 0.0, 5.0]))
    out = harmonize(ds, lon_convention="0..360")
    np.testing.assert_array_equal(out["lon"].values, [0.0, 5.0, 350.0, 355.0])
    np.testing.assert_array_equal(out["sst"].values[0, 0], [2, 3, 0, 1])


def test_wrap_longitude_values() -> None:
    np.testing.assert_array_equal(wrap_longitude(np.array([0, 180, 181, 359.75, -190]), "-180..180"),
                                  [0, -180, -179, -0.25, 170])
    np.testing.assert_array_equal(wrap_longitude(np.array([-0.25, -180, 10]), "0..360"), [359.75, 180, 10])


def cmems_like() -> xr.Dataset:
    """CMEMS layout: (time, depth, latitude, longitude), latitude descending, two depths."""
    lat = np.array([30.0, 29.0, 28.0])
    lon = np.array([-20.0, -19.0])
    depth = np.array([0.5, 10.0])
    no3 = np.zeros((TIMES.size, depth.size, lat.size, lon.size))
    no3[:, 1] = 7.0
    no3[:, :, 0, :] += 0.5  # northernmost row
    return xr.Dataset(
        {"no3": (("time", "depth", "latitude", "longitude"), no3, {"units": "mmol m-3"})},
        coords={"time": TIMES, "depth": depth, "latitude": lat, "longitude": lon},
    )


def test_cmems_layout_level_and_latitude_order() -> None:
    out = harmonize(cmems_like(), level=1)
    assert out["no3"].dims == ("time", "lat", "lon")
    np.testing.assert_array_equal(out["lat"].values, [28.0, 29.0, 30.0])
    np.testing.assert_array_equal(out["no3"].values[0, :, 0], [7.0, 7.0, 7.5])  # north row now last
    assert out["no3"].attrs["units"] == "mmol m-3"
    assert "depth" not in out.variables


def test_level_out_of_range_names_dimension_and_size() -> None:
    with pytest.raises(DataError, match=r"level 5.*'depth' of size 2"):
        harmonize(cmems_like(), level=5)


@pytest.mark.parametrize(
    ("time", "lat", "lon", "vertical"),
    [("t", "y", "x", "lev"), ("valid_time", "nav_lat", "nav_lon", "deptht"), ("TIME", "LATITUDE", "LONGITUDE", "z")],
)
def test_recognised_names(time: str, lat: str, lon: str, vertical: str) -> None:
    ds = xr.Dataset(
        {"v": ((time, vertical, lat, lon), np.ones((2, 3, 2, 2)), {"units": "K"})},
        coords={time: TIMES[:2], vertical: [0, 1, 2], lat: [1.0, 2.0], lon: [3.0, 4.0]},
    )
    out = harmonize(ds, level=2)
    assert out["v"].dims == ("time", "lat", "lon")
    assert out.sizes == {"time": 2, "lat": 2, "lon": 2}


def test_non_dimension_coordinate_on_other_dim() -> None:
    ds = xr.Dataset(
        {"v": (("time", "row", "col"), np.ones((2, 2, 3)))},
        coords={"time": TIMES[:2], "latitude": ("row", [5.0, 6.0]), "longitude": ("col", [1.0, 2.0, 3.0])},
    )
    out = harmonize(ds)
    assert out["v"].dims == ("time", "lat", "lon")
    assert out["v"].attrs["units"] == "unknown"


def test_missing_latitude_names_candidates_and_fix() -> None:
    ds = xr.Dataset(
        {"v": (("time", "gphit", "lon"), np.ones((2, 2, 2)))},
        coords={"time": TIMES[:2], "gphit": [1.0, 2.0], "lon": [1.0, 2.0]},
    )
    with pytest.raises(DataError, match=r"no lat coordinate among \['lat', 'latitude'.*harmonize\.rename"):
        harmonize(ds)
    out = harmonize(ds, rename={"gphit": "lat"})
    assert out["v"].dims == ("time", "lat", "lon")


def test_unknown_rename_key_is_an_error() -> None:
    with pytest.raises(DataError, match=r"harmonize\.rename maps \['nope'\]"):
        harmonize(oisst_like(), rename={"nope": "lat"})


def test_curvilinear_grid_is_rejected() -> None:
    ds = xr.Dataset(
        {"v": (("time", "y", "x"), np.ones((2, 2, 2)))},
        coords={"time": TIMES[:2], "nav_lat": (("y", "x"), np.ones((2, 2))), "nav_lon": (("y", "x"), np.ones((2, 2)))},
    )
    with pytest.raises(DataError, match="rectilinear"):
        harmonize(ds)


def test_no_grid_variable_lists_what_exists() -> None:
    ds = xr.Dataset(
        {"v": (("time", "member", "lat", "lon"), np.ones((2, 2, 2, 2)))},
        coords={"time": TIMES[:2], "lat": [1.0, 2.0], "lon": [1.0, 2.0]},
    )
    with pytest.raises(DataError, match=r"no data variable has dimensions \(time, lat, lon\).*'member'"):
        harmonize(ds)


def _explode(block: np.ndarray) -> np.ndarray:
    raise AssertionError("harmonize computed data")


def test_lazy_dask_input_is_never_computed() -> None:
    ds = oisst_like()
    poisoned = da.map_blocks(_explode, da.zeros(ds["sst"].shape, chunks=(2, 1, 3, 4)), dtype="float64")
    ds["sst"] = (ds["sst"].dims, poisoned, ds["sst"].attrs)
    out = harmonize(ds)
    assert out["sst"].chunks is not None
    assert out["sst"].dtype == np.float32
    np.testing.assert_array_equal(out["lon"].values, [-9.5, -4.5, 0.5, 5.5])


def test_packed_int16_netcdf_is_decoded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(-2, 30, size=(TIMES.size, 1, 3, 4))
    truth[:, :, 0, 0] = np.nan  # land
    ds = oisst_like()
    ds["sst"] = (ds["sst"].dims, truth, {"units": "Celsius"})
    path = tmp_path / "packed.nc"
    ds.to_netcdf(
        path,
        encoding={"sst": {"dtype": "int16", "scale_factor": 0.01, "add_offset": 0.0, "_FillValue": np.int16(-999)}},
    )
    with xr.open_dataset(path, chunks={}) as opened:
        assert opened["sst"].encoding["dtype"] == np.int16
        out = harmonize(opened)
        assert out["sst"].chunks is not None
        values = out["sst"].values
    expected = truth[:, 0][..., [2, 3, 0, 1]]  # source columns 0.5, 5.5, 350.5, 355.5 after wrapping
    np.testing.assert_allclose(values, expected, atol=0.005 + 1e-6)
    assert np.isnan(values[:, 0, 2]).all()  # land stays NaN (fill value decoded), at its new column
    assert out["sst"].dtype == np.float32


def test_select_region_and_errors() -> None:
    out = harmonize(oisst_like())
    sub = select_region(out, [11.0, 13.0], [-5.0, 1.0])
    np.testing.assert_array_equal(sub["lat"].values, [11.5, 12.5])
    np.testing.assert_array_equal(sub["lon"].values, [-4.5, 0.5])
    assert select_region(out, None, None).sizes == out.sizes
    with pytest.raises(DataError, match=r"region lat \[50, 60\].*covers lat 10.5\.\.12.5, lon -9.5\.\.5.5"):
        select_region(out, [50, 60], None)


def test_select_period_includes_whole_end_day() -> None:
    times = pd.date_range("2020-01-01", "2020-01-05 18:00", freq="6h")
    ds = xr.Dataset({"v": (("time", "lat", "lon"), np.zeros((times.size, 1, 1)))},
                    coords={"time": times, "lat": [0.0], "lon": [0.0]})
    sub = select_period(ds, "2020-01-02", "2020-01-03")
    assert sub.sizes["time"] == 8
    assert pd.Timestamp(sub["time"].values[-1]) == pd.Timestamp("2020-01-03 18:00")
    with pytest.raises(DataError, match=r"2021-01-01\.\.2021-02-01 contains no time step.*2020-01-01\.\.2020-01-05"):
        select_period(ds, "2021-01-01", "2021-02-01")


def test_day_bounds_is_the_half_open_interval_of_whole_days() -> None:
    lo, hi = day_bounds("2020-01-02", "2020-01-03")
    assert lo == np.datetime64("2020-01-02T00:00", "ns") and hi == np.datetime64("2020-01-04T00:00", "ns")
    # A time of day in the arguments does not matter: a period is made of whole days.
    assert day_bounds(pd.Timestamp("2020-01-02 17:00"), "2020-01-03T06:00") == (lo, hi)


def test_noon_stamped_days_at_a_period_boundary() -> None:
    """OISST files are stamped 12:00: the last day of a period is in, the next day is out."""
    times = pd.date_range("2020-01-08 12:00", "2020-01-13 12:00", freq="D")
    np.testing.assert_array_equal(in_period(times, "2020-01-09", "2020-01-11"), [0, 1, 1, 1, 0, 0])
    ds = xr.Dataset({"v": (("time",), np.arange(times.size, dtype=float))}, coords={"time": times})
    sub = select_period(ds, "2020-01-09", "2020-01-11")
    assert [str(t)[:16] for t in sub["time"].values] == ["2020-01-09T12:00", "2020-01-10T12:00", "2020-01-11T12:00"]
    np.testing.assert_array_equal(sub["v"].values, [1, 2, 3])


def test_select_period_on_raw_unsorted_times_and_other_names() -> None:
    times = pd.DatetimeIndex(["2020-01-05", "2020-01-01", "2020-01-03", "2020-01-02"])
    raw = xr.Dataset({"v": (("t",), np.arange(4.0))}, coords={"valid_time": ("t", times)})
    sub = select_period(raw, "2020-01-02", "2020-01-03", time="valid_time")
    np.testing.assert_array_equal(sub["v"].values, [2.0, 3.0])  # source order kept
    with pytest.raises(DataError, match=r"^the source 2021-01-01\.\.2021-01-02 contains no time step.*"
                                        r"2020-01-01\.\.2020-01-05; fix it$"):
        select_period(raw, "2021-01-01", "2021-01-02", time="valid_time", what="the source", fix="fix it")


def test_select_period_and_region_stay_lazy() -> None:
    ds = oisst_like()
    poisoned = da.map_blocks(_explode, da.zeros(ds["sst"].shape, chunks=(1, 1, 3, 4)), dtype="float64")
    ds["sst"] = (ds["sst"].dims, poisoned, ds["sst"].attrs)
    out = select_region(select_period(harmonize(ds), "2020-01-02", "2020-01-03"), [11.0, 13.0], [-5.0, 1.0])
    assert out.sizes == {"time": 2, "lat": 2, "lon": 2}
    assert out["sst"].chunks is not None


def test_find_axis_follows_harmonize_names() -> None:
    ds = xr.Dataset(
        {"v": (("Date", "LATITUDE", "x"), np.ones((2, 2, 3)))},
        coords={"Date": TIMES[:2], "LATITUDE": [1.0, 2.0], "x": [0.0, 1.0, 2.0], "depth": 5.0},
    )
    assert find_axis(ds, "lat") == "LATITUDE"  # case-insensitive
    assert find_axis(ds, "lon") == "x"
    assert find_axis(ds, "time") is None
    assert find_axis(ds, "time", rename={"Date": "time"}) == "Date"
    assert find_axis(ds, "vertical") is None  # a scalar is not an axis
    out = harmonize(ds, rename={"Date": "time"})  # harmonize uses the same axes
    assert out["v"].dims == ("time", "lat", "lon")
    np.testing.assert_array_equal(out["lon"].values, [0.0, 1.0, 2.0])
    # A 2-D longitude comes first among the names: curvilinear, no axis (harmonize rejects it).
    curvilinear = ds.assign_coords(nav_lon=(("LATITUDE", "x"), np.ones((2, 3))))
    assert find_axis(curvilinear, "lon") is None
    with pytest.raises(DataError, match="rectilinear"):
        harmonize(curvilinear, rename={"Date": "time"})
    with pytest.raises(ValueError, match="unknown axis role"):
        find_axis(ds, "depth")


def test_select_region_with_a_margin_on_raw_descending_latitude() -> None:
    raw = cmems_like()  # latitude 30, 29, 28; longitude -20, -19
    sub = select_region(raw, [29.0, 29.5], [-19.0, -19.0], lat="latitude", lon="longitude")
    np.testing.assert_array_equal(sub["latitude"].values, [29.0])
    np.testing.assert_array_equal(sub["longitude"].values, [-19.0])
    wide = select_region(raw, [29.0, 29.5], [-19.0, -19.0], lat="latitude", lon="longitude", margin_cells=1)
    np.testing.assert_array_equal(wide["latitude"].values, [30.0, 29.0, 28.0])  # +- one 1-degree cell
    np.testing.assert_array_equal(wide["longitude"].values, [-20.0, -19.0])
    with pytest.raises(DataError, match=r"covers latitude 28\.\.30, longitude -20\.\.-19"):
        select_region(raw, [40.0, 41.0], None, lat="latitude", lon="longitude")
