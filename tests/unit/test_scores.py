"""The score registry (conv2dlstm.evaluation.scores.SCORES): a metric is one entry, and the streaming
table scores every forecast with every entry, on a small case with known values."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from conv2dlstm.evaluation import metrics, scores


def _case() -> tuple[dict[str, xr.DataArray], xr.DataArray, xr.DataArray, xr.DataArray]:
    """Two initial times, one lead, one variable, a 2 x 2 ocean of equal weights: the model is off by
    +1 everywhere, persistence by -2 and climatology by +3."""
    dims = ("time", "lead", "variable", "lat", "lon")
    coords = {"time": [0, 1], "lead": [1], "variable": ["sst"], "lat": [0.0, 1.0], "lon": [0.0, 1.0]}
    truth = xr.DataArray(np.arange(8, dtype="float64").reshape(2, 1, 1, 2, 2), dims=dims, coords=coords)
    forecasts = {"model": truth + 1.0, "persistence": truth - 2.0, "climatology": truth + 3.0}
    weights = xr.DataArray(np.ones((2, 2)), dims=("lat", "lon"), coords={"lat": [0.0, 1.0], "lon": [0.0, 1.0]})
    return forecasts, truth, truth + 3.0, weights


def test_every_forecast_gets_every_score_with_known_values() -> None:
    forecasts, truth, climatology, weights = _case()
    table = scores.StreamingScores(weights)
    table.add(forecasts, truth, climatology)
    means = table.time_means()
    assert set(means["model"]) == set(scores.SCORES)
    assert set(means["climatology"]) == {m for m, s in scores.SCORES.items() if s.of_climatology}
    value = {name: {m: float(v.squeeze()) for m, v in by.items()} for name, by in means.items()}
    assert value["model"]["rmse"] == pytest.approx(1.0) and value["persistence"]["rmse"] == pytest.approx(2.0)
    assert value["persistence"]["bias"] == pytest.approx(-2.0) and value["climatology"]["mae"] == pytest.approx(3.0)


def test_a_new_score_is_one_entry(monkeypatch) -> None:
    """Registering a score is all it takes for it to reach the tidy table of every forecast."""
    largest = scores.Score(lambda f, t, c, w: abs(f - t).max(("lat", "lon")))
    monkeypatch.setitem(scores.SCORES, "max_abs_error", largest)
    forecasts, truth, climatology, weights = _case()
    table = scores.StreamingScores(weights)
    table.add(forecasts, truth, climatology)
    rows = table.table()
    got = rows[rows["metric"] == "max_abs_error"].set_index("model")["value"]
    assert got.to_dict() == pytest.approx({"model": 1.0, "persistence": 2.0, "climatology": 3.0})


def test_the_bootstrapped_score_is_the_mse_series() -> None:
    forecasts, truth, climatology, weights = _case()
    table = scores.StreamingScores(weights)
    table.add(forecasts, truth, climatology)
    series = table.mse_series()["persistence"]
    expected = metrics.mse_per_time(forecasts["persistence"], truth, weights)
    np.testing.assert_allclose(series.values, expected.transpose("time", "lead", "variable").values)
