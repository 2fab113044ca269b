"""The normalization statistics file, ``<outdir>/normalize/<name>.nc`` (netCDF, small).

Written by the normalize step (:func:`write`), read by the windows, train, evaluate and forecast
steps: whole into memory (:func:`load`) or with the climatology left on disk and read per batch
(:func:`open_lazy`). Every reader checks :data:`FORMAT_VERSION` and the :data:`REQUIRED` variables,
and :func:`check_grid` that the statistics belong to the grid of the data they are applied to.
Each problem is a :class:`~conv2dlstm.errors.DataError` naming the file and the fix (rerun the
normalize step).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm.errors import DataError

FORMAT_VERSION = 1
"""Attribute ``format_version`` of the file; a reader refuses any other."""
REQUIRED = ("mean", "std", "climatology", "mask")
"""Data variables every statistics file has, besides the ``variable`` coordinate."""
FIX = "re-run the normalize step (and the steps after it)"
GRID_ATOL = 1e-9
"""Coordinates of the statistics and of the data agree within this many degrees."""


LAND_FROM_GAPS_ATTRS = (
    "land_from_gaps_cells",
    "land_from_gaps_days",
    "land_from_gaps_where",
    "gap_filled_values",
    "gap_filled_cells",
)
"""Attributes of the statistics (carried on by the windows store and logged as MLflow tags) that say
how many cells with data at other time steps the ocean mask made land, on which days they are
missing and where they are (a few ``(lat, lon)``), and how many missing values
``harmonize.fill_max_days`` filled, in how many cells (the normalize step)."""


def _check(ds: xr.Dataset, path: Path) -> None:
    version = ds.attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise DataError(
            f"the statistics file {path} has format_version {version}, this version reads {FORMAT_VERSION}: "
            f"it was written by another version of the normalize step; {FIX}"
        )
    missing = [v for v in REQUIRED if v not in ds.data_vars]
    if "variable" not in ds.coords:
        missing.append("variable")
    if missing:
        raise DataError(
            f"the statistics file {path} has no {missing} (it has {sorted(map(str, ds.variables))}): it was "
            f"not written by this version of the normalize step; {FIX}"
        )


def _covers(ds: xr.Dataset, variables: Sequence[str], path: Path) -> None:
    covered = [str(v) for v in ds["variable"].values]
    absent = [v for v in variables if v not in covered]
    if absent:
        raise DataError(f"the statistics file {path} has no statistics for {absent} (it covers {covered}); {FIX}")


def _open(path: Path, **kwargs: Any) -> xr.Dataset:
    if not path.is_file():
        raise DataError(f"the statistics file {path} does not exist; {FIX}")
    try:
        return xr.open_dataset(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(
            f"the statistics file {path} cannot be read ({type(exc).__name__}: {exc}); delete it and {FIX}"
        ) from exc


def load(path: str | os.PathLike, variables: Sequence[str] = ()) -> xr.Dataset:
    """The whole statistics file ``path``, loaded into memory, checked (and covering ``variables``)."""
    path = Path(path)
    with _open(path) as opened:
        _check(opened, path)
        try:
            stats = opened.load()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise DataError(
                f"the statistics file {path} cannot be read ({type(exc).__name__}: {exc}); delete it and {FIX}"
            ) from exc
    _covers(stats, variables, path)
    return stats


@contextlib.contextmanager
def open_lazy(path: str | os.PathLike, variables: Sequence[str]) -> Iterator[xr.Dataset]:
    """The statistics for evaluation and forecasting: ``mean``, ``std`` (float32, so that denormalized
    float32 data stays float32) and ``mask`` loaded; ``climatology`` left lazy and uncached, read only
    for the days a batch needs."""
    path = Path(path)
    opened = _open(path, cache=False)
    with opened:
        _check(opened, path)
        _covers(opened, variables, path)
        try:
            small = {
                "mean": opened["mean"].load().astype("float32"),
                "std": opened["std"].load().astype("float32"),
                "mask": opened["mask"].load(),
            }
        except Exception as exc:
            raise DataError(f"the statistics file {path} cannot be read ({exc}); {FIX}") from exc
        yield opened.assign(small)


def check_grid(stats: xr.Dataset, lat: np.ndarray, lon: np.ndarray, *, stats_path: Path | str, data: str) -> None:
    """:class:`DataError` unless the statistics' ``lat`` and ``lon`` are those of ``data`` (named in the
    message, e.g. ``"windows store <path>"``) within :data:`GRID_ATOL`."""
    for name, values in (("lat", lat), ("lon", lon)):
        ours = np.asarray(stats[name], dtype="float64") if name in stats.coords else np.array([])
        theirs = np.asarray(values, dtype="float64")
        if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=0, atol=GRID_ATOL):
            raise DataError(
                f"statistics file {stats_path} ({ours.size} {name} cells) and {data} ({theirs.size}) have "
                f"different {name} coordinates; re-run the normalize and windows steps on the same regridded store"
            )


def _select(stats: xr.Dataset, name: str, da: xr.DataArray) -> xr.DataArray:
    if "variable" not in da.dims:
        raise DataError(f"normalize/denormalize need a DataArray with a 'variable' dimension; got dims {da.dims}")
    names = [str(v) for v in da["variable"].values]
    unknown = sorted(set(names) - {str(v) for v in stats["variable"].values})
    if unknown:
        covered = [str(v) for v in stats["variable"].values]
        raise DataError(f"variables {unknown} have no statistics; the statistics cover {covered}; re-run normalize")
    return stats[name].sel(variable=names)


def normalize(da: xr.DataArray, stats: xr.Dataset) -> xr.DataArray:
    """``(da - mean) / std`` per variable (and per cell when the statistics are per pixel)."""
    try:
        with xr.set_options(arithmetic_join="exact", keep_attrs=True):
            return (da - _select(stats, "mean", da)) / _select(stats, "std", da)
    except ValueError as exc:
        raise DataError(f"the data's lat/lon do not match the statistics' grid: {exc}") from exc


def denormalize(da: xr.DataArray, stats: xr.Dataset) -> xr.DataArray:
    """Inverse of :func:`normalize`: ``da * std + mean``, back to physical units."""
    try:
        with xr.set_options(arithmetic_join="exact", keep_attrs=True):
            return da * _select(stats, "std", da) + _select(stats, "mean", da)
    except ValueError as exc:
        raise DataError(f"the data's lat/lon do not match the statistics' grid: {exc}") from exc


def stack_variables(ds: xr.Dataset, variables: Sequence[str]) -> xr.DataArray:
    """``ds[variables]`` as one DataArray ``(time, variable, lat, lon)`` (lazy when ``ds`` is).

    The dataset's attributes (the regrid store's: its provenance, the manifest's path) are not
    carried over, so nothing computed from the array inherits them.
    """
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise DataError(
            f"variables {missing} are not in the data; it has {sorted(map(str, ds.data_vars))}; fix "
            "variables.inputs/targets or re-run the regrid step"
        )
    arr = ds[list(variables)].to_dataarray("variable")
    arr.attrs = {}
    return arr.transpose("time", "variable", "lat", "lon")


def normalized_cube(ds: xr.Dataset, stats: xr.Dataset, variables: Sequence[str]) -> xr.DataArray:
    """``(time, variable, lat, lon)`` float32: normalized ``variables``, land and missing values 0 (lazy):
    what the windows store holds and what a forecast feeds the model."""
    arr = stack_variables(ds, variables)
    z = normalize(arr, stats)
    valid = z.notnull() & stats["mask"]
    return z.where(valid, 0.0).astype(np.float32).transpose("time", "variable", "lat", "lon").rename("data")


def units(stats: xr.Dataset) -> Mapping[str, str]:
    """Units per variable from ``variable_units`` (empty strings where absent)."""
    names = [str(v) for v in stats["variable"].values] if "variable" in stats.coords else []
    if "variable_units" in stats:
        return {n: str(u) for n, u in zip(names, np.asarray(stats["variable_units"].values).tolist(), strict=True)}
    return {n: str(stats.attrs.get(f"units_{n}", "")) for n in names}


def write(stats: xr.Dataset, out: Path) -> None:
    """Write the statistics as netCDF at ``out`` atomically, stamped with :data:`FORMAT_VERSION`."""
    from conv2dlstm.fsutil import atomic_output

    stats = stats.assign_attrs(format_version=FORMAT_VERSION)
    with atomic_output(Path(out)) as tmp:
        stats.to_netcdf(tmp, engine="netcdf4", format="NETCDF4")
