"""The regrid step: scan the fetched files, regrid them to config ``grid`` (:mod:`conv2dlstm.data.regridding`)
slab of time by slab, and write the regridded store (:mod:`conv2dlstm.artifacts.regridded`), chunk
by chunk. Only one slab's files are open at a time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.data import checks, regridding, sources
from conv2dlstm.errors import DataError

log = logging.getLogger(__name__)


SLAB_STEPS = 256
"""Time steps regridded per slab (rounded to whole chunks of the regridded store): the files of one
slab are open at a time, so the step's memory does not grow with the number of files."""

OPEN_FILES = 16
"""Source files xarray keeps open at once while the step writes (``file_cache_maxsize``; its default
is 128). netCDF keeps the decompressed data it read of each open file (a chunk cache per variable),
so with larger files the open ones held memory that grows with the source's resolution; each file
is read once, and one closed early costs nothing."""


def main(
    cfg: Mapping[str, Any],
    *,
    manifest: Path,
    out: Path,
    threads: int = 1,
    memory_mb: int | None = None,
    slab_steps: int = SLAB_STEPS,
) -> None:
    """Open the fetched files of ``manifest``, harmonize, regrid to config ``grid`` and write ``out`` (Zarr v3).

    The files are scanned first, one at a time (:func:`conv2dlstm.data.sources.scan`: time stamps
    repeated across files, units), then regridded and appended slab by slab of about
    ``slab_steps`` time steps (:meth:`conv2dlstm.data.sources.Catalog.slabs`); values outside their
    plausible range are counted with the write and refused before the store is moved into place.
    A file (or time step) whose checked variables hold no valid value is dropped as a missing day,
    counted with the dates missing upstream against ``source.max_missing``
    (:func:`conv2dlstm.data.checks.check_all_fill`; store attribute ``all_fill_days``).
    The store's attribute ``provenance`` records the result configuration and the manifest's
    ``sha256`` (:mod:`conv2dlstm.artifacts.provenance`).
    """
    from conv2dlstm.fsutil import discard_partials

    manifest, out = Path(manifest), Path(out)
    for stray in discard_partials(out.parent, of=out.name):
        log.info("regrid: discarded %s left by an interrupted run", stray)
    # the whole step (the scan, every slab, the write): at most OPEN_FILES source files open, and no
    # netCDF chunk cache (sources.NETCDF_CHUNK_CACHE_BYTES), here and in Dask's worker processes
    with xr.set_options(file_cache_maxsize=OPEN_FILES), sources.netcdf_chunk_cache():
        _regrid(cfg, manifest=manifest, out=out, threads=threads, memory_mb=memory_mb, slab_steps=slab_steps)


