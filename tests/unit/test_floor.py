"""The output floor costs no skill: on a record whose test period sits near 0, the same network with
the floor scores an RMSE at or below the unconstrained one's, at every lead (the train and evaluate
steps, on a generated windows store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.config.validate import validate_config
from conv2dlstm.steps import evaluate, train
from tests.support.windows_fixture import make_windows_store, moving_waves


@pytest.fixture(autouse=True)
def _one_thread_no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _near_zero_record(n_time: int = 80, height: int = 8, width: int = 9) -> np.ndarray:
    """A concentration (``(time, 1, lat, lon)``, >= 0) drawn down by 0.5 a day (waves on a falling
    level, as nutrients after a bloom) until it is exhausted, at 0, in the test period. The validation
    period stays above 0, so that the floor never acts on it and both runs keep the same best epoch."""
    waves = (moving_waves(n_time, 1, height, width, seed=3) - 15.0) / 6.0  # about -1..1
    level = 0.5 * (0.875 * n_time - np.arange(n_time))[:, None, None, None]  # 0 at 7/8 of the record
    return np.clip(level + 0.3 * waves, 0.0, None).astype(np.float32)


def _config(tmp_path: Path, nonnegative: list[str]) -> dict:
    return validate_config(
        {
            "experiment": "test-floor",
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": False},
            "variables": {"inputs": ["no3"], "targets": ["no3"], "nonnegative": nonnegative},
            "windows": {"input_steps": 3, "lead_steps": 2},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4]}},
            # the floor does not enter training, nor the validation loss here: both runs train the same weights
            "train": {"epochs": 4, "batch_size": 4, "learning_rate": 0.01, "device": "cpu"},
        }
    )


def test_the_floored_model_is_never_further_from_the_truth(tmp_path: Path) -> None:
    fx = make_windows_store(tmp_path / "w.zarr", variables=("no3",), values=_near_zero_record())
    out = {}
    for label, nonnegative in (("free", []), ("floored", ["no3"])):
        cfg = _config(tmp_path, nonnegative)
        train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=tmp_path / label / "train")
        evaluate.main(
            cfg,
            run="convlstm",
            windows=fx.store,
            stats=fx.stats,
            checkpoint=tmp_path / label / "train" / "model.pt",
            out_dir=tmp_path / label / "evaluate",
        )
        table = pd.read_csv(tmp_path / label / "evaluate" / "metrics.csv")
        rmse = table[(table["model"] == "convlstm") & (table["metric"] == "rmse")].set_index("lead")["value"]
        with predictions_file.open(tmp_path / label / "evaluate" / "predictions.nc") as ds:
            out[label] = (rmse, ds["no3"].values)
    (rmse_free, free), (rmse_floor, floored) = out["free"], out["floored"]
    ocean = np.isfinite(free)
    assert (free[ocean] < 0).any(), "the unconstrained network must go below 0 on this record"
    a, b = (torch.load(tmp_path / k / "train" / "model.pt", weights_only=True) for k in ("free", "floored"))
    assert a["best_epoch"] == b["best_epoch"]
    assert all(torch.equal(v, b["model_state"][k]) for k, v in a["model_state"].items())  # the same weights
    # the floored prediction is max(raw, 0) per cell
    np.testing.assert_allclose(floored[ocean], np.maximum(free[ocean], 0.0), atol=1e-6)
    assert (rmse_floor <= rmse_free + 1e-7).all(), (rmse_floor, rmse_free)
    assert (rmse_floor < rmse_free).any()
