"""The fetched files of a manifest opened as one lazy (Dask) dataset with their raw names.

:func:`open_sources` reads the manifest (:mod:`conv2dlstm.artifacts.manifest`), opens every listed
netCDF file or Zarr store, checks them one by one (time stamps repeated across files, units:
:class:`conv2dlstm.harmonize.SourceRules`), merges them and says which file each time step came
from (:class:`Sources`); :func:`open_fetched` returns the dataset alone. The regrid step and
forecasting read the fetched data through it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import xarray as xr

from conv2dlstm import harmonize as hz
from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.artifacts.manifest import display_path
from conv2dlstm.errors import DataError


def has_consolidated_metadata(path: Path) -> bool:
    """Whether a local Zarr store has consolidated metadata (v2 ``.zmetadata`` or v3 in ``zarr.json``)."""
    path = Path(path)
    if (path / ".zmetadata").is_file():
        return True
    root = path / "zarr.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(root.read_text()).get("consolidated_metadata") is not None
    return False


def open_local_zarr(path: Path, chunks: dict[str, int]) -> xr.Dataset:
    """Open a local Zarr store lazily, with its consolidated metadata when it has some."""
    return xr.open_zarr(path, chunks=chunks, consolidated=has_consolidated_metadata(path))


@dataclass(frozen=True)
class Sources:
    """The files of a manifest opened as one lazy dataset (raw names), and the file of each time step."""

    dataset: xr.Dataset
    files: tuple[str, ...]
    time_files: dict[Any, str]
    missing: tuple[dict[str, str], ...] = ()

    def file_of(self, time: Any) -> str | None:
        """The file (as listed in the manifest) that time step ``time`` came from, or None."""
        return self.time_files.get(hz.time_key(time))


def _open_part(path: Path, fmt: str, chunks: dict[str, int], manifest: Path) -> xr.Dataset:
    """One listed file (or Zarr store), lazily; :class:`DataError` naming it when it cannot be opened."""
    try:
        if fmt == "zarr":
            return open_local_zarr(path, chunks)
        return xr.open_dataset(str(path), chunks=chunks)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"manifest {manifest}: cannot open {display_path(path)} ({type(exc).__name__}: {exc}); the file is "
            "damaged or not netCDF/Zarr: delete it and run the fetch step again"
        ) from exc


def _time_files(parts: list[hz.SourceFile], rename: dict[str, str]) -> dict[Any, str]:
    """Time stamp key (:func:`harmonize.time_key`) -> path of the file holding it."""
    out: dict[Any, str] = {}
    for part in parts:
        name = hz.find_axis(part.ds, "time", rename=rename)
        if name is not None:
            for key in hz.time_keys(part.ds[name].values):
                out.setdefault(key, part.path)
    return out


def open_sources(
    manifest: Path, *, chunks: dict[str, int] | None = None, rules: hz.SourceRules | None = None
) -> Sources:
    """Open every file of ``manifest`` lazily (Dask), check them one by one, and merge them.

    Before anything is merged: time stamps repeated across files (or within one) are refused or
    resolved as ``rules.duplicates`` says (:func:`harmonize.resolve_duplicate_times`), and each
    file's variables are converted to their canonical units (:func:`harmonize.convert_units`).
    Then the files are combined by their coordinates (they must share every coordinate but the one
    they are concatenated along). ``rules`` None: duplicates refused, no unit conversion. Only
    coordinates and attributes are read. Nothing is selected: the regrid step cuts
    ``source.start..end`` (:func:`conv2dlstm.regridding.prepare`), as it does for every kind.
    """
    manifest = Path(manifest)
    doc = manifest_file.read(manifest)
    paths = manifest_file.file_paths(doc, manifest)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(
            f"manifest {manifest}: {len(missing)} listed file(s) are missing (first: {missing[0]}); "
            "run the fetch step again"
        )
    rules = rules if rules is not None else hz.SourceRules()
    chunks = {} if chunks is None else chunks
    opened: list[xr.Dataset] = []
    try:
        parts: list[hz.SourceFile] = []
        for path in paths:
            opened.append(_open_part(path, doc["format"], chunks, manifest))
            parts.append(hz.SourceFile(display_path(path), opened[-1]))
        parts = hz.resolve_duplicate_times(parts, rules.duplicates, rename=dict(rules.rename))
        parts = hz.convert_units(parts, rules)
        datasets = [part.ds for part in parts]
        try:
            ds = (
                datasets[0]
                if len(datasets) == 1
                else cast(  # Datasets combine into a Dataset (a DataArray comes only from DataArrays)
                    xr.Dataset,
                    xr.combine_by_coords(
                        datasets,
                        data_vars="minimal",
                        coords="minimal",
                        compat="override",
                        join="exact",
                        combine_attrs="override",
                    ),
                )
            )
        except ValueError as exc:
            raise DataError(
                f"manifest {manifest}: the files cannot be combined into one dataset ({exc}); they must share "
                "their lat/lon grid and differ only along time"
            ) from exc
    except BaseException:
        for each in opened:
            each.close()
        raise

    def close_all() -> None:
        for each in opened:
            each.close()

    ds.set_close(close_all)
    return Sources(
        ds,
        tuple(part.path for part in parts),
        _time_files(parts, dict(rules.rename)),
        tuple(doc.get("missing", [])),
    )


def open_fetched(
    manifest: Path, *, chunks: dict[str, int] | None = None, rules: hz.SourceRules | None = None
) -> xr.Dataset:
    """Open every file of ``manifest`` lazily (Dask) as one dataset with the raw names, as fetched.

    The dataset of :func:`open_sources`: ``chunks=None`` uses the files' own chunks (``{}``);
    repeated time stamps are refused (or resolved by ``rules.duplicates``) and, with ``rules``,
    units are converted file by file. Nothing is selected: for kind ``files`` every time step of the
    listed files is returned, and the regrid step cuts ``source.start..end``
    (:func:`conv2dlstm.regridding.prepare`), as it does for every kind.
    """
    return open_sources(manifest, chunks=chunks, rules=rules).dataset
