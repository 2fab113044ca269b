"""Pipeline Zarr stores record their chunk digests and are verified when read."""

from __future__ import annotations

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
    path.write_bytes(bytes(len(data)))  # same size, other content: only the full check sees it
    zarrstore.check_chunks(store, what="store", step="regrid")
    assert zarrstore.verify(store) == ["array 'sst': chunk c.0.0.0 differs from what was written"]
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
        match=r"windows store .* is damaged: reading it failed \(array 'data', time "
        r"\d+\.\.\d+\): RuntimeError: .*rebuild it with the windows step",
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
    else:
        chunk.write_bytes(np.random.default_rng(1).bytes(chunk.stat().st_size))


@pytest.mark.parametrize(
    ("step", "how", "words"),
    [
        ("train", "deleted", r"chunk c\.1\.0\.0\.0 of array 'data' is missing"),
        ("train", "garbage", r"reading it failed \(array 'data', time"),
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
