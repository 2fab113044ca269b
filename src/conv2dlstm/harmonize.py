"""The one renaming step: any gridded source to dimensions ``time, lat, lon``.

:func:`harmonize` recognises the usual names of the time, latitude, longitude and vertical axes,
keeps one vertical level, converts longitudes to the configured convention, sorts latitude
ascending and keeps the float32 data variables on ``(time, lat, lon)``. It works on lazy (Dask)
datasets without loading data: only coordinates are read.

Packed integers (``scale_factor``/``add_offset``/``_FillValue``) are decoded by xarray when the file
is opened (``mask_and_scale``), before this step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.errors import DataError

TIME_NAMES = ("time", "t", "valid_time")
LAT_NAMES = ("lat", "latitude", "nav_lat", "y")
LON_NAMES = ("lon", "longitude", "nav_lon", "x")
VERTICAL_NAMES = ("zlev", "depth", "lev", "level", "deptht", "z")
LON_CONVENTIONS = ("-180..180", "0..360")
DIMS = ("time", "lat", "lon")


def _find(ds: xr.Dataset, names: Sequence[str]) -> list[str]:
    """Names of ``ds`` variables or dimensions matching ``names`` (case-insensitive), in ``names`` order."""
    present = {str(k).lower(): str(k) for k in list(ds.variables) + list(ds.dims)}
    return [present[n] for n in names if n in present]


def _apply_rename(ds: xr.Dataset, rename: Mapping[str, str]) -> xr.Dataset:
    missing = [k for k in rename if k not in ds.variables and k not in ds.dims]
    if missing:
        raise DataError(
            f"harmonize.rename maps {missing} but the dataset has no such name; names in the dataset are "
            f"{sorted(map(str, ds.variables))}; fix the keys of harmonize.rename"
        )
    return ds.rename(dict(rename)) if rename else ds


def _to_standard_axis(ds: xr.Dataset, role: str, names: Sequence[str]) -> xr.Dataset:
    """Rename the 1-D coordinate playing ``role`` (time, lat or lon) and its dimension to ``role``."""
    candidates = [c for c in _find(ds, names) if c in ds.variables]
    if not candidates:
        raise DataError(
            f"no {role} coordinate among {list(names)}; the dataset has {sorted(map(str, ds.variables))}; "
            f"add the source name to harmonize.rename (e.g. {{'<name>': '{role}'}})"
        )
    name = candidates[0]
    if ds[name].ndim != 1:
        raise DataError(
            f"the {role} coordinate {name!r} has dimensions {tuple(map(str, ds[name].dims))}: only "
            "rectilinear grids (1-D latitude and longitude) are supported; regrid the source to a regular "
            "latitude/longitude grid first"
        )
    dim = ds[name].dims[0]
    if dim != name:
        if name in ds.dims:
            raise DataError(
                f"{name!r} is both a dimension and a coordinate on {dim!r}; rename one with harmonize.rename"
            )
        ds = ds.swap_dims({dim: name})
    if name != role:
        if role in ds.variables or role in ds.dims:
            ds = ds.drop_vars(role, errors="ignore")
        ds = ds.rename({name: role})
    return ds


def _select_level(ds: xr.Dataset, level: int) -> xr.Dataset:
    """Keep index ``level`` of every vertical dimension present and drop that dimension."""
    for dim in _find(ds, VERTICAL_NAMES):
        if dim not in ds.dims:
            ds = ds.drop_vars(dim)  # a scalar or auxiliary vertical coordinate
            continue
        size = ds.sizes[dim]
        if not 0 <= level < size:
            raise DataError(
                f"harmonize.level {level} is out of range for the vertical dimension {dim!r} of size {size}; "
                f"use a level between 0 and {size - 1}"
            )
        ds = ds.isel({dim: level}, drop=True)
    return ds


def wrap_longitude(lon: np.ndarray, convention: str) -> np.ndarray:
    """Longitudes (degrees) mapped into ``convention``: ``-180..180`` ([-180, 180)) or ``0..360`` ([0, 360))."""
    lon = np.asarray(lon, dtype=np.float64)
    if convention == "-180..180":
        return ((lon + 180.0) % 360.0) - 180.0
    if convention == "0..360":
        return lon % 360.0
    raise DataError(f"unknown longitude convention {convention!r}; use one of {list(LON_CONVENTIONS)}")


def _fix_lon(ds: xr.Dataset, convention: str) -> xr.Dataset:
    lon = ds["lon"].values
    wrapped = wrap_longitude(lon, convention)
    if not np.array_equal(wrapped, lon):
        ds = ds.assign_coords(lon=("lon", wrapped, ds["lon"].attrs))
    if pd.Index(wrapped).has_duplicates:
        raise DataError(
            f"longitudes repeat after wrapping to {convention} (e.g. both -180 and 180); drop the duplicate "
            "column from the source or restrict region.lon"
        )
    if not ds.indexes["lon"].is_monotonic_increasing:
        ds = ds.isel(lon=np.argsort(wrapped, kind="stable"))
    return ds


def _fix_lat(ds: xr.Dataset) -> xr.Dataset:
    index = ds.indexes["lat"]
    if index.has_duplicates:
        raise DataError("latitudes repeat in the source; it is not a rectilinear grid")
    if index.is_monotonic_decreasing and len(index) > 1:
        return ds.isel(lat=slice(None, None, -1))
    if not index.is_monotonic_increasing:
        return ds.isel(lat=np.argsort(index.values, kind="stable"))
    return ds


def _fix_time(ds: xr.Dataset) -> xr.Dataset:
    index = ds.indexes["time"]
    if not isinstance(index, pd.DatetimeIndex):
        raise DataError(
            f"the time coordinate has dtype {ds['time'].dtype}, not datetimes; the source's time units "
            "could not be decoded (check its 'units' and 'calendar' attributes)"
        )
    if index.has_duplicates:
        first = index[index.duplicated()][0]
        raise DataError(f"time {first} appears more than once in the source; remove the duplicate files")
    if not index.is_monotonic_increasing:
        ds = ds.isel(time=np.argsort(index.values, kind="stable"))
    return ds


def _keep_grid_variables(ds: xr.Dataset) -> xr.Dataset:
    """Data variables on exactly (time, lat, lon), float32, with ``units`` and no source encoding."""
    keep = [v for v in ds.data_vars if set(ds[v].dims) == set(DIMS)]
    if not keep:
        described = {str(v): tuple(map(str, ds[v].dims)) for v in ds.data_vars}
        raise DataError(
            f"no data variable has dimensions (time, lat, lon) after harmonizing; variables are {described}; "
            "map the missing axis with harmonize.rename or choose the vertical level with harmonize.level"
        )
    out = ds[keep].reset_coords(drop=True)
    for name in keep:
        var = out[name].transpose(*DIMS)
        if var.dtype != np.float32:
            var = var.astype(np.float32)
        attrs: dict[str, Any] = dict(out[name].attrs)
        attrs.setdefault("units", "unknown")
        var.attrs = attrs
        var.encoding = {}
        out[name] = var
    for coord in DIMS:
        out[coord].encoding = {}
    return out


def harmonize(
    ds: xr.Dataset,
    *,
    level: int = 0,
    lon_convention: str = "-180..180",
    rename: Mapping[str, str] | None = None,
) -> xr.Dataset:
    """Return ``ds`` on dimensions ``(time, lat, lon)``: the pipeline's one renaming step.

    - ``rename`` (source name -> standard name) is applied first;
    - time is found among :data:`TIME_NAMES`, latitude among :data:`LAT_NAMES`, longitude among
      :data:`LON_NAMES` (1-D coordinates only) and renamed to ``time``, ``lat``, ``lon``;
    - every vertical dimension (:data:`VERTICAL_NAMES`) is reduced to index ``level`` and dropped;
    - longitudes are wrapped into ``lon_convention`` and sorted; latitudes sorted ascending;
    - data variables on exactly ``(time, lat, lon)`` are kept (others, e.g. ``time_bnds``, dropped)
      as float32 with their ``units`` attribute.

    Lazy: Dask-backed variables stay lazy. Raises :class:`DataError` naming what is missing and the fix.
    """
    if lon_convention not in LON_CONVENTIONS:
        raise DataError(f"unknown longitude convention {lon_convention!r}; use one of {list(LON_CONVENTIONS)}")
    ds = _apply_rename(ds, rename or {})
    ds = _select_level(ds, level)
    ds = _to_standard_axis(ds, "time", TIME_NAMES)
    ds = _to_standard_axis(ds, "lat", LAT_NAMES)
    ds = _to_standard_axis(ds, "lon", LON_NAMES)
    ds = _keep_grid_variables(ds)
    if ds.sizes["lat"] == 0 or ds.sizes["lon"] == 0 or ds.sizes["time"] == 0:
        raise DataError(f"the source has an empty axis: sizes {dict(ds.sizes)}")
    ds = _fix_time(ds)
    ds = _fix_lat(ds)
    ds = _fix_lon(ds, lon_convention)
    ds["lat"].attrs.update(units="degrees_north", standard_name="latitude")
    ds["lon"].attrs.update(units="degrees_east", standard_name="longitude")
    return ds


def _span(values: np.ndarray) -> str:
    return f"{values.min():g}..{values.max():g}" if values.size else "empty"


def select_region(
    ds: xr.Dataset,
    lat_range: Sequence[float] | None,
    lon_range: Sequence[float] | None,
) -> xr.Dataset:
    """Cells whose centres lie in ``[min, max]`` of each range (``None``: no restriction), on a harmonized dataset."""
    out = ds
    if lat_range is not None:
        out = out.sel(lat=slice(float(lat_range[0]), float(lat_range[1])))
    if lon_range is not None:
        out = out.sel(lon=slice(float(lon_range[0]), float(lon_range[1])))
    if out.sizes["lat"] == 0 or out.sizes["lon"] == 0:
        raise DataError(
            f"region lat {lat_range} lon {lon_range} contains no source cell; the source covers lat "
            f"{_span(ds['lat'].values)}, lon {_span(ds['lon'].values)} (longitudes in the harmonized "
            "convention); fix config region"
        )
    return out


def select_period(ds: xr.Dataset, start: str, end: str) -> xr.Dataset:
    """Time steps from day ``start`` to day ``end`` (YYYY-MM-DD), both whole days included."""
    lo = pd.Timestamp(start).normalize()
    hi = pd.Timestamp(end).normalize() + pd.Timedelta(days=1) - pd.Timedelta(1, "ns")
    out = ds.sel(time=slice(lo, hi))
    if out.sizes["time"] == 0:
        times = ds.indexes["time"]
        have = f"{times[0].date()}..{times[-1].date()}" if len(times) else "no times"
        raise DataError(
            f"the period {start}..{end} contains no time step of the data, which covers {have}; "
            "fix the period in the config (source.start/end or splits)"
        )
    return out
