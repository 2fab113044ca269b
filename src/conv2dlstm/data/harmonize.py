"""The one renaming step: any gridded source to dimensions ``time, lat, lon``; period and region cuts.

:func:`harmonize` recognises the usual names of the time, latitude, longitude and vertical axes,
keeps one vertical level, converts longitudes to the configured convention, sorts latitude
ascending and keeps the float32 data variables on ``(time, lat, lon)``. It works on lazy (Dask)
datasets without loading data: only coordinates are read.

The axis finder (:func:`find_axis`), the longitude convention (:func:`wrap_longitude`), the period
rule (:func:`day_bounds`: whole days, both ends included) and the region rule
(:func:`select_region`) are defined here once and used by every step that cuts data.

Packed integers (``scale_factor``/``add_offset``/``_FillValue``) are decoded by xarray when the file
is opened (``mask_and_scale``), before this step.

The checks of the source files (duplicate time stamps, units, plausible values, gaps) are
:mod:`conv2dlstm.data.checks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.errors import DataError

log = logging.getLogger(__name__)

TIME_NAMES = ("time", "t", "valid_time")
LAT_NAMES = ("lat", "latitude", "nav_lat", "y")
LON_NAMES = ("lon", "longitude", "nav_lon", "x")
VERTICAL_NAMES = ("zlev", "depth", "lev", "level", "deptht", "z")
LON_CONVENTIONS = ("-180..180", "0..360")
DIMS = ("time", "lat", "lon")
AXIS_NAMES: dict[str, tuple[str, ...]] = {
    "time": TIME_NAMES,
    "lat": LAT_NAMES,
    "lon": LON_NAMES,
    "vertical": VERTICAL_NAMES,
}
"""Recognised source names of each axis role, in order of preference."""

T = TypeVar("T", xr.Dataset, xr.DataArray)
DateLike: TypeAlias = str | pd.Timestamp | np.datetime64


def find_names(ds: xr.Dataset, names: Sequence[str]) -> list[str]:
    """Names of ``ds`` variables or dimensions matching ``names`` (case-insensitive), in ``names`` order."""
    present: dict[str, str] = {}
    for key in list(ds.variables) + list(ds.dims):
        present.setdefault(str(key).lower(), str(key))
    return list(dict.fromkeys(present[n.lower()] for n in names if n.lower() in present))


def find_axis(ds: xr.Dataset, role: str, *, rename: Mapping[str, str] | None = None) -> str | None:
    """Name of the 1-D coordinate of ``ds`` (raw names) that :func:`harmonize` uses as axis ``role``.

    ``role`` is ``time``, ``lat``, ``lon`` or ``vertical``. Candidates are the source names that
    ``rename`` maps onto ``role``, then :data:`AXIS_NAMES` ``[role]`` (case-insensitive), and the
    first one that is a variable is the axis, as in :func:`harmonize`. None when there is none, or
    when it is not 1-D (a curvilinear grid, which :func:`harmonize` rejects).
    """
    if role not in AXIS_NAMES:
        raise ValueError(f"unknown axis role {role!r}; use one of {list(AXIS_NAMES)}")
    candidates = [*(src for src, std in (rename or {}).items() if std == role), *AXIS_NAMES[role]]
    name = _first_variable(ds, candidates)
    return name if name is not None and ds[name].ndim == 1 else None


def _first_variable(ds: xr.Dataset, names: Sequence[str]) -> str | None:
    """The first of ``names`` (case-insensitive) that is a variable of ``ds``."""
    return next((c for c in find_names(ds, names) if c in ds.variables), None)


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
    name = _first_variable(ds, names)
    if name is None:
        raise DataError(
            f"no {role} coordinate among {list(names)}; the dataset has {sorted(map(str, ds.variables))}; "
            f"add the source name to harmonize.rename (e.g. {{'<name>': '{role}'}})"
        )
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
    for dim in find_names(ds, VERTICAL_NAMES):
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
        raise DataError(
            f"time {first} appears more than once in the source; remove the duplicate files, or set "
            "harmonize.duplicates to first or last to keep one of them"
        )
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
    return f"{np.nanmin(values):g}..{np.nanmax(values):g}" if values.size else "empty"


def _as_indexer(idx: np.ndarray) -> slice | np.ndarray:
    """A slice when ``idx`` (increasing) is a contiguous run, else ``idx`` itself (keeps Dask graphs simple)."""
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _axis_indices(values: np.ndarray, bounds: Sequence[float], *, margin: float = 0.0) -> np.ndarray:
    """Indices (increasing) of the cell centres ``values`` within ``[bounds[0] - margin, bounds[1] + margin]``."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(bounds[0]) - margin, float(bounds[1]) + margin
    return np.flatnonzero((values >= lo) & (values <= hi))


