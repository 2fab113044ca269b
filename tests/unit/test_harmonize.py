"""harmonize: any source naming -> (time, lat, lon), lazily; region and period selection."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.data.checks import (
    SourceRules,
    UnitSpec,
    add_units,
    apply_unit_conversions,
    cf_to_pint,
    check_plausible,
    duplicate_steps,
    range_summary,
    time_gaps,
    time_keys,
    unit_conversion,
    unit_conversions,
)
from conv2dlstm.data.harmonize import (
    day_bounds,
    find_axis,
    harmonize,
    in_period,
    select_period,
    select_region,
    wrap_longitude,
)
from conv2dlstm.errors import DataError

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
    np.testing.assert_array_equal(
        wrap_longitude(np.array([0, 180, 181, 359.75, -190]), "-180..180"), [0, -180, -179, -0.25, 170]
    )
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
    ds = xr.Dataset(
        {"v": (("time", "lat", "lon"), np.zeros((times.size, 1, 1)))},
        coords={"time": times, "lat": [0.0], "lon": [0.0]},
    )
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
    with pytest.raises(
        DataError,
        match=r"^the source 2021-01-01\.\.2021-01-02 contains no time step.*"
        r"2020-01-01\.\.2020-01-05; fix it$",
    ):
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


# ------------------------------------------------------------------ source checks: units, duplicates, gaps


@pytest.mark.parametrize(
    ("source", "canonical", "scale", "offset"),
    [
        ("K", "degC", 1.0, -273.15),
        ("kelvin", "degC", 1.0, -273.15),
        ("degC", "K", 1.0, 273.15),
        ("Celsius", "degC", 1.0, 0.0),
        ("degree_Celsius", "degC", 1.0, 0.0),
        ("degrees_C", "degC", 1.0, 0.0),
        ("degF", "degC", 5 / 9, -160 / 9),
        ("mmol m-3", "mmol m-3", 1.0, 0.0),
        ("mmol/m3", "mmol m-3", 1.0, 0.0),
        ("umol/l", "mmol m-3", 1.0, 0.0),
        ("µmol L-1", "mmol m-3", 1.0, 0.0),
        ("mol m-3", "mmol m-3", 1000.0, 0.0),
        ("umol m-3", "mmol m-3", 1e-3, 0.0),
        ("nmol/l", "mmol m-3", 1e-3, 0.0),
        ("ug/l", "mg m-3", 1.0, 0.0),
        ("mg.m-3", "mg m-3", 1.0, 0.0),
        ("umol kg-1", "umol/kg", 1.0, 0.0),
        ("1e-3", "psu", 1.0, 0.0),
        ("1", "psu", 1.0, 0.0),
        ("PSU", "psu", 1.0, 0.0),
        ("psu", "1e-3", 1.0, 0.0),
        ("cm", "m", 0.01, 0.0),
    ],
)
def test_unit_conversions_are_pint_s(source: str, canonical: str, scale: float, offset: float) -> None:
    conv = unit_conversion(source, canonical)
    assert conv.scale == pytest.approx(scale, rel=1e-12)
    assert conv.offset == pytest.approx(offset, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("source", "canonical", "match"),
    [
        ("K", "mmol m-3", r"'K' \(\[temperature\]\) cannot be converted to 'mmol m-3'"),
        ("umol/kg", "mmol m-3", r"\[substance\] / \[mass\]"),
        ("percent", "psu", "cannot be converted"),
        ("bananas", "degC", r"'bananas' is not a unit pint can read"),
    ],
)
def test_unconvertible_units_raise_naming_both(source: str, canonical: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unit_conversion(source, canonical)


def test_cf_spellings_become_pint_syntax() -> None:
    assert cf_to_pint("mmol m-3") == "mmol m**-3"
    assert cf_to_pint("mg/m3") == "mg/m**3"
    assert cf_to_pint("m.s-1") == "m s**-1"
    assert cf_to_pint("m^2") == "m**2"
    assert cf_to_pint("1e-3") == "1e-3" and cf_to_pint("0.001") == "0.001"
    assert cf_to_pint(" degrees Celsius ") == "degC" and cf_to_pint("Kelvin") == "K"


def _files(units: list[str | None], values: list[float], var: str = "sst") -> list[tuple[str, xr.Dataset]]:
    out = []
    for i, (unit, value) in enumerate(zip(units, values)):
        attrs = {} if unit is None else {"units": unit, "valid_min": -300}
        ds = xr.Dataset(
            {var: (("time", "lat", "lon"), np.full((1, 2, 2), value, np.float32), attrs)},
            coords={"time": TIMES[i : i + 1], "lat": [1.0, 2.0], "lon": [3.0, 4.0]},
        ).chunk()
        out.append((f"f{i}.nc", ds))
    return out


def convert_units(files: list[tuple[str, xr.Dataset]], rules: SourceRules) -> list[xr.Dataset]:
    """What the regrid step does with its files' units: found over all files, then converted file by file."""
    found: dict = {}
    for path, ds in files:
        add_units(found, path, ds, rules)
    conversions = unit_conversions(found, rules)
    return [apply_unit_conversions(ds, conversions, rules) for _, ds in files]