def _regrid(
    cfg: Mapping[str, Any], *, manifest: Path, out: Path, threads: int, memory_mb: int | None, slab_steps: int
) -> None:
    """:func:`main`'s work, with at most :data:`OPEN_FILES` source files open and no netCDF chunk cache."""
    from conv2dlstm.daskutil import dask_client

    # Scanning reads metadata only and building a slab's graph computes nothing: configuration
    # errors and the checks across files fail before the cluster starts.
    t0 = time.perf_counter()
    rules = checks.SourceRules.from_config(cfg)
    catalog = sources.scan(manifest, rules=rules)  # duplicates and units checked file by file
    src = cfg["source"]
    empty = checks.check_all_fill(  # files of fill values only: missing days, up to source.max_missing
        catalog.empty,
        upstream_missing=len(catalog.missing),
        max_missing=int(src["max_missing"]),
        start=src["start"],
        end=src["end"],
    )
    if not catalog.everything():
        raise DataError(
            f"manifest {manifest}: no file holds a valid value of {list(rules.variables)} (all fill values); "
            "fix or fetch the source files again"
        )
    # a slab holds whole chunks of the store (appends never share a chunk), a chunk at most one slab
    chunk = min(regridding.output_time_chunk(regridding.target_grid(cfg["grid"])), max(1, slab_steps))
    slabs = catalog.slabs(cfg["source"]["start"], cfg["source"]["end"], chunk * max(1, slab_steps // chunk))
    builder = _SlabBuilder(cfg, manifest, catalog, rules, chunk)
    first = builder.build(slabs[0])  # configuration errors fail here, before the cluster starts
    times = first[0]["time"].values if slabs[0].times is None else np.concatenate([slab.times for slab in slabs])
    attrs, record = _store_attrs(cfg, first[0], manifest=manifest, catalog=catalog, times=times, empty=empty)
    log.info(
        "regrid: scanned %d file(s) of %s in %.1f s; %d steps %s..%s in %d slab(s) -> grid %d x %d (%s), variables %s",
        len(catalog.paths),
        manifest,
        time.perf_counter() - t0,
        times.size,
        str(times[0])[:10],
        str(times[-1])[:10],
        len(slabs),
        first[0].sizes["lat"],
        first[0].sizes["lon"],
        cfg["grid"]["method"],
        list(first[0].data_vars),
    )

    check_plausible = functools.partial(_check_plausible, times=times, rules=rules, catalog=catalog)
    address = cfg["dask"]["scheduler_address"]
    with dask_client(
        threads=threads,
        memory_mb=memory_mb,
        address=address,
        data_bytes=builder.slab_bytes[0],
        worker_setup=functools.partial(sources.set_netcdf_chunk_cache, sources.NETCDF_CHUNK_CACHE_BYTES),
    ):
        t1 = time.perf_counter()
        # one pass over the source: the range check is computed with the write, not before it
        zarrstore.write_parts(_parts(builder, slabs, first, attrs), Path(out), before_commit=check_plausible)
    log.info("regrid: wrote %s in %.1f s (provenance %s)", out, time.perf_counter() - t1, record["digest"])


@dataclass
class _SlabBuilder:
    """The slabs of a scanned manifest, each opened, harmonized and regridded (lazy) on its own."""

    cfg: Mapping[str, Any]
    manifest: Path
    catalog: sources.Catalog
    rules: checks.SourceRules
    chunk: int  # time steps per chunk of the regridded store
    grid: dict[str, np.ndarray] = field(default_factory=dict)  # lat and lon of the first slab built
    slab_bytes: list[int] = field(default_factory=list)  # of the harmonized source, per slab built

    def build(self, slab: sources.Slab) -> tuple[xr.Dataset, list[Any]]:
        """One slab opened, harmonized, regridded (lazy), and its plausibility summary (lazy)."""
        raw = sources.open_slab(self.catalog, slab.members)
        try:
            source = regridding.prepare(raw, self.cfg)
            self._check_grid(source, slab)
            ds = regridding.regrid_dataset(raw, self.cfg, out_chunk=self.chunk)
        except BaseException:
            raw.close()
            raise
        ds.set_close(raw.close)
        self.slab_bytes.append(source.nbytes)
        summary = checks.range_summary(source, self.rules.units)  # values outside harmonize.units' ranges
        return ds, [summary] if summary.data_vars else []

    def _check_grid(self, source: xr.Dataset, slab: sources.Slab) -> None:
        """:class:`DataError` unless the harmonized ``source`` of ``slab`` is on the first slab's grid
        (the files must share it)."""
        for axis in ("lat", "lon"):
            values = source[axis].values
            if self.grid.setdefault(axis, values).shape != values.shape or not np.array_equal(self.grid[axis], values):
                raise DataError(
                    f"manifest {self.manifest}: the files cannot be combined into one dataset (their {axis} "
                    f"coordinates differ, e.g. in {self.catalog.names[slab.members[-1][0]]}); they must share "
                    "their lat/lon grid and differ only along time"
                )


def _store_attrs(
    cfg: Mapping[str, Any],
    first: xr.Dataset,
    *,
    manifest: Path,
    catalog: sources.Catalog,
    times: np.ndarray,
    empty: list[checks.EmptyStep],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The regridded store's attributes (those of the ``first`` slab, the gaps of the time axis ``times``,
    which it logs, the dates missing upstream, the files of fill values only that were dropped
    (``empty``), the manifest and its digests, the provenance) and its provenance record."""
    from conv2dlstm.artifacts import manifest as manifest_file
    from conv2dlstm.artifacts import provenance
    from conv2dlstm.fsutil import sha256_file

    gaps = checks.time_gaps(times, cfg["source"]["start"], cfg["source"]["end"])
    attrs = dict(first.attrs)
    attrs.update(gaps.attrs())
    attrs["missing_upstream"] = [str(m.get("date", "?")) for m in catalog.missing]
    attrs["all_fill_days"] = [f"{step.date()} {step.file}" for step in empty]
    why = [
        *([f"{len(catalog.missing)} date(s) had no file upstream"] if catalog.missing else []),
        *([f"{len(empty)} file(s) held fill values only"] if empty else []),
    ]
    log.log(
        logging.WARNING if gaps.gaps else logging.INFO,
        "regrid: %s%s",
        gaps.describe(),
        f" ({'; '.join(why)}: source.max_missing)" if why else "",
    )
    attrs["source_manifest"] = str(manifest)
    attrs["source_manifest_sha256"] = sha256_file(manifest)
    attrs["source_sha256"] = str(manifest_file.read(manifest).get("sha256", ""))
    record = provenance.for_step(cfg, "regrid", {"manifest": manifest_file.read_digest(manifest)})
    attrs.update(provenance.to_attrs(record))
    return attrs, record


def _parts(
    builder: _SlabBuilder,
    slabs: list[sources.Slab],
    first: tuple[xr.Dataset, list[Any]],
    attrs: dict[str, Any],
) -> list[zarrstore.Part]:
    """The parts of the store, one per slab of ``slabs``, each with the attributes ``attrs``: the first
    slab as already built (``first``), the others built when the part is written."""

    def part(n: int) -> zarrstore.Part:
        def make() -> tuple[xr.Dataset, list[Any]]:
            ds, also = first if n == 0 else builder.build(slabs[n])
            ds.attrs = attrs
            return ds, also

        return make

    return [part(n) for n in range(len(slabs))]


def _check_plausible(
    results: list[tuple[Any, ...]], *, times: np.ndarray, rules: checks.SourceRules, catalog: sources.Catalog
) -> None:
    """Refuse values outside their plausible range (:func:`conv2dlstm.data.checks.raise_implausible`)
    from the slabs' summaries ``results``, computed with the write; runs before the store is committed."""
    if results[0]:  # every slab has the same variables, so the same (or no) summary
        summary = xr.concat([r[0] for r in results], dim="time")
        checks.raise_implausible(summary, times, rules.units, file_of=catalog.file_of)
