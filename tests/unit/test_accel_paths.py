"""The CPU side of the GPU features: bfloat16 autocast, ``torch.compile`` and the device-resident data.

CI has no GPU. These tests run the same code the GPU path runs, on the CPU (every network's forward,
masked loss and backward under bfloat16 autocast is a check of the network contract,
tests/unit/test_networks.py): a training run with ``train.compile: true``
(TorchInductor, compiling C++ with the machine's compiler) against the same run in eager mode; and
training from windows held in memory (``train.data_on_device: always``, what a GPU run does) against
streaming them from Zarr (``never``).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from conv2dlstm.config.validate import validate_config
from conv2dlstm.steps import train
from tests.support.windows_fixture import make_windows_store


def _config(tmp_path: Path, name: str = "convlstm", **train_overrides) -> dict:
    return validate_config(
        {
            "experiment": "test-accel",
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": False},
            "model": {
                "name": name,
                "convlstm": {"hidden_channels": [4]},
                "conv2d_lstm": {"filters": [4, 8], "lstm_units": 8, "dense_units": 8},
            },
            "train": {"epochs": 1, "batch_size": 4, "learning_rate": 0.01, "device": "cpu"} | train_overrides,
        }
    )


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _train(tmp_path: Path, tag: str, fx, **train_overrides) -> list[dict[str, str]]:
    out = tmp_path / tag
    train.main(
        _config(tmp_path / tag, **train_overrides), run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out
    )
    assert (out / "model.pt").is_file()
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="no C/C++ compiler")
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    """``train.compile: true`` trains through TorchInductor's C++ kernels; its losses equal eager mode's
    to float32 rounding (the kernels fuse, so the last bits may differ)."""
    import torch._inductor.config as inductor

    torch.set_num_threads(1)
    # 14 training and 2 validation windows in batches of 2: one batch shape, so one graph for
    # training and one for validation (a partial last batch would compile a third)
    fx = make_windows_store(tmp_path / "w.zarr", n_time=30, height=6, width=7)
    run = {"batch_size": 2, "max_batches_per_epoch": 3}
    eager = _train(tmp_path, "eager", fx, compile=False, **run)
    compile_threads = inductor.compile_threads
    inductor.compile_threads = 1  # no pool of compile workers to start on a small machine
    try:
        compiled = _train(tmp_path, "compiled", fx, compile=True, **run)
    finally:
        inductor.compile_threads = compile_threads
    assert len(eager) == len(compiled) == 1
    for key in ("train_loss", "val_loss"):
        assert float(compiled[0][key]) == pytest.approx(float(eager[0][key]), rel=1e-4), key


def test_device_resident_windows_train_like_streamed_ones(tmp_path: Path) -> None:
    """Windows held in memory (the GPU path: one cube on the device, batches gathered by index) give
    the same training, bit for bit, as windows streamed from Zarr."""
    torch.set_num_threads(1)
    fx = make_windows_store(tmp_path / "w.zarr", n_time=24, height=6, width=7)
    resident = _train(tmp_path, "resident", fx, data_on_device="always", epochs=2)
    streamed = _train(tmp_path, "streamed", fx, data_on_device="never", epochs=2)
    assert [(r["train_loss"], r["val_loss"]) for r in resident] == [(r["train_loss"], r["val_loss"]) for r in streamed]
    a = torch.load(tmp_path / "resident/model.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "streamed/model.pt", weights_only=True)["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
