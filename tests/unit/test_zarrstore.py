"""Pipeline Zarr stores record their chunk digests and are verified when read."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.cli import main as cli_main
from conv2dlstm.errors import DataError
from tests.support.windows_fixture import make_windows_store


def _store(path: Path) -> Path:
    time = pd.date_range("2020-01-01", periods=12, freq="D")
    values = np.arange(12 * 3 * 4, dtype=np.float32).reshape(12, 3, 4)
    ds = xr.Dataset(
        {"sst": (("time", "lat", "lon"), values)},
        coords={"time": time, "lat": [1.0, 2.0, 3.0], "lon": [1.0, 2.0, 3.0, 4.0]},
    )
    zarrstore.write_store(ds.chunk({"time": 4}), path)
    return path


def _chunk(store: Path, array: str, key: str) -> Path:
    return store / array / key


def test_written_store_records_every_chunk_and_verifies(tmp_path):
    store = _store(tmp_path / "a.zarr")
    record = zarrstore.read_record(store, what="store", step="regrid")
    assert sorted(c.key for c in record if c.array == "sst") == ["c.0.0.0", "c.1.0.0", "c.2.0.0"]
    assert [c.key for c in record if c.array == "time"] == ["c/0"]  # coordinates too (nested chunk keys)
    full = zarrstore.load_record(store, what="store", step="regrid")
    metadata = ["lat/zarr.json", "lon/zarr.json", "sst/zarr.json", "time/zarr.json", "zarr.json"]
    assert sorted(c.path for c in full.metadata) == metadata
    assert not full.legacy
    files = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}
    assert set(full.files()) == files - {zarrstore.DIGESTS_FILE}  # every file the store holds but the record
    assert zarrstore.verify(store) == []
    zarrstore.check_chunks(store, what="store", step="regrid")
    assert xr.open_zarr(store)["sst"].values[5, 1, 2] == 5 * 12 + 1 * 4 + 2  # still a plain Zarr store


def test_deleted_chunk_is_an_error_not_nan(tmp_path):
    store = _store(tmp_path / "a.zarr")
    _chunk(store, "sst", "c.1.0.0").unlink()
    assert np.isnan(xr.open_zarr(store)["sst"].values[5]).all()  # what Zarr alone reads: fill values
    with pytest.raises(
        DataError,
        match=r"a\.zarr is damaged: chunk c\.1\.0\.0 of array 'sst' is missing; rebuild "
        r"it with the regrid step \(snakemake --forcerun regrid\)",
    ):
        zarrstore.check_chunks(store, what="the regridded store", step="regrid")
    assert zarrstore.verify(store) == ["array 'sst': chunk c.1.0.0 is missing"]


def test_truncated_and_altered_chunks(tmp_path):
    store = _store(tmp_path / "a.zarr")
    path = _chunk(store, "sst", "c.0.0.0")
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(DataError, match=r"chunk c\.0\.0\.0 of array 'sst' has \d+ bytes, \d+ were written"):
        zarrstore.check_chunks(store, what="store", step="regrid")
    path.write_bytes(bytes(len(data)))  # same size, other content: the open check passes, a read does not
    zarrstore.check_chunks(store, what="store", step="regrid")
    assert zarrstore.verify(store) == ["array 'sst': chunk c.0.0.0 differs from what was written"]
    with pytest.raises(DataError, match=r"chunk c\.0\.0\.0 of array 'sst' differs from what was written"):
        xr.open_zarr(zarrstore.open_store(store, what="store", step="regrid"))["sst"].load()
    (store / "sst" / "c.9.0.0").write_bytes(b"x")
    assert "array 'sst': chunk c.9.0.0 was not written with the store" in zarrstore.verify(store)


def test_store_without_record_names_the_step(tmp_path):
    store = _store(tmp_path / "a.zarr")
    (store / zarrstore.DIGESTS_FILE).unlink()
    with pytest.raises(DataError, match=r"no readable chunk record .* rebuild it with the windows step"):
        zarrstore.check_chunks(store, what="windows store", step="windows")


def test_windows_store_refuses_a_deleted_chunk_on_open(tmp_path):
    fx = make_windows_store(tmp_path / "w.zarr")
    next((fx.store / "data").glob("c.1.*")).unlink()
    with pytest.raises(
        DataError,
        match=r"windows store .*w\.zarr is damaged: chunk c\.1\.0\.0\.0 of array 'data' "
        r"is missing; rebuild it with the windows step",
    ):
        WindowsStore(fx.store)


def test_garbage_chunk_reads_as_a_named_error(tmp_path):
    fx = make_windows_store(tmp_path / "w.zarr")
    path = next((fx.store / "data").glob("c.1.*"))
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))  # same size: passes the open check
    store = WindowsStore(fx.store)
    store.read_time_range(0, 2)  # other chunks read fine
    with pytest.raises(
        DataError,
        match=r"windows store .* is damaged: chunk c\.1\.0\.0\.0 of array 'data' differs from what was written "
        r"\(SHA-256\); rebuild it with the windows step \(snakemake --forcerun windows\)",
    ):
        store.read_time_range(0, store.time.size)


def test_codec_errors_in_a_computation_name_the_store(tmp_path):
    store = _store(tmp_path / "a.zarr")
    path = _chunk(store, "sst", "c.2.0.0")
    path.write_bytes(b"\x00" * path.stat().st_size)
    with pytest.raises(DataError, match=r"the regridded store .* is damaged: reading it failed"):
        with zarrstore.read_errors(store, what="the regridded store", step="regrid", codec_only=True):
            xr.open_zarr(store)["sst"].mean().compute()
    with pytest.raises(ValueError, match="not a chunk problem"):  # other errors are not disguised
        with zarrstore.read_errors(store, what="the regridded store", step="regrid", codec_only=True):
            raise ValueError("not a chunk problem")


def test_verify_command(tmp_path, capsys):
    good, bad = _store(tmp_path / "good.zarr"), _store(tmp_path / "bad.zarr")
    assert cli_main(["verify", str(good)]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    _chunk(bad, "sst", "c.0.0.0").write_bytes(b"garbage")
    assert cli_main(["verify", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert f"{bad}: DAMAGED" in out and "chunk c.0.0.0 differs from what was written" in out
    assert "1 damaged store(s)" in err and "snakemake --forcerun" in err
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert "is not a Zarr store" in capsys.readouterr().err


def _damage(store: Path, how: str) -> None:
    chunk = next((store / "data").glob("c.1.*"))
    if how == "deleted":
        chunk.unlink()
    elif how == "flip":  # one bit, in the middle: what used to decode into other values
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x04
        chunk.write_bytes(bytes(data))
    else:
        chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))


@pytest.mark.parametrize(
    ("step", "how", "words"),
    [
        ("train", "deleted", r"chunk c\.1\.0\.0\.0 of array 'data' is missing"),
        ("train", "garbage", r"chunk c\.1\.0\.0\.0 of array 'data' differs from what was written"),
        ("train", "flip", r"chunk c\.1\.0\.0\.0 of array 'data' differs from what was written \(SHA-256\)"),
        ("evaluate", "deleted", r"chunk c\.1\.0\.0\.0 of array 'data' is missing"),
    ],
)
def test_steps_stop_on_a_damaged_windows_store(step, how, words, tmp_path, capsys, monkeypatch):
    """What used to read as NaN ('training diverged ... lower train.learning_rate') or change
    metrics.csv silently: exit status 2, the store and the step named, nothing written."""
    import json

    from conv2dlstm.config.validate import validate_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fx = make_windows_store(tmp_path / "w.zarr", n_time=60)
    _damage(fx.store, how)
    cfg = validate_config(
        {
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "model": {"convlstm": {"hidden_channels": [2]}},
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "data_on_device": "always"},
        }
    )
    out = tmp_path / "out"
    args = [
        step,
        "--config-json",
        json.dumps(cfg),
        "--run",
        "convlstm",
        "--windows",
        str(fx.store),
        "--stats",
        str(fx.stats),
    ]
    args += (
        ["--out-dir", str(out)]
        if step == "train"
        else ["--checkpoint", str(tmp_path / "model.pt"), "--out-dir", str(out)]
    )
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: windows store .*w\.zarr is damaged: " + words, err), err
    assert "rebuild it with the windows step (snakemake --forcerun windows)" in err
    assert "Traceback" not in err and "diverged" not in err
    assert not (out / "model.pt").exists() and not (out / "metrics.csv").exists()


def test_evaluate_with_a_real_checkpoint_stops_on_a_flipped_bit_in_a_test_chunk(tmp_path, capsys, monkeypatch):
    """A run trained on the intact store, then evaluated after one bit of a chunk that only the test
    period reads has flipped: what would have changed metrics.csv silently stops the evaluate step
    (exit status 2) naming the store, the chunk and the step to rerun; no metrics are written."""
    import json

    from conv2dlstm.config.validate import validate_config
    from conv2dlstm.steps import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fx = make_windows_store(tmp_path / "w.zarr", n_time=60, time_chunk=5)
    cfg = validate_config(
        {
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": False},
            "model": {"convlstm": {"hidden_channels": [2]}},
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "max_batches_per_epoch": 1},
        }
    )
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=tmp_path / "trained")
    checkpoint = tmp_path / "trained" / "model.pt"
    assert checkpoint.is_file()
    last = int(fx.starts["test"][-1]) + fx.input_steps + fx.lead_steps - 1  # the test period's last step
    assert last // 5 > (int(fx.starts["val"][-1]) + fx.input_steps + fx.lead_steps - 1) // 5  # test only
    chunk = fx.store / "data" / f"c.{last // 5}.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04  # one bit
    chunk.write_bytes(bytes(data))
    out = tmp_path / "evaluate"
    args = ["evaluate", "--config-json", json.dumps(cfg), "--run", "convlstm"]
    args += [
        "--windows",
        str(fx.store),
        "--stats",
        str(fx.stats),
        "--checkpoint",
        str(checkpoint),
        "--out-dir",
        str(out),
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"error: windows store {re.escape(str(fx.store))} is damaged: chunk {re.escape(chunk.name)} of array 'data' "
        r"differs from what was written \(SHA-256\); rebuild it with the windows step \(snakemake --forcerun windows\)",
        err,
    ), err
    assert "Traceback" not in err
    assert not (out / "metrics.csv").exists()
    assert not out.exists() or not list(out.iterdir())  # nor a staging folder left behind


def test_verify_checks_metadata_files_and_lists_no_recorded_file_as_unrecorded(tmp_path):
    store = _store(tmp_path / "a.zarr")
    meta = store / "sst" / "zarr.json"
    meta.write_text(meta.read_text().replace('"float32"', '"float64"'))  # other content: the dtype
    assert zarrstore.verify(store) == ["metadata file sst/zarr.json differs from what was written"]
    zarrstore.record_store(store)  # an edit on purpose, recorded: as written again
    assert zarrstore.verify(store) == []
    meta.write_text(meta.read_text().replace('"float64"', '"float32"'))
    (store / "lat" / "zarr.json").unlink()
    (store / "notes.txt").write_text("x")
    assert zarrstore.verify(store) == [
        "metadata file lat/zarr.json is missing",
        "file notes.txt was not written with the store",
        "metadata file sst/zarr.json differs from what was written",
    ]


def test_open_store_checks_the_metadata_before_zarr_reads_it(tmp_path):
    store = _store(tmp_path / "a.zarr")
    root = store / "zarr.json"
    root.write_text(root.read_text().replace('"sst"', '"sss"', 1))  # the consolidated metadata, same size
    with pytest.raises(
        DataError,
        match=r"a\.zarr is damaged: metadata file zarr\.json \(the store's root and consolidated metadata\) differs "
        r"from what was written \(SHA-256\); rebuild it with the regrid step \(snakemake --forcerun regrid\)",
    ):
        zarrstore.open_store(store, what="the regridded store", step="regrid")


def test_byte_range_and_partial_reads_are_verified_too(tmp_path):
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer.core import default_buffer_prototype
    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    store = _store(tmp_path / "a.zarr")
    verified = zarrstore.open_store(store, what="store", step="regrid")
    plain = LocalStore(store, read_only=True)
    proto = default_buffer_prototype()
    for rng in (None, RangeByteRequest(3, 9), OffsetByteRequest(5), SuffixByteRequest(4), SuffixByteRequest(10**6)):
        want = sync(plain.get("sst/c.1.0.0", proto, rng))
        got = sync(verified.get("sst/c.1.0.0", proto, rng))
        got_sync = verified.get_sync("sst/c.1.0.0", prototype=proto, byte_range=rng)
        assert want is not None and got is not None and got_sync is not None
        assert got.to_bytes() == got_sync.to_bytes() == want.to_bytes()
    assert sync(verified.get("sst/c.9.0.0", proto)) is None  # never written (fill value) and not recorded
    chunk = store / "sst" / "c.1.0.0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"chunk c\.1\.0\.0 of array 'sst' differs"):
        sync(verified.get("sst/c.1.0.0", proto, RangeByteRequest(0, 2)))  # the bytes asked for are intact
    with pytest.raises(DataError, match=r"chunk c\.1\.0\.0 of array 'sst' differs"):
        sync(verified.get_partial_values(proto, [("sst/c.0.0.0", None), ("sst/c.1.0.0", SuffixByteRequest(1))]))
    with pytest.raises(DataError, match=r"chunk c\.1\.0\.0 of array 'sst' differs"):
        verified.get_sync("sst/c.1.0.0")
    (store / "sst" / "c.9.0.0").write_bytes(b"x")
    with pytest.raises(DataError, match=r"chunk c\.9\.0\.0 of array 'sst' was not written with the store"):
        sync(verified.get("sst/c.9.0.0", proto))
    with pytest.raises(ValueError, match="read-only"):
        verified.with_read_only(False)


def _legacy(store: Path) -> None:
    """Rewrite the record as the previous version wrote it: data chunks only (flat keys), no digest of its own."""
    chunks = [c for c in zarrstore.read_record(store, what="store", step="regrid") if "/" not in c.key]
    doc = {"algorithm": "sha256", "chunks": [[c.array, c.key, c.size, c.sha256] for c in chunks]}
    (store / zarrstore.DIGESTS_FILE).write_text(json.dumps(doc, indent=0) + "\n")


def test_a_store_of_the_previous_version_is_read_with_its_chunks_verified_and_a_warning(tmp_path, caplog):
    store = _store(tmp_path / "legacy.zarr")
    _legacy(store)
    with caplog.at_level(logging.WARNING, logger="conv2dlstm.zarrstore"):
        verified = zarrstore.open_store(store, what="the regridded store", step="regrid")
        zarrstore.open_store(store, what="the regridded store", step="regrid")  # warned once per store
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "written by an earlier version that recorded only its data chunks" in warnings[0]
    assert "rebuild it with the regrid step (snakemake --forcerun regrid)" in warnings[0]
    assert zarrstore.load_record(store, what="store", step="regrid").legacy
    assert zarrstore.verify(store) == []  # its metadata and coordinates are not listed as unrecorded
    xr.testing.assert_identical(xr.open_zarr(verified).load(), xr.open_zarr(store).load())
    chunk = store / "sst" / "c.2.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"chunk c\.2\.0\.0 of array 'sst' differs from what was written"):
        xr.open_zarr(verified)["sst"].load()


def test_every_single_bit_flip_of_the_record_is_found(tmp_path):
    """The record carries its own digest: no flip anywhere in it passes as a record (nor as a legacy one)."""
    store = _store(tmp_path / "a.zarr")
    path = store / zarrstore.DIGESTS_FILE
    original = path.read_bytes()
    assert zarrstore.parse_record(original).files()
    missed = []
    for offset in range(len(original)):
        for bit in range(8):
            flipped = bytearray(original)
            flipped[offset] ^= 1 << bit
            try:
                zarrstore.parse_record(bytes(flipped))
            except (ValueError, KeyError, TypeError):
                continue
            missed.append((offset, bit))
    assert missed == []
    for offset in range(0, len(original), 97):  # and through the reader, as the steps open it
        flipped = bytearray(original)
        flipped[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=r"has no readable chunk record \(chunk_digests\.json.*rebuild it with the"):
            zarrstore.open_store(store, what="the regridded store", step="regrid")


def test_workers_in_another_directory_read_and_write_relative_paths_where_the_step_runs(tmp_path, monkeypatch):
    """A step's paths may be relative to the step's directory, while the workers of an external Dask
    scheduler run in a directory of their own: every chunk is written to, and read and verified
    from, the step's store (a real scheduler and worker process, started in another directory)."""
    import distributed

    from conv2dlstm.daskutil import dask_client
    from conv2dlstm.data.sources import open_local_zarr

    workers, step = tmp_path / "workers", tmp_path / "step"
    workers.mkdir(), step.mkdir()
    expected = np.arange(12 * 3 * 4, dtype=np.float32).reshape(12, 3, 4)
    monkeypatch.chdir(workers)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.chdir(step)
        with dask_client(threads=1, memory_mb=None, address=cluster.scheduler_address) as client:
            assert list(client.run(os.getcwd).values()) == [str(workers)]
            _store(Path("out.zarr"))
            store = zarrstore.open_store(Path("out.zarr"), what="store", step="regrid")
            with xr.open_zarr(store, consolidated=True, zarr_format=3) as ds:  # verified, chunk by chunk on the worker
                np.testing.assert_array_equal(ds["sst"].compute().values, expected)
            with open_local_zarr(Path("out.zarr"), {}) as ds:  # a raw Zarr source
                np.testing.assert_array_equal(ds["sst"].compute().values, expected)
    assert zarrstore.verify(step / "out.zarr") == []
    assert list(workers.iterdir()) == []  # nothing written where the workers run
