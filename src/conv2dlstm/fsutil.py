"""Atomic outputs: write to a temporary sibling, rename into place only on success.

A step that fails (bad input, a killed job) therefore never leaves a partial or corrupt output that
Snakemake, or the next step, would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

PARTIAL_GLOB = ".*.partial"
"""Names of the temporaries of :func:`atomic_output` (``.<name>.<random>.partial``)."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it to ``target``.

    Works for files and for directories (Zarr stores). The temporary name starts with ``.`` and ends
    with ``.partial`` so that globs never pick it up. On any exception the temporary path is removed
    and ``target`` is left as it was before the call.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"  # matches PARTIAL_GLOB
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise FileNotFoundError(f"atomic_output: nothing was written to {tmp} for {target}")
    if target.exists():
        _remove(target)
    os.replace(tmp, target)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (memory does not grow with file size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """SHA-256 over a file or a directory tree (relative names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        digest.update(bytes.fromhex(sha256_file(f)))
    return digest.hexdigest()


def discard_partials(directory: str | os.PathLike, *, of: str | None = None) -> list[Path]:
    """Remove the :func:`atomic_output` temporaries that a killed process left in ``directory``.

    Only direct children matching :data:`PARTIAL_GLOB` are removed (files or directories); with
    ``of``, only the temporaries of the output named ``of`` (``.<of>.<random>.partial``), so that a
    step never touches those of another job writing into the same directory. Returns them. A
    missing directory has none.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = PARTIAL_GLOB if of is None else f".{glob.escape(of)}.*.partial"
    strays = sorted(directory.glob(pattern))
    for stray in strays:
        _remove(stray)
    return strays


def tree_bytes(path: str | os.PathLike) -> int:
    """Size in bytes of a file, or of all files under a directory (a Zarr store)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
