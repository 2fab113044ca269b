"""Every read of the pipeline's Zarr stores is verified: single-bit flips anywhere in a chunk, a
metadata file or the record stop each reader the steps use with a DataError naming the file and
the step, and never return data; an undamaged store reads exactly as plain Zarr reads it.

Real stores on disk, written as the steps write them (``zarrstore.write_store``); each flip is undone
before the next, so one store serves a whole test.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.artifacts import regridded
from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.errors import DataError
from conv2dlstm.training.dataset import InMemoryWindows, WindowDataset, iter_batches
from tests.support.windows_fixture import WindowsFixture, make_windows_store

N_FLIPS = 24
"""Single-bit flips per file, spread evenly from its first byte to its last."""
REBUILD_WINDOWS = r"; rebuild it with the windows step \(snakemake --forcerun windows\)"
REBUILD_REGRID = r"; rebuild it with the regrid step \(snakemake --forcerun regrid\)"


def flips(path: Path, n: int = N_FLIPS) -> list[tuple[int, int]]:
    """``n`` (byte offset, bit) pairs spread over the file ``path``, first and last byte included."""
    size = path.stat().st_size
    offsets = np.linspace(0, size - 1, n).round().astype(int)
    return [(int(offset), i % 8) for i, offset in enumerate(offsets)]


@contextlib.contextmanager
def flipped(path: Path, offset: int, bit: int) -> Iterator[None]:
    """The file ``path`` with one bit flipped for the duration of the block, then restored."""
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[offset] ^= 1 << bit
    path.write_bytes(bytes(damaged))
    try:
        yield
    finally:
        path.write_bytes(original)


def each_flip(path: Path) -> Iterator[tuple[int, int]]:
    """Flip each of :func:`flips` in turn (restored after each), yielding ``(offset, bit)``."""
    for offset, bit in flips(path):
        with flipped(path, offset, bit):
            yield offset, bit


@pytest.fixture(scope="module")
def windows(tmp_path_factory: pytest.TempPathFactory) -> WindowsFixture:
    return make_windows_store(tmp_path_factory.mktemp("windows") / "w.zarr", n_time=40, time_chunk=5)


def _regridded_dataset() -> xr.Dataset:
    time = pd.date_range("2019-01-01", periods=48, freq="D")
    rng = np.random.default_rng(0)
    sst = (20 + rng.standard_normal((time.size, 6, 7))).astype(np.float32)
    sst[:, 0, 0] = np.nan  # land
    return xr.Dataset(
        {"sst": (("time", "lat", "lon"), sst, {"units": "degC"})},
        coords={"time": time, "lat": np.arange(6.0) + 10.5, "lon": np.arange(7.0) + 70.5},
        attrs={"format_version": regridded.FORMAT_VERSION},
    )


@pytest.fixture(scope="module")
def regrid_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("regrid") / "r.zarr"
    zarrstore.write_store(_regridded_dataset().chunk({"time": 8}), path)  # as the regrid step writes it
    return path


def _test_chunk(fx: WindowsFixture) -> tuple[Path, int, int]:
    """A chunk of ``data`` in the test period, and a test window that reads it (its index, its start)."""
    t0 = int(fx.starts["test"][0])
    chunk = fx.store / "data" / f"c.{t0 // 5}.0.0.0"
    assert chunk.is_file()
    return chunk, 0, t0


def test_an_undamaged_windows_store_reads_as_plain_zarr(windows: WindowsFixture) -> None:
    store = WindowsStore(windows.store)
    plain = xr.open_zarr(windows.store)
    cube = store.read_time_range(0, store.time.size)
    assert cube.dtype == np.float32 and np.array_equal(cube, plain["data"].values)
    np.testing.assert_array_equal(cube, windows.normalized)
    np.testing.assert_array_equal(store.time, plain["time"].values)
    np.testing.assert_array_equal(store.mask, plain["mask"].values)
    x, y = store.sample("test", 1)
    t0 = int(windows.starts["test"][1])
    np.testing.assert_array_equal(x, plain["data"].values[t0 : t0 + windows.input_steps])
    assert store.attrs == plain.attrs


def test_an_undamaged_regridded_store_reads_as_plain_zarr(regrid_store: Path) -> None:
    xr.testing.assert_identical(regridded.open(regrid_store).load(), xr.open_zarr(regrid_store).load())


def test_a_flipped_bit_in_a_windows_chunk_stops_every_reader(windows: WindowsFixture) -> None:
    """The issue's case: one bit of a test-period chunk. 23 of 26 such flips used to decode."""
    chunk, i, t0 = _test_chunk(windows)
    store = WindowsStore(windows.store)
    dataset = WindowDataset(windows.store, "test")
    words = rf"windows store .*w\.zarr is damaged: chunk {chunk.name} of array 'data' differs from what was written"
    for _ in each_flip(chunk):
        with pytest.raises(DataError, match=words + r" \(SHA-256\)" + REBUILD_WINDOWS):
            store.read_time_range(t0, t0 + 1)
        with pytest.raises(DataError, match=words):
            store.sample("test", i)
        with pytest.raises(DataError, match=words):
            dataset[i]
        with pytest.raises(DataError, match=words):
            InMemoryWindows(store, "test")
        with pytest.raises(DataError, match=words):
            WindowsStore(windows.store).read_time_range(0, store.time.size)
    np.testing.assert_array_equal(store.read_time_range(t0, t0 + 1), windows.normalized[t0 : t0 + 1])  # restored


