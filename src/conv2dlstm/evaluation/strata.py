"""Strata of the scores: regions of the grid and groups of initial times (seasons, months).

The evaluate step scores every forecast on the whole grid over the whole test period (region and
season ``all``, :data:`ALL`), and on the strata the configuration names:

- ``evaluate.regions``: name -> a box ``{lat: [south, north], lon: [west, east]}`` (cell centres
  inside, both ends inclusive; an axis left out is not restricted) or ``{mask: <file>}``, a
  netCDF or Zarr ``(lat, lon)`` field on the target grid, boolean or 0/1 (NaN: outside). Each
  becomes a ``(lat, lon)`` boolean field of the region's ocean cells (:func:`region_masks`); a
  region without an ocean cell is a :class:`~conv2dlstm.errors.DataError` naming it and the fix.
- ``evaluate.by_season``: ``season`` (DJF, MAM, JJA, SON) or ``month`` (Jan .. Dec)
  (:func:`time_grouping`, :class:`TimeGrouping`). A forecast belongs to the group of its *first
  valid time* (lead 1: the initial time plus one step), the same group at every lead, so that a
  group's scores at every lead, its skill intervals and its skill horizon come from one set of
  initial times (at lead ``k`` the valid time may lie ``k - 1`` steps into the next group).

The scores themselves are stratified by :class:`conv2dlstm.evaluation.scores.StreamingScores`,
which takes the regions' area weights and the time grouping. The configuration's own checks
(names, latitudes, a box on the grid) are in :mod:`conv2dlstm.config.validate`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.errors import DataError

ALL = "all"
"""The region and season of the headline scores: the whole grid, the whole test period."""
STRATA: tuple[str, str] = ("region", "season")
"""The columns of ``metrics.csv`` that name a score's stratum (``all`` for the headline rows)."""
MASK_VARIABLE = "mask"
"""The variable read from a mask file holding several (a file with one variable needs no name)."""
_COORD_TOLERANCE = 1e-6
"""Degrees by which a mask file's coordinates may differ from the grid's."""


@dataclass(frozen=True)
class TimeGrouping:
    """Groups of initial times by the month of their first valid time (``evaluate.by_season``)."""

    name: str
    """The ``evaluate.by_season`` value: ``season`` or ``month``."""
    of_month: tuple[str, ...]
    """The group of each calendar month, January first (12 entries)."""

    @property
    def order(self) -> tuple[str, ...]:
        """The groups in calendar order, each once (DJF first for seasons)."""
        return tuple(dict.fromkeys(self.of_month[11:] + self.of_month[:11]))

    def labels(self, first_valid: np.ndarray) -> np.ndarray:
        """The group of each forecast from its first valid times ``(time,)`` (datetimes)."""
        months = pd.DatetimeIndex(np.asarray(first_valid, dtype="datetime64[ns]").reshape(-1)).month
        return np.asarray(self.of_month, dtype=object)[np.asarray(months) - 1]

    def of(self, forecast: xr.DataArray) -> np.ndarray:
        """The group of each initial time of a ``(time, lead, ...)`` forecast or truth with the
        ``valid_time(time, lead)`` coordinate of :func:`conv2dlstm.evaluation.inference.forecast_array`."""
        if "valid_time" not in forecast.coords:
            raise DataError(
                f"grouping initial times by {self.name} needs the valid times (coordinate valid_time) of the "
                "forecasts; build them with conv2dlstm.evaluation.inference.forecast_array"
            )
        return self.labels(forecast["valid_time"].isel(lead=0).values)


SEASONS = ("DJF", "DJF", "MAM", "MAM", "MAM", "JJA", "JJA", "JJA", "SON", "SON", "SON", "DJF")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
TIME_GROUPINGS: dict[str, TimeGrouping | None] = {
    "none": None,
    "season": TimeGrouping("season", SEASONS),
    "month": TimeGrouping("month", MONTHS),
}
"""``evaluate.by_season`` -> its grouping (``none``: the whole test period only)."""


def time_grouping(by_season: str) -> TimeGrouping | None:
    """The :class:`TimeGrouping` of an ``evaluate.by_season`` value (None for ``none``)."""
    if by_season not in TIME_GROUPINGS:
        raise DataError(f"evaluate.by_season: {by_season!r} is not one of {sorted(TIME_GROUPINGS)}")
    return TIME_GROUPINGS[by_season]


def box_mask(lat: np.ndarray, lon: np.ndarray, box: Mapping[str, Any]) -> xr.DataArray:
    """``(lat, lon)`` True where the cell centre lies in ``box`` (``lat: [south, north]``,
    ``lon: [west, east]``, ends inclusive; an axis absent or null is not restricted)."""
    lat, lon = np.asarray(lat, dtype="float64"), np.asarray(lon, dtype="float64")
    inside = []
    for axis, values in (("lat", lat), ("lon", lon)):
        bounds = box.get(axis)
        if bounds is None:
            inside.append(np.ones(values.size, dtype=bool))
        else:
            lo, hi = float(bounds[0]), float(bounds[1])
            inside.append((values >= lo - _COORD_TOLERANCE) & (values <= hi + _COORD_TOLERANCE))
    return xr.DataArray(inside[0][:, None] & inside[1][None, :], dims=("lat", "lon"), coords={"lat": lat, "lon": lon})


