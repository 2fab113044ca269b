"""Windows store reading: samples against hand slicing, times, streaming == in-memory batches, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import zarr

from conv2dlstm import zarrstore
from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.errors import DataError
from conv2dlstm.training.dataset import InMemoryWindows, WindowDataset, iter_batches, use_in_memory
from tests.support.windows_fixture import make_windows_store


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Three variables; inputs (sst, no3), targets (no3, po4): the channel maps differ."""
    path = tmp_path_factory.mktemp("windows") / "w.zarr"
    return make_windows_store(
        path,
        n_time=30,
        height=6,
        width=7,
        variables=("sst", "no3", "po4"),
        input_variables=["sst", "no3"],
        target_variables=["no3", "po4"],
        input_steps=3,
        lead_steps=2,
        time_chunk=4,
        seed=3,
    )


def test_metadata(fx) -> None:
    store = WindowsStore(fx.store)
    assert store.input_variables == ["sst", "no3"] and store.target_variables == ["no3", "po4"]
    assert store.input_channels == [0, 1] and store.target_channels == [1, 2]
    assert (store.input_steps, store.lead_steps, store.shape) == (3, 2, (6, 7))
    np.testing.assert_array_equal(store.mask, fx.mask)
    np.testing.assert_array_equal(store.time, fx.time.values)
    np.testing.assert_array_equal(store.lat, fx.lat)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(store.starts(split), fx.starts[split])
    # 30 days: train 0..17, val 18..23, test 24..29; windows span 5 days.
    assert store.starts("train").tolist() == list(range(0, 14))
    assert store.starts("val").tolist() == [18, 19]


def test_sample_is_hand_slice(fx) -> None:
    store = WindowsStore(fx.store)
    for split, i in [("train", 0), ("train", 13), ("val", 1), ("test", 0), ("test", -1)]:
        t0 = int(fx.starts[split][i])
        x, y = store.sample(split, i)
        assert x.dtype == np.float32 and x.shape == (3, 2, 6, 7) and y.shape == (2, 2, 6, 7)
        np.testing.assert_array_equal(x, fx.normalized[t0 : t0 + 3, [0, 1]])
        np.testing.assert_array_equal(y, fx.normalized[t0 + 3 : t0 + 5, [1, 2]])
    with pytest.raises(IndexError, match="out of range for the 2 val windows"):
        store.sample("val", 2)


def test_times(fx) -> None:
    store = WindowsStore(fx.store)
    # val window 1 starts on day 19 (2020-01-20): inputs 20, 21, 22 January; leads 23 and 24 January.
    assert store.init_times("val")[1] == np.datetime64("2020-01-22")
    np.testing.assert_array_equal(
        store.valid_times("val")[1], np.array(["2020-01-23", "2020-01-24"], dtype="datetime64[ns]")
    )
    assert store.valid_times("train").shape == (14, 2)


def test_in_memory_equals_streaming(fx) -> None:
    store = WindowsStore(fx.store)
    order = torch.randperm(14, generator=torch.Generator().manual_seed(0))
    batches = [order[:5].tolist(), order[5:10].tolist(), order[10:].tolist()]
    mem = list(iter_batches(InMemoryWindows(store, "train"), batches))
    streamed = list(iter_batches(WindowDataset(fx.store, "train"), batches, num_workers=0))
    workers = list(iter_batches(WindowDataset(fx.store, "train"), batches, num_workers=2))
    assert [b[0].shape for b in mem] == [(5, 3, 2, 6, 7), (5, 3, 2, 6, 7), (4, 3, 2, 6, 7)]
    for (xm, ym), (xs, ys), (xw, yw), idx in zip(mem, streamed, workers, batches, strict=True):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
        assert torch.equal(xm, xw) and torch.equal(ym, yw)
        for k, i in enumerate(idx):
            x, y = store.sample("train", i)
            assert torch.equal(xm[k], torch.from_numpy(x)) and torch.equal(ym[k], torch.from_numpy(y))


def test_in_memory_loads_only_the_split_range(fx) -> None:
    store = WindowsStore(fx.store)
    mem = InMemoryWindows(store, "val")
    assert mem.cube.shape == (6, 3, 6, 7)  # val windows span days 18..23
    assert store.cube_nbytes("val") == 6 * 3 * 6 * 7 * 4
    x, y = mem.batch(torch.tensor([1]))
    np.testing.assert_array_equal(x[0].numpy(), fx.normalized[19:22, [0, 1]])


def test_dataset_pickles_without_open_store(fx) -> None:
    ds = WindowDataset(fx.store, "test")
    _ = ds[0]
    assert ds._store is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None and len(clone) == len(ds) == 2
    assert all(torch.equal(a, b) for a, b in zip(clone[1], ds[1]))


def test_use_in_memory_modes() -> None:
    cpu = torch.device("cpu")
    assert use_in_memory("always", 10**18, cpu)
    assert not use_in_memory("never", 1, cpu)
    assert use_in_memory("auto", 1, cpu)
    assert not use_in_memory("auto", 10**18, cpu)


def test_missing_store(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist; run the windows step"):
        WindowsStore(tmp_path / "nope.zarr")


def test_wrong_format_version(tmp_path) -> None:
    fx = make_windows_store(tmp_path / "w.zarr", n_time=12, height=4, width=5)
    group = zarr.open_group(fx.store, mode="r+")
    group.attrs["format_version"] = 7
    zarrstore.record_store(fx.store)  # an edit on purpose: recorded again, so the store reads as written
    with pytest.raises(DataError, match="format_version 7, expected 1"):
        WindowsStore(fx.store)


def test_unknown_variable(tmp_path) -> None:
    fx = make_windows_store(tmp_path / "w.zarr", n_time=12, height=4, width=5)
    group = zarr.open_group(fx.store, mode="r+")
    group.attrs["target_variables"] = ["chl"]
    zarrstore.record_store(fx.store)  # an edit on purpose: recorded again, so the store reads as written
    with pytest.raises(DataError, match=r"\['chl'\] are not in its variable coordinate"):
        WindowsStore(fx.store)
