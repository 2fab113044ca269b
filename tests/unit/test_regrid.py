"""regrid: each method against hand-computed values, NaN-aware conservation, laziness, the Zarr step."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.artifacts import provenance
from conv2dlstm.config.validate import validate_config
from conv2dlstm.data import checks, regridding, sources
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.fsutil import sha256_file
from conv2dlstm.steps import regrid as rg
from conv2dlstm.zarrstore import write_store

TIMES = pd.date_range("2020-01-01", periods=3, freq="D").values
COS = lambda deg: np.cos(np.deg2rad(deg))  # noqa: E731


def cube(values: np.ndarray, lat: np.ndarray, lon: np.ndarray) -> xr.Dataset:
    """A harmonized dataset (time, lat, lon); ``values`` (lat, lon) is repeated as value + time index."""
    data = np.stack([values + k for k in range(TIMES.size)]).astype(np.float32)
    return xr.Dataset(
        {"sst": (("time", "lat", "lon"), data, {"units": "Celsius"})},
        coords={"time": TIMES, "lat": lat, "lon": lon},
    )


def one_cell_target(lat: float, lon: float, step: float) -> xr.Dataset:
    attrs = {"step": step}
    return xr.Dataset(coords={"lat": ("lat", [lat], attrs), "lon": ("lon", [lon], attrs)})


# 2 x 2 source cells of 20 degrees (centres lat 10, 30; lon 0, 20) -> one 40-degree target cell.
SRC_LAT, SRC_LON = np.array([10.0, 30.0]), np.array([0.0, 20.0])
VALUES = np.array([[1.0, 2.0], [3.0, 4.0]])  # rows: lat 10, lat 30


def test_target_grid_from_config() -> None:
    grid = regridding.target_grid(
        {"lat": {"start": 21, "stop": 45, "step": 1}, "lon": {"start": -79, "stop": -55, "step": 1}}
    )
    assert grid.sizes == {"lat": 25, "lon": 25}
    assert grid["lat"].values[0] == 21 and grid["lat"].values[-1] == 45
    assert grid["lon"].attrs["step"] == 1.0
    assert "-79.5..-54.5" in grid["lon"].attrs["cell_bounds"]
    fine = regridding.target_grid(
        {"lat": {"start": 0.125, "stop": 0.875, "step": 0.25}, "lon": {"start": 0, "stop": 0.7, "step": 0.1}}
    )
    np.testing.assert_allclose(fine["lat"].values, [0.125, 0.375, 0.625, 0.875])
    assert fine.sizes["lon"] == 8  # 0.7 reached despite floating-point steps
    with pytest.raises(ConfigError, match=r"grid\.lat.*at least 2 cells"):
        regridding.target_grid({"lat": {"start": 1, "stop": 1, "step": 1}, "lon": {"start": 0, "stop": 5, "step": 1}})
    # the configuration alone decides it: refused when it is parsed, before any job
    with pytest.raises(ConfigError, match=r"config key grid\.lon: start 0, stop 0.5, step 1 give 1 cell"):
        validate_config({"grid": {"lon": {"start": 0, "stop": 0.5, "step": 1}}})


def test_conservative_by_hand_with_cos_lat_weights() -> None:
    out = regridding.regrid(cube(VALUES, SRC_LAT, SRC_LON), one_cell_target(20.0, 10.0, 40.0), method="conservative")
    # Equal-width cells: area proportional to cos(latitude of the centre).
    expected = (COS(10) * (1 + 2) + COS(30) * (3 + 4)) / (2 * COS(10) + 2 * COS(30))
    np.testing.assert_allclose(out["sst"].values[:, 0, 0], expected + np.arange(3), rtol=1e-6)
    assert out["sst"].dims == ("time", "lat", "lon")
    assert out["sst"].attrs["units"] == "Celsius"


@pytest.mark.parametrize(("min_fraction", "is_ocean"), [(0.4, True), (0.6, False)])
def test_conservative_half_land_cell(min_fraction: float, is_ocean: bool) -> None:
    values = VALUES.copy()
    values[:, 0] = np.nan  # western column is land: half of the target cell's area
    out = regridding.regrid(
        cube(values, SRC_LAT, SRC_LON),
        one_cell_target(20.0, 10.0, 40.0),
        method="conservative",
        min_ocean_fraction=min_fraction,
    )
    result = out["sst"].values[:, 0, 0]
    if is_ocean:
        expected = (COS(10) * 2 + COS(30) * 4) / (COS(10) + COS(30))  # ocean cells only
        np.testing.assert_allclose(result, expected + np.arange(3), rtol=1e-6)
    else:
        assert np.isnan(result).all()


def test_conservative_ocean_fraction_is_area_weighted() -> None:
    values = VALUES.copy()
    values[0, 0] = np.nan  # one low-latitude (larger) cell is land
    fraction = (COS(10) + 2 * COS(30)) / (2 * COS(10) + 2 * COS(30))  # about 0.729
    src = cube(values, SRC_LAT, SRC_LON)
    tgt = one_cell_target(20.0, 10.0, 40.0)
    kept = regridding.regrid(src, tgt, method="conservative", min_ocean_fraction=fraction - 1e-4)
    expected = (COS(10) * 2 + COS(30) * 7) / (COS(10) + 2 * COS(30))
    np.testing.assert_allclose(kept["sst"].values[0, 0, 0], expected, rtol=1e-6)
    dropped = regridding.regrid(src, tgt, method="conservative", min_ocean_fraction=fraction + 1e-4)
    assert np.isnan(dropped["sst"].values).all()


@pytest.mark.parametrize(("min_fraction", "is_ocean"), [(0.4, True), (0.6, False)])
def test_conservative_gap_in_source_counts_as_missing(min_fraction: float, is_ocean: bool) -> None:
    # Source columns at lon 0.5, 1.5 and 3.5 (1-degree cells; 2..3 is a gap) -> target cells 0..2, 2..4.
    lat, lon = np.array([10.5, 11.5]), np.array([0.5, 1.5, 3.5])
    values = np.array([[1.0, 2.0, 5.0], [3.0, 4.0, 7.0]])
    attrs = {"step": 2.0}
    tgt = xr.Dataset(coords={"lat": ("lat", [11.0], attrs), "lon": ("lon", [1.0, 3.0], attrs)})
    out = regridding.regrid(cube(values, lat, lon), tgt, method="conservative", min_ocean_fraction=min_fraction)
    result = out["sst"].values[0, 0]
    w = COS(lat)
    np.testing.assert_allclose(result[0], (w[0] * 3 + w[1] * 7) / (2 * w.sum()), rtol=1e-6)
    if is_ocean:  # only the column 3..4 (half the cell) is known: its own mean, not spread over 2..4
        np.testing.assert_allclose(result[1], (w[0] * 5 + w[1] * 7) / w.sum(), rtol=1e-6)
    else:
        assert np.isnan(result[1])


def test_cell_bounds() -> None:
    lo, hi = regridding.cell_bounds(np.array([0.5, 1.5, 3.5]))
    np.testing.assert_array_equal(lo, [0.0, 1.0, 3.0])
    np.testing.assert_array_equal(hi, [1.0, 2.0, 4.0])
    lo, hi = regridding.cell_bounds(np.array([21.0, 22.0]), 1.0)
    np.testing.assert_array_equal(lo, [20.5, 21.5])
    np.testing.assert_array_equal(hi, [21.5, 22.5])


def quarter_degree(seed: int, land: bool) -> xr.Dataset:
    lat = np.arange(20.125, 24.0, 0.25)  # 16 cells, 4 target rows
    lon = np.arange(-79.875, -76.0, 0.25)  # 16 cells, 4 target columns
    values = np.random.default_rng(seed).normal(size=(lat.size, lon.size))
    if land:
        values[:6, :5] = np.nan  # a coast crossing target cells
    return cube(values, lat, lon)


GRID = {"lat": {"start": 20.5, "stop": 23.5, "step": 1.0}, "lon": {"start": -79.5, "stop": -76.5, "step": 1.0}}


def _areas(lat: np.ndarray, lon_step: float, lat_step: float, n_lon: int) -> np.ndarray:
    band = np.sin(np.deg2rad(lat + lat_step / 2)) - np.sin(np.deg2rad(lat - lat_step / 2))
    return np.repeat(band[:, None] * lon_step, n_lon, axis=1)


def test_conservative_preserves_the_area_weighted_mean() -> None:
    src = quarter_degree(1, land=False)
    out = regridding.regrid(src, regridding.target_grid(GRID), method="conservative")
    a_src = _areas(src["lat"].values, 0.25, 0.25, 16)
    a_tgt = _areas(out["lat"].values, 1.0, 1.0, 4)
    for t in range(TIMES.size):
        mean_src = np.sum(src["sst"].values[t] * a_src) / a_src.sum()
        mean_tgt = np.sum(out["sst"].values[t].astype(np.float64) * a_tgt) / a_tgt.sum()
        assert abs(mean_src - mean_tgt) < 1e-6


def test_conservative_coast_cells_use_ocean_values_only() -> None:
    src = quarter_degree(2, land=True)
    out = regridding.regrid(src, regridding.target_grid(GRID), method="conservative", min_ocean_fraction=0.5)
    # Target cell (0, 0) covers source rows 0..3, columns 0..3: all land -> NaN.
    assert np.isnan(out["sst"].values[:, 0, 0]).all()
    # Target cell (1, 1) covers rows 4..7, columns 4..7: land at rows 4,5 x column 4 (2 of 16 cells).
    block = src["sst"].values[0, 4:8, 4:8].astype(np.float64)
    w = np.repeat(COS(src["lat"].values[4:8])[:, None], 4, axis=1)
    ok = np.isfinite(block)
    assert ok.sum() == 14
    expected = np.sum(np.where(ok, block, 0) * w) / np.sum(w * ok)
    np.testing.assert_allclose(out["sst"].values[0, 1, 1], expected, rtol=1e-5)
    # Target cell (1, 0): rows 4..7 x columns 0..3, land in rows 4, 5 -> ocean area just under one half.
    frac = COS(src["lat"].values[6:8]).sum() / COS(src["lat"].values[4:8]).sum()
    assert frac < 0.5
    assert np.isnan(out["sst"].values[0, 1, 0])
    relaxed = regridding.regrid(src, regridding.target_grid(GRID), method="conservative", min_ocean_fraction=0.45)
    ocean = src["sst"].values[0, 6:8, 0:4].astype(np.float64)
    w = np.repeat(COS(src["lat"].values[6:8])[:, None], 4, axis=1)
    np.testing.assert_allclose(relaxed["sst"].values[0, 1, 0], np.sum(ocean * w) / w.sum(), rtol=1e-5)


def test_linear_by_hand() -> None:
    lat = np.array([0.0, 1.0, 2.0])
    lon = np.array([10.0, 11.0, 12.0])
    f = lambda la, lo: 1 + 2 * la + 3 * (lo - 10) + 4 * la * (lo - 10)  # noqa: E731  bilinear: exact
    values = f(lat[:, None], lon[None, :])
    values[2, 2] = np.nan  # land
    tgt = xr.Dataset(coords={"lat": [0.25, 1.5], "lon": [10.5, 11.75]})
    out = regridding.regrid(cube(values, lat, lon), tgt, method="linear")["sst"].values[0]
    np.testing.assert_allclose(out[0], [f(0.25, 10.5), f(0.25, 11.75)], rtol=1e-6)
    np.testing.assert_allclose(out[1, 0], f(1.5, 10.5), rtol=1e-6)
    assert np.isnan(out[1, 1])  # next to land: no land value bleeds in


def test_nearest_by_hand() -> None:
    lat = np.array([0.0, 1.0, 2.0])
    lon = np.array([10.0, 11.0, 12.0])
    values = 10 * np.arange(3)[:, None] + np.arange(3)[None, :]
    tgt = xr.Dataset(coords={"lat": [0.4, 1.6], "lon": [10.2, 11.9]})
    out = regridding.regrid(cube(values.astype(float), lat, lon), tgt, method="nearest")["sst"]
    np.testing.assert_array_equal(out.values[0], [[0, 2], [20, 22]])
    np.testing.assert_array_equal(out.values[2], [[2, 4], [22, 24]])
    assert out.dtype == np.float32


@pytest.mark.parametrize("method", ["conservative", "linear", "nearest"])
def test_eager_and_dask_inputs_agree(method: str) -> None:
    src = quarter_degree(3, land=True)
    tgt = regridding.target_grid(GRID)
    eager = regridding.regrid(src, tgt, method=method)
    lazy = regridding.regrid(src.chunk({"time": 2, "lat": 5, "lon": 7}), tgt, method=method)
    assert lazy["sst"].chunks is not None
    assert lazy["sst"].chunks[0] == (2, 1)  # time chunks kept
    assert lazy["sst"].dtype == np.float32 and lazy["sst"].values.dtype == np.float32
    np.testing.assert_array_equal(eager["sst"].values, lazy["sst"].values)
    np.testing.assert_array_equal(eager["lat"].values, tgt["lat"].values)


@pytest.mark.parametrize("method", ["conservative", "linear"])
def test_target_outside_source_names_both_extents(method: str) -> None:
    src = quarter_degree(4, land=False)
    grid = {"lat": {"start": 20.5, "stop": 25.5, "step": 1.0}, "lon": GRID["lon"]}
    tgt, src_ext = ("20..26", "20..24") if method == "conservative" else ("20.5..25.5", "20.125..23.875")
    pattern = rf"target grid lat \(.*{re.escape(tgt)}\) is outside the source coverage \(.*{re.escape(src_ext)}\)"
    with pytest.raises(DataError, match=pattern):
        regridding.regrid(src, regridding.target_grid(grid), method=method)


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match="bilinear"):
        regridding.regrid(quarter_degree(0, False), regridding.target_grid(GRID), method="bilinear")


# ---------------------------------------------------------------- the step on files


def write_daily_files(directory: Path, n_days: int = 6) -> list[Path]:
    """OISST-like daily netCDF files (time, zlev, lat, lon; 0..360 longitudes; packed int16; land NaN)."""
    directory.mkdir(parents=True, exist_ok=True)
    lat = np.arange(20.125, 22.0, 0.25)  # 8
    lon = np.arange(280.125, 282.0, 0.25)  # 8 -> -79.875..-78.125
    rng = np.random.default_rng(5)
    paths = []
    for t in pd.date_range("2019-12-30", periods=n_days, freq="D"):
        sst = 20 + rng.normal(size=(1, 1, lat.size, lon.size))
        sst[..., :3, :2] = np.nan
        ds = xr.Dataset(
            {
                "sst": (("time", "zlev", "lat", "lon"), sst, {"units": "Celsius"}),
                "ice": (("time", "zlev", "lat", "lon"), np.zeros_like(sst), {"units": "%"}),
            },
            coords={"time": [t], "zlev": [0.0], "lat": lat, "lon": lon},
        )
        path = directory / f"oisst.{t:%Y%m%d}.nc"
        packed = {"dtype": "int16", "scale_factor": 0.01, "_FillValue": np.int16(-999)}
        ds.to_netcdf(path, encoding={"sst": packed, "ice": packed})
        paths.append(path)
    return paths


def step_config(**grid: object) -> dict:
    return validate_config(
        {
            "source": {"start": "2020-01-01", "end": "2020-01-04"},
            "grid": {
                "lat": {"start": 20.5, "stop": 21.5, "step": 1.0},
                "lon": {"start": -79.5, "stop": -78.5, "step": 1.0},
                **grid,
            },
        }
    )


def test_regrid_dataset_and_write_store(tmp_path: Path) -> None:
    paths = write_daily_files(tmp_path / "raw")
    raw = xr.open_mfdataset(paths, combine="nested", concat_dim="time")
    cfg = step_config()
    ds = regridding.regrid_dataset(raw, cfg)
    assert ds["sst"].chunks is not None and list(ds.data_vars) == ["sst"]
    out = tmp_path / "regrid" / "oisst.zarr"
    write_store(ds, out)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == 3
    store = xr.open_zarr(out)
    assert store["sst"].dims == ("time", "lat", "lon")
    assert store.sizes == {"time": 4, "lat": 2, "lon": 2}
    assert str(store["time"].values[0])[:10] == "2020-01-01" and str(store["time"].values[-1])[:10] == "2020-01-04"
    assert store.attrs["regrid_method"] == "conservative"
    # Hand check of target cell (lat 20.5, lon -79.5): source rows 0..3, columns 0..3, land rows 0..2 x cols 0..1.
    src = raw["sst"].isel(zlev=0, time=2).values[:4, :4].astype(np.float64)
    w = np.repeat(COS(raw["lat"].values[:4])[:, None], 4, axis=1)
    ok = np.isfinite(src)
    expected = np.sum(np.where(ok, src, 0) * w) / np.sum(w * ok)
    assert np.sum(w * ok) / w.sum() > 0.5
    np.testing.assert_allclose(store["sst"].values[0, 0, 0], expected, rtol=1e-6)


def test_missing_variable_lists_available(tmp_path: Path) -> None:
    raw = xr.open_mfdataset(write_daily_files(tmp_path / "raw", 5), combine="nested", concat_dim="time")
    cfg = step_config()
    cfg["variables"]["targets"] = ["no3"]
    with pytest.raises(DataError, match=r"\['no3'\].*available variables are \['ice', 'sst'\]"):
        regridding.regrid_dataset(raw, cfg)


def write_manifest(tmp_path: Path, paths: list[Path]) -> Path:
    files = [manifest_file.FetchedFile(p, f"file:{p}", sha256_file(p), p.stat().st_size) for p in paths]
    return manifest_file.write(tmp_path / manifest_file.NAME, manifest_file.build("url", "netcdf", files))


def test_main_end_to_end(tmp_path: Path, caplog) -> None:
    manifest = write_manifest(tmp_path, write_daily_files(tmp_path / "raw"))
    out = tmp_path / "results" / "regrid" / "oisst.zarr"
    (out.parent / ".oisst.zarr.1234abcd.partial").mkdir(parents=True)  # left by a killed attempt
    (out.parent / ".other.zarr.1234abcd.partial").mkdir()  # another output's, perhaps being written
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        rg.main(step_config(), manifest=manifest, out=out, threads=1, memory_mb=1024)
    assert sorted(p.name for p in out.parent.iterdir()) == [".other.zarr.1234abcd.partial", "oisst.zarr"]
    assert "discarded" in caplog.text and ".oisst.zarr.1234abcd.partial" in caplog.text
    (out.parent / ".other.zarr.1234abcd.partial").rmdir()
    manifest_sha = json.loads(manifest.read_text())["sha256"]
    assert provenance.read_zarr(out, step="regrid") == provenance.for_step(
        step_config(), "regrid", {"manifest": manifest_sha}
    )
    store = xr.open_zarr(out)
    assert store.sizes == {"time": 4, "lat": 2, "lon": 2}
    assert store.attrs["source_manifest_sha256"] == sha256_file(manifest)
    assert store.attrs["source_sha256"] == json.loads(manifest.read_text())["sha256"]
    assert store.attrs["regrid_method"] == "conservative"
    # A bad config fails before writing and leaves the previous output untouched.
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(DataError, match="outside the source coverage"):
        rg.main(step_config(lat={"start": 20.5, "stop": 30.5, "step": 1.0}), manifest=manifest, out=out)
    assert sorted(p.name for p in out.parent.iterdir()) == before


# ---------------------------------------------------------------------------------------------
# Oracle: xarray-regrid's conservative regridder, where both apply


def _land_corner_source() -> xr.Dataset:
    lat = np.arange(20.125, 30, 0.25)
    lon = np.arange(-79.875, -70, 0.25)
    values = np.random.default_rng(0).normal(size=(2, lat.size, lon.size))
    values[:, :13, :9] = np.nan  # land covering parts of several target cells
    return xr.Dataset({"sst": (("time", "lat", "lon"), values)}, coords={"time": [0, 1], "lat": lat, "lon": lon})


ORACLE_GRID = {"lat": {"start": 21.0, "stop": 29.0, "step": 1.0}, "lon": {"start": -79.0, "stop": -71.0, "step": 1.0}}


@pytest.mark.parametrize("min_ocean_fraction", [0.25, 0.5, 1.0])
def test_conservative_equals_xarray_regrid_on_a_regular_grid(min_ocean_fraction: float) -> None:
    """On a regular, gap-free source both are the same area-weighted, NaN-aware mean: a target cell
    is ocean when its ocean fraction reaches ``min_ocean_fraction`` (xarray-regrid: its NaN fraction
    is at most ``nan_threshold = 1 - min_ocean_fraction``)."""
    import xarray_regrid  # noqa: F401  (registers the .regrid accessor)

    ds = _land_corner_source()
    target = regridding.target_grid(ORACLE_GRID)
    ours = regridding.regrid(ds, target, method="conservative", min_ocean_fraction=min_ocean_fraction)["sst"]
    grid = xr.Dataset(coords={"lat": target["lat"].values, "lon": target["lon"].values})
    theirs = ds.regrid.conservative(grid, latitude_coord="lat", skipna=True, nan_threshold=1 - min_ocean_fraction)
    theirs = theirs["sst"].transpose(*ours.dims)
    assert np.isnan(ours).sum() > 0 and not np.isnan(ours).all()
    np.testing.assert_array_equal(np.isnan(ours.values), np.isnan(theirs.values))
    np.testing.assert_allclose(ours.values, theirs.values, rtol=0, atol=1e-6, equal_nan=True)


def test_a_gap_in_the_source_counts_as_missing_not_as_its_neighbours() -> None:
    """Why the project has its own regridder: xarray-regrid infers source cells halfway between
    neighbouring centres, so across a gap (columns missing from the source) the neighbours stretch
    over it and a target cell inside the gap gets their values; here the gap is missing data."""
    import xarray_regrid  # noqa: F401

    ds = _land_corner_source().isel(lon=np.r_[0:10, 20:40])  # lon -77.375 .. -75.125 missing
    target = regridding.target_grid(ORACLE_GRID)
    ours = regridding.regrid(ds, target, method="conservative", min_ocean_fraction=0.5)["sst"]
    grid = xr.Dataset(coords={"lat": target["lat"].values, "lon": target["lon"].values})
    theirs = ds.regrid.conservative(grid, latitude_coord="lat")["sst"]
    inside = {"lon": -76.0}  # the target column wholly inside the gap
    assert np.isnan(ours.sel(inside)).all()
    assert np.isfinite(theirs.sel(inside).isel(lat=slice(4, None))).all()


# ---------------------------------------------------------------------------------------------
# The step slab by slab: the same store as in one slab, one slab's files open at a time


def _open_raw_files(directory: Path) -> set[str]:
    """The files under ``directory`` that this process holds open (from /proc/self/fd)."""
    out = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = Path(fd).readlink()
        except OSError:
            continue
        if target.is_relative_to(directory.resolve()):
            out.add(target.name)
    return out


def _slab_source(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """Nine daily files listed out of time order, the 2020-01-03 file twice (the later copy +1 K)."""
    raw = tmp_path / "raw"
    paths = write_daily_files(raw, n_days=9)
    copy = raw / "oisst.20200103.v2.nc"
    with xr.open_dataset(paths[4]) as day:
        fixed = day.load()
    fixed["sst"] = fixed["sst"] + 1.0
    fixed["sst"].attrs["units"] = "Celsius"
    fixed.to_netcdf(copy)
    listed = [paths[5], *paths[:5], copy, *paths[6:]]
    return write_manifest(tmp_path, listed), raw, paths


def _slab_config() -> dict:
    """The step's configuration for :func:`_slab_source`: its 8 days, the later copy of a day kept."""
    cfg = step_config()
    cfg["source"].update(start="2019-12-31", end="2020-01-07")
    cfg["harmonize"]["duplicates"] = "last"
    return cfg


