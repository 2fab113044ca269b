"""The fetch manifest, ``<resources_dir>/raw/<name>/manifest.json`` (JSON, small): what the fetch
step got and where it lies (layout in ``docs/architecture.md``).

``format_version``; ``kind`` (the source kind); ``format`` (:data:`FORMATS`); ``files``, one entry
per fetched or located file or Zarr store (:class:`FetchedFile`: ``path``, relative to the working
directory when under it, else absolute; ``url``, redacted; ``sha256``; ``bytes``; for a file
downloaded over http(s), the answer's ``etag`` and ``last_modified`` when the server sent them,
which ``check-upstream`` compares with the server's, :mod:`conv2dlstm.data.upstream`); ``sha256``, the
digest over the files (:func:`digest`); ``missing`` (kind ``url`` only, when dates had no file
upstream).

Written last by the fetch step, atomically (:func:`build`, :func:`write`); read by the regrid step
and by forecasting (through :mod:`conv2dlstm.data.sources`), and by the fetch step itself
for the checksums of an earlier fetch (:func:`checksums`). :func:`read` checks
:data:`FORMAT_VERSION` and the entries; a problem is a :class:`~conv2dlstm.errors.DataError` naming
the file and the fix (run the fetch step again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conv2dlstm.artifacts.provenance import rerun_advice
from conv2dlstm.errors import DataError
from conv2dlstm.fsutil import atomic_output
from conv2dlstm.redact import redact_text, redact_url

FORMAT_VERSION = 1
"""Entry ``format_version`` of the manifest; :func:`read` refuses any other."""
NAME = "manifest.json"
"""The manifest's file name in the fetch step's output folder."""
FORMATS = ("netcdf", "zarr")
"""What the listed files are: netCDF files, or Zarr stores."""


@dataclass(frozen=True)
class FetchedFile:
    """One fetched or located file (or Zarr store) as listed in the manifest."""

    path: Path
    url: str
    sha256: str
    bytes: int
    etag: str | None = None
    """The ``ETag`` of the HTTP answer the file was downloaded from (None: not sent, or not http)."""
    last_modified: str | None = None
    """The ``Last-Modified`` of that answer, as the server wrote it (None: not sent, or not http)."""

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "path": display_path(self.path),
            "url": redact_url(self.url),
            "sha256": self.sha256,
            "bytes": self.bytes,
        }
        if self.etag is not None:
            entry["etag"] = self.etag
        if self.last_modified is not None:
            entry["last_modified"] = self.last_modified
        return entry


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies under it, else absolute."""
    path = Path(path).absolute()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd().absolute()))
    return str(path)


def digest(files: Iterable[FetchedFile]) -> str:
    """SHA-256 over ``"<file name> <sha256>\\n"`` of each file, in manifest order."""
    sha = hashlib.sha256()
    for f in files:
        sha.update(f"{Path(f.path).name} {f.sha256}\n".encode())
    return sha.hexdigest()


def build(kind: str, fmt: str, files: list[FetchedFile], **extra: Any) -> dict[str, Any]:
    """The manifest document of ``files`` of source kind ``kind`` and format ``fmt``."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "format": fmt,
        "files": [f.to_json() for f in files],
        "sha256": digest(files),
        **extra,
    }


def write(path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as JSON, atomically, every URL in it redacted (:func:`redact_text`)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(redact_text(json.dumps(manifest, indent=1)) + "\n")
    return path


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest ``path``, checked: of :data:`FORMAT_VERSION`, listing files of one of :data:`FORMATS`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; run the fetch step first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest {path} is not valid JSON ({exc}); delete it and fetch again") from exc
    if not isinstance(manifest, dict) or not manifest.get("files") or manifest.get("format") not in FORMATS:
        raise DataError(f"manifest {path} lists no files or has no format netcdf/zarr; delete it and fetch again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"manifest {path} has format_version {version}, this version reads {FORMAT_VERSION}: it was written "
            "by another version of the fetch step; delete it and fetch again"
        )
    return manifest


def file_path(entry: dict[str, Any], manifest_path: str | os.PathLike) -> Path:
    """A listed file's path: as written (relative to the working directory), else next to the manifest."""
    path = Path(entry["path"])
    if path.is_absolute() or path.exists():
        return path
    beside = Path(manifest_path).parent / path.name
    return beside if beside.exists() else path


def file_paths(manifest: dict[str, Any], manifest_path: str | os.PathLike) -> list[Path]:
    """The paths of the files the manifest (read from ``manifest_path``) lists, in its order (:func:`file_path`)."""
    return [file_path(entry, manifest_path) for entry in manifest["files"]]


def checksums(path: str | os.PathLike) -> dict[str, str]:
    """File name -> sha256 of the files the manifest ``path`` lists; empty when there is no
    readable manifest of this version there (the fetch step then checks its files again)."""
    try:
        return {Path(entry["path"]).name: str(entry["sha256"]) for entry in read(path)["files"]}
    except (DataError, KeyError, TypeError):
        return {}


def read_digest(path: str | os.PathLike) -> str:
    """The top-level ``sha256`` of the manifest ``path`` (over its files' names and contents): the
    digest later steps record as their ``manifest`` input. Its format version is checked."""
    path = Path(path)
    value = read(path).get("sha256")
    if not isinstance(value, str) or not value:
        raise DataError(f"manifest {path} has no top-level sha256; {rerun_advice('fetch')}")
    return value
