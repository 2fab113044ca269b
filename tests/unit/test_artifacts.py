"""Each artifact module refuses a file of another format version, naming the file and the step to rerun."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts import regridded
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.errors import DataError
from conv2dlstm.zarrstore import write_store
from tests.support.windows_fixture import make_windows_store


@pytest.mark.parametrize("version", [None, stats_file.FORMAT_VERSION + 1])
def test_stats_of_another_format_version_are_refused(tmp_path: Path, version) -> None:
    fx = make_windows_store(tmp_path / "w.zarr", n_time=20, height=4, width=5)
    stats = stats_file.load(fx.stats)
    assert stats.attrs["format_version"] == stats_file.FORMAT_VERSION
    other = tmp_path / "other.nc"
    if version is None:
        del stats.attrs["format_version"]
        stats.to_netcdf(other)
    else:
        stats.assign_attrs(format_version=version).to_netcdf(other)
    match = rf"statistics file {other} has format_version {version}, this version reads 1.*re-run the normalize step"
    with pytest.raises(DataError, match=match):
        stats_file.load(other)
    with pytest.raises(DataError, match=match):
        with stats_file.open_lazy(other, ["sst"]):
            pass


@pytest.mark.parametrize("version", [None, regridded.FORMAT_VERSION + 1])
def test_a_regridded_store_of_another_format_version_is_refused(tmp_path: Path, version) -> None:
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), np.zeros((4, 2, 3), dtype="float32"))},
        coords={"time": pd.date_range("2020-01-01", periods=4), "lat": [0.5, 1.5], "lon": [0.5, 1.5, 2.5]},
    )
    path = tmp_path / "regrid.zarr"
    write_store(ds.chunk({"time": 2}).assign_attrs({} if version is None else {"format_version": version}), path)
    with pytest.raises(
        DataError, match=rf"regridded store {path} has format_version {version}.*re-run the regrid step"
    ):
        regridded.open(path)
    ok = tmp_path / "ok.zarr"
    write_store(ds.chunk({"time": 2}).assign_attrs(format_version=regridded.FORMAT_VERSION), ok)
    assert regridded.open(ok)["sst"].dims == ("time", "lat", "lon")
