"""Training: masked loss, MLflow records in a real sqlite store, learning a toy, kill-and-resume identity,
resuming only a training of the same provenance (fresh starts otherwise)."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conv2dlstm.artifacts import checkpoint, digests, provenance
from conv2dlstm.config import keys
from conv2dlstm.config.runs import flatten
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError, DataError, TrackingError
from conv2dlstm.steps import train
from conv2dlstm.training import loop
from conv2dlstm.training.models import load_model
from tests.support.windows_fixture import make_windows_store

OUTPUTS = {"best.pt", "last.pt", "model.pt", "history.csv", "mlflow_run_id.txt", "model_summary.txt"}


def tiny_config(tmp_path: Path, **train_overrides) -> dict:
    return validate_config(
        {
            "experiment": "test-train",
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4, 4]}},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01, "device": "cpu"} | train_overrides,
        }
    )


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and spinning threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def test_masked_mse_hand_computed() -> None:
    mask = np.array([[True, False], [True, True]])  # (H=2, W=2), one land cell
    lat = np.array([0.0, 60.0])
    pred = torch.tensor([[1.0, 5.0], [2.0, 0.0]]).view(1, 1, 1, 2, 2)
    target = torch.tensor([[0.0, -5.0], [0.0, 1.0]]).view(1, 1, 1, 2, 2)
    # squared errors on ocean: 1 (lat 0), 4 and 1 (lat 60).
    plain = loop.masked_mse(pred, target, loop.loss_weights(mask, lat, False))
    assert plain.item() == pytest.approx((1 + 4 + 1) / 3)
    weighted = loop.masked_mse(pred, target, loop.loss_weights(mask, lat, True))
    assert weighted.item() == pytest.approx((1 * 1 + 0.5 * 4 + 0.5 * 1) / (1 + 0.5 + 0.5))


@pytest.mark.parametrize("latitude_weighted", [False, True])
def test_land_values_cannot_change_the_loss(latitude_weighted: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    mask = np.ones((6, 7), dtype=bool)
    mask[:, :2] = False
    mask[3, 4] = False
    weights = loop.loss_weights(mask, np.linspace(-60, 60, 6), latitude_weighted)
    pred = torch.randn(3, 2, 2, 6, 7, generator=gen)
    target = torch.randn(3, 2, 2, 6, 7, generator=gen)
    base = loop.masked_mse(pred, target, weights)
    land = torch.from_numpy(~mask)
    for fill in (1e6, -3.0, float("nan"), float("inf")):
        p2 = torch.where(land, torch.full_like(pred, fill), pred)
        t2 = torch.where(land, torch.randn(3, 2, 2, 6, 7, generator=gen) * 100, target)
        assert torch.equal(loop.masked_mse(p2, t2, weights), base)
    # gradients do not reach land cells either
    p = pred.clone().requires_grad_(True)
    loop.masked_mse(p, target, weights).backward()
    assert torch.all(p.grad[..., land] == 0) and torch.any(p.grad[..., ~land] != 0)


def test_index_batches_and_cap() -> None:
    order = torch.tensor([4, 2, 0, 1, 3])
    assert loop.index_batches(order, 2) == [[4, 2], [0, 1], [3]]
    assert loop.index_batches(order, 2, max_batches=2) == [[4, 2], [0, 1]]


def test_schedules_and_devices_are_the_listed_choices() -> None:
    from conv2dlstm.training.devices import DEVICES, resolve_device

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for name in loop.LR_SCHEDULES:
        loop.make_scheduler(name, optimizer, epochs=2, patience=2)
    with pytest.raises(ConfigError, match="train.lr_schedule 'linear' is not one of cosine, plateau, constant"):
        loop.make_scheduler("linear", optimizer, epochs=2, patience=2)
    assert DEVICES == ("auto", "cpu", "cuda") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device 'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")


# ---------------------------------------------------------------------------------------------
# Training with MLflow
# ---------------------------------------------------------------------------------------------


def test_short_training_logs_run_model_and_artifacts(tmp_path) -> None:
    import mlflow.pytorch
    from mlflow import MlflowClient

    fx = make_windows_store(tmp_path / "w.zarr", n_time=40, height=10, width=12)
    cfg = tiny_config(tmp_path)
    out = tmp_path / "train" / "convlstm"
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]

    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == list(train.HISTORY_COLUMNS)

    # checkpoint layout, and load_model from the file alone
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == 2 and ckpt["config"] == cfg
    record = provenance.for_step(cfg, "train", {"windows": fx.windows_digest, "stats": fx.stats_digest})
    assert ckpt["provenance"] == record and ckpt["result_config"] == keys.result_config(cfg, "train")
    for name in ("best.pt", "model.pt"):
        assert checkpoint.read_provenance(out / name) == record
        assert digests.digest_of(out / name) == record["digest"]
    assert train.is_complete(out, record["digest"]) and not train.is_complete(out, "0" * 16)
    assert ckpt["input_variables"] == ["sst"] and ckpt["target_variables"] == ["sst"]
    model, best = load_model(out / "best.pt")
    assert best["epoch"] == best["best_epoch"] and best["best_val_loss"] == min(float(r["val_loss"]) for r in rows)
    x = torch.from_numpy(np.stack([fx.normalized[s : s + 3] for s in fx.starts["val"][:2]]))  # (2, 3, 1, 10, 12)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (2, 2, 1, 10, 12)

    # the MLflow run, read back from the sqlite store
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    assert best["mlflow_run_id"] == run_id
    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "convlstm"
    assert client.get_experiment(run.info.experiment_id).name == "test-train"
    assert run.data.params == flatten(cfg)
    for name in ("train_loss", "val_loss", "lr", "samples_per_s"):
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name
    assert [
        m.value for m in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    ] == pytest.approx([float(r["val_loss"]) for r in rows])
    tags = run.data.tags
    assert tags["stats_sha256"] == tags["data.stats_sha256"]
    assert tags["provenance.digest"] == record["digest"] and tags["provenance.inputs.windows"] == fx.windows_digest
    assert tags["provenance.config_digest"] == keys.result_digest(cfg, "train")
    assert "superseded" not in tags and "supersedes" not in tags
    assert tags["device"] == "cpu" and "git.commit" in tags and "version.torch" in tags
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "model_summary.txt", "history.csv"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]

    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(logged) == 1 and logged[0].source_run_id == run_id
    loaded = mlflow.pytorch.load_model(logged[0].model_uri)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)

    # a complete run returns at once, without a new MLflow run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_unreachable_tracking_server_fails_before_training(tmp_path, monkeypatch) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fx = make_windows_store(tmp_path / "w.zarr", n_time=20, height=6, width=7)
    out = tmp_path / "out"
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        train.main(tiny_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    assert not out.exists()


def test_no_validation_windows(tmp_path) -> None:
    fx = make_windows_store(
        tmp_path / "w.zarr", n_time=20, height=6, width=7, input_steps=3, lead_steps=2, split_fractions=(0.7, 0.1, 0.2)
    )
    with pytest.raises(DataError, match="no val windows; lengthen splits.val"):
        train.main(tiny_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Resume only the same provenance; otherwise start afresh
# ---------------------------------------------------------------------------------------------


def quick_config(tmp_path: Path, **train_overrides) -> dict:
    cfg = tiny_config(tmp_path, epochs=1, **train_overrides)
    cfg["mlflow"]["log_model"] = False
    return cfg


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stale_folders(out: Path) -> list[Path]:
    return sorted((out / train.STALE_DIR).iterdir()) if (out / train.STALE_DIR).is_dir() else []


def fresh_start_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "conv2dlstm.steps.train" and r.levelno == logging.WARNING and "starting fresh" in r.getMessage()
    ]


def test_changed_learning_rate_starts_afresh_in_a_new_mlflow_run(tmp_path, caplog) -> None:
    """The issue: after a complete run, train.learning_rate changes and Snakemake reruns train (it
    deletes model.pt). Training must not 'resume' the finished last.pt but train anew, in a new MLflow
    run holding the new rate, and keep the old files and run (tagged superseded)."""
    from mlflow import MlflowClient

    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    out = tmp_path / "out"
    old_cfg = quick_config(tmp_path)
    train.main(old_cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    old_run_id = (out / "mlflow_run_id.txt").read_text().strip()
    old_weights = weights(out / "model.pt")
    (out / "model.pt").unlink()  # what Snakemake does before rerunning the rule

    new_cfg = quick_config(tmp_path, learning_rate=0.02)
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        train.main(new_cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)

    # the warning names the changed key with both values, and where the old files went
    [warning] = fresh_start_warnings(caplog)
    assert "train.learning_rate: 0.01 -> 0.02" in warning and "input" not in warning
    assert "resuming" not in caplog.text
    [folder] = stale_folders(out)
    assert str(folder) in warning
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["last.pt", "best.pt", "history.csv", "mlflow_run_id.txt", "model_summary.txt"]
    )
    stale = torch.load(folder / "last.pt", weights_only=True)
    assert stale["finished"] and stale["result_config"]["train"]["learning_rate"] == 0.01
    assert (folder / "mlflow_run_id.txt").read_text().strip() == old_run_id

    # a real training with the new rate: the weights of a run from scratch in an empty directory
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["config"]["train"]["learning_rate"] == 0.02 and ckpt["epoch"] == 1
    assert ckpt["provenance"]["digest"] == train.train_record(new_cfg, fx.store, fx.stats)["digest"]
    assert not same_weights(ckpt["model_state"], old_weights)
    scratch = tmp_path / "scratch"
    train.main(new_cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=scratch)
    assert same_weights(ckpt["model_state"], weights(scratch / "model.pt"))
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [(r["epoch"], float(r["lr"])) for r in rows] == [("1", 0.02)]

    # MLflow: a new run with the new rate; the old one keeps its rate and is tagged superseded
    client = MlflowClient(new_cfg["mlflow"]["tracking_uri"])
    new_run_id = (out / "mlflow_run_id.txt").read_text().strip()
    assert new_run_id != old_run_id and ckpt["mlflow_run_id"] == new_run_id
    new_run, old_run = client.get_run(new_run_id), client.get_run(old_run_id)
    assert new_run.data.params["train.learning_rate"] == "0.02" and new_run.info.status == "FINISHED"
    assert old_run.data.params["train.learning_rate"] == "0.01"
    assert old_run.data.tags["superseded"] == "true" and old_run.data.tags["superseded_by"] == new_run_id
    assert new_run.data.tags["supersedes"] == old_run_id and "superseded" not in new_run.data.tags
    assert new_run.data.tags["provenance.digest"] == ckpt["provenance"]["digest"]
    assert [m.step for m in client.get_metric_history(new_run_id, "val_loss")] == [1]


def test_changed_input_starts_afresh(tmp_path, caplog) -> None:
    """Fixing bad input data rebuilds the windows store: the model trained on the old data is not resumed."""
    out = tmp_path / "out"
    cfg = quick_config(tmp_path)
    bad = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7, seed=0)
    train.main(cfg, run="convlstm", windows=bad.store, stats=bad.stats, out_dir=out)
    good = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7, seed=1)  # same paths, other data
    assert good.windows_digest != bad.windows_digest
    record = train.train_record(cfg, good.store, good.stats)
    assert not train.is_complete(out, record["digest"])  # model.pt exists, but of other inputs
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        train.main(cfg, run="convlstm", windows=good.store, stats=good.stats, out_dir=out)
    [warning] = fresh_start_warnings(caplog)
    assert f"input windows changed: {bad.windows_digest} -> {good.windows_digest}" in warning
    assert "train.learning_rate" not in warning
    [folder] = stale_folders(out)
    assert "model.pt" in {p.name for p in folder.iterdir()}
    assert torch.load(out / "model.pt", weights_only=True)["provenance"] == record
    assert train.is_complete(out, record["digest"])


def test_identical_config_resumes_the_same_mlflow_run(tmp_path, caplog) -> None:
    """Same result configuration and inputs (a runtime key may differ): a true resume, same MLflow run."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    out = tmp_path / "out"
    cfg = quick_config(tmp_path)
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    before = weights(out / "model.pt")
    (out / "model.pt").unlink()
    runtime_change = quick_config(tmp_path, data_on_device="never")  # runtime key: not in the digest
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        train.main(runtime_change, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    assert not fresh_start_warnings(caplog) and not stale_folders(out)
    assert any("resuming run convlstm after epoch 1" in r.getMessage() for r in caplog.records)
    assert (out / "mlflow_run_id.txt").read_text().strip() == run_id
    assert same_weights(before, weights(out / "model.pt"))


def test_another_model_starts_afresh(tmp_path, caplog) -> None:
    """A model built differently (other model_kwargs) is another training, not an error."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    out = tmp_path / "out"
    train.main(quick_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    (out / "model.pt").unlink()  # as if unfinished
    other = quick_config(tmp_path)
    other["model"]["convlstm"]["hidden_channels"] = [4, 8]
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        train.main(other, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    [warning] = fresh_start_warnings(caplog)
    assert "model.convlstm.hidden_channels: [4, 4] -> [4, 8]" in warning
    assert torch.load(out / "model.pt", weights_only=True)["model_kwargs"]["hidden_channels"] == [4, 8]
    assert len(stale_folders(out)) == 1


def test_resume_problems_names_each_difference() -> None:
    kwargs = {"hidden_channels": [4]}
    old_cfg = {"train": {"learning_rate": 0.01, "epochs": 2}}
    new_cfg = {"train": {"learning_rate": 0.02, "epochs": 2}}
    old = provenance.make_record("train", "a" * 16, {"windows": "w1", "stats": "s"})
    ckpt = {
        "format_version": checkpoint.FORMAT_VERSION,
        "model_name": "convlstm",
        "model_kwargs": kwargs,
        "provenance": old,
        "result_config": old_cfg,
    }
    same = dict(model_name="convlstm", model_kwargs=kwargs)
    assert train.resume_problems(ckpt, old, result_config=old_cfg, **same) == []
    new = provenance.make_record("train", "b" * 16, {"windows": "w2", "stats": "s"})
    assert train.resume_problems(ckpt, new, result_config=new_cfg, **same) == [
        "train.learning_rate: 0.01 -> 0.02",
        "input windows changed: w1 -> w2",
    ]
    assert train.resume_problems(
        ckpt, old, result_config=old_cfg, model_name="convlstm", model_kwargs={"hidden_channels": [8]}
    )[0].startswith("it holds a convlstm model")
    legacy = {k: v for k, v in ckpt.items() if k != "provenance"}
    assert "no provenance record" in train.resume_problems(legacy, old, result_config=old_cfg, **same)[0]
    assert (
        "checkpoint format"
        in train.resume_problems({**ckpt, "format_version": 0}, old, result_config=old_cfg, **same)[0]
    )


def test_retire_files_moves_into_a_new_timestamped_folder(tmp_path) -> None:
    import datetime as dt

    now = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    for name in ("last.pt", "history.csv"):
        (tmp_path / name).write_text(name)
    first = train.retire_files(tmp_path, now=now)
    assert first == tmp_path / "stale" / "20240506T070809Z"
    assert sorted(p.name for p in first.iterdir()) == ["history.csv", "last.pt"]
    assert not (tmp_path / "last.pt").exists()
    (tmp_path / "last.pt").write_text("again")
    assert train.retire_files(tmp_path, now=now) == tmp_path / "stale" / "20240506T070809Z-2"
    assert train.retire_files(tmp_path, now=now) is None  # nothing left to move


def test_train_discards_partials_of_a_killed_attempt(tmp_path, caplog) -> None:
    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".last.pt.1234abcd.partial").write_bytes(b"half a checkpoint")
    (out / ".history.csv.deadbeef.partial").write_text("epoch")
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        train.main(quick_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    assert not list(out.glob(".*.partial"))
    assert sum("discarded" in r.getMessage() and ".partial" in r.getMessage() for r in caplog.records) == 2
    assert not stale_folders(out)  # partials alone are no earlier training


def test_an_unreadable_last_checkpoint_is_set_aside_and_training_starts_afresh(tmp_path, caplog) -> None:
    """A truncated ``last.pt`` (a full disk, a kill mid-write outside the atomic writer) does not stop
    the rerun: it goes into the stale folder with the run's other files, named in the log, and the
    run trains from scratch to the weights of a run that never had it."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    reference, out = tmp_path / "reference", tmp_path / "out"
    train.main(quick_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=reference)
    out.mkdir()
    (out / "last.pt").write_bytes((reference / "last.pt").read_bytes()[:1000])  # truncated
    (out / "history.csv").write_text("epoch,train_loss\n1,0.5\n")
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        train.main(quick_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    (folder,) = stale_folders(out)
    assert (folder / "last.pt").read_bytes() == (reference / "last.pt").read_bytes()[:1000]
    assert any("cannot be read" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    a = torch.load(reference / "model.pt", weights_only=True)["model_state"]
    b = torch.load(out / "model.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conv2d_lstm_streaming_from_zarr(tmp_path) -> None:
    """The notebook network, windows streamed from Zarr, latitude-weighted loss, plateau schedule."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=30, height=12, width=10)
    cfg = tiny_config(
        tmp_path,
        epochs=2,
        data_on_device="never",
        latitude_weighted_loss=True,
        lr_schedule="plateau",
        max_batches_per_epoch=2,
    )
    cfg["model"]["name"] = "conv2d_lstm"
    cfg["model"]["conv2d_lstm"].update({"filters": [4, 4], "lstm_units": 8, "dense_units": 8})
    cfg["mlflow"]["log_model"] = False
    out = tmp_path / "out"
    train.main(cfg, run="nb", windows=fx.store, stats=fx.stats, out_dir=out)
    model, ckpt = load_model(out / "model.pt")
    assert ckpt["model_name"] == "conv2d_lstm" and ckpt["model_kwargs"]["filters"] == [4, 4]
    assert "model: conv2d_lstm" in (out / "model_summary.txt").read_text()
    assert len(list(csv.DictReader(open(out / "history.csv")))) == 2


def test_multi_process_inputs_checked_before_launching(tmp_path) -> None:
    """train.gpus > 1 checks its inputs in the launching process: no worker starts, nothing is written
    (the data-parallel training itself is tested in test_ddp.py)."""
    cfg = tiny_config(tmp_path, gpus=2)
    with pytest.raises(DataError, match="windows store .*w.zarr does not exist"):
        train.main(cfg, run="r", windows=tmp_path / "w.zarr", stats=tmp_path / "s.nc", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def masked_loss_np(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    return float(((pred - target) ** 2)[..., mask].mean())


def test_training_learns_moving_pattern(tmp_path) -> None:
    """A pattern moving one cell per step: the net must beat predicting the mean (0) and persistence."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=100, height=10, width=12, input_steps=3, lead_steps=2)
    cfg = tiny_config(tmp_path, epochs=8, lr_schedule="cosine")
    cfg["model"]["convlstm"]["hidden_channels"] = [8, 8]
    cfg["mlflow"]["log_model"] = False
    out = tmp_path / "out"
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    starts = fx.starts["val"]
    y = np.stack([fx.normalized[s + 3 : s + 5] for s in starts])  # (n, 2, 1, H, W)
    last = np.stack([fx.normalized[s + 2 : s + 3] for s in starts])  # (n, 1, 1, H, W)
    zero_loss = masked_loss_np(np.zeros_like(y), y, fx.mask)
    persistence_loss = masked_loss_np(np.broadcast_to(last, y.shape), y, fx.mask)
    best_val = torch.load(out / "best.pt", weights_only=True)["best_val_loss"]
    assert zero_loss > 0.5
    assert best_val < 0.3 * zero_loss
    assert best_val < 0.3 * persistence_loss


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM, resume, identical weights
# ---------------------------------------------------------------------------------------------

CHILD = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from conv2dlstm.steps.train import main
cfg, windows, stats, out = json.loads(sys.argv[1]), *map(Path, sys.argv[2:5])
main(cfg, run="r", windows=windows, stats=stats, out_dir=out)
"""


def child(cfg: dict, fx, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg), str(fx.store), str(fx.stats), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> int:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode in (0, 143), output
    return proc.returncode


def test_sigterm_then_resume_gives_identical_weights(tmp_path) -> None:
    from mlflow import MlflowClient

    # ~0.3 s per epoch on one thread: the signal lands during epoch 2 with epochs to spare.
    fx = make_windows_store(tmp_path / "w.zarr", n_time=160, height=20, width=20)
    cfg = tiny_config(tmp_path, epochs=8, batch_size=2, patience=10)
    cfg["model"]["convlstm"]["hidden_channels"] = [8, 8]
    cfg["mlflow"]["log_model"] = False

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    ref_proc = child(cfg, fx, reference)  # uninterrupted, alongside (both share the sqlite store)
    proc = child(cfg, fx, interrupted)
    deadline = time.monotonic() + 120
    while not (interrupted / "history.csv").exists():  # written after epoch 1
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    run_id = (interrupted / "mlflow_run_id.txt").read_text().strip()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output
    state = torch.load(interrupted / "last.pt", weights_only=True)
    assert not state["finished"] and 1 <= state["epoch"] < 8
    assert (
        "stopped on SIGTERM" in output
        and f"a rerun resumes from {interrupted / 'last.pt'} after epoch {state['epoch']}" in output
    ), output
    assert not (interrupted / "model.pt").exists()
    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    assert client.get_run(run_id).info.status == "KILLED"

    assert finish(ref_proc) == 0
    assert finish(child(cfg, fx, interrupted)) == 0  # resume
    assert (interrupted / "mlflow_run_id.txt").read_text().strip() == run_id
    assert not (interrupted / train.STALE_DIR).exists()
    for name in ("best.pt", "last.pt", "model.pt"):
        a = torch.load(reference / name, weights_only=True)
        b = torch.load(interrupted / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and a["best_epoch"] == b["best_epoch"]
        assert a["model_state"].keys() == b["model_state"].keys()
        for key in a["model_state"]:
            assert torch.equal(a["model_state"][key], b["model_state"][key]), (name, key)
    rows = [list(csv.DictReader(open(d / "history.csv"))) for d in (reference, interrupted)]
    assert [(r["train_loss"], r["val_loss"]) for r in rows[0]] == [(r["train_loss"], r["val_loss"]) for r in rows[1]]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, 9))


def test_deadline_checkpoints_before_the_time_limit_and_resumes(tmp_path) -> None:
    """`train --time-limit-minutes` stops at the job's own deadline (no scheduler signal needed)."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=80, height=12, width=10)
    cfg = tiny_config(tmp_path, epochs=3, batch_size=4, patience=10)
    cfg["model"]["convlstm"]["hidden_channels"] = [4]
    cfg["mlflow"]["log_model"] = False
    cfg["runs"] = []
    run = cfg["model"]["name"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CONV2DLSTM_TRAIN_DEADLINE")}
    env["OMP_NUM_THREADS"] = "1"

    def cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "conv2dlstm",
                "train",
                "--config-json",
                json.dumps(cfg),
                "--run",
                run,
                "--windows",
                str(fx.store),
                "--stats",
                str(fx.stats),
                "--out-dir",
                str(out),
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    reference, limited = tmp_path / "reference", tmp_path / "limited"
    assert cli(reference).returncode == 0
    # A limit this short is already over when training starts: it stops at the first batch boundary.
    proc = cli(limited, "--time-limit-minutes", "0.0001")
    assert proc.returncode == 128 + signal.SIGALRM, proc.stdout + proc.stderr
    state = torch.load(limited / "last.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] == 0
    assert "WARNING" in proc.stderr and "stopped on the job's time limit" in proc.stderr
    assert "resumes from" in proc.stderr and "after epoch 0" in proc.stderr
    assert not (limited / "model.pt").exists()
    assert cli(limited, "--time-limit-minutes", "60").returncode == 0  # resume, well within the limit
    a = torch.load(reference / "model.pt", weights_only=True)["model_state"]
    b = torch.load(limited / "model.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_deadline_keeps_a_margin():
    from conv2dlstm.training.preemption import DEADLINE_ENV, set_deadline

    env: dict[str, str] = {}
    now = time.time()
    deadline = set_deadline(120, environ=env)
    assert float(env[DEADLINE_ENV]) == pytest.approx(deadline, abs=1e-3)
    assert deadline - now == pytest.approx(120 * 60 - 360, abs=5)  # 5% of 2 h
    assert set_deadline(24 * 60, environ=env) - time.time() == pytest.approx(24 * 3600 - 600, abs=5)  # at most 10 min


def test_nonnegative_target_is_trained_with_its_floor_from_the_statistics(tmp_path) -> None:
    """A concentration target: the checkpoint's model floors it at -mean/std of the statistics, and the
    model rebuilt from the file alone predicts nothing below 0 physical units, even for inputs far
    below anything seen in training."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=30, height=12, width=10, variables=("no3",))
    cfg = quick_config(tmp_path)
    cfg["variables"].update({"inputs": ["no3"], "targets": ["no3"]})
    out = tmp_path / "out"
    train.main(cfg, run="no3", windows=fx.store, stats=fx.stats, out_dir=out)
    model, ckpt = load_model(out / "model.pt")
    assert ckpt["model_kwargs"]["nonnegative_channels"] == [0] and ckpt["model_kwargs"]["floor_per_cell"] is False
    floor = ckpt["model_state"]["output_floor.floor"]
    assert torch.allclose(floor.flatten(), torch.tensor([-fx.mean[0] / fx.std[0]]), rtol=1e-6)
    x = torch.full((2, fx.input_steps, 1, 12, 10), -50.0)  # normalized: far below 0 physical
    with torch.no_grad():
        physical = model(x) * float(fx.std[0]) + float(fx.mean[0])
    assert (physical >= -1e-5).all()
