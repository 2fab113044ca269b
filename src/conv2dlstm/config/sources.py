"""The source kinds, in one table: what fetches each, what it fetches, and which configuration keys it
reads while fetching. The schema's ``source.kind`` enum and its ``x-steps`` conditions on
``source.kind`` are derived from it (:func:`expand_kinds`, used by :mod:`conv2dlstm.config.schema`
and :mod:`conv2dlstm.config.keys`), so a new kind is one row here plus its fetcher in
:mod:`conv2dlstm.data.fetching`. :func:`expand_path` is what a ``source.paths`` entry names, for the
fetch step and for the fetch rule's inputs. The standard library only (the Snakefile imports it).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceKind:
    """One ``source.kind``."""

    fetcher: str
    """The function of :mod:`conv2dlstm.data.fetching` that fetches it: ``(cfg, out_dir, *, known,
    missing) -> (files, file format)``."""
    formats: tuple[str, ...]
    """What its manifest can list (``netcdf``, ``zarr``)."""
    subsets: bool
    """Cuts period, region and variables while fetching: the fetch step reads those keys."""
    dated: bool
    """Fetches one file per date of a URL template: the fetch step reads the period."""


SOURCE_KINDS: dict[str, SourceKind] = {
    "url": SourceKind("fetch_urls", ("netcdf",), subsets=False, dated=True),
    "files": SourceKind("locate_files", ("netcdf", "zarr"), subsets=False, dated=False),
    "zarr": SourceKind("fetch_zarr", ("zarr",), subsets=True, dated=False),
    "copernicus": SourceKind("fetch_copernicus", ("netcdf",), subsets=True, dated=False),
}

GROUPS: dict[str, tuple[str, ...]] = {
    "subsetting": tuple(name for name, kind in SOURCE_KINDS.items() if kind.subsets),
    "fetching-the-period": tuple(name for name, kind in SOURCE_KINDS.items() if kind.subsets or kind.dated),
    "whole-files": tuple(name for name, kind in SOURCE_KINDS.items() if not kind.subsets),
}
"""Names the schema's conditions use for the kinds that read a key while fetching: ``subsetting``
(region, variables, the period), ``fetching-the-period`` (``source.start``/``end``); and for the
kinds whose files are used as they are, not written by the fetch (``whole-files``: the regrid step
checks each file for values, ``source.max_missing``)."""


def expand_kinds(values: Iterable[str], *, where: str = "schema") -> tuple[str, ...]:
    """The kinds named by ``values``: kind names as they are, group names (:data:`GROUPS`) as their
    kinds. ``ValueError`` naming an unknown name."""
    out: list[str] = []
    for value in values:
        if value in GROUPS:
            out.extend(GROUPS[value])
        elif value in SOURCE_KINDS:
            out.append(value)
        else:
            raise ValueError(
                f"{where}: {value!r} is neither a source kind ({list(SOURCE_KINDS)}) nor a group of them "
                f"({list(GROUPS)}); see conv2dlstm.config.sources"
            )
    return tuple(dict.fromkeys(out))


def expand_path(pattern: str) -> list[Path]:
    """What one ``source.paths`` entry names: ``~`` and environment variables expanded, then a glob
    (recursive ``**``) matched in sorted order, or the path itself when it exists; [] otherwise."""
    expanded = os.path.expandvars(os.path.expanduser(pattern))
    if glob.has_magic(expanded):
        return [Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
    return [Path(expanded)] if Path(expanded).exists() else []
