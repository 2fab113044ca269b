"""Provenance records: digests by hand, readers and their errors, and the data steps and training run in
two directories with one configuration giving the same digests, stores and weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from conv2dlstm.artifacts import checkpoint as checkpoint_file
from conv2dlstm.artifacts import digests, provenance
from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.config import keys
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import DataError
from conv2dlstm.fsutil import sha256_file, sha256_tree
from conv2dlstm.steps import fetch, train
from conv2dlstm.steps import normalize as nz
from conv2dlstm.steps import regrid as rg
from conv2dlstm.steps import windows as wn
from tests.unit.test_regrid import write_daily_files

# ---------------------------------------------------------------------------------------------
# Records


def test_record_digest_by_hand() -> None:
    record = provenance.make_record("windows", "c" * 16, {"stats": "s" * 16, "regrid": "r" * 16})
    canonical = json.dumps(
        {"config_digest": "c" * 16, "inputs": {"regrid": "r" * 16, "stats": "s" * 16}, "step": "windows"},
        sort_keys=True,
    )
    assert record == {
        "step": "windows",
        "config_digest": "c" * 16,
        "inputs": {"regrid": "r" * 16, "stats": "s" * 16},
        "digest": hashlib.sha256(canonical.encode()).hexdigest()[:16],
    }
    assert list(record["inputs"]) == ["regrid", "stats"]  # sorted: the order given does not matter
    # every field enters the digest
    others = [
        provenance.make_record("windows", "d" * 16, {"stats": "s" * 16, "regrid": "r" * 16}),
        provenance.make_record("windows", "c" * 16, {"stats": "t" * 16, "regrid": "r" * 16}),
        provenance.make_record("train", "c" * 16, {"stats": "s" * 16, "windows": "r" * 16}),
    ]
    assert len({record["digest"], *(o["digest"] for o in others)}) == 4
    with pytest.raises(ValueError, match=r"records inputs \['regrid', 'stats'\]"):
        provenance.make_record("windows", "c" * 16, {"regrid": "r"})


def test_for_step_uses_the_result_digest_only() -> None:
    cfg = validate_config({})
    inputs = {"windows": "w" * 16, "stats": "s" * 16}
    record = provenance.for_step(cfg, "train", inputs)
    assert record["config_digest"] == keys.result_digest(cfg, "train")
    runtime = validate_config({"train": {"device": "cpu", "num_workers": 3}, "mlflow": {"tracking_uri": "x.db"}})
    assert provenance.for_step(runtime, "train", inputs) == record
    changed = validate_config({"train": {"learning_rate": 0.5}})
    assert provenance.for_step(changed, "train", inputs)["digest"] != record["digest"]
    assert provenance.for_step(changed, "regrid", {"manifest": "m"}) == provenance.for_step(
        cfg, "regrid", {"manifest": "m"}
    )


def test_validate_errors_name_the_artifact_and_the_step() -> None:
    record = provenance.make_record("normalize", "c" * 16, {"regrid": "r" * 16})
    assert provenance.validate(provenance.to_json(record), where="x.nc", step="normalize") == record
    assert provenance.from_attrs(provenance.to_attrs(record), where="x.nc", step="normalize") == record
    cases = [
        (None, "x.nc has no provenance record"),
        ("{not json", "x.nc: its provenance record is not JSON"),
        (json.dumps({"step": "normalize"}), "lacks some of"),
        (provenance.to_json({**record, "config_digest": "e" * 16}), "does not match its fields"),
    ]
    for value, match in cases:
        with pytest.raises(DataError, match=rf"{match}.*rerun the normalize step \(`snakemake --forcerun normalize`"):
            provenance.validate(value, where="x.nc", step="normalize")
    with pytest.raises(DataError, match="written by the normalize step, not by windows"):
        provenance.validate(record, where="x.nc", step="windows")


def test_differences_name_changed_keys_and_inputs() -> None:
    old = provenance.make_record("train", "a" * 16, {"windows": "w1", "stats": "s"})
    new = provenance.make_record("train", "b" * 16, {"windows": "w2", "stats": "s"})
    old_cfg = {"train": {"learning_rate": 0.01, "epochs": 2}, "model": {"name": "convlstm"}}
    new_cfg = {"train": {"learning_rate": 0.02, "epochs": 2}, "model": {"name": "convlstm", "extra": [1, 2]}}
    assert provenance.differences(old, new, old_config=old_cfg, new_config=new_cfg) == [
        "model.extra: (absent) -> [1, 2]",
        "train.learning_rate: 0.01 -> 0.02",
        "input windows changed: w1 -> w2",
    ]
    assert provenance.differences(old, new) == [
        f"result configuration {'a' * 16} -> {'b' * 16}",
        "input windows changed: w1 -> w2",
    ]
    assert provenance.differences(old, old) == []
    assert provenance.mlflow_tags(old) == {
        "provenance.digest": old["digest"],
        "provenance.config_digest": "a" * 16,
        "provenance.step": "train",
        "provenance.inputs.stats": "s",
        "provenance.inputs.windows": "w1",
    }


def test_readers_of_each_artifact_kind(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    listing = {"format_version": manifest_file.FORMAT_VERSION, "format": "netcdf", "files": [{"name": "a.nc"}]}
    manifest.write_text(json.dumps({**listing, "sha256": "m" * 64}))
    assert manifest_file.read_digest(manifest) == digests.digest_of(manifest) == "m" * 64
    manifest.write_text(json.dumps(listing))
    with pytest.raises(DataError, match="has no top-level sha256; rerun the fetch step"):
        manifest_file.read_digest(manifest)

    regrid = provenance.make_record("regrid", "c" * 16, {"manifest": "m" * 64})
    store = tmp_path / "x.zarr"
    xr.Dataset({"a": ("t", np.zeros(3))}, attrs=provenance.to_attrs(regrid)).to_zarr(store, zarr_format=3)
    assert provenance.read_zarr(store, step="regrid") == regrid
    assert digests.digest_of(store) == regrid["digest"]
    with pytest.raises(DataError, match="not by windows"):
        provenance.read_zarr(store, step="windows")
    with pytest.raises(DataError, match="windows store .*missing.zarr cannot be opened"):
        provenance.read_zarr(tmp_path / "missing.zarr", step="windows")

    stats = provenance.make_record("normalize", "c" * 16, {"regrid": regrid["digest"]})
    nc = tmp_path / "s.nc"
    xr.Dataset({"a": ("t", np.zeros(3))}, attrs=provenance.to_attrs(stats)).to_netcdf(nc)
    assert provenance.read_netcdf(nc) == stats and digests.digest_of(nc) == stats["digest"]
    xr.Dataset({"a": ("t", np.zeros(3))}).to_netcdf(nc)
    with pytest.raises(DataError, match="s.nc has no provenance record.*rerun the normalize step"):
        provenance.read_netcdf(nc)
    with pytest.raises(DataError, match="s.nc has no provenance record.*rerun the step that wrote it"):
        digests.digest_of(nc)

    trained = provenance.make_record("train", "c" * 16, {"windows": "w", "stats": stats["digest"]})
    ckpt = tmp_path / "model.pt"
    torch.save(
        {"format_version": checkpoint_file.FORMAT_VERSION, "model_state": {"w": torch.zeros(2)}, "provenance": trained},
        ckpt,
    )
    assert checkpoint_file.read_provenance(ckpt) == trained and digests.digest_of(ckpt) == trained["digest"]
    with pytest.raises(ValueError, match="no provenance reader for '.csv'"):
        digests.digest_of(tmp_path / "metrics.csv")


# ---------------------------------------------------------------------------------------------
# The same configuration in two directories


def pipeline_config(root: Path) -> dict:
    """The data steps and a tiny training on 28 days of OISST-like files; paths and the tracking
    store inside ``root`` (path and runtime keys: they must not change any digest)."""
    return validate_config(
        {
            "experiment": "provenance",
            "synthetic": {"kind": "none"},
            "source": {
                "kind": "files",
                "paths": [str(root / "raw" / "*.nc")],
                "start": "2020-01-01",
                "end": "2020-01-28",
            },
            "grid": {
                "lat": {"start": 20.5, "stop": 21.5, "step": 1.0},
                "lon": {"start": -79.5, "stop": -78.5, "step": 1.0},
            },
            "variables": {"inputs": ["sst"], "targets": ["sst"]},
            "splits": {
                "train": {"start": "2020-01-01", "end": "2020-01-14"},
                "val": {"start": "2020-01-15", "end": "2020-01-21"},
                "test": {"start": "2020-01-22", "end": "2020-01-28"},
            },
            "windows": {"input_steps": 2, "lead_steps": 1},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [2]}},
            "train": {"epochs": 1, "batch_size": 4, "device": "cpu"},
            "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "log_model": False},
        }
    )


def run_pipeline(root: Path) -> dict[str, Path]:
    """fetch, regrid, normalize, windows and train in ``root``, each step given its config view."""
    write_daily_files(root / "raw", n_days=30)
    cfg = pipeline_config(root)
    paths = {
        "manifest": root / "resources/raw/x/manifest.json",
        "regrid": root / "results/regrid/x.zarr",
        "stats": root / "results/normalize/x.nc",
        "windows": root / "results/windows/x.zarr",
        "train": root / "results/train/convlstm",
    }
    fetch.main(keys.step_view(cfg, "fetch"), out_dir=paths["manifest"].parent)
    rg.main(keys.step_view(cfg, "regrid"), manifest=paths["manifest"], out=paths["regrid"], memory_mb=1024)
    nz.main(keys.step_view(cfg, "normalize"), data=paths["regrid"], out=paths["stats"], memory_mb=1024)
    wn.main(
        keys.step_view(cfg, "windows"), data=paths["regrid"], stats=paths["stats"], out=paths["windows"], memory_mb=1024
    )
    train.main(
        keys.step_view(cfg, "train"),
        run="convlstm",
        windows=paths["windows"],
        stats=paths["stats"],
        out_dir=paths["train"],
    )
    return paths


def test_same_config_in_two_directories_gives_the_same_digests_and_results(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    a, b = run_pipeline(tmp_path / "a"), run_pipeline(tmp_path / "b")
    manifest_doc = json.loads(a["manifest"].read_text())
    assert manifest_doc["files"][0]["path"] != json.loads(b["manifest"].read_text())["files"][0]["path"]

    digests = []
    for paths in (a, b):
        regrid = provenance.read_zarr(paths["regrid"], step="regrid")
        stats = provenance.read_netcdf(paths["stats"])
        windows = provenance.read_zarr(paths["windows"], step="windows")
        model = checkpoint_file.read_provenance(paths["train"] / "model.pt")
        # each record names its inputs' digests
        assert regrid["inputs"] == {"manifest": manifest_file.read_digest(paths["manifest"])}
        assert stats["inputs"] == {"regrid": regrid["digest"]}
        assert windows["inputs"] == {"regrid": regrid["digest"], "stats": stats["digest"]}
        assert model["inputs"] == {"windows": windows["digest"], "stats": stats["digest"]}
        for name in ("last.pt", "best.pt"):
            assert checkpoint_file.read_provenance(paths["train"] / name) == model
        digests.append([regrid, stats, windows, model])
    assert digests[0] == digests[1]

    # and the same results: data, statistics file, windows store, weights
    with xr.open_zarr(a["regrid"]) as ra, xr.open_zarr(b["regrid"]) as rb:
        xr.testing.assert_identical(ra.drop_attrs(), rb.drop_attrs())
    assert sha256_file(a["stats"]) == sha256_file(b["stats"])
    assert sha256_tree(a["windows"]) == sha256_tree(b["windows"])
    wa = torch.load(a["train"] / "model.pt", weights_only=True)["model_state"]
    wb = torch.load(b["train"] / "model.pt", weights_only=True)["model_state"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
