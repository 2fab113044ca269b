"""Regridding a harmonized ``(time, lat, lon)`` dataset to a target grid (a library: no files).

Methods:

- ``conservative``: area-weighted and NaN-aware. The weights factorise into a latitude and a
  longitude overlap matrix; the latitude one holds exact spherical band areas
  (``sin(north) - sin(south)``, i.e. proportional to ``cos(lat)``), the longitude one overlap widths.
  A target cell is ocean when the finite (ocean) source cells cover at least ``min_ocean_fraction``
  of its area; its value is then the area-weighted mean of those ocean cells alone, otherwise NaN.
  Land values never enter an ocean cell.
- ``linear`` and ``nearest``: point interpolation with ``xarray-regrid`` (``ds.regrid.linear`` /
  ``ds.regrid.nearest``); a target point next to a NaN (land) source cell is NaN for ``linear``.

Everything stays lazy: each time chunk is regridded independently by Dask. The regrid step
(:mod:`conv2dlstm.steps.regrid`) and the forecast step call :func:`regrid_dataset`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm.artifacts import regridded
from conv2dlstm.config.modelsize import axis_problem
from conv2dlstm.data import harmonize as hz
from conv2dlstm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

METHODS = ("conservative", "linear", "nearest")
CHUNK_BYTES = 16 * 1024 * 1024
"""Target size of one source time chunk (float64 working copy) while regridding: a worker thread
holds about three times this while it regrids one."""
MAX_TIME_CHUNK = 256
_FRACTION_TOL = 1e-6
"""Ocean fractions within this of ``min_ocean_fraction`` count as reaching it (float coordinates)."""


def axis_centres(start: float, stop: float, step: float) -> np.ndarray:
    """Cell centres ``start, start+step, ...`` up to ``stop`` inclusive (within 1e-6 step)."""
    n = int(np.floor((stop - start) / step + 1e-6)) + 1
    return np.round(start + step * np.arange(n, dtype=np.float64), 10)


def target_grid(grid_cfg: Mapping[str, Any]) -> xr.Dataset:
    """The target grid of config section ``grid``: a Dataset with ``lat`` and ``lon`` cell centres.

    Each coordinate carries ``step`` (cell width) and ``cell_bounds`` attributes; a cell spans its centre
    +- step/2.
    """
    coords = {}
    for axis, units, name in (("lat", "degrees_north", "latitude"), ("lon", "degrees_east", "longitude")):
        ax = grid_cfg[axis]
        centres = axis_centres(float(ax["start"]), float(ax["stop"]), float(ax["step"]))
        problem = axis_problem(axis, ax)
        if problem:
            raise ConfigError(problem)
        if axis == "lat" and (centres[0] - ax["step"] / 2 < -90 or centres[-1] + ax["step"] / 2 > 90):
            raise ConfigError(f"config key grid.lat: cells {centres[0]}..{centres[-1]} +- step/2 leave -90..90")
        half = float(ax["step"]) / 2
        coords[axis] = (
            axis,
            centres,
            {
                "units": units,
                "standard_name": name,
                "step": float(ax["step"]),
                "cell_bounds": f"centre +- {half:g}, {centres[0] - half:g}..{centres[-1] + half:g}",
            },
        )
    return xr.Dataset(coords=coords)


GAP_FACTOR = 1.5
"""A spacing wider than this many times the smallest spacing is a gap in the source axis, not a wide cell."""


def cell_bounds(centres: np.ndarray, step: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds of the cells with these centres.

    With ``step``: centre +- step/2. Without: halfway to each neighbour, except across a gap (a
    spacing above :data:`GAP_FACTOR` times the smallest spacing) and at the ends, where a cell
    extends half the smallest spacing. A gap is covered by no cell.
    """
    centres = np.asarray(centres, dtype=np.float64)
    if step is not None:
        return centres - step / 2, centres + step / 2
    if centres.size < 2:
        raise DataError(f"cannot infer cell bounds from the single centre {centres.tolist()}; give the cell width")
    spacing = np.diff(centres)
    nominal = float(spacing.min())
    half = np.where(spacing <= GAP_FACTOR * nominal, spacing / 2, nominal / 2)
    lower = centres - np.concatenate([[nominal / 2], half])
    upper = centres + np.concatenate([half, [nominal / 2]])
    return lower, upper