def select_region(
    ds: xr.Dataset,
    lat_range: Sequence[float] | None,
    lon_range: Sequence[float] | None,
    *,
    lat: str = "lat",
    lon: str = "lon",
    margin_cells: float = 0,
) -> xr.Dataset:
    """Cells whose centres lie in ``[min, max]`` of each range (``None``: no restriction).

    ``lat`` and ``lon`` name the 1-D coordinates (those of a harmonized dataset by default); the
    ranges are in the coordinates' own longitude convention. ``margin_cells`` widens each range by
    that many cells (the median spacing of the axis) on both sides. Works on lazy datasets (only the
    coordinates are read). :class:`DataError` when nothing is left.
    """
    out = ds
    for name, bounds in ((lat, lat_range), (lon, lon_range)):
        if bounds is None:
            continue
        values = np.asarray(ds[name].values, dtype=np.float64)
        margin = float(margin_cells) * float(np.median(np.abs(np.diff(values)))) if values.size > 1 else 0.0
        idx = _axis_indices(values, bounds, margin=margin)
        if idx.size == 0:
            covers = ", ".join(f"{n} {_span(ds[n].values)}" for n in (lat, lon) if n in ds.variables)
            raise DataError(
                f"region lat {lat_range} lon {lon_range} contains no source cell; the source covers {covers}; "
                "fix config region"
            )
        out = out.isel({ds[name].dims[0]: _as_indexer(idx)})
    return out


def day_bounds(start: DateLike, end: DateLike) -> tuple[np.datetime64, np.datetime64]:
    """The period of whole days ``start..end`` (both included) as ``[lo, hi)`` in datetime64[ns].

    ``lo`` is midnight starting day ``start`` and ``hi`` midnight ending day ``end`` (the start of
    the next day): a time ``t`` is in the period when ``lo <= t < hi``, whatever its time of day
    (OISST daily files are stamped at 12:00). This is the pipeline's one definition of a period;
    source, splits and windows all use it.
    """
    lo = pd.Timestamp(start).normalize()
    hi = pd.Timestamp(end).normalize() + pd.Timedelta(days=1)
    return np.datetime64(lo.to_datetime64(), "ns"), np.datetime64(hi.to_datetime64(), "ns")


def in_period(times: np.ndarray | pd.Index, start: DateLike, end: DateLike) -> np.ndarray:
    """Bool array: which ``times`` lie in the whole days ``start..end`` (see :func:`day_bounds`)."""
    lo, hi = day_bounds(start, end)
    t = np.asarray(times, dtype="datetime64[ns]")
    return (t >= lo) & (t < hi)


def _covered(times: pd.Index | np.ndarray) -> str:
    t = pd.DatetimeIndex(np.asarray(times, dtype="datetime64[ns]"))
    return f"{t.min().date()}..{t.max().date()}" if len(t) else "no times"


def select_period(
    ds: T,
    start: DateLike,
    end: DateLike,
    *,
    time: str = "time",
    what: str = "the period",
    fix: str = "fix the period in the config (source.start/end or splits)",
) -> T:
    """Time steps of the whole days ``start`` to ``end`` (YYYY-MM-DD), both included (:func:`day_bounds`).

    ``time`` names the 1-D datetime coordinate. Selection is by index on the (small) coordinate, so
    it works on lazy data and on unsorted raw times. When no step is left, :class:`DataError` says
    ``"<what> <start>..<end> contains no time step ...; <fix>"``.
    """
    times = ds[time].values
    idx = np.flatnonzero(in_period(times, start, end))
    if idx.size == 0:
        raise DataError(
            f"{what} {start}..{end} contains no time step of the data, which covers {_covered(times)}; {fix}"
        )
    return ds.isel({ds[time].dims[0]: _as_indexer(idx)})