def _record_open_files(monkeypatch, raw: Path) -> tuple[list[set[str]], list[set[str]]]:
    """Wraps the real ``sources.open_slab``: the files of ``raw`` open before and right after each call."""
    before: list[set[str]] = []
    after: list[set[str]] = []
    real_open_slab = sources.open_slab

    def open_slab(catalog, members, **kwargs):
        before.append(_open_raw_files(raw))
        slab = real_open_slab(catalog, members, **kwargs)
        after.append(_open_raw_files(raw))
        return slab

    monkeypatch.setattr(sources, "open_slab", open_slab)
    return before, after


def test_slab_by_slab_equals_one_slab_and_holds_one_slab_open(tmp_path: Path, monkeypatch) -> None:
    manifest, raw, paths = _slab_source(tmp_path)
    cfg = _slab_config()
    held, _ = _record_open_files(monkeypatch, raw)
    rg.main(cfg, manifest=manifest, out=tmp_path / "slabs.zarr", threads=1, memory_mb=1024, slab_steps=3)
    assert len(held) == 3 and held == [set(), set(), set()]  # 8 days in slabs of 3; none left open before the next
    monkeypatch.undo()
    rg.main(cfg, manifest=manifest, out=tmp_path / "one.zarr", threads=1, memory_mb=1024)
    slabs, one = xr.open_zarr(tmp_path / "slabs.zarr"), xr.open_zarr(tmp_path / "one.zarr")
    assert slabs["sst"].encoding["chunks"] == (3, 2, 2) and one["sst"].encoding["chunks"][0] == 8
    assert [str(t)[:10] for t in slabs["time"].values] == [f"2019-12-{d}" for d in (31,)] + [
        f"2020-01-0{d}" for d in range(1, 8)
    ]
    xr.testing.assert_identical(slabs.load(), one.load())
    # the later copy of 2020-01-03 won: its values are the first copy's + 1 (conservative means are linear)
    with xr.open_dataset(paths[4]) as first_copy:
        alone = regridding.regrid_dataset(first_copy.load(), cfg)
    np.testing.assert_allclose(slabs["sst"].sel(time="2020-01-03").values, alone["sst"].values[0] + 1.0, rtol=1e-6)