def overlap_matrix(
    target: tuple[np.ndarray, np.ndarray], source: tuple[np.ndarray, np.ndarray], *, latitude: bool
) -> np.ndarray:
    """``(n_target, n_source)`` overlap of target and source cells (``(lower, upper)`` bounds) on one axis.

    Longitude: overlap width in degrees. Latitude: ``sin(north) - sin(south)`` of the overlap band,
    proportional to its area on the sphere.
    """
    lo = np.maximum(target[0][:, None], source[0][None, :])
    hi = np.maximum(np.minimum(target[1][:, None], source[1][None, :]), lo)
    if latitude:
        return np.sin(np.deg2rad(hi)) - np.sin(np.deg2rad(lo))
    return hi - lo


def _conservative_block(
    x: np.ndarray, wlat: np.ndarray, wlon: np.ndarray, cell_area: np.ndarray, min_fraction: float
) -> np.ndarray:
    """Regrid one block ``(..., lat_src, lon_src)`` -> ``(..., lat_tgt, lon_tgt)`` (float32).

    ``wlat`` ``(lat_tgt, lat_src)`` and ``wlon`` ``(lon_tgt, lon_src)`` are overlap matrices and
    ``cell_area`` ``(lat_tgt, lon_tgt)`` the target cells' areas in the same units.
    """
    values = x.astype(np.float64)  # the one working copy of the block
    ocean = np.isfinite(values)
    values[~ocean] = 0.0
    # (lat_t, lat_s) @ (..., lat_s, lon_s) @ (lon_s, lon_t) -> (..., lat_t, lon_t)
    total = wlat @ values @ wlon.T
    ocean_area = wlat @ ocean.astype(np.float64) @ wlon.T
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / ocean_area
    keep = (ocean_area > 0) & (ocean_area >= (min_fraction - _FRACTION_TOL) * cell_area)
    return np.where(keep, mean, np.nan).astype(np.float32)


def _extent(lower: float, upper: float) -> str:
    return f"{lower:g}..{upper:g}"


def check_coverage(ds: xr.Dataset, target: xr.Dataset, method: str) -> None:
    """Raise :class:`DataError` unless the source covers the target grid.

    Conservative needs every target cell inside the outer bounds of the source cells; the
    interpolating methods need every target centre inside the source centres.
    """
    for axis in ("lat", "lon"):
        src = ds[axis].values.astype(np.float64)
        tgt = target[axis].values.astype(np.float64)
        if method == "conservative":
            step = target[axis].attrs.get("step")
            s_lo, s_hi = cell_bounds(src) if src.size > 1 else cell_bounds(src, step)
            t_lo, t_hi = cell_bounds(tgt, step)
            ok = t_lo[0] >= s_lo[0] - 1e-6 and t_hi[-1] <= s_hi[-1] + 1e-6
            what_src = f"cells span {_extent(s_lo[0], s_hi[-1])}"
            what_tgt = f"cells span {_extent(t_lo[0], t_hi[-1])}"
        else:
            ok = tgt[0] >= src[0] - 1e-6 and tgt[-1] <= src[-1] + 1e-6
            what_src, what_tgt = f"centres span {_extent(src[0], src[-1])}", f"centres span {_extent(tgt[0], tgt[-1])}"
        if not ok:
            raise DataError(
                f"the target grid {axis} ({what_tgt}) is outside the source coverage ({what_src}) for "
                f"method {method}; shrink config grid.{axis} or widen region.{axis} / the source"
            )


