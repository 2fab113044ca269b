"""The pipeline's Zarr stores (regridded store, windows store): one writer, verified on every read.

:func:`write_store` writes a lazy dataset as a Zarr v3 store atomically, one Dask chunk per Zarr
chunk (streaming), with consolidated metadata, and records in the store the size and SHA-256 of
every file it wrote (``chunk_digests.json`` at the store root, written before the store is renamed
into place): each chunk file (coordinates included) and each metadata file (``zarr.json`` at the
root, which holds the consolidated metadata, and each array's ``zarr.json``). The record carries
the SHA-256 of its own content (``record_sha256``), so a damaged record is found too.

- :func:`open_store` - how every reader opens a store: the record is read and checked, every
  recorded file must be there with its recorded size (:func:`check_chunks`), every metadata file
  must match its digest (:func:`check_metadata`), and the :class:`VerifiedStore` it returns (give it
  to ``xr.open_zarr``) checks every file Zarr reads through it against its digest *before* Zarr
  decodes it. A damaged, deleted or unrecorded file is a :class:`DataError` naming the store, the
  array, the chunk (or metadata file) and the step that rebuilds the store; never NaN, never data.
- :func:`verify` - the full check on demand (``python -m conv2dlstm verify <store>``): every
  recorded file's digest, and no file that the record does not hold.
- :func:`read_errors` - a context that turns a failure to decode a chunk into the same kind of
  error instead of a decompressor traceback (a last line of defence: verified reads never decode a
  damaged chunk).

Chunks that Zarr does not write (entirely fill value) are not recorded and not expected.

Stores written before metadata digests were recorded (a record of only ``algorithm`` and
``chunks``: :attr:`Record.legacy`) are still read, with a WARNING once per store and process:
their data chunks are verified on every read as above, but their metadata files and coordinate
chunks were never recorded and cannot be; rebuilding the store with its step records them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import xarray as xr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.buffer.core import default_buffer_prototype
from zarr.storage import LocalStore

from conv2dlstm.errors import Conv2dLstmError, DataError

log = logging.getLogger(__name__)

DIGESTS_FILE = "chunk_digests.json"
RECORD_FORMAT = 2
"""``format`` of the record: 2 records metadata files and its own digest (1, unnamed, did neither)."""
FLAT_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "."}}
"""Chunk files named ``c.<i>.<j>.<k>`` in the array's folder (no folder per chunk index)."""
_METADATA = "zarr.json"
_RECORD_KEYS = frozenset({"algorithm", "format", "chunks", "metadata", "record_sha256"})
_LEGACY_KEYS = frozenset({"algorithm", "chunks"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Chunk:
    """One recorded file: array name (``""`` at the store root), key in the array's folder, size in
    bytes and SHA-256. Metadata files have the key ``zarr.json``."""

    array: str
    key: str
    size: int
    sha256: str

    @property
    def path(self) -> str:
        """The file's key in the store (``data/c.0.0.0.0``, ``time/c/0``, ``data/zarr.json``, ``zarr.json``)."""
        return f"{self.array}/{self.key}" if self.array else self.key

    @property
    def is_metadata(self) -> bool:
        """Whether the file is a metadata file (``zarr.json``) rather than a chunk."""
        return self.key == _METADATA

    def describe(self) -> str:
        """How messages name the file: ``chunk c.1.0.0.0 of array 'data'``, ``metadata file data/zarr.json``."""
        if self.is_metadata:
            of = f" (of array {self.array!r})" if self.array else " (the store's root and consolidated metadata)"
            return f"metadata file {self.path}{of}"
        if self.array:
            return f"chunk {self.key} of array {self.array!r}"
        return f"file {self.key}"

    def listed(self) -> str:
        """How :func:`verify` lists the file: ``array 'data': chunk c.1.0.0.0``, ``metadata file zarr.json``."""
        if self.is_metadata:
            return f"metadata file {self.path}"
        return f"array {self.array!r}: chunk {self.key}" if self.array else self.describe()


@dataclass(frozen=True)
class Record:
    """A store's record (``chunk_digests.json``): its chunk files and metadata files.

    ``legacy``: written before metadata files were recorded (no ``metadata``, no ``record_sha256``);
    only the flat chunk files of its arrays (``<array>/c.<i>...``) are recorded.
    """

    chunks: tuple[Chunk, ...]
    metadata: tuple[Chunk, ...] = ()
    legacy: bool = False

    def files(self) -> dict[str, Chunk]:
        """Every recorded file by its key in the store."""
        return {c.path: c for c in (*self.chunks, *self.metadata)}

    def covers(self, key: str) -> bool:
        """Whether the record vouches for the file ``key`` (recorded or known not to exist): every key
        of a current record; a legacy record only those of flat chunk files."""
        if not self.legacy:
            return True
        array, _, name = key.partition("/")
        return bool(array) and "/" not in name and _is_chunk_name(name)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_chunk_name(name: str) -> bool:
    return name == "c" or name.startswith("c.")


def _chunk_files(store: Path, *, nested: bool = True) -> dict[str, list[str]]:
    """Chunk keys per array folder of a Zarr v3 store: every file of the folder but its ``zarr.json``
    (``c.<i>...`` flat, ``c/<i>/...`` nested: coordinates are written with the default encoding).
    ``nested=False``: only the flat ones (``c`` or ``c.<i>...``), all that a legacy record holds."""
    out: dict[str, list[str]] = {}
    for meta in sorted(store.glob(f"*/{_METADATA}")):
        folder = meta.parent
        if nested:
            keys = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            out[folder.name] = sorted(k for k in keys if k != _METADATA)
        else:
            out[folder.name] = sorted(p.name for p in folder.iterdir() if p.is_file() and _is_chunk_name(p.name))
    return out


def _metadata_files(store: Path) -> list[Chunk]:
    """The metadata files of ``store`` (root first), as unsized :class:`Chunk` entries."""
    found = [("", _METADATA)] if (store / _METADATA).is_file() else []
    found += [(meta.parent.name, _METADATA) for meta in sorted(store.glob(f"*/{_METADATA}"))]
    return [Chunk(array, key, 0, "") for array, key in found]


def _digested(store: Path, array: str, key: str) -> Chunk:
    path = store / Chunk(array, key, 0, "").path
    return Chunk(array, key, path.stat().st_size, _file_sha256(path))


def record_chunks(store: Path) -> list[Chunk]:
    """Digest every chunk file of ``store``, coordinates included (reads them once)."""
    store = Path(store)
    return [_digested(store, array, key) for array, keys in _chunk_files(store).items() for key in keys]


def record_metadata(store: Path) -> list[Chunk]:
    """Digest every metadata file of ``store``: its root ``zarr.json`` and each array's ``zarr.json``."""
    store = Path(store)
    return [_digested(store, m.array, m.key) for m in _metadata_files(store)]


def _record_sha256(doc: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a record's fields but ``record_sha256`` itself."""
    body = {k: v for k, v in doc.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_record(store: Path, chunks: list[Chunk], metadata: list[Chunk]) -> None:
    doc: dict[str, Any] = {
        "algorithm": "sha256",
        "format": RECORD_FORMAT,
        "chunks": [[c.array, c.key, c.size, c.sha256] for c in chunks],
        "metadata": [[c.array, c.key, c.size, c.sha256] for c in metadata],
    }
    doc["record_sha256"] = _record_sha256(doc)
    (store / DIGESTS_FILE).write_text(json.dumps(doc, indent=0) + "\n")


def record_store(store: str | Path) -> None:
    """Record the size and SHA-256 of every chunk and metadata file of ``store`` as it is now (the
    writer's last act). Only for a store edited on purpose (tests, repairs): it vouches for whatever
    the files hold."""
    store = Path(store)
    _write_record(store, record_chunks(store), record_metadata(store))


def _entries(rows: Any) -> tuple[Chunk, ...]:
    """Parse ``[[array, key, size, sha256], ...]``; ValueError or TypeError when malformed."""
    out = []
    for array, key, size, sha256 in rows:
        if not (isinstance(array, str) and isinstance(key, str) and isinstance(sha256, str)):
            raise TypeError(f"entry {[array, key, size, sha256]} is not [array, key, size, sha256]")
        if type(size) is not int or size < 0 or not _SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"entry {[array, key, size, sha256]} has no valid size or SHA-256")
        out.append(Chunk(array, key, size, sha256))
    return tuple(out)


def parse_record(text: bytes) -> Record:
    """The record in the bytes of a ``chunk_digests.json``; ValueError (also for a current record whose
    content does not match its ``record_sha256``), KeyError or TypeError when it is not one."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("algorithm") != "sha256":
        raise ValueError("not a SHA-256 chunk record")
    if set(doc) == _LEGACY_KEYS:
        return Record(_entries(doc["chunks"]), legacy=True)
    if set(doc) != _RECORD_KEYS or doc["format"] != RECORD_FORMAT:
        raise KeyError(f"fields {sorted(doc)}, format {doc.get('format')!r}")
    if _record_sha256(doc) != doc["record_sha256"]:
        raise ValueError("its content does not match its own SHA-256 (record_sha256)")
    return Record(_entries(doc["chunks"]), _entries(doc["metadata"]))


def load_record(store: str | Path, *, what: str, step: str) -> Record:
    """The record of ``store``; :class:`DataError` naming the store and the step when it is missing,
    unreadable, or does not match its own digest."""
    store = Path(store)
    try:
        return parse_record((store / DIGESTS_FILE).read_bytes())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{what} {store} has no readable chunk record ({DIGESTS_FILE}: {type(exc).__name__}: {exc}); it was "
            f"not written by this version or is damaged: rebuild it with the {step} step "
            f"(snakemake --forcerun {step})"
        ) from exc


def read_record(store: str | Path, *, what: str, step: str) -> list[Chunk]:
    """The recorded chunk files of ``store`` (:func:`load_record`, without its metadata files)."""
    return list(load_record(store, what=what, step=step).chunks)


def _damaged(what: str, store: Path, detail: str, step: str) -> DataError:
    return DataError(
        f"{what} {store} is damaged: {detail}; rebuild it with the {step} step (snakemake --forcerun {step}); "
        f"`python -m conv2dlstm verify {store}` checks every chunk"
    )


_warned_legacy: set[str] = set()


def _warn_legacy(store: Path, what: str, step: str) -> None:
    """Say once per store and process that a legacy store's metadata cannot be verified."""
    if str(store) in _warned_legacy:
        return
    _warned_legacy.add(str(store))
    log.warning(
        "%s %s was written by an earlier version that recorded only its data chunks: they are verified on "
        "every read, its metadata and coordinates cannot be; rebuild it with the %s step "
        "(snakemake --forcerun %s) to have them verified too",
        what,
        store,
        step,
        step,
    )


def check_chunks(store: str | Path, *, what: str, step: str, record: Record | None = None) -> None:
    """The cheap check on open: every recorded file (chunk or metadata) exists with its recorded size.

    ``what`` names the store in messages (e.g. ``windows store``), ``step`` the step that writes it;
    ``record``: the store's record when already read.
    """
    store = Path(store)
    record = load_record(store, what=what, step=step) if record is None else record
    for entry in (*record.metadata, *record.chunks):
        try:
            size = (store / entry.path).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise _damaged(what, store, f"{entry.describe()} is missing", step) from None
        if size != entry.size:
            raise _damaged(what, store, f"{entry.describe()} has {size} bytes, {entry.size} were written", step)


def _checked(data: bytes, entry: Chunk, *, store: Path, what: str, step: str) -> bytes:
    """``data`` (the bytes of the file ``entry``) when they are what was written, else the error."""
    if len(data) != entry.size:
        raise _damaged(what, store, f"{entry.describe()} has {len(data)} bytes, {entry.size} were written", step)
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise _damaged(what, store, f"{entry.describe()} differs from what was written (SHA-256)", step)
    return data


def check_metadata(store: str | Path, record: Record, *, what: str, step: str) -> None:
    """Every recorded metadata file of ``store`` against its digest (they are small)."""
    store = Path(store)
    for entry in record.metadata:
        try:
            data = (store / entry.path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise _damaged(what, store, f"{entry.describe()} is missing", step) from None
        _checked(data, entry, store=store, what=what, step=step)


def _byte_range(data: bytes, byte_range: ByteRequest | None) -> bytes:
    """The part of a whole file's ``data`` that ``byte_range`` asks for (as ``LocalStore`` reads it)."""
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[max(0, len(data) - byte_range.suffix) :]
    raise TypeError(f"unexpected byte range {byte_range!r}")


class VerifiedStore(LocalStore):
    """A read-only ``LocalStore`` that checks every file it reads against the store's record before
    Zarr decodes it: the whole file is read and digested, also for a byte-range read (these stores
    are unsharded: Zarr reads whole chunks). A recorded file that is missing or differs, or a file
    that is there but not recorded, is a :class:`DataError` naming the store, the file and ``step``.

    Picklable (it carries its record: a few hundred bytes per chunk), so that Dask workers and
    DataLoader workers, forked or spawned, verify with the record checked when the store was opened.
    Build it with :func:`open_store`.
    """

    def __init__(self, root: Path | str, *, what: str, step: str, record: Record, read_only: bool = True) -> None:
        if not read_only:
            raise ValueError(f"{what} {root}: a VerifiedStore is read-only; write with zarrstore.write_store")
        # absolute: Dask workers that unpickle the store may run in another directory (an external
        # scheduler's workers), and would look for a relative path there
        super().__init__(Path(root).absolute(), read_only=True)
        self.shown = Path(root)  # as the caller named it, for messages
        self.what = what
        self.step = step
        self.record = record
        self._files = record.files()

    def with_read_only(self, read_only: bool = False) -> Self:
        """This store again (it is read-only; ValueError for a writable one)."""
        other = type(self)(self.root, what=self.what, step=self.step, record=self.record, read_only=read_only)
        other.shown = self.shown
        return other

    def __dask_tokenize__(self) -> tuple[str, str, tuple[Chunk, ...]]:
        return (type(self).__name__, str(self.root), self.record.chunks + self.record.metadata)

    def read_verified(self, key: str) -> bytes | None:
        """The bytes of the file ``key`` once checked; None for a file that neither exists nor is
        recorded (Zarr probes for some, and reads an unwritten chunk as fill values)."""
        path = self.root / key
        entry = self._files.get(key)
        if entry is None:
            if not self.record.covers(key):
                return _read_or_none(path)
            if path.is_file():
                detail = f"{Chunk(*_split_key(key), 0, '').describe()} was not written with the store"
                raise _damaged(self.what, self.shown, detail, self.step)
            return None
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise _damaged(self.what, self.shown, f"{entry.describe()} is missing", self.step) from None
        return _checked(data, entry, store=self.shown, what=self.what, step=self.step)

    def get_sync(
        self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        data = self.read_verified(key)
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(_byte_range(data, byte_range))

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        if not self._is_open:
            await self._open()
        data = await asyncio.to_thread(self.read_verified, key)  # hashlib releases the GIL
        if data is None:
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(_byte_range(data, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges)))


def _split_key(key: str) -> tuple[str, str]:
    """``(array, key in its folder)`` of a store key (array ``""`` for a file at the root)."""
    array, sep, rest = key.partition("/")
    return (array, rest) if sep else ("", array)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def open_store(path: str | Path, *, what: str, step: str) -> VerifiedStore:
    """Open the store ``path`` for reading, verified: its record (:func:`load_record`), every recorded
    file present with its size (:func:`check_chunks`), every metadata file's digest
    (:func:`check_metadata`); returns the :class:`VerifiedStore` to read it through
    (``xr.open_zarr(store, ...)``), which checks each chunk's digest when it is read."""
    path = Path(path)
    record = load_record(path, what=what, step=step)
    check_chunks(path, what=what, step=step, record=record)
    check_metadata(path, record, what=what, step=step)
    if record.legacy:
        _warn_legacy(path, what, step)
    return VerifiedStore(path, what=what, step=step, record=record)


def _present_files(store: Path, record: Record) -> dict[str, Chunk]:
    """The files of ``store`` that its record should hold, by key (sizes and digests unset): every
    file but the record for a current record; the flat chunk files for a legacy one."""
    if record.legacy:
        entries = [Chunk(a, k, 0, "") for a, keys in _chunk_files(store, nested=False).items() for k in keys]
    else:
        keys = [p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()]
        entries = [Chunk(*_split_key(k), 0, "") for k in keys if k != DIGESTS_FILE]
    return {c.path: c for c in entries}


def verify(store: str | Path, *, what: str = "Zarr store", step: str = "its") -> list[str]:
    """The full check: every recorded file's SHA-256 (chunks and metadata), and no file that the
    record does not hold. Returns the problems found (empty: the store is as written). A legacy
    record (:attr:`Record.legacy`) holds only the data chunks: those are checked, with a WARNING."""
    store = Path(store)
    record = load_record(store, what=what, step=step)
    if record.legacy:
        _warn_legacy(store, what, step)
    recorded = record.files()
    present = _present_files(store, record)
    problems = [f"{recorded[k].listed()} is missing" for k in sorted(recorded.keys() - present.keys())]
    problems += [
        f"{present[k].listed()} was not written with the store" for k in sorted(present.keys() - recorded.keys())
    ]
    for key in sorted(recorded.keys() & present.keys()):
        entry = recorded[key]
        path = store / key
        if path.stat().st_size != entry.size or _file_sha256(path) != entry.sha256:
            problems.append(f"{entry.listed()} differs from what was written")
    return problems


def verify_stores(stores: Sequence[Path]) -> Iterator[tuple[Path, list[str]]]:
    """:func:`verify` each store in turn, yielding ``(store, problems)``; after the last, a
    :class:`DataError` naming the damaged ones (and at once for a path that is not a Zarr store)."""
    damaged = []
    for store in map(Path, stores):
        if not (store / _METADATA).is_file():
            raise DataError(f"{store} is not a Zarr store (no {_METADATA}); give a regridded or windows store")
        problems = verify(store)
        if problems:
            damaged.append(str(store))
        yield store, problems
    if damaged:
        raise DataError(
            f"{len(damaged)} damaged store(s): {', '.join(damaged)}; rebuild each with the step that writes it "
            "(regrid for results/regrid/, windows for results/windows/: snakemake --forcerun <step>)"
        )


_CODEC_WORDS = ("decompress", "codec", "zstd", "blosc", "crc32c", "checksum")


def is_codec_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a failure to decode a chunk."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(word in str(seen).lower() for word in _CODEC_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def read_errors(
    store: str | Path, *, what: str, step: str, detail: str = "", codec_only: bool = False
) -> Iterator[None]:
    """Turn an error raised while reading the store's chunks into a :class:`DataError` naming the
    store and the step. Project errors pass through unchanged; with ``codec_only`` (around a
    computation that does more than read) only failures to decode a chunk are turned."""
    try:
        yield
    except Conv2dLstmError:
        raise
    except Exception as exc:
        if codec_only and not is_codec_error(exc):
            raise
        where = f" ({detail})" if detail else ""
        raise _damaged(
            what, Path(store), f"reading it failed{where}: {type(exc).__name__}: {str(exc)[:200]}", step
        ) from exc


def write_store(
    ds: xr.Dataset,
    out: Path,
    *,
    writing: str | None = None,
    also: Sequence[Any] = (),
    before_commit: Callable[[tuple[Any, ...]], None] | None = None,
) -> None:
    """Write ``ds`` (lazy) as a Zarr v3 store at ``out`` atomically and record its chunk digests.

    Each data variable with Dask chunks is written one Zarr chunk per Dask chunk (streaming, memory
    bounded by a chunk); metadata is consolidated so that a plain ``xr.open_zarr`` opens the store
    without probing every array. ``writing`` names the store in a Dask failure message.

    ``also``: lazy (Dask) collections computed in the same pass as the write, so that inputs they
    share with it are read once (e.g. a plausibility check of the source); their results go to
    ``before_commit``, which may raise to discard the store before it is moved into place.
    """
    write_parts(
        [lambda: (ds, also)],
        out,
        writing=writing,
        before_commit=None if before_commit is None else lambda results: before_commit(results[0]),
        close=False,
    )


Part = Callable[[], tuple[xr.Dataset, Sequence[Any]]]
"""One part of a store written in parts: builds its lazy dataset and the collections computed with it."""


def write_parts(
    parts: Sequence[Part],
    out: Path,
    *,
    append_dim: str = "time",
    writing: str | None = None,
    before_commit: Callable[[list[tuple[Any, ...]]], None] | None = None,
    close: bool = True,
) -> None:
    """Write a store in parts along ``append_dim``, atomically, as :func:`write_store` writes one.

    Each part is built only when its turn comes (so that only one is open at a time), computed
    with its ``also`` collections in one pass, and appended; the first sets the store's chunks,
    attributes and encoding. Every part but the last must hold a whole number of the first part's
    chunks along ``append_dim`` (Zarr chunks are never shared between parts).
    ``before_commit`` gets the results of every part's ``also``, in order. With ``close`` each
    part's dataset is closed (its files released) once it is written.
    """
    import dask

    from conv2dlstm.daskutil import compute_errors
    from conv2dlstm.fsutil import atomic_output

    results: list[tuple[Any, ...]] = []
    with atomic_output(out) as tmp, compute_errors(writing or f"writing {out}"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        for n, part in enumerate(parts):
            source, also = part()
            ds = source.copy()
            for name in ds.data_vars:
                ds[name].encoding = {}
            if n == 0:  # the first part sets the chunks: one Zarr chunk per Dask chunk
                encoding: dict[Hashable, Any] = {}
                for name in ds.data_vars:
                    chunks = ds[name].chunks
                    if chunks is not None:
                        encoding[name] = {"chunks": tuple(c[0] for c in chunks), "chunk_key_encoding": FLAT_CHUNK_KEYS}
                write = ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True, encoding=encoding, compute=False)
            else:  # the store's encoding applies
                write = ds.to_zarr(tmp, append_dim=append_dim, zarr_format=3, consolidated=True, compute=False)
            try:
                _, *computed = dask.compute(write, *also)
            finally:
                if close:
                    source.close()
            results.append(tuple(computed))
        if before_commit is not None:
            before_commit(results)
        record_store(tmp)
