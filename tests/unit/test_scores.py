"""The score registry (conv2dlstm.evaluation.scores.SCORES): a metric is one entry, and the streaming
table scores every forecast with every entry, on a small case with known values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import metrics, scores
from tests.support import reference as _reference
from tests.support.cases import LAT, MASK, batch_slices, cube_shape, forecast_cube


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


def test_score_forecasts_hand_values(scored):
    def value(model, metric, variable="sst", lead=1):
        sel = scored[
            (scored["model"] == model)
            & (scored["metric"] == metric)
            & (scored["variable"] == variable)
            & (scored["lead"] == lead)
        ]
        assert len(sel) == 1
        return float(sel["value"].iloc[0])

    for lead in (1, 2):
        for variable in ("sst", "no3"):
            assert value("model", "rmse", variable, lead) == pytest.approx(1.0)
            assert value("model", "mae", variable, lead) == pytest.approx(1.0)
            assert value("model", "bias", variable, lead) == pytest.approx(1.0)
            assert value("model", "acc", variable, lead) == pytest.approx(1.0)  # anomalies 5 vs 4: perfectly correlated
            assert value("persistence", "rmse", variable, lead) == pytest.approx(2.0)
            assert value("climatology", "rmse", variable, lead) == pytest.approx(4.0)
            assert value("climatology", "bias", variable, lead) == pytest.approx(-4.0)
            assert value("model", "skill_vs_persistence", variable, lead) == pytest.approx(0.5)
            assert value("model", "skill_vs_climatology", variable, lead) == pytest.approx(0.75)
            # constant errors: every resample gives the same skill; the interval is that point
            for baseline, skill in (("persistence", 0.5), ("climatology", 0.75)):
                assert value("model", f"skill_vs_{baseline}_lower", variable, lead) == pytest.approx(skill)
                assert value("model", f"skill_vs_{baseline}_upper", variable, lead) == pytest.approx(skill)
                assert value("model", f"skill_vs_{baseline}_significant", variable, lead) == 1.0
                assert value("model", f"skill_vs_{baseline}_meaningful", variable, lead) == 1.0
            # baselines against the other baselines, never against themselves
            assert value("persistence", "skill_vs_climatology", variable, lead) == pytest.approx(0.5)
            assert value("climatology", "skill_vs_persistence", variable, lead) == pytest.approx(-1.0)
    assert not ((scored["model"] == "climatology") & (scored["metric"] == "acc")).any()
    assert not ((scored["model"] == "persistence") & scored["metric"].str.startswith("skill_vs_persistence")).any()
    # model: 4 scores + 2 x 6 skill rows, persistence 4 + 6, climatology 3 + 6; x 2 variables x 2 leads
    assert len(scored) == (16 + 10 + 9) * 2 * 2


def test_mlflow_metric_names(scored):
    table = scores.metrics_table(scored, run="exp1", model_name="convlstm")
    names = scores.mlflow_metrics(table, model_name="convlstm")
    assert names["test_rmse_sst_lead1"] == pytest.approx(1.0)
    assert names["test_acc_no3_lead2"] == pytest.approx(1.0)
    assert names["persistence_rmse_sst_lead1"] == pytest.approx(2.0)
    assert names["climatology_rmse_no3_lead2"] == pytest.approx(4.0)
    assert names["skill_vs_persistence_sst_lead1"] == pytest.approx(0.5)
    assert names["skill_vs_climatology_sst_mean"] == pytest.approx(0.75)
    assert names["test_rmse_sst_mean"] == pytest.approx(1.0)
    assert "climatology_acc_sst_lead1" not in names
    assert not any(k.startswith("test_skill") for k in names)


@pytest.mark.parametrize("sizes", [[7], [3, 3, 1], [1] * 7, [2, 5]], ids=["one", "3-3-1", "single", "2-5"])
def test_streaming_scores_equal_metrics_definitions(forecast_set, sizes):
    forecasts, truth, clim = forecast_set
    weights = metrics.area_weights(LAT, MASK)
    reference = _reference.score_forecasts(forecasts, truth, clim, weights)
    acc_ref = reference[(reference["model"] == "model") & (reference["metric"] == "acc")]["value"]
    assert np.isfinite(acc_ref).all() and (acc_ref.abs() < 1).all()  # a real, non-trivial model ACC
    streaming = scores.StreamingScores(weights)
    for sl in batch_slices(7, sizes):
        streaming.add({k: v.isel(time=sl) for k, v in forecasts.items()}, truth.isel(time=sl), clim.isel(time=sl))
    pd.testing.assert_frame_equal(streaming.table(), reference, check_exact=False, rtol=1e-12, atol=0)


def test_streaming_scores_need_a_batch():
    with pytest.raises(DataError, match="no batch"):
        scores.StreamingScores(metrics.area_weights(LAT, MASK)).table()


@pytest.mark.parametrize("sizes", [[7], [3, 3, 1]], ids=["one", "3-3-1"])
def test_cell_rmse_equals_rmse_per_cell(forecast_set, sizes):
    forecasts, truth, _ = forecast_set
    model, truth = forecasts["model"].sel(lead=1), truth.sel(lead=1)
    cells = scores.CellRmse(MASK)
    for sl in batch_slices(7, sizes):
        cells.add(model.isel(time=sl), truth.isel(time=sl))
    expected = metrics.rmse_per_cell(model, truth, MASK)
    result = cells.result()
    assert result.dims == expected.dims == ("variable", "lat", "lon")
    np.testing.assert_allclose(result.values, expected.values, rtol=1e-12)
    assert np.isnan(result.values[:, ~MASK.values]).all()


def _white_noise_case(n: int, model_sd: float, baseline_sd: float, seed: int):
    """Truth and two forecasts whose errors are white noise in time and space with known variances."""
    rng = np.random.default_rng(seed)
    shape = cube_shape(n=n, n_lead=2, n_var=1)
    truth = forecast_cube(rng.normal(20, 1, size=shape), n_lead=2).where(MASK)
    forecasts = {
        "model": (truth + rng.normal(0, model_sd, size=shape)).where(MASK),
        "persistence": (truth + rng.normal(0, baseline_sd, size=shape)).where(MASK),
    }
    return forecasts, truth


@pytest.mark.parametrize(
    ("model_sd", "skill", "significant"), [(1.0, 0.5, True), (2.0, 0.0, False)], ids=["half-the-error", "no-gain"]
)
def test_streaming_skill_interval_known_case(model_sd, skill, significant):
    """Errors of standard deviation 1 (or 2) against 2: the RMSE skill is 0.5 (or 0). The streamed
    evaluation's 95% interval contains it, and excludes zero exactly when there is a gain."""
    forecasts, truth = _white_noise_case(300, model_sd, 2.0, seed=5)
    weights = metrics.area_weights(LAT, MASK)
    streaming = scores.StreamingScores(weights)
    for sl in batch_slices(300, [64] * 5):
        streaming.add({k: v.isel(time=sl) for k, v in forecasts.items()}, truth.isel(time=sl), truth.isel(time=sl))
    rows = scores.skill_intervals(streaming.table())
    rows = rows[rows["model"] == "model"]
    assert len(rows) == 2 and set(rows["baseline"]) == {"persistence"}
    for row in rows.itertuples():
        assert row.lower < skill < row.upper, row
        assert row.upper - row.lower < 0.25  # 300 initial times pin it down
        assert row.significant == significant and row.meaningful


