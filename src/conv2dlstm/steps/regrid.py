"""The regrid step: scan the fetched files, regrid them to config ``grid`` (:mod:`conv2dlstm.data.regridding`)
slab of time by slab, and write the regridded store (:mod:`conv2dlstm.artifacts.regridded`), chunk
by chunk. Only one slab's files are open at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conv2dlstm import zarrstore
from conv2dlstm.data import checks, regridding

log = logging.getLogger(__name__)


SLAB_STEPS = 256
"""Time steps regridded per slab (rounded to whole chunks of the regridded store): the files of one
slab are open at a time, so the step's memory does not grow with the number of files."""


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
    The store's attribute ``provenance`` records the result configuration and the manifest's
    ``sha256`` (:mod:`conv2dlstm.artifacts.provenance`).
    """
    import xarray as xr

    from conv2dlstm.artifacts import manifest as manifest_file
    from conv2dlstm.artifacts import provenance
    from conv2dlstm.daskutil import dask_client
    from conv2dlstm.data import sources
    from conv2dlstm.errors import DataError
    from conv2dlstm.fsutil import discard_partials, sha256_file

    manifest, out = Path(manifest), Path(out)
    for stray in discard_partials(out.parent, of=out.name):
        log.info("regrid: discarded %s left by an interrupted run", stray)
    # Scanning reads metadata only and building a slab's graph computes nothing: configuration
    # errors and the checks across files fail before the cluster starts.
    t0 = time.perf_counter()
    rules = checks.SourceRules.from_config(cfg)
    catalog = sources.scan(manifest, rules=rules)  # duplicates and units checked file by file
    # a slab holds whole chunks of the store (appends never share a chunk), a chunk at most one slab
    chunk = min(regridding.output_time_chunk(regridding.target_grid(cfg["grid"])), max(1, slab_steps))
    slabs = catalog.slabs(cfg["source"]["start"], cfg["source"]["end"], chunk * max(1, slab_steps // chunk))
    grid: dict[str, np.ndarray] = {}
    slab_bytes: list[int] = []  # of the harmonized source, per slab built

    def build(slab: sources.Slab) -> tuple[xr.Dataset, list[Any]]:
        """One slab opened, harmonized, regridded (lazy), and its plausibility summary (lazy)."""
        raw = sources.open_slab(catalog, slab.members)
        try:
            source = regridding.prepare(raw, cfg)
            for axis in ("lat", "lon"):  # every slab on the first one's grid (the files must share it)
                values = source[axis].values
                if grid.setdefault(axis, values).shape != values.shape or not np.array_equal(grid[axis], values):
                    raise DataError(
                        f"manifest {manifest}: the files cannot be combined into one dataset (their {axis} "
                        f"coordinates differ, e.g. in {catalog.names[slab.members[-1][0]]}); they must share "
                        "their lat/lon grid and differ only along time"
                    )
            ds = regridding.regrid_dataset(raw, cfg, out_chunk=chunk)
        except BaseException:
            raw.close()
            raise
        ds.set_close(raw.close)
        slab_bytes.append(source.nbytes)
        summary = checks.range_summary(source, rules.units)  # values outside harmonize.units' ranges
        return ds, [summary] if summary.data_vars else []

    first, first_also = build(slabs[0])  # configuration errors fail here, before the cluster starts
    times = first["time"].values if slabs[0].times is None else np.concatenate([slab.times for slab in slabs])
    gaps = checks.time_gaps(times, cfg["source"]["start"], cfg["source"]["end"])
    attrs = dict(first.attrs)
    attrs.update(gaps.attrs())
    attrs["missing_upstream"] = [str(m.get("date", "?")) for m in catalog.missing]
    log.log(
        logging.WARNING if gaps.gaps else logging.INFO,
        "regrid: %s%s",
        gaps.describe(),
        f" ({len(catalog.missing)} date(s) had no file upstream: source.max_missing)" if catalog.missing else "",
    )
    attrs["source_manifest"] = str(manifest)
    attrs["source_manifest_sha256"] = sha256_file(manifest)
    attrs["source_sha256"] = str(manifest_file.read(manifest).get("sha256", ""))
    record = provenance.for_step(cfg, "regrid", {"manifest": manifest_file.read_digest(manifest)})
    attrs.update(provenance.to_attrs(record))
    log.info(
        "regrid: scanned %d file(s) of %s in %.1f s; %d steps %s..%s in %d slab(s) -> grid %d x %d (%s), variables %s",
        len(catalog.paths),
        manifest,
        time.perf_counter() - t0,
        times.size,
        str(times[0])[:10],
        str(times[-1])[:10],
        len(slabs),
        first.sizes["lat"],
        first.sizes["lon"],
        cfg["grid"]["method"],
        list(first.data_vars),
    )

    def part(n: int) -> zarrstore.Part:
        def make() -> tuple[xr.Dataset, list[Any]]:
            ds, also = (first, first_also) if n == 0 else build(slabs[n])
            ds.attrs = attrs
            return ds, also

        return make

    def check_plausible(results: list[tuple[Any, ...]]) -> None:  # stops the step before the store is committed
        if results[0]:  # every slab has the same variables, so the same (or no) summary
            summary = xr.concat([r[0] for r in results], dim="time")
            checks.raise_implausible(summary, times, rules.units, file_of=catalog.file_of)

    address = cfg["dask"]["scheduler_address"]
    with dask_client(threads=threads, memory_mb=memory_mb, address=address, data_bytes=slab_bytes[0]):
        t1 = time.perf_counter()
        # one pass over the source: the range check is computed with the write, not before it
        zarrstore.write_parts([part(n) for n in range(len(slabs))], Path(out), before_commit=check_plausible)
    log.info("regrid: wrote %s in %.1f s (provenance %s)", out, time.perf_counter() - t1, record["digest"])