def conservative(ds: xr.Dataset, target: xr.Dataset, *, min_ocean_fraction: float) -> xr.Dataset:
    """NaN-aware area-conservative regridding of every data variable (see the module docstring).

    The ocean fraction of a target cell is the area of its finite source cells over its whole area,
    so gaps in the source axes count as missing, like land.

    Why not ``xarray-regrid``'s conservative regridder, which this equals on a regular, gap-free
    source (``nan_threshold = 1 - min_ocean_fraction``; ``tests/unit/test_regrid.py`` checks it): it
    infers source cells halfway between neighbouring centres, so across a gap in the source axis (a
    product cut into tiles, a missing band) the neighbours stretch over the gap and a target cell
    inside it gets their values; here the gap is missing data. The overlap matrices also give the
    ocean fraction that decides the land mask in the same pass.
    """
    if not 0.0 <= min_ocean_fraction <= 1.0:
        raise ConfigError(f"grid.min_ocean_fraction {min_ocean_fraction} must be within 0..1")
    src_lat, src_lon = ds["lat"].values, ds["lon"].values
    if src_lat.size < 2 or src_lon.size < 2:
        raise DataError(f"the source has {src_lat.size} x {src_lon.size} cells; conservative regridding needs 2 x 2")
    t_lat = cell_bounds(target["lat"].values, target["lat"].attrs.get("step"))
    t_lon = cell_bounds(target["lon"].values, target["lon"].attrs.get("step"))
    wlat = overlap_matrix(t_lat, cell_bounds(src_lat), latitude=True)
    wlon = overlap_matrix(t_lon, cell_bounds(src_lon), latitude=False)
    lat_area = np.sin(np.deg2rad(t_lat[1])) - np.sin(np.deg2rad(t_lat[0]))
    cell_area = lat_area[:, None] * (t_lon[1] - t_lon[0])[None, :]
    out = {}
    for name, da in ds.data_vars.items():
        if da.chunks is not None:
            da = da.chunk({"lat": -1, "lon": -1})
        res = xr.apply_ufunc(
            _conservative_block,
            da,
            kwargs={"wlat": wlat, "wlon": wlon, "cell_area": cell_area, "min_fraction": float(min_ocean_fraction)},
            input_core_dims=[["lat", "lon"]],
            output_core_dims=[["lat_t", "lon_t"]],
            exclude_dims={"lat", "lon"},
            dask="parallelized",
            output_dtypes=[np.float32],
            dask_gufunc_kwargs={"output_sizes": {"lat_t": wlat.shape[0], "lon_t": wlon.shape[0]}},
            keep_attrs=True,
        )
        out[name] = res.rename({"lat_t": "lat", "lon_t": "lon"})
    result = xr.Dataset(out, attrs=ds.attrs)
    return result.assign_coords(lat=target["lat"], lon=target["lon"])


def _interpolate(ds: xr.Dataset, target: xr.Dataset, method: str) -> xr.Dataset:
    import xarray_regrid  # noqa: F401  (registers the .regrid accessor)

    grid = xr.Dataset(coords={"lat": target["lat"].values, "lon": target["lon"].values})
    if any(ds[v].chunks is not None for v in ds.data_vars):
        ds = ds.chunk({"lat": -1, "lon": -1})
    # Interpolate in float64: on Dask arrays xarray declares a float32 result for float32 inputs but
    # computes float64, so the final cast to float32 would be skipped.
    ds = ds.astype(np.float64, keep_attrs=True)
    out = ds.regrid.linear(grid) if method == "linear" else ds.regrid.nearest(grid)
    out = out.assign_coords(lat=target["lat"], lon=target["lon"])
    for name in out.data_vars:
        out[name] = out[name].astype(np.float32)
        out[name].attrs = ds[name].attrs
    return out


