"""Training: masked loss, MLflow records in a real sqlite store, learning a toy, kill-and-resume identity."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conv2dlstm import train
from conv2dlstm.config import flatten, validate_config
from conv2dlstm.errors import ConfigError, DataError, TrackingError
from conv2dlstm.models import load_model
from tests._windows_fixture import make_windows_store

OUTPUTS = {"best.pt", "last.pt", "model.pt", "history.csv", "mlflow_run_id.txt", "model_summary.txt"}


def tiny_config(tmp_path: Path, **train_overrides) -> dict:
    return validate_config({
        "experiment": "test-train",
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4, 4]}},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01, "device": "cpu"} | train_overrides,
    })


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
    plain = train.masked_mse(pred, target, train.loss_weights(mask, lat, False))
    assert plain.item() == pytest.approx((1 + 4 + 1) / 3)
    weighted = train.masked_mse(pred, target, train.loss_weights(mask, lat, True))
    assert weighted.item() == pytest.approx((1 * 1 + 0.5 * 4 + 0.5 * 1) / (1 + 0.5 + 0.5))


@pytest.mark.parametrize("latitude_weighted", [False, True])
def test_land_values_cannot_change_the_loss(latitude_weighted: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    mask = np.ones((6, 7), dtype=bool)
    mask[:, :2] = False
    mask[3, 4] = False
    weights = train.loss_weights(mask, np.linspace(-60, 60, 6), latitude_weighted)
    pred = torch.randn(3, 2, 2, 6, 7, generator=gen)
    target = torch.randn(3, 2, 2, 6, 7, generator=gen)
    base = train.masked_mse(pred, target, weights)
    land = torch.from_numpy(~mask)
    for fill in (1e6, -3.0, float("nan"), float("inf")):
        p2 = torch.where(land, torch.full_like(pred, fill), pred)
        t2 = torch.where(land, torch.randn(3, 2, 2, 6, 7, generator=gen) * 100, target)
        assert torch.equal(train.masked_mse(p2, t2, weights), base)
    # gradients do not reach land cells either
    p = pred.clone().requires_grad_(True)
    train.masked_mse(p, target, weights).backward()
    assert torch.all(p.grad[..., land] == 0) and torch.any(p.grad[..., ~land] != 0)


def test_index_batches_and_cap() -> None:
    order = torch.tensor([4, 2, 0, 1, 3])
    assert train.index_batches(order, 2) == [[4, 2], [0, 1], [3]]
    assert train.index_batches(order, 2, max_batches=2) == [[4, 2], [0, 1]]


# ---------------------------------------------------------------------------------------------
# Training with MLflow
# ---------------------------------------------------------------------------------------------


def test_short_training_logs_run_model_and_artifacts(tmp_path) -> None:
    from mlflow import MlflowClient
    import mlflow.pytorch

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
    assert ckpt["input_variables"] == ["sst"] and ckpt["target_variables"] == ["sst"]
    model, best = load_model(out / "best.pt")
    assert best["epoch"] == best["best_epoch"] and best["best_val_loss"] == min(float(r["val_loss"]) for r in rows)
    x = torch.from_numpy(np.stack([fx.normalized[s:s + 3] for s in fx.starts["val"][:2]]))  # (2, 3, 1, 10, 12)
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
    assert [m.value for m in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)] \
        == pytest.approx([float(r["val_loss"]) for r in rows])
    tags = run.data.tags
    assert tags["stats_sha256"] == tags["data.stats_sha256"]
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
    fx = make_windows_store(tmp_path / "w.zarr", n_time=20, height=6, width=7, input_steps=3, lead_steps=2,
                            split_fractions=(0.7, 0.1, 0.2))
    with pytest.raises(DataError, match="no val windows; lengthen splits.val"):
        train.main(tiny_config(tmp_path), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_resume_with_another_model_refused(tmp_path) -> None:
    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path, epochs=1)
    cfg["mlflow"]["log_model"] = False
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
    (out / "model.pt").unlink()  # as if unfinished
    other = tiny_config(tmp_path, epochs=1)
    other["model"]["convlstm"]["hidden_channels"] = [4, 8]
    with pytest.raises(ConfigError, match=f"delete {out} to train this run from scratch"):
        train.main(other, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)


def test_conv2d_lstm_streaming_from_zarr(tmp_path) -> None:
    """The notebook network, windows streamed from Zarr, latitude-weighted loss, plateau schedule."""
    fx = make_windows_store(tmp_path / "w.zarr", n_time=30, height=12, width=10)
    cfg = tiny_config(tmp_path, epochs=2, data_on_device="never", latitude_weighted_loss=True,
                      lr_schedule="plateau", max_batches_per_epoch=2)
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
    y = np.stack([fx.normalized[s + 3:s + 5] for s in starts])  # (n, 2, 1, H, W)
    last = np.stack([fx.normalized[s + 2:s + 3] for s in starts])  # (n, 1, 1, H, W)
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
from conv2dlstm.train import main
cfg, windows, stats, out = json.loads(sys.argv[1]), *map(Path, sys.argv[2:5])
main(cfg, run="r", windows=windows, stats=stats, out_dir=out)
"""


def child(cfg: dict, fx, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(cfg), str(fx.store), str(fx.stats), str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
    assert finish(proc) == 143
    state = torch.load(interrupted / "last.pt", weights_only=True)
    assert not state["finished"] and 1 <= state["epoch"] < 8
    assert not (interrupted / "model.pt").exists()
    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    assert client.get_run(run_id).info.status == "KILLED"

    assert finish(ref_proc) == 0
    assert finish(child(cfg, fx, interrupted)) == 0  # resume
    assert (interrupted / "mlflow_run_id.txt").read_text().strip() == run_id
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
            [sys.executable, "-m", "conv2dlstm", "train", "--config-json", json.dumps(cfg), "--run", run,
             "--windows", str(fx.store), "--stats", str(fx.stats), "--out-dir", str(out), *extra],
            env=env, capture_output=True, text=True, timeout=300,
        )

    reference, limited = tmp_path / "reference", tmp_path / "limited"
    assert cli(reference).returncode == 0
    # A limit this short is already over when training starts: it stops at the first batch boundary.
    proc = cli(limited, "--time-limit-minutes", "0.0001")
    assert proc.returncode == 128 + signal.SIGALRM, proc.stdout + proc.stderr
    state = torch.load(limited / "last.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] == 0
    assert not (limited / "model.pt").exists()
    assert cli(limited, "--time-limit-minutes", "60").returncode == 0  # resume, well within the limit
    a = torch.load(reference / "model.pt", weights_only=True)["model_state"]
    b = torch.load(limited / "model.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_deadline_keeps_a_margin():
    from conv2dlstm.train import DEADLINE_ENV, set_deadline

    env: dict[str, str] = {}
    now = time.time()
    deadline = set_deadline(120, environ=env)
    assert float(env[DEADLINE_ENV]) == pytest.approx(deadline, abs=1e-3)
    assert deadline - now == pytest.approx(120 * 60 - 360, abs=5)  # 5% of 2 h
    assert set_deadline(24 * 60, environ=env) - time.time() == pytest.approx(24 * 3600 - 600, abs=5)  # at most 10 min