def test_an_implausible_value_in_a_late_slab_stops_the_step_naming_its_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    paths = write_daily_files(raw, n_days=9)
    with xr.open_dataset(paths[7]) as day:
        bad = day.load()
    bad["sst"][0, 0, 5, 5] = 99.0  # 2020-01-06, in the third slab of 3 days
    paths[7].unlink()
    bad.to_netcdf(paths[7], encoding={"sst": {"dtype": "float32"}})
    cfg = step_config()
    cfg["source"].update(start="2019-12-30", end="2020-01-07")
    out = tmp_path / "out.zarr"
    with pytest.raises(DataError, match=r"'sst' lie outside .* 2020-01-06[ 0-9:]* in \S*oisst\.20200106\.nc"):
        rg.main(cfg, manifest=write_manifest(tmp_path, paths), out=out, threads=1, memory_mb=1024, slab_steps=3)
    assert not out.exists() and not list(tmp_path.glob(".out.zarr*"))


def test_catalog_slabs_cut_the_period_in_time_order() -> None:
    day = lambda d: pd.Timestamp(f"2020-01-{d:02d}").value  # noqa: E731
    catalog = sources.Catalog(
        Path("m.json"),
        "netcdf",
        (Path("b.nc"), Path("a.nc"), Path("static.nc")),
        ("b.nc", "a.nc", "static.nc"),
        (np.array([day(3), day(4), day(5)]), np.array([day(1), day(2)]), None),
        (np.array([0, 2, 3]), np.array([0, 1]), None),
        {},
        checks.SourceRules(),
    )
    slabs = catalog.slabs("2020-01-02", "2020-01-05", 2)
    as_lists = [[(i, None if p is None else p.tolist()) for i, p in slab.members] for slab in slabs]
    assert as_lists == [[(2, None), (0, [0]), (1, [1])], [(2, None), (0, [2, 3])]]
    assert [[str(t)[:10] for t in slab.times] for slab in slabs] == [
        ["2020-01-02", "2020-01-03"],
        ["2020-01-04", "2020-01-05"],
    ]
    outside = catalog.slabs("2021-01-01", "2021-01-31", 2)  # no step in the period: one slab of all, no times
    assert len(outside) == 1 and outside[0].times is None and [i for i, _ in outside[0].members] == [0, 1, 2]
    assert catalog.file_of(np.datetime64("2020-01-04")) == "b.nc"
    assert catalog.file_of(np.datetime64("2020-01-09")) is None


