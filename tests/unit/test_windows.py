"""windows: start indices at split boundaries and gaps, and the store layout on a real Zarr store."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from conv2dlstm.artifacts import provenance, regridded
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import DataError
from conv2dlstm.fsutil import sha256_file
from conv2dlstm.steps import normalize as nz
from conv2dlstm.steps import windows as wn
from conv2dlstm.zarrstore import write_store


def days(start: str, end: str) -> np.ndarray:
    return pd.date_range(start, end, freq="D").values


def test_starts_stay_inside_the_split() -> None:
    times = days("2020-01-01", "2020-01-20")
    # Split 2020-01-05..2020-01-12 is indices 4..11; windows of 3 + 2 = 5 steps start at 4..7.
    got = wn.window_starts(times, start="2020-01-05", end="2020-01-12", input_steps=3, lead_steps=2)
    np.testing.assert_array_equal(got, [4, 5, 6, 7])
    assert got.dtype == np.int64
    # The whole axis: 0..15.
    np.testing.assert_array_equal(
        wn.window_starts(times, start="2019-01-01", end="2021-01-01", input_steps=3, lead_steps=2), np.arange(16)
    )


def test_end_day_is_included_for_sub_daily_steps() -> None:
    times = pd.date_range("2020-01-01", "2020-01-03 18:00", freq="6h").values  # 12 steps
    got = wn.window_starts(times, start="2020-01-02", end="2020-01-03", input_steps=2, lead_steps=2)
    np.testing.assert_array_equal(got, [4, 5, 6, 7, 8])  # 2020-01-02 00:00 .. 2020-01-03 06:00


def test_no_window_spans_a_gap() -> None:
    times = np.concatenate([days("2020-01-01", "2020-01-06"), days("2020-01-09", "2020-01-15")])
    # indices 0..5 are Jan 1..6, 6..12 are Jan 9..15; windows of 4 steps.
    got = wn.window_starts(times, start="2020-01-01", end="2020-01-31", input_steps=2, lead_steps=2)
    np.testing.assert_array_equal(got, [0, 1, 2, 6, 7, 8, 9])


def test_stride_and_explicit_step() -> None:
    times = days("2020-01-01", "2020-01-12")
    got = wn.window_starts(times, start="2020-01-01", end="2020-01-12", input_steps=2, lead_steps=1, stride=3)
    np.testing.assert_array_equal(got, [0, 3, 6, 9])
    # With a 2-day nominal step, consecutive days are not consecutive steps: no window.
    none = wn.window_starts(
        times, start="2020-01-01", end="2020-01-12", input_steps=2, lead_steps=1, step=np.timedelta64(2, "D")
    )
    assert none.size == 0


def test_noon_stamps_at_a_split_boundary() -> None:
    """OISST days are stamped 12:00: the last day of a split is in it, the next day is not."""
    times = pd.date_range("2020-01-01 12:00", "2020-01-20 12:00", freq="D")  # 20 days
    train = {"start": "2020-01-01", "end": "2020-01-10"}
    starts = wn.window_starts(times.values, **train, input_steps=3, lead_steps=2)
    np.testing.assert_array_equal(starts, np.arange(6))  # the last window ends on 2020-01-10 12:00
    assert str(times[starts[-1] + 4])[:16] == "2020-01-10 12:00"
    val = wn.window_starts(times.values, start="2020-01-11", end="2020-01-20", input_steps=3, lead_steps=2)
    assert str(times[val[0]])[:16] == "2020-01-11 12:00"  # the next day opens the next split
    # The training slice of the statistics uses the same boundary.
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), np.zeros((times.size, 1, 1), np.float32))},
        coords={"time": times, "lat": [0.0], "lon": [0.0]},
    )
    sliced = nz.training_slice(ds, train["start"], train["end"])
    assert [str(t)[:16] for t in sliced["time"].values[[0, -1]]] == ["2020-01-01T12:00", "2020-01-10T12:00"]
    assert sliced.sizes["time"] == 10
    assert (
        nz.fit_stats(ds, train_start=train["start"], train_end=train["end"], variables=["sst"]).attrs["train_steps"]
        == 10
    )


def test_inferred_step_is_the_most_common_difference() -> None:
    times = np.concatenate([days("2020-01-01", "2020-01-10"), np.array(["2020-01-20"], dtype="datetime64[ns]")])
    assert wn.nominal_step(times) == np.timedelta64(1, "D")
    got = wn.window_starts(times, start="2020-01-01", end="2020-02-01", input_steps=8, lead_steps=2)
    np.testing.assert_array_equal(got, [0])


def test_window_longer_than_the_data() -> None:
    assert (
        wn.window_starts(
            days("2020-01-01", "2020-01-03"), start="2020-01-01", end="2020-01-03", input_steps=3, lead_steps=1
        ).size
        == 0
    )


# ------------------------------------------------------------------ the store


LAT = np.array([21.0, 22.0, 23.0])
LON = np.array([-79.0, -78.0])


REGRID_RECORD = provenance.make_record("regrid", "a" * 16, {"manifest": "b" * 64})
STATS_RECORD = provenance.make_record("normalize", "c" * 16, {"regrid": REGRID_RECORD["digest"]})
"""The provenance records of the regridded store and the statistics these tests write."""


def source() -> xr.Dataset:
    """A regrid-step-like dataset: 2019-12-25..2020-02-05 daily, a land cell, one missing value."""
    times = pd.date_range("2019-12-25", "2020-02-05", freq="D")
    rng = np.random.default_rng(7)
    sst = 20 + 3 * rng.normal(size=(times.size, LAT.size, LON.size))
    sst[:, 0, 0] = np.nan
    sst[30, 2, 1] = np.nan  # a cell missing once: not ocean
    chl = rng.lognormal(size=sst.shape)
    chl[:, 0, 0] = np.nan
    return xr.Dataset(
        {
            "sst": (("time", "lat", "lon"), sst.astype(np.float32), {"units": "Celsius"}),
            "chl": (("time", "lat", "lon"), chl.astype(np.float32), {"units": "mg m-3"}),
        },
        coords={"time": times, "lat": LAT, "lon": LON},
        attrs=provenance.to_attrs(REGRID_RECORD),
    )


def store_config(**windows: int) -> dict:
    return validate_config(
        {
            "variables": {"inputs": ["sst", "chl"], "targets": ["sst"]},
            "splits": {
                "train": {"start": "2020-01-01", "end": "2020-01-20"},
                "val": {"start": "2020-01-21", "end": "2020-01-27"},
                "test": {"start": "2020-01-28", "end": "2020-02-03"},
            },
            "windows": {"input_steps": 3, "lead_steps": 2, **windows},
            "normalize": {"climatology_window": 3},
        }
    )


def fitted(ds: xr.Dataset) -> xr.Dataset:
    stats = nz.fit_stats(
        ds, train_start="2020-01-01", train_end="2020-01-20", variables=["sst", "chl"], climatology_window=3
    )
    return stats.assign_attrs(provenance.to_attrs(STATS_RECORD))


@pytest.mark.parametrize("chunked", [False, True])
def test_build_store_eager_and_dask(chunked: bool) -> None:
    ds = source()
    cfg = store_config()
    stats = fitted(ds)
    store = wn.build_store(ds.chunk({"time": 7}) if chunked else ds, stats, cfg)
    assert store["data"].chunks[0][0] == 5  # input_steps + lead_steps
    data = store["data"].values
    # Time axis trimmed to the splits: 2020-01-01..2020-02-03 (34 days).
    assert store.sizes["time"] == 34
    np.testing.assert_array_equal(store["train_start"].values, np.arange(0, 16))  # Jan 1..16 (+4 <= Jan 20)
    np.testing.assert_array_equal(store["val_start"].values, [20, 21, 22])  # Jan 21..23
    np.testing.assert_array_equal(store["test_start"].values, [27, 28, 29])
    reference = wn.build_store(source(), stats, cfg)["data"].values
    np.testing.assert_array_equal(data, reference)


@pytest.mark.parametrize("chunked", [False, True])
def test_gaps_are_filled_as_normalize_filled_them(chunked: bool) -> None:
    """harmonize.fill_max_days: the cell missing on 2020-01-24 stays ocean, its value that day the mean
    of the days either side (here at a chunk boundary), normalized; statistics fitted otherwise are refused."""
    ds = source()
    cfg = store_config()
    cfg["harmonize"]["fill_max_days"] = 1
    stats = nz.fit_stats(
        ds,
        train_start="2020-01-01",
        train_end="2020-01-20",
        variables=["sst", "chl"],
        climatology_window=3,
        fill_max_days=1,
    )
    assert bool(stats["mask"][2, 1]) and stats.attrs["gap_filled_values"] == 1
    store = wn.build_store(ds.chunk({"time": 3}) if chunked else ds, stats, cfg)
    day = list(store["time"].values).index(np.datetime64("2020-01-24"))
    sst = ds["sst"].values[:, 2, 1].astype(np.float64)
    filled = (sst[29] + sst[31]) / 2  # 2020-01-23 and 2020-01-25
    expected = (filled - float(stats["mean"].sel(variable="sst"))) / float(stats["std"].sel(variable="sst"))
    np.testing.assert_allclose(store["data"].sel(variable="sst").values[day, 2, 1], expected, rtol=1e-5)
    assert bool(store["mask"][2, 1]) and store.attrs["source_gaps"]["gap_filled_cells"] == 1
    with pytest.raises(DataError, match=r"gaps of up to 0 day\(s\) filled but harmonize\.fill_max_days is 1"):
        wn.build_store(ds, fitted(ds), cfg)


def test_zero_windows_names_split_period_and_fix() -> None:
    ds = source()
    cfg = store_config()  # validation refuses it (tests/unit/test_config.py); the step must too
    cfg["windows"] |= {"input_steps": 6, "lead_steps": 3}  # 9 steps > the 7-day validation period
    with pytest.raises(DataError, match=r"split val \(2020-01-21\.\.2020-01-27\) has no window.*lower windows"):
        wn.build_store(ds, fitted(ds), cfg)


def test_statistics_of_another_training_period_are_rejected() -> None:
    ds = source()
    stats = nz.fit_stats(ds, train_start="2020-01-01", train_end="2020-01-15", variables=["sst", "chl"])
    expected = r"fitted on 2020-01-01\.\.2020-01-15 but splits\.train is 2020-01-01\.\.2020-01-20"
    with pytest.raises(DataError, match=expected):
        wn.build_store(ds, stats, store_config())


def test_statistics_without_their_training_period_are_rejected() -> None:
    ds = source()
    stats = fitted(ds)
    for attr in ("train_start", "train_end"):
        incomplete = stats.copy()
        del incomplete.attrs[attr]
        with pytest.raises(DataError, match=rf"no attribute\(s\) \['{attr}'\].*re-run the normalize step"):
            wn.build_store(ds, incomplete, store_config())


def _written(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A regridded store and its statistics on disk, and the configuration."""
    ds = source()
    data_path = tmp_path / "regrid" / "x.zarr"
    write_store(ds.chunk({"time": 16}).assign_attrs(format_version=regridded.FORMAT_VERSION), data_path)
    stats_path = tmp_path / "normalize" / "x.nc"
    stats_file.write(fitted(ds), stats_path)
    return data_path, stats_path, store_config()