def _open(path: Path) -> xr.Dataset:
    if not path.exists():
        raise DataError(f"mask file {path} does not exist; fix the path in evaluate.regions or create the file")
    try:
        if path.is_dir() or path.suffix == ".zarr":
            return xr.open_zarr(path, consolidated=None).load()
        with xr.open_dataset(path) as ds:
            return ds.load()
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"mask file {path} cannot be read as netCDF or Zarr ({exc}); write a (lat, lon) field") from exc


def file_mask(path: str | os.PathLike, lat: np.ndarray, lon: np.ndarray, *, region: str) -> xr.DataArray:
    """The ``(lat, lon)`` boolean field of a mask file on the grid ``lat``, ``lon``.

    The file (netCDF, or a Zarr store) holds one data variable, or several of which one is named
    :data:`MASK_VARIABLE`, with dimensions ``lat`` and ``lon`` whose coordinates are the grid's;
    its values are booleans or 0/1 (NaN counts as 0, outside). Anything else is a
    :class:`DataError` naming the file, the region and the fix.
    """
    path = Path(path)
    where = f"evaluate.regions.{region}: mask file {path}"
    ds = _open(path)
    names = [str(n) for n in ds.data_vars]
    if MASK_VARIABLE in names:
        name = MASK_VARIABLE
    elif len(names) == 1:
        name = names[0]
    else:
        raise DataError(f"{where} holds the variables {names}; keep one, or name the mask variable {MASK_VARIABLE!r}")
    field = ds[name]
    if set(field.dims) != {"lat", "lon"}:
        raise DataError(f"{where}: variable {name!r} has dimensions {field.dims}; expected (lat, lon) on the grid")
    field = field.transpose("lat", "lon")
    for axis, grid in (("lat", np.asarray(lat, dtype="float64")), ("lon", np.asarray(lon, dtype="float64"))):
        have = np.asarray(field[axis].values, dtype="float64") if axis in field.coords else None
        if have is None or have.shape != grid.shape or not np.allclose(have, grid, rtol=0, atol=_COORD_TOLERANCE):
            got = "none" if have is None else f"{have.size} values {have.min():g}..{have.max():g}"
            raise DataError(
                f"{where}: its {axis} coordinate ({got}) is not the grid's ({grid.size} values "
                f"{grid.min():g}..{grid.max():g}); regrid the mask onto the target grid (grid.lat, grid.lon)"
            )
    values = np.asarray(field.values)
    if values.dtype != bool:
        numbers = values.astype("float64")
        finite = numbers[np.isfinite(numbers)]
        if not np.isin(finite, (0.0, 1.0)).all():
            bad = sorted(set(finite[~np.isin(finite, (0.0, 1.0))].tolist()))[:5]
            raise DataError(f"{where}: values {bad} are neither 0 nor 1; write a boolean or 0/1 field (NaN: outside)")
        values = np.nan_to_num(numbers, nan=0.0) > 0.5
    return xr.DataArray(values, dims=("lat", "lon"), coords={"lat": np.asarray(lat), "lon": np.asarray(lon)})


def region_masks(regions: Mapping[str, Mapping[str, Any]], ocean: xr.DataArray) -> dict[str, xr.DataArray]:
    """Name -> ``(lat, lon)`` boolean field of the region's ocean cells, in the configured order.

    Args:
        regions: ``evaluate.regions`` (validated): a box (``lat``, ``lon``) or a ``mask`` file each.
        ocean: the grid's ``(lat, lon)`` ocean mask, with its coordinates.

    Raises:
        DataError: a mask file that does not fit (:func:`file_mask`), or a region without an ocean cell.
    """
    lat, lon = np.asarray(ocean["lat"].values), np.asarray(ocean["lon"].values)
    out: dict[str, xr.DataArray] = {}
    for name, spec in regions.items():
        if spec.get("mask"):
            inside = file_mask(spec["mask"], lat, lon, region=name)
            what = f"mask file {spec['mask']}"
        else:
            inside = box_mask(lat, lon, spec)
            what = f"box lat {spec.get('lat') or 'all'}, lon {spec.get('lon') or 'all'}"
        cells = inside & ocean.astype(bool)
        if not bool(cells.any()):
            raise DataError(
                f"config key evaluate.regions.{name}: the {what} holds no ocean cell of the grid "
                f"({int(inside.sum())} of its cells lie in it, all land); move or enlarge the region onto the "
                "ocean, or remove it"
            )
        out[name] = cells.assign_coords(lat=lat, lon=lon)
    return out
