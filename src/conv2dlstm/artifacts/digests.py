"""The provenance digest of any artifact by its kind, through the artifact's own reader."""

from __future__ import annotations

import os
from pathlib import Path

from conv2dlstm.artifacts import checkpoint, manifest, provenance
from conv2dlstm.errors import DataError


def digest_of(path: str | os.PathLike) -> str:
    """The provenance digest of any artifact, by its kind: a fetch manifest (``*.json``), a checkpoint
    (``*.pt``), or a Zarr store or netCDF file written by any recording step."""
    path = Path(path)
    if path.suffix == ".json":
        return manifest.read_digest(path)
    if path.suffix == ".pt":
        return checkpoint.read_provenance(path)["digest"]
    if path.suffix == ".nc":
        import netCDF4

        try:
            with netCDF4.Dataset(str(path), "r") as ds:
                value = ds.getncattr(provenance.ATTR) if provenance.ATTR in ds.ncattrs() else None
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path} cannot be read ({exc}); rerun the step that wrote it") from exc
    elif path.suffix == ".zarr":
        import zarr

        try:
            value = zarr.open_group(str(path), mode="r").attrs.get(provenance.ATTR)
        except Exception as exc:
            raise DataError(f"store {path} cannot be opened ({exc}); rerun the step that wrote it") from exc
    else:
        raise ValueError(f"{path}: no provenance reader for {path.suffix!r} files (json, zarr, nc, pt)")
    return provenance.validate(value, where=str(path), step=None)["digest"]