def test_convert_units_per_file_lazily_and_labels_the_canonical_unit() -> None:
    rules = SourceRules(units={"sst": UnitSpec("degC", -3.0, 40.0)}, variables=("sst",))
    files = convert_units(_files(["degC", "K", "Celsius"], [20.0, 294.15, 22.0]), rules)
    assert all(f["sst"].chunks is not None for f in files)  # still lazy
    assert [float(f["sst"].values.mean()) for f in files] == pytest.approx([20.0, 21.0, 22.0], abs=1e-4)
    assert {f["sst"].attrs["units"] for f in files} == {"degC"}
    assert files[1]["sst"].dtype == np.float32
    assert "valid_min" not in files[1]["sst"].attrs and files[0]["sst"].attrs["valid_min"] == -300
    merged = xr.combine_by_coords(files, combine_attrs="override")
    assert float(merged["sst"].max()) == pytest.approx(22.0)


def test_convert_units_refuses_naming_files_and_units() -> None:
    rules = SourceRules(units={"sst": UnitSpec("degC", -3.0, 40.0)}, variables=("sst",))
    with pytest.raises(
        DataError,
        match=r"'sst' in f1\.nc has units 'W m-2'.*Units found: 'degC' in f0\.nc; "
        r"'W m-2' in f1\.nc.*harmonize\.units\.sst\.unit",
    ):
        convert_units(_files(["degC", "W m-2"], [20.0, 20.0]), rules)
    # a variable without an entry keeps its unit, which must agree across the files
    plain = SourceRules(variables=("sst",))
    assert convert_units(_files(["m", "m"], [1.0, 1.0]), plain)[1]["sst"].attrs["units"] == "m"
    with pytest.raises(DataError, match=r"'sst' has different units.*add harmonize\.units\.sst"):
        convert_units(_files(["m", "cm"], [1.0, 100.0]), plain)
    # variables that are not wanted are not looked at
    assert convert_units(_files(["W m-2"], [1.0]), SourceRules(units=rules.units, variables=("no3",)))


def test_duplicate_times_are_refused_or_resolved_explicitly() -> None:
    (pa, a), (pb, b), (pc, c) = _files(["degC"] * 3, [20.0, 21.0, 22.0])
    keys = [time_keys(ds["time"].values) for ds in (a, b, b, c)]
    paths = [pa, pb, "dup.nc", pc]
    with pytest.raises(
        DataError,
        match=r"time 2020-01-02 00:00:00 appears in both f1\.nc and dup\.nc.*"
        r"harmonize\.duplicates to first .*or last",
    ):
        duplicate_steps(keys, paths)
    assert duplicate_steps(keys, paths, "first") == {2: [0]}  # dup.nc's step is dropped
    assert duplicate_steps(keys, paths, "last") == {1: [0]}  # f1.nc's step is dropped
    assert duplicate_steps([keys[0], keys[3]], [pa, pc]) == {}  # nothing repeated
    assert duplicate_steps([keys[0], None], [pa, "static.nc"]) == {}  # a file without a time axis
    with pytest.raises(DataError, match="harmonize.duplicates"):
        duplicate_steps(keys, paths, "keep")