@pytest.mark.parametrize(
    ("array", "chunk_key"),
    [
        ("time", "c/0"),
        ("lat", "c/0"),
        ("mask", "c.0.0"),
        ("train_start", "c.0"),
        ("val_start", "c.0"),
        ("test_start", "c.0"),
    ],
)
def test_a_flipped_bit_in_a_windows_coordinate_mask_or_start_chunk_stops_the_open(
    windows: WindowsFixture, array: str, chunk_key: str
) -> None:
    """The small arrays read whole when the store opens (coordinates, the ocean mask, the window
    starts) are verified like the data: a flipped bit would shift a date, move the coast or start a
    window elsewhere, silently."""
    chunk = windows.store / array / chunk_key
    words = rf"windows store .*w\.zarr is damaged: chunk {re.escape(chunk_key)} of array '{array}'"
    for _ in each_flip(chunk):
        with pytest.raises(DataError, match=words + r" differs from what was written \(SHA-256\)" + REBUILD_WINDOWS):
            WindowsStore(windows.store)
        with pytest.raises(DataError, match=words):
            WindowDataset(windows.store, "train")
    store = WindowsStore(windows.store)  # restored: reads as written
    np.testing.assert_array_equal(store.starts("test"), windows.starts["test"])
    np.testing.assert_array_equal(store.mask, xr.open_zarr(windows.store)["mask"].values)


