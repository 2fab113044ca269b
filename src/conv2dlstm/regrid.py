"""The regrid step: open the fetched files, regrid them to config ``grid`` (:mod:`conv2dlstm.regridding`)
and write the regridded store (:mod:`conv2dlstm.artifacts.regridded`), chunk by chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conv2dlstm import harmonize as hz
from conv2dlstm import regridding, zarrstore

log = logging.getLogger(__name__)


def main(
    cfg: Mapping[str, Any],
    *,
    manifest: Path,
    out: Path,
    threads: int = 1,
    memory_mb: int | None = None,
) -> None:
    """Open the fetched files of ``manifest``, harmonize, regrid to config ``grid`` and write ``out`` (Zarr v3).

    The store's attribute ``provenance`` records the result configuration and the manifest's
    ``sha256`` (:mod:`conv2dlstm.provenance`).
    """
    from conv2dlstm import provenance, sources
    from conv2dlstm.artifacts import manifest as manifest_file
    from conv2dlstm.daskutil import dask_client
    from conv2dlstm.fsutil import discard_partials, sha256_file

    manifest, out = Path(manifest), Path(out)
    for stray in discard_partials(out.parent, of=out.name):
        log.info("regrid: discarded %s left by an interrupted run", stray)
    # Opening reads metadata only and building the graph computes nothing: both happen before the
    # cluster starts, so configuration errors fail fast and a parallel open uses local threads.
    t0 = time.perf_counter()
    rules = hz.SourceRules.from_config(cfg)
    fetched = sources.open_sources(manifest, rules=rules)  # duplicates and units checked file by file
    raw = fetched.dataset
    ds = regridding.regrid_dataset(raw, cfg)
    gaps = hz.time_gaps(ds["time"].values, cfg["source"]["start"], cfg["source"]["end"])
    ds.attrs.update(gaps.attrs())
    ds.attrs["missing_upstream"] = [str(m.get("date", "?")) for m in fetched.missing]
    log.log(
        logging.WARNING if gaps.gaps else logging.INFO,
        "regrid: %s%s",
        gaps.describe(),
        f" ({len(fetched.missing)} date(s) had no file upstream: source.max_missing)" if fetched.missing else "",
    )
    ds.attrs["source_manifest"] = str(manifest)
    ds.attrs["source_manifest_sha256"] = sha256_file(manifest)
    ds.attrs["source_sha256"] = str(manifest_file.read(manifest).get("sha256", ""))
    record = provenance.for_step(cfg, "regrid", {"manifest": provenance.manifest_digest(manifest)})
    ds.attrs.update(provenance.to_attrs(record))
    log.info(
        "regrid: opened %s in %.1f s; %d steps %s..%s -> grid %d x %d (%s), variables %s",
        manifest,
        time.perf_counter() - t0,
        ds.sizes["time"],
        str(ds["time"].values[0])[:10],
        str(ds["time"].values[-1])[:10],
        ds.sizes["lat"],
        ds.sizes["lon"],
        cfg["grid"]["method"],
        list(ds.data_vars),
    )
    source = regridding.prepare(raw, cfg)
    summary = hz.range_summary(source, rules.units)  # values outside harmonize.units' ranges

    def check_plausible(results: tuple[Any, ...]) -> None:  # stops the step before the store is committed
        if summary.data_vars:
            hz.raise_implausible(results[0], source["time"].values, rules.units, file_of=fetched.file_of)

    with dask_client(threads=threads, memory_mb=memory_mb, address=cfg["dask"]["scheduler_address"]):
        t1 = time.perf_counter()
        # one pass over the source: the range check is computed with the write, not before it
        zarrstore.write_store(ds, Path(out), also=[summary] if summary.data_vars else [], before_commit=check_plausible)
    log.info("regrid: wrote %s in %.1f s (provenance %s)", out, time.perf_counter() - t1, record["digest"])