def _damage_stats(stats_path: Path, how: str) -> None:
    if how == "missing":
        stats_path.unlink()
    elif how == "corrupt":
        stats_path.write_bytes(stats_path.read_bytes()[:200])  # truncated
    elif how == "html":
        stats_path.write_text("<html>not a netCDF file</html>")
    else:  # a variable dropped: "no_mask", "no_climatology"
        with xr.open_dataset(stats_path) as opened:
            stats = opened.load()
        stats.drop_vars(how[len("no_") :]).to_netcdf(stats_path)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("missing", r"does not exist; re-run the normalize step"),
        ("corrupt", r"(?s)cannot be read \(.*\); delete it and re-run the normalize step"),
        ("html", r"(?s)cannot be read \(.*\); delete it and re-run the normalize step"),
        ("no_mask", r"has no \['mask'\].*re-run the normalize step"),
        ("no_climatology", r"has no \['climatology'\].*re-run the normalize step"),
        ("no_attrs", r"no attribute\(s\) \['train_start', 'train_end'\].*re-run the normalize step"),
    ],
)
def test_main_bad_statistics_file_names_the_path_and_the_step(tmp_path: Path, how: str, match: str) -> None:
    data_path, stats_path, cfg = _written(tmp_path)
    if how == "no_attrs":
        with xr.open_dataset(stats_path) as opened:
            stats = opened.load()
        stats.attrs = {k: v for k, v in stats.attrs.items() if k not in ("train_start", "train_end")}
        stats.to_netcdf(stats_path)
    else:
        _damage_stats(stats_path, how)
    out = tmp_path / "windows" / "x.zarr"
    with pytest.raises(DataError, match=match) as info:
        wn.main(cfg, data=data_path, stats=stats_path, out=out, threads=1, memory_mb=1024)
    assert str(stats_path) in str(info.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_main_refuses_statistics_without_provenance(tmp_path: Path) -> None:
    data_path, stats_path, cfg = _written(tmp_path)
    with xr.open_dataset(stats_path) as opened:
        stats = opened.load()
    del stats.attrs["provenance"]  # as written by an older version
    stats.to_netcdf(stats_path)
    out = tmp_path / "windows" / "x.zarr"
    with pytest.raises(DataError, match=r"x.nc has no provenance record.*rerun the normalize step"):
        wn.main(cfg, data=data_path, stats=stats_path, out=out, threads=1, memory_mb=1024)
    assert not out.exists()


@pytest.mark.parametrize("how", ["missing", "corrupt", "not_a_store"])
def test_main_bad_regridded_store_names_the_path_and_the_step(tmp_path: Path, how: str) -> None:
    data_path, stats_path, cfg = _written(tmp_path)
    if how == "missing":
        shutil.rmtree(data_path)
        match = "does not exist; run the regrid step first"
    elif how == "corrupt":
        (data_path / "zarr.json").write_text("{not json")
        match = r"(?s)is damaged: metadata file zarr\.json .*; rebuild it with the regrid step"
    else:
        shutil.rmtree(data_path)
        data_path.mkdir()
        match = r"(?s)cannot be opened \(.*\); delete it and re-run the regrid step"
    out = tmp_path / "windows" / "x.zarr"
    with pytest.raises(DataError, match=match) as info:
        wn.main(cfg, data=data_path, stats=stats_path, out=out, threads=1, memory_mb=1024)
    assert str(data_path) in str(info.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_main_writes_the_documented_store(tmp_path: Path, caplog) -> None:
    ds = source()
    cfg = store_config()
    data_path = tmp_path / "regrid" / "x.zarr"
    gaps = {"time_gaps": 1, "missing_steps": 2, "longest_gap_days": 2.0, "missing_dates": ["2020-01-05..2020-01-06"]}
    write_store(ds.chunk({"time": 16}).assign_attrs(gaps, format_version=regridded.FORMAT_VERSION), data_path)
    stats_path = tmp_path / "normalize" / "x.nc"
    land = {  # as normalize records them
        "land_from_gaps_cells": 3,
        "land_from_gaps_days": "2020-01-02",
        "land_from_gaps_where": "(0, 10), (1, 11), (2, 10)",
    }
    stats_file.write(fitted(ds).assign_attrs(land), stats_path)
    out = tmp_path / "windows" / "x.zarr"
    (out.parent / ".x.zarr.1234abcd.partial").mkdir(parents=True)  # left by a killed attempt
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        wn.main(cfg, data=data_path, stats=stats_path, out=out, threads=1, memory_mb=1024)
    assert [p.name for p in out.parent.iterdir()] == ["x.zarr"]
    assert "discarded" in caplog.text and ".x.zarr.1234abcd.partial" in caplog.text
    inputs = {"regrid": REGRID_RECORD["digest"], "stats": STATS_RECORD["digest"]}
    assert provenance.read_zarr(out, step="windows") == provenance.for_step(cfg, "windows", inputs)

    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 3
    assert group["data"].dtype == np.float32
    assert group["data"].shape == (34, 2, 3, 2)
    assert group["data"].chunks == (5, 2, 3, 2)
    assert group["mask"].dtype == bool
    assert group["train_start"].dtype == np.int64
    attrs = group.attrs.asdict()
    assert attrs["input_variables"] == ["sst", "chl"] and attrs["target_variables"] == ["sst"]
    assert attrs["input_steps"] == 3 and attrs["lead_steps"] == 2 and attrs["format_version"] == 1
    assert attrs["stats_sha256"] == sha256_file(stats_path)
    assert attrs["source_gaps"] == gaps | land  # the gaps and the land they made travel on to MLflow tags
    assert WindowsStore(out).gap_tags() == {
        "data.time_gaps": "1",
        "data.missing_steps": "2",
        "data.longest_gap_days": "2.0",
        "data.missing_dates": "2020-01-05..2020-01-06",
        "data.land_from_gaps_cells": "3",
        "data.land_from_gaps_days": "2020-01-02",
        "data.land_from_gaps_where": "(0, 10), (1, 11), (2, 10)",
    }

    store = xr.open_zarr(out)
    assert store["data"].dims == ("time", "variable", "lat", "lon")
    assert list(store["variable"].values) == ["sst", "chl"]
    assert store["train_start"].dims == ("train_sample",)
    mask = store["mask"].values
    np.testing.assert_array_equal(mask, [[False, True], [True, True], [True, False]])

    # Sample slicing reproduces normalized source values.
    with xr.open_dataset(stats_path) as st:
        mean = st["mean"].values
        std = st["std"].values
    t0 = int(store["val_start"].values[1])
    tin, tout = attrs["input_steps"], attrs["lead_steps"]
    times = store["time"].values
    src = ds.sel(time=times)
    expected_x = np.stack([(src[v].values[t0 : t0 + tin] - mean[i]) / std[i] for i, v in enumerate(["sst", "chl"])], 1)
    expected_x = np.where(mask & np.isfinite(expected_x), expected_x, 0.0)
    x = store["data"].values[t0 : t0 + tin, [0, 1]]
    np.testing.assert_allclose(x, expected_x, rtol=1e-5, atol=1e-6)
    y = store["data"].values[t0 + tin : t0 + tin + tout, [0]]
    expected_y = (src["sst"].values[t0 + tin : t0 + tin + tout] - mean[0]) / std[0]
    np.testing.assert_allclose(y[:, 0], np.where(mask, expected_y, 0.0), rtol=1e-5, atol=1e-6)
    assert str(times[t0 + tin - 1])[:10] == "2020-01-24"  # initial time of val sample 1 (starts Jan 22)
    assert not np.isnan(store["data"].values).any()

    # Storage: the normalized cube once (compressed chunks), not once per window.
    cube_bytes = 34 * 2 * 3 * 2 * 4
    assert _file_bytes(out / "data") <= 1.25 * cube_bytes + 1024  # + the array's metadata document


def test_storage_does_not_grow_with_window_length(tmp_path: Path) -> None:
    ds = source()
    sizes = []
    for steps in (2, 6):
        cfg = store_config(input_steps=steps, lead_steps=1, time_chunk=8)
        store = wn.build_store(ds, fitted(ds), cfg)
        path = tmp_path / f"w{steps}.zarr"
        write_store(store, path)
        chunk_files = [p for p in (path / "data").rglob("*") if p.is_file() and p.name != "zarr.json"]
        sizes.append(sum(p.stat().st_size for p in chunk_files))
        assert sizes[-1] <= 1.25 * store["data"].size * 4
    assert abs(sizes[0] - sizes[1]) <= 0.05 * sizes[0]
