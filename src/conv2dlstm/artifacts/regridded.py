"""The regridded store, ``<outdir>/regrid/<name>.zarr`` (Zarr v3): the harmonized variables on the
target grid, ``(time, lat, lon)`` float32, chunked along time.

Written by the regrid step (:mod:`conv2dlstm.steps.regrid`, through :func:`conv2dlstm.zarrstore.write_store`,
which records every chunk's digest), read lazily by the normalize and windows steps with
:func:`open`, which checks :data:`FORMAT_VERSION`, the dimensions and the chunk record, and reads
every chunk through a store that checks its digest before it is decoded.
"""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.errors import DataError

FORMAT_VERSION = 1
"""Attribute ``format_version`` of the store; :func:`open` refuses any other."""
WHAT = "the regridded store"
"""How messages name this artifact."""
STEP = "regrid"
DIMS = ("time", "lat", "lon")


def open(path: str | Path) -> xr.Dataset:
    """The regridded store ``path``, lazily (Dask); :class:`DataError` naming it and the regrid step when
    it is missing, unreadable, of another format version, lacks a dimension, a chunk or its chunk
    record, or when a metadata file differs from what was written. Every chunk is read through
    :class:`conv2dlstm.zarrstore.VerifiedStore` (in Dask's threads or worker processes alike): one
    whose bytes differ from the recorded digest stops the computation with such an error before it
    is decoded."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise DataError(f"{WHAT} {path} does not exist; run the regrid step first")
    if not (path / "zarr.json").is_file():
        raise DataError(
            f"{WHAT} {path} cannot be opened (no zarr.json: not a Zarr v3 store); delete it and re-run the regrid step"
        )
    store = zarrstore.open_store(path, what=WHAT, step=STEP)  # record, sizes, metadata digests
    try:
        ds = xr.open_zarr(store, consolidated=True, zarr_format=3)
    except (OSError, ValueError, KeyError, TypeError, zarr.errors.BaseZarrError) as exc:
        raise DataError(
            f"{WHAT} {path} cannot be opened ({type(exc).__name__}: {exc}); delete it and re-run the regrid step"
        ) from exc
    version = ds.attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise DataError(
            f"{WHAT} {path} has format_version {version}, this version reads {FORMAT_VERSION}: it was written "
            "by another version of the regrid step; delete it and re-run the regrid step"
        )
    missing = [d for d in DIMS if d not in ds.dims]
    if missing:
        raise DataError(
            f"{WHAT} {path} has no dimension(s) {missing} (dimensions {list(ds.dims)}); "
            "delete it and re-run the regrid step"
        )
    return ds
