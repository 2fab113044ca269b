"""The fetched files of a manifest opened as lazy (Dask) datasets with their raw names.

:func:`scan` reads the manifest (:mod:`conv2dlstm.artifacts.manifest`) and opens every listed
netCDF file or Zarr store in turn, reading only its time coordinate and units, and closes it: the
checks across files (time stamps repeated across files, units: :class:`conv2dlstm.data.checks.SourceRules`)
are done there, and the :class:`Catalog` it returns cuts the source into slabs of time
(:meth:`Catalog.slabs`), each opened and merged by :func:`open_slab`. The regrid step works slab by
slab, so that its memory does not grow with the number of files. :func:`open_sources` opens the
whole source as one dataset and says which file each time step came from (:class:`Sources`);
:func:`open_fetched` returns the dataset alone. The forecast reads its few input days with
:func:`open_sources`, with the checks of its configuration.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import xarray as xr

from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.artifacts.manifest import display_path
from conv2dlstm.config.sources import GROUPS
from conv2dlstm.data import checks
from conv2dlstm.data import harmonize as hz
from conv2dlstm.errors import DataError

log = logging.getLogger(__name__)


NETCDF_CHUNK_CACHE_BYTES = 0
"""netCDF-C's chunk cache per variable of the source files the regrid step opens: none. Each file is
read once, whole chunks at a time (its Dask chunks are the file's own), so a cache holds only
decompressed data that is read no more; by default (64 MB per variable in netCDF 4.10) it holds
every chunk read of every file still open, and grows with the files' resolution."""


def set_netcdf_chunk_cache(size: int) -> tuple[int, int, float] | None:
    """Set netCDF-C's default chunk cache (bytes per variable) for the files this process opens from
    now on; the previous setting ``(size, slots, preemption)``, or None without netCDF4 installed."""
    try:
        import netCDF4
    except ImportError:
        return None
    old = netCDF4.get_chunk_cache()
    netCDF4.set_chunk_cache(size, old[1], old[2])
    return (int(old[0]), int(old[1]), float(old[2]))


@contextlib.contextmanager
def netcdf_chunk_cache(size: int = NETCDF_CHUNK_CACHE_BYTES) -> Iterator[None]:
    """netCDF-C's chunk cache for files opened in this process within the block (:data:`NETCDF_CHUNK_CACHE_BYTES`);
    the previous setting again after it. Dask worker processes need it set themselves
    (``dask_client(worker_setup=...)``)."""
    old = set_netcdf_chunk_cache(size)
    try:
        yield
    finally:
        if old is not None:
            import netCDF4

            netCDF4.set_chunk_cache(*old)


def has_consolidated_metadata(path: Path) -> bool:
    """Whether a local Zarr store has consolidated metadata (v2 ``.zmetadata`` or v3 in ``zarr.json``)."""
    path = Path(path)
    if (path / ".zmetadata").is_file():
        return True
    root = path / "zarr.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(root.read_text()).get("consolidated_metadata") is not None
    return False


def open_local_zarr(path: Path, chunks: dict[str, int] | None, *, indexes: bool = True) -> xr.Dataset:
    """Open a local Zarr store lazily, with its consolidated metadata when it has some (``indexes``
    False: no index on its dimension coordinates, which are still there to read)."""
    return xr.open_zarr(  # an absolute path: Dask workers may run in another directory
        Path(path).absolute(),
        chunks=chunks,
        consolidated=has_consolidated_metadata(path),
        create_default_indexes=indexes,
    )


@dataclass(frozen=True)
class Sources:
    """The files of a manifest opened as one lazy dataset (raw names), and the file of each time step."""

    dataset: xr.Dataset
    files: tuple[str, ...]
    time_files: dict[Any, str]
    missing: tuple[dict[str, str], ...] = ()

    def file_of(self, time: Any) -> str | None:
        """The file (as listed in the manifest) that time step ``time`` came from, or None."""
        return self.time_files.get(checks.time_key(time))


def _open_part(
    path: Path, fmt: str, chunks: dict[str, int] | None, manifest: Path, *, indexes: bool = True
) -> xr.Dataset:
    """One listed file (or Zarr store), lazily (``chunks`` None: without Dask; ``indexes`` False:
    without indexes, half the cost of opening a small file, for reading coordinates and attributes
    only); :class:`DataError` naming it when it cannot be opened."""
    try:
        if fmt == "zarr":
            return open_local_zarr(path, chunks, indexes=indexes)
        return xr.open_dataset(str(path), chunks=chunks, create_default_indexes=indexes)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"manifest {manifest}: cannot open {display_path(path)} ({type(exc).__name__}: {exc}); the file is "
            "damaged or not netCDF/Zarr: delete it and run the fetch step again"
        ) from exc