def test_dataloader_workers_verify_their_reads(windows: WindowsFixture) -> None:
    """Forked workers (the default on Linux) reopen the store from its path and verify as the parent
    does; a spawned worker gets the dataset pickled (without its store) and reopens it the same way."""
    chunk, i, _ = _test_chunk(windows)
    dataset = WindowDataset(windows.store, "test")
    words = rf"chunk {chunk.name} of array 'data' differs from what was written"
    with flipped(chunk, chunk.stat().st_size // 2, 3):
        with pytest.raises(DataError, match=words):
            list(iter_batches(dataset, [[i]], num_workers=1))
        spawned = pickle.loads(pickle.dumps(dataset))
        assert spawned._store is None
        with pytest.raises(DataError, match=words):
            spawned[i]
    x, _ = next(iter_batches(dataset, [[i]], num_workers=1))
    assert torch.equal(x[0], torch.from_numpy(dataset.store.sample("test", i)[0]))


@pytest.mark.parametrize("key", ["zarr.json", "data/zarr.json", "time/zarr.json"])
def test_a_flipped_bit_in_windows_metadata_stops_the_open(windows: WindowsFixture, key: str) -> None:
    path = windows.store / key
    name = key.replace(".", r"\.")
    for _ in each_flip(path):
        with pytest.raises(DataError, match=rf"w\.zarr is damaged: metadata file {name}.* differs .*{REBUILD_WINDOWS}"):
            WindowsStore(windows.store)
        with pytest.raises(DataError, match=rf"metadata file {name}"):
            WindowDataset(windows.store, "train")
    WindowsStore(windows.store)  # restored: opens again


def test_a_flipped_bit_in_the_record_stops_the_read(windows: WindowsFixture, regrid_store: Path) -> None:
    for store, opener, step in ((windows.store, WindowsStore, "windows"), (regrid_store, regridded.open, "regrid")):
        for _ in each_flip(store / zarrstore.DIGESTS_FILE):
            with pytest.raises(DataError, match=rf"has no readable chunk record .*rebuild it with the {step} step"):
                opener(store)


def test_a_flipped_bit_in_a_regridded_chunk_stops_the_dask_reads(regrid_store: Path) -> None:
    """What normalize and windows compute on: ``regridded.open(...)`` through Dask (threads here)."""
    chunk = regrid_store / "sst" / "c.2.0.0"
    words = r"the regridded store .*r\.zarr is damaged: chunk c\.2\.0\.0 of array 'sst' differs from what was written"
    for _ in each_flip(chunk):
        ds = regridded.open(regrid_store)
        with pytest.raises(DataError, match=words + r" \(SHA-256\)" + REBUILD_REGRID):
            ds.load()
        with pytest.raises(DataError, match=words):
            with zarrstore.read_errors(regrid_store, what=regridded.WHAT, step="regrid", codec_only=True):
                float(ds["sst"].isel(time=slice(16, 24)).mean())  # one chunk, as a step reduces it
        assert float(ds["sst"].isel(time=slice(0, 16)).mean()) > 0  # the other chunks are intact and read


def test_normalize_stops_on_a_flipped_regridded_chunk(regrid_store: Path) -> None:
    from conv2dlstm.steps import normalize

    chunk = regrid_store / "sst" / "c.1.0.0"
    for offset, bit in flips(chunk, n=3):
        with flipped(chunk, offset, bit), pytest.raises(DataError, match=r"chunk c\.1\.0\.0 of array 'sst' differs"):
            normalize.fit_stats(
                regridded.open(regrid_store), train_start="2019-01-01", train_end="2019-02-17", variables=["sst"]
            )


@pytest.mark.parametrize("key", ["zarr.json", "sst/zarr.json", "time/zarr.json"])
def test_a_flipped_bit_in_regridded_metadata_stops_the_open(regrid_store: Path, key: str) -> None:
    name = key.replace(".", r"\.")
    for _ in each_flip(regrid_store / key):
        with pytest.raises(DataError, match=rf"r\.zarr is damaged: metadata file {name}.* differs .*{REBUILD_REGRID}"):
            regridded.open(regrid_store)


def test_metadata_damaged_after_the_open_is_found_when_zarr_reads_it(regrid_store: Path) -> None:
    """The store checks every file Zarr asks for, metadata included, not only on open."""
    store = zarrstore.open_store(regrid_store, what=regridded.WHAT, step="regrid")
    with flipped(regrid_store / "zarr.json", 100, 0):
        with pytest.raises(DataError, match=r"metadata file zarr\.json .* differs from what was written"):
            xr.open_zarr(store, consolidated=True, zarr_format=3)


def test_a_pickled_store_verifies_in_another_process(regrid_store: Path) -> None:
    """Dask workers get the store pickled (with its record); a local cluster's worker process reads it."""
    from conv2dlstm.daskutil import dask_client

    lazy = regridded.open(regrid_store)["sst"].data
    again = pickle.loads(pickle.dumps(lazy))
    assert np.array_equal(again.compute(), lazy.compute(), equal_nan=True)
    chunk = regrid_store / "sst" / "c.3.0.0"
    with flipped(chunk, 7, 6):
        with pytest.raises(DataError, match=r"chunk c\.3\.0\.0 of array 'sst' differs"):
            again.compute()
        with dask_client(threads=1, memory_mb=1024, data_bytes=None) as client:  # a worker process
            assert client is not None
            with pytest.raises(DataError, match=r"chunk c\.3\.0\.0 of array 'sst' differs .*regrid step"):
                regridded.open(regrid_store)["sst"].mean().compute()