@pytest.mark.parametrize("open_files", [3, 128])
def test_at_most_open_files_sources_are_open_at_once(tmp_path: Path, monkeypatch, open_files: int) -> None:
    """xarray's file cache is held to ``OPEN_FILES`` while the step writes: the least recently used
    source closes when another opens (and reopens if read again); the result is the same."""
    manifest, raw, _ = _slab_source(tmp_path)
    cfg = _slab_config()
    _, opened = _record_open_files(monkeypatch, raw)
    monkeypatch.setattr(rg, "OPEN_FILES", open_files)
    rg.main(cfg, manifest=manifest, out=tmp_path / "out.zarr", threads=1, memory_mb=1024)
    assert len(opened) == 1  # one slab of 8 files (of the 9, the first copy of 2020-01-03 is dropped)
    assert len(opened[0]) == min(open_files, 8), sorted(opened[0])
    monkeypatch.undo()
    rg.main(cfg, manifest=manifest, out=tmp_path / "default.zarr", threads=1, memory_mb=1024)
    xr.testing.assert_identical(
        xr.open_zarr(tmp_path / "out.zarr").load(), xr.open_zarr(tmp_path / "default.zarr").load()
    )


def test_regrid_opens_its_sources_without_a_netcdf_chunk_cache(tmp_path: Path, monkeypatch) -> None:
    """The step's own process (the scan and every slab) opens the source files with no chunk cache
    (``sources.NETCDF_CHUNK_CACHE_BYTES``; each file is read once); the setting is restored after the
    step, also when it fails. Dask's worker processes: tests/unit/test_daskutil.py."""
    netCDF4 = pytest.importorskip("netCDF4")
    manifest, _, _ = _slab_source(tmp_path)
    default = netCDF4.get_chunk_cache()
    assert default[0] > 0
    seen: list[tuple[str, int]] = []
    real_scan, real_open_slab = sources.scan, sources.open_slab

    def scan(manifest, **kwargs):
        seen.append(("scan", netCDF4.get_chunk_cache()[0]))
        return real_scan(manifest, **kwargs)

    def open_slab(catalog, members, **kwargs):
        seen.append(("slab", netCDF4.get_chunk_cache()[0]))
        return real_open_slab(catalog, members, **kwargs)

    monkeypatch.setattr(sources, "scan", scan)
    monkeypatch.setattr(sources, "open_slab", open_slab)
    rg.main(_slab_config(), manifest=manifest, out=tmp_path / "out.zarr", threads=1, memory_mb=1024, slab_steps=3)
    assert seen == [("scan", 0), ("slab", 0), ("slab", 0), ("slab", 0)]
    assert netCDF4.get_chunk_cache() == default
    with pytest.raises(DataError):
        rg.main(_slab_config(), manifest=tmp_path / "absent.json", out=tmp_path / "bad.zarr")
    assert netCDF4.get_chunk_cache() == default


def test_a_chunked_variable_opened_in_the_block_has_no_chunk_cache(tmp_path: Path) -> None:
    netCDF4 = pytest.importorskip("netCDF4")
    path = tmp_path / "chunked.nc"
    data = np.random.default_rng(0).random((2, 40, 30)).astype("float32")
    xr.Dataset({"sst": (("time", "lat", "lon"), data)}).to_netcdf(path, encoding={"sst": {"zlib": True}})
    default = netCDF4.get_chunk_cache()[0]
    with sources.netcdf_chunk_cache():
        with netCDF4.Dataset(path) as nc:
            assert nc.variables["sst"].chunking() != "contiguous"
            assert nc.variables["sst"].get_var_chunk_cache()[0] == sources.NETCDF_CHUNK_CACHE_BYTES == 0
        with xr.open_dataset(path) as ds:  # reads as before
            np.testing.assert_array_equal(ds["sst"].values, data)
    with netCDF4.Dataset(path) as nc:
        assert nc.variables["sst"].get_var_chunk_cache()[0] == default > 0