def regrid(ds: xr.Dataset, target: xr.Dataset, *, method: str, min_ocean_fraction: float = 0.5) -> xr.Dataset:
    """Regrid a harmonized dataset (``time, lat, lon``) to ``target`` (from :func:`target_grid`).

    Lazy inputs give lazy outputs with the same time chunks. ``min_ocean_fraction`` applies to the
    conservative method only. Raises :class:`DataError` when the target is outside the source.
    """
    if method not in METHODS:
        raise ConfigError(f"config key grid.method: {method!r} is not one of {list(METHODS)}")
    for axis in ("lat", "lon"):
        if axis not in ds.dims:
            raise DataError(f"regrid needs a harmonized dataset with dimension {axis!r}; it has {list(ds.dims)}")
    check_coverage(ds, target, method)
    if method == "conservative":
        out = conservative(ds, target, min_ocean_fraction=min_ocean_fraction)
    else:
        out = _interpolate(ds, target, method)
    return out.transpose("time", "lat", "lon")


def time_chunk(n_lat: int, n_lon: int, *, chunk_bytes: int = CHUNK_BYTES, maximum: int = MAX_TIME_CHUNK) -> int:
    """Time steps per chunk so that one float64 ``(time, n_lat, n_lon)`` block is about ``chunk_bytes``."""
    return int(max(1, min(maximum, chunk_bytes // (8 * max(1, n_lat * n_lon)))))


OUTPUT_CHUNK_BYTES = 16 * 1024 * 1024
"""Target size of one time chunk of the regridded store (float64 working copy)."""


def output_time_chunk(target: xr.Dataset) -> int:
    """Time steps per chunk of the regridded store on grid ``target``: :func:`time_chunk` of
    :data:`OUTPUT_CHUNK_BYTES` (the grid alone decides it, so every slab of the source agrees)."""
    return time_chunk(target.sizes["lat"], target.sizes["lon"], chunk_bytes=OUTPUT_CHUNK_BYTES)


def prepare(raw: xr.Dataset, cfg: Mapping[str, Any]) -> xr.Dataset:
    """Harmonize, cut to ``source.start..end`` and ``region``, keep ``variables.inputs`` + ``targets``."""
    h = cfg["harmonize"]
    ds = hz.harmonize(raw, level=h["level"], lon_convention=h["lon_convention"], rename=h["rename"])
    ds = hz.select_period(ds, cfg["source"]["start"], cfg["source"]["end"])
    ds = hz.select_region(ds, cfg["region"]["lat"], cfg["region"]["lon"])
    wanted = list(dict.fromkeys([*cfg["variables"]["inputs"], *cfg["variables"]["targets"]]))
    missing = [v for v in wanted if v not in ds.data_vars]
    if missing:
        raise DataError(
            f"variables {missing} (config variables.inputs/targets) are not in the harmonized source; "
            f"available variables are {sorted(map(str, ds.data_vars))}; fix the names or map them with "
            "harmonize.rename"
        )
    return ds[wanted]


def regrid_dataset(raw: xr.Dataset, cfg: Mapping[str, Any], *, out_chunk: int | None = None) -> xr.Dataset:
    """The whole regrid step on an opened (raw, lazy) dataset: prepare, regrid, chunk for writing.

    The result is chunked ``(out_chunk, all lat, all lon)`` (default :func:`output_time_chunk`);
    nothing is computed.
    """
    ds = prepare(raw, cfg)
    target = target_grid(cfg["grid"])
    tc = time_chunk(ds.sizes["lat"], ds.sizes["lon"])
    ds = ds.chunk({"time": tc, "lat": -1, "lon": -1})
    out = regrid(ds, target, method=cfg["grid"]["method"], min_ocean_fraction=cfg["grid"]["min_ocean_fraction"])
    out = out.chunk({"time": out_chunk or output_time_chunk(target), "lat": -1, "lon": -1})
    out.attrs = {
        "regrid_method": cfg["grid"]["method"],
        "min_ocean_fraction": float(cfg["grid"]["min_ocean_fraction"]),
        "lon_convention": cfg["harmonize"]["lon_convention"],
        "format_version": regridded.FORMAT_VERSION,
    }
    return out
