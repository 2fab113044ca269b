"""The pipeline's Zarr stores (regridded store, windows store): one writer, verified on every read.

:func:`write_store` writes a lazy dataset as a Zarr v3 store atomically, one Dask chunk per Zarr
chunk (streaming), with consolidated metadata, and records in the store the SHA-256 of every chunk
file it wrote (``chunk_digests.json`` at the store root, written before the store is renamed into
place). Zarr reads a missing chunk as the fill value (NaN for floats) without an error, so:

- :func:`check_chunks` - the cheap check every reader runs on open: every recorded chunk file is
  there, with its recorded size. A deleted or truncated chunk is a :class:`DataError` naming the
  store, the array, the chunk and the step that rebuilds the store; never NaN.
- :func:`verify` - the full check on demand (``python -m conv2dlstm verify <store>``): every chunk
  file's digest against the record, and no unrecorded chunk.
- :func:`read_errors` - a context that turns a failure to decode a chunk (garbage in a chunk file)
  into the same kind of error instead of a decompressor traceback.

Chunks that Zarr does not write (entirely fill value) are not recorded and not expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from conv2dlstm.errors import Conv2dLstmError, DataError

DIGESTS_FILE = "chunk_digests.json"
FLAT_CHUNK_KEYS = {"name": "default", "configuration": {"separator": "."}}
"""Chunk files named ``c.<i>.<j>.<k>`` in the array's folder (no folder per chunk index)."""
_METADATA = "zarr.json"


@dataclass(frozen=True)
class Chunk:
    """One recorded chunk file: array name, chunk key, size in bytes and SHA-256."""

    array: str
    key: str
    size: int
    sha256: str


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _chunk_files(store: Path) -> dict[str, list[Path]]:
    """Chunk files per array folder of a Zarr v3 store (files named ``c`` or ``c.<i>...``)."""
    out: dict[str, list[Path]] = {}
    for meta in sorted(store.glob(f"*/{_METADATA}")):
        folder = meta.parent
        out[folder.name] = sorted(
            p for p in folder.iterdir() if p.is_file() and (p.name == "c" or p.name.startswith("c."))
        )
    return out


def record_chunks(store: Path) -> list[Chunk]:
    """Digest every chunk file of ``store`` (reads them once)."""
    return [
        Chunk(array, path.name, path.stat().st_size, _file_sha256(path))
        for array, paths in _chunk_files(Path(store)).items()
        for path in paths
    ]


def _write_record(store: Path, chunks: list[Chunk]) -> None:
    doc = {"algorithm": "sha256", "chunks": [[c.array, c.key, c.size, c.sha256] for c in chunks]}
    (store / DIGESTS_FILE).write_text(json.dumps(doc, indent=0) + "\n")


def read_record(store: Path, *, what: str, step: str) -> list[Chunk]:
    """The chunk record of ``store``; :class:`DataError` naming the step when it is missing or broken."""
    path = Path(store) / DIGESTS_FILE
    try:
        doc = json.loads(path.read_text())
        return [Chunk(str(a), str(k), int(s), str(h)) for a, k, s, h in doc["chunks"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{what} {store} has no readable chunk record ({DIGESTS_FILE}: {type(exc).__name__}); it was "
            f"not written by this version or is damaged: rebuild it with the {step} step "
            f"(snakemake --forcerun {step})"
        ) from exc


def _damaged(what: str, store: Path, detail: str, step: str) -> DataError:
    return DataError(
        f"{what} {store} is damaged: {detail}; rebuild it with the {step} step (snakemake --forcerun {step}); "
        f"`python -m conv2dlstm verify {store}` checks every chunk"
    )


def check_chunks(store: str | Path, *, what: str, step: str) -> None:
    """The cheap check on open: every recorded chunk file exists with its recorded size.

    ``what`` names the store in messages (e.g. ``windows store``), ``step`` the step that writes it.
    """
    store = Path(store)
    for chunk in read_record(store, what=what, step=step):
        path = store / chunk.array / chunk.key
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _damaged(what, store, f"chunk {chunk.key} of array {chunk.array!r} is missing", step) from None
        if size != chunk.size:
            raise _damaged(
                what,
                store,
                f"chunk {chunk.key} of array {chunk.array!r} has {size} bytes, {chunk.size} were written",
                step,
            )


def verify(store: str | Path, *, what: str = "Zarr store", step: str = "its") -> list[str]:
    """The full check: every chunk file's SHA-256 against the record, and no chunk file that the
    record does not hold. Returns the problems found (empty: the store is as written)."""
    store = Path(store)
    recorded = {(c.array, c.key): c for c in read_record(store, what=what, step=step)}
    present = {(a, p.name): p for a, paths in _chunk_files(store).items() for p in paths}
    problems = [f"array {a!r}: chunk {k} is missing" for (a, k) in sorted(recorded.keys() - present.keys())]
    problems += [
        f"array {a!r}: chunk {k} was not written with the store" for (a, k) in sorted(present.keys() - recorded.keys())
    ]
    for key in sorted(recorded.keys() & present.keys()):
        if _file_sha256(present[key]) != recorded[key].sha256:
            problems.append(f"array {key[0]!r}: chunk {key[1]} differs from what was written")
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
        _write_record(tmp, record_chunks(tmp))