def test_a_repeated_step_inside_one_file_is_found_too() -> None:
    keys = [time_keys(TIMES[[0, 1, 1]])]
    with pytest.raises(DataError, match=r"appears twice in one\.nc"):
        duplicate_steps(keys, ["one.nc"])
    assert duplicate_steps(keys, ["one.nc"], "last") == {0: [1]}  # steps 0 and 2 are kept
    assert duplicate_steps(keys, ["one.nc"], "first") == {0: [2]}


def test_plausibility_is_a_chunked_reduction_naming_time_and_file() -> None:
    values = np.full((6, 2, 2), 20.0, np.float32)
    values[3, 0, 1] = 45.0
    values[4, 1, 1] = np.nan  # land or missing is not counted
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), values)},
        coords={"time": pd.date_range("2020-01-01", periods=6), "lat": [1.0, 2.0], "lon": [3.0, 4.0]},
    )
    ds = ds.chunk({"time": 2})
    units = {"sst": UnitSpec("degC", -3.0, 40.0)}
    summary = range_summary(ds, units)
    assert summary["sst.count"].chunks == ((6,),)  # lazy: one small result per time chunk
    long = xr.concat([ds] * 100, "time").chunk({"time": 1})
    assert max(range_summary(long, units)["sst.count"].chunks[0]) <= 256  # memory bounded by a chunk
    with pytest.raises(
        DataError,
        match=r"^1 value\(s\) of 'sst' lie outside its plausible range -3\.\.40 degC "
        r"\(harmonize\.units\.sst\), at 1 of 6 time steps; .* from 20 to 45; the "
        r"first is at 2020-01-04 00:00:00 in day4\.nc.*widen harmonize\.units\.sst",
    ):
        check_plausible(ds, units, file_of=lambda t: f"day{pd.Timestamp(t).day}.nc")
    check_plausible(ds, {"sst": UnitSpec("degC", -3.0, 50.0)})
    check_plausible(ds, {"sst": UnitSpec("degC", None, None)})  # no bounds: nothing computed
    check_plausible(ds, {})


def test_time_gaps_inside_and_at_the_ends_of_the_period() -> None:
    days = pd.to_datetime(["2020-01-02", "2020-01-03", "2020-01-06", "2020-01-07", "2020-01-08"]) + pd.Timedelta("12h")
    gaps = time_gaps(days.values, "2020-01-01", "2020-01-10")
    assert gaps.ranges() == ["2020-01-01", "2020-01-04..2020-01-05", "2020-01-09..2020-01-10"]
    assert gaps.attrs() == {
        "time_gaps": 3,
        "missing_steps": 5,
        "longest_gap_days": 2.0,
        "missing_dates": ["2020-01-01", "2020-01-04..2020-01-05", "2020-01-09..2020-01-10"],
        "time_step": "1 day",
    }
    assert "3 gap(s)" in gaps.describe()
    complete = time_gaps(pd.date_range("2020-01-01", "2020-01-10").values, "2020-01-01", "2020-01-10")
    assert complete.gaps == () and complete.describe() == "no gap in the time axis"
    six_hourly = pd.date_range("2020-01-01", periods=8, freq="6h").delete([3, 4])
    sub = time_gaps(six_hourly.values)
    assert sub.ranges() == ["2020-01-01T18:00:00..2020-01-02T00:00:00"] and sub.longest_days == 0.5
    assert time_gaps(TIMES[:1]).gaps == ()  # one step: no nominal step, no gap


def test_source_rules_from_the_configuration() -> None:
    from conv2dlstm.config.validate import validate_config
    from conv2dlstm.errors import ConfigError

    cfg = validate_config(
        {
            "variables": {"inputs": ["fe", "po4"], "targets": ["no3"]},
            "harmonize": {"units": {"fe": {"max": 0.01}}, "duplicates": "last"},
        }
    )
    rules = SourceRules.from_config(cfg)
    assert rules.variables == ("fe", "po4", "no3") and rules.duplicates == "last"
    assert rules.units["fe"] == UnitSpec("mmol m-3", 0.0, 0.01)  # the other fields keep their defaults
    assert rules.units["sst"] == UnitSpec("degC", -3.0, 40.0)
    bad = validate_config({"harmonize": {"units": {"sst": {"unit": "degrees of freedom"}}}})
    with pytest.raises(ConfigError, match=r"harmonize\.units\.sst\.unit"):
        SourceRules.from_config(bad)
