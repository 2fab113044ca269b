"""Atomic outputs: write to a temporary sibling, rename into place only on success.

A step that fails (bad input, a killed job) therefore never leaves a partial or corrupt output that
Snakemake, or the next step, would mistake for a finished one.

A write that fails because the disk is full raises :class:`~conv2dlstm.errors.DiskFullError`
naming the output, the free space and the space needed (:func:`disk_full_cause`): ``errno.ENOSPC``
or ``errno.EDQUOT`` anywhere in the exception chain (plain writes, Zarr, fsspec), or a failed write
without a reason (netCDF-4 reports a full disk only as ``NetCDF: HDF error``, PyTorch as ``file
write failed``) while almost no space is left. The space needed is a lower bound: the bytes of the
disk the partial output (file or folder) had taken when the disk filled, measured before it is
removed; the output needs at least that much more than the space that was free then.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from conv2dlstm.errors import DiskFullError

PARTIAL_GLOB = ".*.partial"
"""Names of the temporaries of :func:`atomic_output` (``.<name>.<random>.partial``)."""
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``No space left on device`` and ``Disk quota exceeded``."""
DISK_FULL_MESSAGES = ("no space left on device", "disk quota exceeded")
"""The same, as libraries that drop the errno spell them (compared lower-cased)."""
WRITE_FAILED_MESSAGES = ("hdf error", "file write failed", "failed writing", "unexpected pos")
"""How writers that drop the errno report any failed write, a full disk included: netCDF-4
(``NetCDF: HDF error``), PyTorch (``PytorchStreamWriter failed writing file ...: file write
failed``, or ``[enforce fail at inline_container.cc] unexpected pos 124672 vs 124560`` when the
zip writer finds its file shorter than what it wrote). Compared lower-cased; they count as a full
disk only when space is low."""
LOW_SPACE_BYTES = 64 << 20
"""Below this many free bytes a :data:`WRITE_FAILED_MESSAGES` error counts as a full disk."""


REMOVE_ATTEMPTS = 20
"""Tries to remove a partial output: a writer's threads (Zarr's asynchronous stores) may still put a
file into a folder being removed, after the failure that stopped the write; 50 ms apart."""


def _remove(path: Path) -> None:
    """Remove the file or folder ``path`` (a partial output). A folder is removed again until it has
    stayed away for 50 ms: the threads of a failed writer may still be putting files into it."""
    gone = 0
    for _ in range(REMOVE_ATTEMPTS):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        gone = gone + 1 if not (path.exists() or path.is_symlink()) else 0
        if gone >= 2 or (gone and not path.name.endswith(".partial")):
            return
        time.sleep(0.05)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling (``__cause__``,
    ``__context__``), each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged process may still write on the file system of ``path`` (its nearest
    existing ancestor), or None when that cannot be told."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def disk_full_cause(exc: BaseException, where: str | os.PathLike) -> BaseException | None:
    """The exception of ``exc``'s chain (:func:`exception_chain`) that says the disk holding ``where`` is
    full, or None: an ``OSError`` with errno ENOSPC or EDQUOT, a message saying so
    (:data:`DISK_FULL_MESSAGES`), or a failed write without a reason
    (:data:`WRITE_FAILED_MESSAGES`, e.g. ``NetCDF: HDF error``) while fewer than
    :data:`LOW_SPACE_BYTES` are free there (call it before freeing the partial output)."""
    failed_write: BaseException | None = None
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return e
        text = str(e).lower()
        if any(m in text for m in DISK_FULL_MESSAGES):
            return e
        if failed_write is None and any(m in text for m in WRITE_FAILED_MESSAGES):
            failed_write = e
    if failed_write is not None:
        free = free_bytes(where)
        if free is not None and free < LOW_SPACE_BYTES:
            return failed_write
    return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    size: float = n
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} bytes"  # pragma: no cover


def written_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of the disk that the file or folder ``path`` (a partial output) takes now (allocated
    blocks: a sparse file that netCDF-4 extended past what it wrote counts what is on disk), or
    None when ``path`` is None or cannot be measured; files that a failed writer's threads remove
    while they are counted are skipped."""
    if path is None:
        return None

    def used(p: Path) -> int:
        st = p.stat()
        blocks = getattr(st, "st_blocks", None)
        return st.st_size if blocks is None else blocks * 512

    path = Path(path)
    try:
        if not path.is_dir():
            return used(path) if path.exists() else 0
        total = 0
        for p in path.rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                if p.is_file():
                    total += used(p)
        return total
    except OSError:
        return None


def disk_full_error(target: str | os.PathLike, cause: BaseException, *, written: int | None = None) -> DiskFullError:
    """The error for a write of ``target`` that failed because its disk is full: it names the
    output, the file system's free and total space, the space needed and what to do.

    ``written``: the bytes of the disk the output had taken when the disk filled
    (:func:`written_bytes` of its partial file or folder), or None when unknown. The output was not
    finished, so it needs more than that: the message names it as a lower bound, "at least N more
    than the F free"."""
    target = Path(target)
    free = free_bytes(target.parent)
    total = None
    with contextlib.suppress(OSError):
        total = shutil.disk_usage(target.parent).total
    needed = removed = ""
    if written:
        needed = (
            f" It needs at least {_size(written)} more than the {_size(free)} free: the output had taken "
            f"{_size(written)} of the disk when it filled, and it was not finished (a lower bound)."
        )
        removed = f", which frees its {_size(written)} again"
    return DiskFullError(
        f"no space left on device writing {target}: the disk holding {target.parent} is full "
        f"({_size(free)} free of {_size(total)}; {type(cause).__name__}: {cause}).{needed} Nothing was written "
        f"to {target} (the partial output was removed{removed}). Free space there, or point outdir / "
        "resources_dir at a disk with room, and run the step again"
    )


@contextlib.contextmanager
def full_disk_named(target: str | os.PathLike, *, partial: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a failure of the writes in the block into a :class:`DiskFullError` naming ``target`` when
    the disk holding it is full (:func:`disk_full_cause`); other failures pass unchanged.

    ``partial``: the file or folder the block writes (a temporary, a staging folder); the disk space
    it had taken when the disk filled (:func:`written_bytes`) is the lower bound of the space needed
    that the error names (:func:`disk_full_error`). Enter it inside the block that removes partial
    outputs, so that the free space and the partial output's size are read before it goes."""
    target = Path(target)
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        cause = disk_full_cause(exc, target.parent)
        if cause is not None:
            raise disk_full_error(target, cause, written=written_bytes(partial)) from exc
        raise


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success move it to ``target``.

    Works for files and for directories (Zarr stores). The temporary name starts with ``.`` and ends
    with ``.partial`` so that globs never pick it up. On any exception the temporary path is removed
    and ``target`` is left as it was before the call; a write that failed because the disk is full
    (:func:`disk_full_cause`) raises :class:`~conv2dlstm.errors.DiskFullError` naming ``target``
    and the space it needs (at least what the temporary had taken of the disk) instead, whatever
    the writer wrapped it in.
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"  # matches PARTIAL_GLOB
    try:
        # the free space and the temporary's size are read before the temporary is removed
        with full_disk_named(target, partial=tmp):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if not tmp.exists():
                raise FileNotFoundError(f"atomic_output: nothing was written to {tmp} for {target}")
            if target.exists():
                _remove(target)
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


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