def test_skill_frame_marks_unsupported_baselines_not_meaningful(forecast_set):
    forecasts, truth, clim = forecast_set
    weights = metrics.area_weights(LAT, MASK)
    flags = {"climatology": xr.DataArray([False, True, True], dims=("lead",), coords={"lead": [1, 2, 3]})}
    table = _reference.score_forecasts(forecasts, truth, clim, weights, not_meaningful=flags)
    rows = scores.skill_intervals(table)
    vs_clim = rows[(rows["model"] == "model") & (rows["baseline"] == "climatology")].set_index(["variable", "lead"])
    assert vs_clim.loc[("sst", 1), "meaningful"] and np.isfinite(vs_clim.loc[("sst", 1), "skill"])
    for lead in (2, 3):
        assert not vs_clim.loc[("sst", lead), "meaningful"]
        assert np.isnan(vs_clim.loc[("sst", lead), ["skill", "lower", "upper"]].astype(float)).all()
    # the climatology's own skill against persistence relies on it too
    own = rows[(rows["model"] == "climatology") & (rows["lead"] == 3)]
    assert not own["meaningful"].any()
    assert rows[(rows["model"] == "model") & (rows["baseline"] == "persistence")]["meaningful"].all()
    names = scores.mlflow_metrics(scores.metrics_table(table, run="r", model_name="m"), model_name="m")
    assert names["skill_vs_climatology_meaningful_sst_lead3"] == 0.0
    assert "skill_vs_climatology_sst_lead3" not in names and "skill_vs_climatology_sst_mean" not in names
    assert "skill_vs_persistence_sst_mean" in names
