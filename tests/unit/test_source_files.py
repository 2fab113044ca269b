"""One bad file among many: the check before a source's files are merged names the file and what is
wrong with it (a shifted grid, another resolution, the opposite latitude order, a missing variable,
a time coordinate without units), on real netCDF files."""

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


def _day(path: Path, day: str, *, lat=LAT, lon=LON, variables=("sst", "ice"), time_units: bool = True) -> Path:
    shape = (1, len(lat), len(lon))
    data = {v: (("time", "lat", "lon"), np.full(shape, 20.0, np.float32), {"units": "degC"}) for v in variables}
    time = pd.DatetimeIndex([day]) + pd.Timedelta(hours=12)
    ds = xr.Dataset(data, coords={"time": time, "lat": lat, "lon": lon})
    encoding = {}
    if not time_units:  # plain numbers, as a file whose writer forgot the CF units
        ds = ds.assign_coords(time=[3.5])
        encoding = {"time": {"dtype": "float64"}}
    ds.to_netcdf(path, encoding=encoding)
    return path


def _manifest(tmp_path: Path, odd: dict | None = None, odd_day: int = 3) -> Path:
    paths = []
    for i, day in enumerate(pd.date_range("2020-01-01", periods=6).strftime("%Y-%m-%d")):
        path = tmp_path / f"sst.{day}.nc"
        paths.append(_day(path, day, **(odd if odd and i == odd_day else {})))
    files = [manifest_file.FetchedFile(p, f"file:{p}", sha256_file(p), p.stat().st_size) for p in paths]
    return manifest_file.write(tmp_path / manifest_file.NAME, manifest_file.build("files", "netcdf", files))


@pytest.mark.parametrize(
    ("odd", "words"),
    [
        ({"lat": LAT + 0.125}, r"another latitude axis than the other 5: .*sst.2020-01-04.nc: 8 values 30.25\.\.32"),
        ({"lon": np.arange(290.125, 292.0, 0.5)}, r"another longitude axis .*sst.2020-01-04.nc: 4 values .*step 0\.5"),
        ({"lat": LAT[::-1]}, r"sst.2020-01-04.nc: 8 values 31.875\.\.30.125 \(descending.*the others: .*ascending"),
        ({"variables": ("sst",)}, r"sst.2020-01-04.nc lacks \['ice'\]"),
        ({"time_units": False}, r"sst.2020-01-04.nc: its time coordinate 'time' holds plain numbers \(3.5\)"),
    ],
    ids=["shifted-grid", "other-resolution", "descending-latitude", "missing-variable", "time-without-units"],
)
def test_the_one_bad_file_is_named(tmp_path: Path, odd: dict, words: str) -> None:
    manifest = _manifest(tmp_path, odd)
    with pytest.raises(DataError, match=words):
        sources.scan(manifest, rules=RULES)


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
