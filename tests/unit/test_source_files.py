"""One bad file among many: the check before a source's files are merged names the file and what is
wrong with it (a shifted grid, another resolution, a smaller extent, a missing variable, a time
coordinate without units), on real netCDF files; a file stored north to south among files stored south to north is
merged value for value, and a file of fill values only is dropped as a missing day."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.data import checks, sources
from conv2dlstm.errors import DataError
from conv2dlstm.fsutil import sha256_file

LAT = np.arange(30.125, 32.0, 0.25)
LON = np.arange(290.125, 292.0, 0.25)
RULES = checks.SourceRules(variables=("sst", "ice"))


def _day(
    path: Path, day: str, *, lat=LAT, lon=LON, variables=("sst", "ice"), time_units: bool = True, blank: bool = False
) -> Path:
    """One day; ``sst`` = its latitude (so that a flipped axis shows), ``ice`` 20; ``blank``: all NaN."""
    shape = (1, len(lat), len(lon))
    values = {"sst": np.broadcast_to(np.asarray(lat, np.float32)[None, :, None], shape), "ice": np.full(shape, 20.0)}
    data = {
        v: (
            ("time", "lat", "lon"),
            np.full(shape, np.nan, np.float32) if blank else values[v].astype(np.float32),
            {"units": "degC"},
        )
        for v in variables
    }
    time = pd.DatetimeIndex([day]) + pd.Timedelta(hours=12)
    ds = xr.Dataset(data, coords={"time": time, "lat": lat, "lon": lon})
    encoding = {}
    if not time_units:  # plain numbers, as a file whose writer forgot the CF units
        ds = ds.assign_coords(time=[3.5])
        encoding = {"time": {"dtype": "float64"}}
    ds.to_netcdf(path, encoding=encoding)
    return path


def _manifest(tmp_path: Path, odd: dict | None = None, odd_day: int = 3, kind: str = "files") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, day in enumerate(pd.date_range("2020-01-01", periods=6).strftime("%Y-%m-%d")):
        path = tmp_path / f"sst.{day}.nc"
        paths.append(_day(path, day, **(odd if odd and i == odd_day else {})))
    files = [manifest_file.FetchedFile(p, f"file:{p}", sha256_file(p), p.stat().st_size) for p in paths]
    return manifest_file.write(tmp_path / manifest_file.NAME, manifest_file.build(kind, "netcdf", files))


@pytest.mark.parametrize(
    ("odd", "words"),
    [
        ({"lat": LAT + 0.125}, r"another latitude axis than the other 5: .*sst.2020-01-04.nc: 8 values 30.25\.\.32"),
        ({"lon": np.arange(290.125, 292.0, 0.5)}, r"another longitude axis .*sst.2020-01-04.nc: 4 values .*step 0\.5"),
        ({"variables": ("sst",)}, r"sst.2020-01-04.nc lacks \['ice'\]"),
        ({"time_units": False}, r"sst.2020-01-04.nc: its time coordinate 'time' holds plain numbers \(3.5\)"),
    ],
    ids=["shifted-grid", "other-resolution", "missing-variable", "time-without-units"],
)
def test_the_one_bad_file_is_named(tmp_path: Path, odd: dict, words: str) -> None:
    manifest = _manifest(tmp_path, odd)
    with pytest.raises(DataError, match=words):
        sources.scan(manifest, rules=RULES)


def _lon_layout(lon: np.ndarray) -> checks.FileLayout:
    """The layout of a file with longitudes ``lon`` only."""
    axis = checks._axis_layout(xr.Dataset(coords={"lon": lon}), "lon", {})
    return checks.FileLayout(lat=None, lon=axis, variables=frozenset())


IRREGULAR = LON.copy()
IRREGULAR[3] += 0.05  # same size, first and last value


@pytest.mark.parametrize(
    ("lon", "words"),
    [
        (LON[2:], r"6 values 290\.625\.\.291\.875 \(ascending, step 0\.25\), a smaller extent at the same step \("),
        (np.arange(289.625, 292.0, 0.25), r"10 values .*, a larger extent at the same step \("),
        (np.arange(290.625, 292.2, 0.25), r"7 values 290\.625\.\.292\.125 .*, another extent at the same step \("),
        (LON + 0.125, r"8 values 290\.25\.\.292 \(ascending, step 0\.25\), shifted by \+0\.125 \("),
        (LON[::2], r"4 values .*\(ascending, step 0\.5\), another resolution \("),
        (LON[::-1], r"8 values 291\.875\.\.290\.125 \(descending, step 0\.25\), in the other order \("),
        (IRREGULAR, r"8 values 290\.125\.\.291\.875 \(ascending, step 0\.25\), other values in the same range \("),
    ],
    ids=["smaller-extent", "larger-extent", "other-extent", "shifted", "resolution", "order", "irregular"],
)
def test_how_an_odd_axis_differs_is_named(lon: np.ndarray, words: str) -> None:
    """Not only the odd file's axis and the others': what differs, in words."""
    layouts = [*[_lon_layout(LON)] * 5, _lon_layout(lon)]
    prefix = r"1 file\(s\) have another longitude axis than the other 5: odd\.nc: "
    with pytest.raises(DataError, match=prefix + words + r"the others: 8 values 290\.125\.\.291\.875"):
        checks.check_layouts(layouts, ["a.nc", "b.nc", "c.nc", "d.nc", "e.nc", "odd.nc"])


def test_files_that_agree_pass_whatever_their_latitude_order(tmp_path: Path) -> None:
    catalog = sources.scan(_manifest(tmp_path), rules=RULES)
    assert len(catalog.paths) == 6
    descending = tmp_path / "desc"
    descending.mkdir()
    for i, day in enumerate(pd.date_range("2020-01-01", periods=3).strftime("%Y-%m-%d")):
        _day(descending / f"d{i}.nc", day, lat=LAT[::-1])
    paths = sorted(descending.glob("*.nc"))
    files = [manifest_file.FetchedFile(p, f"file:{p}", sha256_file(p), p.stat().st_size) for p in paths]
    manifest = manifest_file.write(descending / manifest_file.NAME, manifest_file.build("files", "netcdf", files))
    assert len(sources.scan(manifest, rules=RULES).paths) == 3


def test_a_file_stored_north_to_south_is_merged_value_for_value(tmp_path: Path) -> None:
    catalog = sources.scan(_manifest(tmp_path, {"lat": LAT[::-1]}), rules=RULES)
    with sources.open_slab(catalog, catalog.everything()) as ds:
        np.testing.assert_array_equal(ds["lat"].values, LAT)
        sst = ds["sst"].transpose("time", "lat", "lon").values
    np.testing.assert_allclose(sst, np.broadcast_to(LAT[None, :, None], sst.shape))  # every day, the 4th too


def test_a_file_of_fill_values_only_is_dropped_as_a_missing_day(tmp_path: Path) -> None:
    catalog = sources.scan(_manifest(tmp_path, {"blank": True}), rules=RULES)
    (step,) = catalog.empty
    assert step.file.endswith("sst.2020-01-04.nc") and step.date() == "2020-01-04"
    assert step.variables == ("sst", "ice")
    times = catalog.slabs("2020-01-01", "2020-01-06", 10)[0].times
    assert [f"{t}"[:10] for t in times] == ["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-05", "2020-01-06"]
    # a second file of the same day, of fill values only, leaves no day missing (and is no duplicate)
    extra = _day(tmp_path / "sst.2020-01-02b.nc", "2020-01-02", blank=True)
    doc = manifest_file.read(tmp_path / manifest_file.NAME)
    paths = [*manifest_file.file_paths(doc, tmp_path / manifest_file.NAME), extra]
    files = [manifest_file.FetchedFile(p, f"file:{p}", sha256_file(p), p.stat().st_size) for p in paths]
    both = manifest_file.write(tmp_path / manifest_file.NAME, manifest_file.build("files", "netcdf", files))
    assert [e.date() for e in sources.scan(both, rules=RULES).empty] == ["2020-01-04"]
    # the kind zarr or copernicus writes its own store: not looked at
    assert not sources.scan(_manifest(tmp_path / "z", {"blank": True}, kind="zarr"), rules=RULES).empty