Members = list[tuple[int, np.ndarray | None]]
"""Files of a slab: ``(file index in the catalog, positions along its time axis, or None for all)``."""


@dataclass(frozen=True)
class Slab:
    """One slab of time: its files (:data:`Members`) and its time stamps in order (datetime64[ns];
    None when the source's time axes are not datetimes and the whole source is one slab)."""

    members: Members
    times: np.ndarray | None


@dataclass(frozen=True)
class Catalog:
    """The files of a manifest, scanned one at a time (:func:`scan`) and closed again: what the
    checks across files need, without holding any file open.

    ``keys[i]`` are the time keys (:func:`conv2dlstm.data.checks.time_key`) of file ``i``'s steps that are kept
    after ``rules.duplicates`` (None: the file has no time axis), ``positions[i]`` where they lie
    along its time axis; ``conversions`` take every checked variable of every file to its canonical
    unit (:func:`conv2dlstm.data.checks.unit_conversions`).
    """

    manifest: Path
    fmt: str
    paths: tuple[Path, ...]
    names: tuple[str, ...]
    keys: tuple[np.ndarray | None, ...]
    positions: tuple[np.ndarray | None, ...]
    conversions: checks.Conversions
    rules: checks.SourceRules
    missing: tuple[dict[str, str], ...] = ()
    empty: tuple[checks.EmptyStep, ...] = ()
    """Steps dropped because a checked variable holds no valid value there (all fill values)."""

    def file_of(self, time: Any) -> str | None:
        """The file (as listed in the manifest) that time step ``time`` came from, or None."""
        key = checks.time_key(time)
        for name, keys in zip(self.names, self.keys):
            if keys is not None and key in keys:
                return name
        return None

    def everything(self) -> Members:
        """Every file with kept steps, and their positions: one slab of the whole source."""
        return [(i, pos) for i, pos in enumerate(self.positions) if pos is None or pos.size]

    def slabs(self, start: hz.DateLike, end: hz.DateLike, steps: int) -> list[Slab]:
        """The kept time steps within the whole days ``start..end``, in time order, cut into slabs of
        ``steps`` steps (the last may be shorter): per slab, the files holding its steps, their
        positions, and the steps' time stamps. Files without a time axis belong to every slab.

        One slab of everything (:meth:`everything`, no time stamps) when a time axis is not datetimes
        or no step lies in the period, so that harmonizing gives its own error there.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        timed = [
            (i, k, p) for i, (k, p) in enumerate(zip(self.keys, self.positions)) if k is not None and p is not None
        ]
        if not timed or any(k.dtype != np.int64 for _, k, _ in timed):
            return [Slab(self.everything(), None)]
        keys = np.concatenate([k for _, k, _ in timed])
        owner = np.concatenate([np.full(k.size, i) for i, k, _ in timed])
        where = np.concatenate([p for _, _, p in timed])
        order = np.argsort(keys, kind="stable")
        order = order[hz.in_period(keys[order].view("datetime64[ns]"), start, end)]
        if order.size == 0:
            return [Slab(self.everything(), None)]
        untimed: Members = [(i, None) for i, k in enumerate(self.keys) if k is None]
        out = []
        for lo in range(0, order.size, steps):
            part = order[lo : lo + steps]
            files = np.unique(owner[part])
            members = untimed + [(int(i), np.sort(where[part][owner[part] == i])) for i in files]
            out.append(Slab(members, keys[part].view("datetime64[ns]")))
        return out


def scan(manifest: Path, *, rules: checks.SourceRules | None = None) -> Catalog:
    """Open each file of ``manifest`` in turn, read its time coordinate and units, and close it.

    Checks across files happen here, before any data is read: every file on the same lat/lon grid
    (size, values and order) with the same checked variables, and a time coordinate decoded to dates
    (:func:`conv2dlstm.data.checks.check_layouts`, :func:`~conv2dlstm.data.checks.check_time_has_units`:
    the files that differ are named); time stamps repeated across files
    (or within one) are refused or resolved as ``rules.duplicates`` says
    (:func:`conv2dlstm.data.checks.duplicate_steps`), and the units of every checked variable must convert to
    its canonical unit (:func:`conv2dlstm.data.checks.unit_conversions`). ``rules`` None: duplicates refused, no
    unit conversion. Memory is a few numbers per time step, whatever the number of files.

    For the kinds whose files are used as fetched (url, files), each file's checked variables are also
    read once, a block of time steps at a time (:func:`conv2dlstm.data.checks.all_fill_steps`): a time step
    where one holds no valid value (all fill values) is not data; it is dropped, before duplicates are
    looked for, and listed in :attr:`Catalog.empty`, so that it becomes a gap in the time axis like a
    day missing upstream (the regrid step counts both against ``source.max_missing``:
    :func:`conv2dlstm.data.checks.check_all_fill`).
    """
    manifest = Path(manifest)
    doc = manifest_file.read(manifest)
    paths = manifest_file.file_paths(doc, manifest)
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        raise DataError(
            f"manifest {manifest}: {len(absent)} listed file(s) are missing (first: {absent[0]}); "
            "run the fetch step again"
        )
    rules = rules if rules is not None else checks.SourceRules()
    rename = dict(rules.rename)
    names = [display_path(p) for p in paths]
    keys: list[np.ndarray | None] = []
    found: checks.UnitsFound = {}
    layouts: list[checks.FileLayout] = []
    blank: list[dict[int, tuple[str, ...]]] = []
    look_for_blanks = doc.get("kind") in GROUPS["whole-files"]
    for path, name in zip(paths, names):
        ds = _open_part(path, doc["format"], None, manifest, indexes=False)
        try:
            axis = hz.find_axis(ds, "time", rename=rename)
            if axis is not None:
                checks.check_time_has_units(ds, axis, name)
            keys.append(None if axis is None else np.asarray(checks.time_keys(ds[axis].values)))
            checks.add_units(found, name, ds, rules)
            layouts.append(checks.file_layout(ds, rules))
            blank.append(checks.all_fill_steps(ds, axis, rules) if look_for_blanks and axis is not None else {})
        finally:
            ds.close()
    try:
        checks.check_layouts(layouts, names)
    except DataError as exc:
        raise DataError(f"manifest {manifest}: {exc}") from exc
    keys, positions, empty = _kept_steps(keys, blank, names, rules)
    conversions = checks.unit_conversions(found, rules)
    return Catalog(
        manifest,
        doc["format"],
        tuple(paths),
        tuple(names),
        tuple(keys),
        tuple(positions),
        conversions,
        rules,
        tuple(doc.get("missing", [])),
        tuple(empty),
    )


def _kept_steps(
    keys: list[np.ndarray | None],
    blank: list[dict[int, tuple[str, ...]]],
    names: list[str],
    rules: checks.SourceRules,
) -> tuple[list[np.ndarray | None], list[np.ndarray | None], list[checks.EmptyStep]]:
    """The time keys of each file's kept steps and their positions along its time axis, and the steps of
    fill values only that leave a day missing (in time order). ``keys[i]`` are file ``i``'s time keys
    (None: no time axis), ``blank[i]`` its steps of fill values only (:func:`conv2dlstm.data.checks.all_fill_steps`):
    they are not data and are dropped first, then repeated time stamps as ``rules.duplicates`` says
    (:func:`conv2dlstm.data.checks.duplicate_steps`)."""
    keys = list(keys)
    empty: list[checks.EmptyStep] = []
    valid: list[np.ndarray | None] = []
    for i, k in enumerate(keys):
        if k is None:
            valid.append(None)
            continue
        empty.extend(checks.EmptyStep(names[i], k[pos].item(), found_in) for pos, found_in in blank[i].items())
        valid.append(np.setdiff1d(np.arange(k.size), list(blank[i])))
        keys[i] = k[valid[i]]
    dropped = checks.duplicate_steps(keys, names, rules.duplicates)
    positions: list[np.ndarray | None] = []
    for i, (k, kept) in enumerate(zip(keys, valid)):
        if k is None or kept is None:
            positions.append(None)
            continue
        keep = np.setdiff1d(np.arange(k.size), dropped.get(i, []))
        positions.append(kept[keep])
        keys[i] = k[keep]
    held = {key for k in keys if k is not None for key in k.tolist()} if empty else set()
    for step in [e for e in empty if checks.time_key(e.time) in held]:  # not a missing day
        log.warning(
            "%s: no valid value on %s (all fill values); dropped, another file holds that day", step.file, step.date()
        )
    missing = [e for e in empty if checks.time_key(e.time) not in held]
    return keys, positions, sorted(missing, key=lambda e: (checks.time_key(e.time), e.file))


def open_slab(catalog: Catalog, members: Members, *, chunks: dict[str, int] | None = None) -> xr.Dataset:
    """Open the files of one slab lazily (Dask), keep their listed steps, convert units, and merge.

    ``members`` are those of a :class:`Slab` from :meth:`Catalog.slabs`, or :meth:`Catalog.everything`.
    The files are combined by their coordinates (they must share every coordinate but time);
    closing the dataset closes them.
    """
    chunks = {} if chunks is None else chunks
    rename = dict(catalog.rules.rename)
    opened: list[xr.Dataset] = []
    try:
        datasets = []
        for i, pos in members:
            ds = _open_part(catalog.paths[i], catalog.fmt, chunks, catalog.manifest)
            opened.append(ds)
            ds = checks.ascending_latitude(ds, rename)  # files may store latitudes in either order
            axis = hz.find_axis(ds, "time", rename=rename)
            if pos is not None and axis is not None and pos.size != ds[axis].size:
                ds = ds.isel({ds[axis].dims[0]: pos})
            datasets.append(checks.apply_unit_conversions(ds, catalog.conversions, catalog.rules))
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
                f"manifest {catalog.manifest}: the files cannot be combined into one dataset ({exc}); they must "
                "share their lat/lon grid and differ only along time"
            ) from exc
    except BaseException:
        for each in opened:
            each.close()
        raise

    def close_all() -> None:
        for each in opened:
            each.close()

    ds.set_close(close_all)
    return ds


def open_sources(
    manifest: Path, *, chunks: dict[str, int] | None = None, rules: checks.SourceRules | None = None
) -> Sources:
    """Every file of ``manifest`` as one lazy (Dask) dataset: :func:`scan`, then :func:`open_slab`
    of everything.

    Repeated time stamps are refused or resolved as ``rules.duplicates`` says and each file's
    variables are converted to their canonical units before the files are merged, which needs them
    to share every coordinate but time. ``rules`` None: duplicates refused, no unit conversion.
    Nothing is selected: the regrid step cuts ``source.start..end``
    (:func:`conv2dlstm.data.regridding.prepare`), as it does for every kind. For a source of any length
    the regrid step opens it slab by slab instead (:meth:`Catalog.slabs`).
    """
    catalog = scan(manifest, rules=rules)
    for step in catalog.empty:
        log.warning(
            "%s: no valid value of %s on %s (all fill values); dropped: a missing day",
            step.file,
            ", ".join(map(repr, step.variables)),
            step.date(),
        )
    ds = open_slab(catalog, catalog.everything(), chunks=chunks)
    time_files: dict[Any, str] = {}
    for name, keys in zip(catalog.names, catalog.keys):
        if keys is not None:
            for key in keys.tolist():
                time_files.setdefault(key, name)
    return Sources(ds, catalog.names, time_files, catalog.missing)


def open_fetched(
    manifest: Path, *, chunks: dict[str, int] | None = None, rules: checks.SourceRules | None = None
) -> xr.Dataset:
    """Open every file of ``manifest`` lazily (Dask) as one dataset with the raw names, as fetched.

    The dataset of :func:`open_sources`: ``chunks=None`` uses the files' own chunks (``{}``);
    repeated time stamps are refused (or resolved by ``rules.duplicates``) and, with ``rules``,
    units are converted file by file. Nothing is selected: for kind ``files`` every time step of the
    listed files is returned, and the regrid step cuts ``source.start..end``
    (:func:`conv2dlstm.data.regridding.prepare`), as it does for every kind.
    """
    return open_sources(manifest, chunks=chunks, rules=rules).dataset
