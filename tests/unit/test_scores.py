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
    # the interval is above zero at both leads, except for climatology's (skill -1) against persistence
    horizons = scored[scored["metric"].str.startswith("skill_horizon_vs_")]
    assert set(horizons["lead"]) == {scores.HORIZON_LEAD}
    for variable in ("sst", "no3"):
        assert value("model", "skill_horizon_vs_persistence", variable, lead=0) == 2
        assert value("model", "skill_horizon_vs_climatology", variable, lead=0) == 2
        assert value("persistence", "skill_horizon_vs_climatology", variable, lead=0) == 2
        assert value("climatology", "skill_horizon_vs_persistence", variable, lead=0) == 0
    # model: 4 scores + 2 x 6 skill rows, persistence 4 + 6, climatology 3 + 6; x 2 variables x 2 leads;
    # then one horizon per forecast, baseline and variable: (2 + 1 + 1) x 2 variables
    assert len(horizons) == 4 * 2
    assert len(scored) == (16 + 10 + 9) * 2 * 2 + 4 * 2


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
    # the skill horizon: one metric per baseline and variable, in lead steps, no lead in its name
    assert names["skill_horizon_vs_persistence_sst"] == 2.0
    assert names["skill_horizon_vs_climatology_no3"] == 2.0
    assert names["climatology_skill_horizon_vs_persistence_sst"] == 0.0
    assert names["persistence_skill_horizon_vs_climatology_no3"] == 2.0
    assert not any("horizon" in k and ("_lead" in k or k.endswith("_mean")) for k in names)
    assert not any(k.endswith("_lead0") for k in names)


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
    # a lead not meaningful ends the horizon: against climatology it is at most lead 1
    horizon = table[(table["model"] == "model") & (table["metric"] == "skill_horizon_vs_climatology")]
    horizon = horizon.set_index("variable")["value"]
    assert horizon["sst"] == float(vs_clim.loc[("sst", 1), "lower"] > 0)
    names = scores.mlflow_metrics(scores.metrics_table(table, run="r", model_name="m"), model_name="m")
    assert names["skill_vs_climatology_meaningful_sst_lead3"] == 0.0
    assert names["skill_horizon_vs_climatology_sst"] == horizon["sst"]
    assert "skill_vs_climatology_sst_lead3" not in names and "skill_vs_climatology_sst_mean" not in names
    assert "skill_vs_persistence_sst_mean" in names


@pytest.mark.parametrize(
    ("lower", "horizon"),
    [
        ([0.3, 0.2, 0.1], 3),  # above zero at every lead: the last lead
        ([0.0, 0.2, 0.1], 0),  # zero at lead 1 is not above it
        ([-0.1, 0.2, 0.1], 0),
        ([0.3, np.nan, 0.1], 1),  # NaN (not meaningful) in the middle ends it
        ([np.nan, 0.2], 0),
        ([0.3, 0.2, -0.05, 0.4, 0.5], 2),  # a later positive lead does not extend it
        ([0.3, 0.2, 0.0], 2),
        (np.array([0.1, 0.1]), 2),
        ([], 0),
    ],
)
def test_skill_horizon(lower, horizon):
    got = scores.skill_horizon(lower)
    assert got == horizon and isinstance(got, int)


def test_skill_horizon_needs_one_dimension():
    with pytest.raises(ValueError, match="1-D"):
        scores.skill_horizon(np.ones((2, 2)))


def test_lead_horizon_orders_leads_and_a_missing_lead_ends_it():
    rows = pd.DataFrame({"lead": [3, 1, 2], "lower": [0.1, 0.2, 0.3]})
    assert scores.lead_horizon(rows) == 3
    assert scores.lead_horizon(rows[rows["lead"] != 2]) == 1  # lead 2 absent
    assert scores.lead_horizon(rows.iloc[:0]) == 0


def _horizon_case(n: int, seed: int):
    """Truth, a model and persistence over four leads: the model's error has standard deviation 1, 1, 3
    and 1 at leads 1-4, persistence's 2 everywhere; skill 0.5, 0.5, -0.5, 0.5 (two variables alike)."""
    rng = np.random.default_rng(seed)
    shape = cube_shape(n=n, n_lead=4, n_var=2)
    sd = np.array([1.0, 1.0, 3.0, 1.0])[None, :, None, None, None]
    truth = forecast_cube(rng.normal(20, 1, size=shape), variables=("sst", "no3"), n_lead=4).where(MASK)
    forecasts = {
        "model": (truth + rng.normal(0, 1, size=shape) * sd).where(MASK),
        "persistence": (truth + rng.normal(0, 2, size=shape)).where(MASK),
    }
    return forecasts, truth


def test_streaming_table_has_the_skill_horizon_rows():
    """Skill above zero at leads 1 and 2, below at 3, above again at 4: the horizon is lead 2, in
    ``metrics.csv`` (lead 0, one row per forecast, baseline and variable) and in MLflow."""
    forecasts, truth = _horizon_case(200, seed=3)
    streaming = scores.StreamingScores(metrics.area_weights(LAT, MASK))
    for sl in batch_slices(200, [64] * 4):
        streaming.add({k: v.isel(time=sl) for k, v in forecasts.items()}, truth.isel(time=sl), truth.isel(time=sl))
    table = scores.metrics_table(streaming.table(), run="r", model_name="convlstm")
    lower = scores.skill_intervals(table).set_index(["model", "variable", "lead"])["lower"]
    for variable in ("sst", "no3"):
        assert list(lower.loc[("convlstm", variable)] > 0) == [True, True, False, True]  # the case holds
    horizons = table[table["metric"].str.startswith(scores.HORIZON_PREFIX)]
    assert list(horizons.columns) == scores.CSV_COLUMNS and horizons["lead"].dtype.kind == "i"
    assert sorted(zip(horizons["model"], horizons["variable"], horizons["lead"], horizons["metric"])) == [
        ("convlstm", "no3", 0, "skill_horizon_vs_persistence"),
        ("convlstm", "sst", 0, "skill_horizon_vs_persistence"),
    ]  # persistence is not scored against itself; no climatology forecast here
    assert list(horizons["value"]) == [2.0, 2.0]
    # the per-lead readers do not see them
    assert set(scores.skill_intervals(table)["lead"]) == {1, 2, 3, 4}
    names = scores.mlflow_metrics(table, model_name="convlstm")
    assert names["skill_horizon_vs_persistence_sst"] == names["skill_horizon_vs_persistence_no3"] == 2.0
    assert "skill_vs_persistence_sst_mean" in names and "skill_horizon_vs_persistence_sst_mean" not in names


def test_horizon_rows_from_wide_skill_rows():
    wide = pd.DataFrame(
        {
            "model": ["m"] * 6,
            "baseline": ["persistence"] * 3 + ["climatology"] * 3,
            "variable": ["sst"] * 6,
            "lead": [1, 2, 3] * 2,
            "lower": [0.2, 0.1, -0.1, np.nan, 0.4, 0.4],
        }
    )
    rows = scores.horizon_rows(wide)
    assert list(rows.columns) == ["model", "variable", "lead", "metric", "value"]
    assert rows.set_index("metric")["value"].to_dict() == {
        "skill_horizon_vs_persistence": 2.0,
        "skill_horizon_vs_climatology": 0.0,
    }
    assert set(rows["lead"]) == {scores.HORIZON_LEAD}
    assert scores.horizon_rows(wide.iloc[:0]).empty
