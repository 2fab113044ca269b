"""The seed task, the notebook's network on fe, po4, si -> NO3, run by the real Snakemake (minutes).
In a file of its own so that it runs next to the default pipeline's tests (``make test``: two workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts.windows_store import WindowsStore
from tests.e2e.test_quickstart import model_beats_baselines
from tests.support.workflow import copy_workflow, run_snakemake

pytestmark = pytest.mark.e2e


def test_seed_no3_pipeline(tmp_path: Path):
    """The notebook's task and network (config/seed_no3.yaml) learn what the notebook could not. The
    shipped config trains up to 60 epochs; skill over climatology and half the mean-predictor loss
    come within 25 (each extra configfile updates the ones before it, key by key). With two training
    years before its test period, the seed task also scores extreme NO3 events end to end."""
    wf = copy_workflow(tmp_path / "wf")
    (wf / "fewer_epochs.yaml").write_text("train: {epochs: 25}\nevaluate: {events: {variables: [no3]}}\n")
    run_snakemake(wf, "--cores", "2", "--configfile", "config/seed_no3.yaml", "fewer_epochs.yaml")
    out = wf / "results/seed_no3"
    ds = xr.open_zarr(out / "windows/seed_no3.zarr")
    assert (ds.sizes["lat"], ds.sizes["lon"]) == (48, 28)
    assert ds.attrs["input_variables"] == ["fe", "po4", "si"]
    assert ds.attrs["target_variables"] == ["no3"]
    history = pd.read_csv(out / "train/conv2d_lstm/history.csv")
    assert 0 < len(history) <= 25
    # The notebook's loss stayed flat. Predicting the training mean is predicting 0 in normalized
    # units: its masked validation MSE is the mean of y^2 over ocean cells.
    store = WindowsStore(out / "windows/seed_no3.zarr")
    ys = np.stack([store.sample("val", i)[1] for i in range(len(store.starts("val")))])
    mean_loss = float((ys**2)[..., store.mask].mean())
    assert history["val_loss"].min() < 0.5 * mean_loss, (history["val_loss"].min(), mean_loss)
    metrics = pd.read_csv(out / "evaluate/conv2d_lstm/metrics.csv")
    model_beats_baselines(metrics, "no3", ("climatology",))
    assert np.isfinite(metrics["value"][metrics.metric == "rmse"]).all()
    # the 90th-percentile events of the two training years: scored, with intervals, for every forecast
    events = metrics[metrics["metric"].str.startswith("event_")]
    assert set(events["model"]) == set(metrics["model"]), set(events["model"])
    assert (events[events["metric"] == "event_meaningful"]["value"] == 1).all()
    for metric in ("event_pod", "event_far", "event_sedi", "event_ets", "event_sedi_lower", "event_sedi_upper"):
        values = events[events["metric"] == metric].set_index("model")["value"]
        assert values.notna().all() and (values.abs() <= 1).all(), (metric, values)
    base_rate = events[events["metric"] == "event_base_rate"]["value"]
    assert ((base_rate > 0) & (base_rate < 0.5)).all(), base_rate  # events, rarer than not (0.25 here)
