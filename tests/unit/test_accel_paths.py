"""The CPU side of the GPU features: bfloat16 autocast, ``torch.compile`` and the device-resident data.

CI has no GPU. These tests run the same code the GPU path runs, on the CPU: each model's forward,
masked loss and backward under bfloat16 autocast; a training run with ``train.compile: true``
(TorchInductor, compiling C++ with the machine's compiler) against the same run in eager mode; and
training from windows held in memory (``train.data_on_device: always``, what a GPU run does) against
streaming them from Zarr (``never``).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conv2dlstm.config.validate import validate_config
from conv2dlstm.steps import train
from conv2dlstm.training import loop, models
from conv2dlstm.training.models import build_model, model_kwargs_from_config
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


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bf16_autocast_forward_loss_backward(tmp_path: Path, name: str) -> None:
    """Under bfloat16 autocast the prediction stays close to float32's, the masked loss is a finite
    float32 scalar and every gradient (float32, like the weights) is finite."""
    cfg = _config(tmp_path, name)
    kwargs = model_kwargs_from_config(
        {**cfg["model"], "name": name},
        input_variables=["a", "b"],
        target_variables=["a"],
        input_steps=5,
        lead_steps=3,
        height=12,
        width=16,
    )
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    x = torch.randn(4, 5, 2, 12, 16)  # (batch, time, channel, lat, lon)
    y = torch.randn(4, 3, 1, 12, 16)  # (batch, lead, target, lat, lon)
    mask = np.ones((12, 16), dtype=bool)
    mask[:, :3] = False  # land
    weights = loop.loss_weights(mask, np.linspace(-10, 10, 12), latitude_weighted=True)

    with torch.no_grad():
        reference = model(x)
    conv_dtypes: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: conv_dtypes.append(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x)
        loss = loop.masked_mse(pred, y, weights)
    for hook in hooks:
        hook.remove()
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}  # the convolutions ran in bfloat16
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    scale = reference.abs().max().item()
    assert (pred.float() - reference).abs().max().item() < 0.05 * scale + 0.05
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


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
