"""Extreme-event scores (conv2dlstm.evaluation.events): the day-of-year percentile threshold, the
minimum duration, the contingency counts and their scores, the streamed counts, the support of the
training period, and the rows the evaluate step writes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError
from conv2dlstm.evaluation import events, inference, metrics
from conv2dlstm.steps import evaluate, train
from tests.support.cases import LAT, LON, MASK
from tests.support.windows_fixture import make_windows_store, moving_waves

# Three years of daily steps from 2001 (no leap year): with split fractions (0.6, 0.2, 0.2) the
# training period is the first 730 days, 2001-01-01..2002-12-31, exactly two years.
N_TIME = 1217
START = "2001-01-01"
GRID = (4, 5)


@pytest.fixture(autouse=True)
def _one_thread_no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _calendar_day(times: pd.DatetimeIndex) -> np.ndarray:
    """Day of year with 1 March = 61 in every year (the test's own spelling of Hobday's calendar)."""
    return times.day_of_year.to_numpy() + ((~times.is_leap_year) & (times.month > 2)).astype(int)


# ---------------------------------------------------------------------------------------------
# the threshold


def _ramp_record() -> tuple[np.ndarray, np.ndarray]:
    """``(time, 1, lat, lon)`` values: a cell's level plus a ramp in the day of year, positive in the
    first training year and negative in the second (the training climatology, their mean, is the level:
    the anomalies are +-doy/10), and the mask."""
    times = pd.date_range(START, periods=N_TIME, freq="D")
    sign = np.where(times.year % 2 == 1, 1.0, -1.0)
    level = 10.0 + np.arange(GRID[0] * GRID[1]).reshape(GRID)
    values = level[None] + (sign * times.day_of_year.to_numpy() / 10.0)[:, None, None]
    mask = np.ones(GRID, dtype=bool)
    mask[0, 0] = False
    return values[:, None].astype(np.float32), mask


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    values, mask = _ramp_record()
    root = tmp_path_factory.mktemp("events_ramp")
    return make_windows_store(root / "w.zarr", values=values, mask=mask, start=START)


@pytest.mark.parametrize(("quantile", "smooth_days"), [(0.9, 1), (0.9, 31), (0.1, 1)])
def test_the_threshold_is_the_quantile_of_the_11_day_window_over_the_training_years(ramp, quantile, smooth_days):
    """Around a day ``d`` of March onwards (calendar day ``d - 1``) the window holds the anomalies
    ``+-(d - 1 + o) / 10``, ``o = -5..5``: 22 values whose 0.9 quantile (linear between order
    statistics 18 and 19) is ``(d + 1.9) / 10`` and 0.1 quantile its negative. A linear threshold is
    its own 31-day running mean, away from the year's end."""
    store = WindowsStore(ramp.store)
    with xr.open_dataset(ramp.stats) as stats:
        stats = stats.load()
    spec = events.EventSpec(variables=("sst",), quantile=quantile, smooth_days=smooth_days)
    threshold = events.percentile_threshold(store, stats, spec, chunk_steps=40)
    assert threshold.dims == ("dayofyear", "variable", "lat", "lon")
    days = np.arange(90, 330)  # away from 29 February and the year's end (and their 31-day means)
    expected = np.sign(quantile - 0.5) * (days + 1.9) / 10.0
    values = threshold.sel(variable="sst", dayofyear=days).values  # (day, lat, lon)
    ocean = ramp.mask
    np.testing.assert_allclose(values[:, ocean], np.broadcast_to(expected[:, None], values[:, ocean].shape), atol=2e-4)
    assert np.isnan(values[:, ~ocean]).all()  # land


def test_the_threshold_reads_the_training_part_in_blocks_whatever_the_chunk(ramp):
    store = WindowsStore(ramp.store)
    with xr.open_dataset(ramp.stats) as stats:
        stats = stats.load()
    spec = events.EventSpec(variables=("sst",), smooth_days=1)
    small = events.percentile_threshold(store, stats, spec, chunk_steps=1)
    large = events.percentile_threshold(store, stats, spec, chunk_steps=100_000)
    xr.testing.assert_identical(small, large)


def test_calendar_day_gives_29_february_its_own_day():
    times = pd.DatetimeIndex(["2001-02-28", "2001-03-01", "2004-02-29", "2004-03-01", "2001-12-31", "2004-12-31"])
    assert events.calendar_day(times.values).tolist() == [59, 61, 60, 61, 366, 366]
    assert events.day_distance(366, 1).tolist() == 1
    assert events.day_distance(3, 360).tolist() == 9


# ---------------------------------------------------------------------------------------------
# the support of the training period


def test_training_years_count_the_windows_that_are_half_training_days():
    two = pd.date_range("2019-07-01", "2021-06-30", freq="D").values  # two years from any first day
    assert set(events.training_years(two).tolist()) == {2}
    one_and_half = pd.date_range("2019-01-01", "2020-06-30", freq="D")
    years = events.training_years(one_and_half.values)
    assert years[0] == 2 and years[199] == 1  # January is covered twice, July once
    january = pd.date_range("2021-01-01", "2021-01-31", freq="D").values
    assert events.training_years(january).max() == 1


def test_a_training_period_too_short_turns_the_event_scores_off(tmp_path, caplog):
    fx = make_windows_store(tmp_path / "w.zarr", n_time=200, height=3, width=4, start=START)  # 120 training days
    store = WindowsStore(fx.store)
    with xr.open_dataset(fx.stats) as stats:
        stats = stats.load()
    spec = events.EventSpec(variables=("sst",))
    with caplog.at_level(logging.WARNING, logger="conv2dlstm.steps.evaluate"):
        flags, threshold = evaluate.event_threshold(store, stats, spec, chunk_steps=10)
    assert flags.tolist() == [True, True] and threshold is None
    assert "fewer than 2 years" in caplog.text and "evaluate.events.min_training_years" in caplog.text
    counts = {"model": np.zeros((0, 0, 1, 4)), "persistence": np.zeros((0, 0, 1, 4))}
    rows = events.event_rows(counts, variables=["sst"], unsupported=flags)
    assert set(rows["metric"]) == set(events.METRICS) and len(rows) == 2 * 2 * len(events.METRICS)
    flag_rows = rows[rows["metric"] == events.MEANINGFUL]
    assert (flag_rows["value"] == 0).all()
    assert rows[rows["metric"] != events.MEANINGFUL]["value"].isna().all()


def test_event_variables_must_be_targets():
    assert events.EventSpec.from_config({"variables": []}, ["sst"]) is None
    with pytest.raises(ConfigError, match=r"evaluate.events.variables: \['chl'\]"):
        events.EventSpec.from_config({"variables": ["chl"]}, ["sst"])
    with pytest.raises(ConfigError, match=r"evaluate.events.variables: \['chl'\]"):
        validate_config({"evaluate": {"events": {"variables": ["chl"]}}})
    spec = events.EventSpec.from_config({"variables": ["sst"], "quantile": 0.1}, ["sst"])
    assert spec is not None and not spec.high and "below" in spec.describe()


# ---------------------------------------------------------------------------------------------
# minimum duration


def test_min_duration_keeps_runs_of_at_least_that_many_days():
    series = np.array([0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)  # 4 days, then 6 days
    expected = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    np.testing.assert_array_equal(events.min_duration(series, None, 5), expected)
    np.testing.assert_array_equal(events.min_duration(series, None, 1), series)
    breaks = np.zeros(series.size, dtype=bool)
    breaks[9] = True  # a gap between initial times ends the 6-day run after 3 days
    assert not events.min_duration(series, breaks, 5).any()


@pytest.mark.parametrize("sizes", [[7] * 8, [1] * 50, [3, 2, 40, 5], [50]])
def test_the_streamed_duration_equals_the_whole_series(sizes):
    rng = np.random.default_rng(0)
    series = rng.random((50, 3, 4)) < 0.7
    breaks = np.zeros(50, dtype=bool)
    breaks[[0, 21, 22]] = True
    whole = events.min_duration(series, breaks, 4)
    assert whole.any() and (whole != series).any()
    stream, parts, i = events.DurationFilter(4), [], 0
    for size in sizes:
        parts.append(stream.push(series[i : i + size], breaks[i : i + size]))
        i += size
    parts.append(stream.flush().reshape(-1, 3, 4))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


# ---------------------------------------------------------------------------------------------
# contingency counts and scores


def test_contingency_counts_and_scores_of_a_hand_built_case():
    truth = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    forecast = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    valid = np.ones((3, 4), dtype=bool)
    valid[2, 3] = False  # left out
    weights = np.ones((3, 4))
    counts = events.contingency(forecast, truth, valid, weights)
    assert counts.tolist() == [3.0, 1.0, 2.0, 5.0]  # hits, misses, false alarms, correct negatives
    weights[0, 0] = 2.0  # a cell counts its area weight
    assert events.contingency(forecast, truth, valid, weights).tolist() == [4.0, 1.0, 2.0, 5.0]
    a, c, b, d = 3.0, 1.0, 2.0, 5.0
    scores = events.contingency_scores(np.array([a, c, b, d]))
    h, f = a / (a + c), b / (b + d)
    sedi = (math.log(f) - math.log(h) - math.log(1 - f) + math.log(1 - h)) / (
        math.log(f) + math.log(h) + math.log(1 - f) + math.log(1 - h)
    )
    chance = (a + b) * (a + c) / (a + b + c + d)
    assert float(scores["pod"]) == pytest.approx(0.75)
    assert float(scores["far"]) == pytest.approx(0.4)
    assert float(scores["sedi"]) == pytest.approx(sedi)
    assert float(scores["ets"]) == pytest.approx((a - chance) / (a + b + c - chance))
    assert float(scores["base_rate"]) == pytest.approx(4 / 11)
    assert float(scores["frequency_bias"]) == pytest.approx(5 / 4)


def test_sedi_limits():
    perfect, worst, never = events.contingency_scores(np.array([[5.0, 0, 0, 20], [0, 5, 20, 0], [0, 5, 0, 20]]))["sedi"]
    assert perfect == 1.0 and worst == -1.0 and math.isnan(never)  # never forecast: undefined
    rng = np.random.default_rng(1)
    truth, forecast = rng.random((2, 400, 500)) < 0.1  # independent: no skill
    counts = events.contingency(forecast, truth, np.ones((400, 500), bool), np.ones((400, 500)))
    assert abs(float(events.contingency_scores(counts)["sedi"])) < 0.03
    no_miss = events.contingency(forecast | truth, truth, np.ones((400, 500), bool), np.ones((400, 500)))
    assert math.isnan(float(events.contingency_scores(no_miss)["sedi"]))  # H = 1 with false alarms: undefined


def test_bootstrap_intervals_resample_the_initial_times():
    rng = np.random.default_rng(2)
    counts = np.stack([rng.poisson(lam, 200).astype(float) for lam in (3, 1, 2, 40)], axis=1)  # (time, 4)
    out = events.bootstrap_scores(counts, n_resamples=400)
    for score, (value, lower, upper) in out.items():
        assert lower < value < upper, score
    assert out["pod"][0] == pytest.approx(counts[:, 0].sum() / counts[:, :2].sum())
    perfect = np.tile([2.0, 0.0, 0.0, 30.0], (50, 1))
    assert events.bootstrap_scores(perfect, n_resamples=50)["sedi"] == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# streamed counts over batches


def _cube(values: np.ndarray, init: np.ndarray, name: str) -> xr.DataArray:
    valid = init[:, None] + np.arange(1, values.shape[1] + 1)[None, :] * np.timedelta64(1, "D")
    return inference.forecast_array(
        values, init_times=init, valid_times=valid, variables=["sst"], lat=LAT, lon=LON, name=name
    )


@pytest.mark.parametrize("sizes", [[4, 4, 4, 4, 4, 4, 4, 4], [1, 30, 1], [32]])
def test_streamed_counts_equal_the_whole_test_period(sizes):
    rng = np.random.default_rng(4)
    init = pd.date_range("2021-06-01", periods=33, freq="D").values
    init = np.delete(init, 12)  # a gap between initial times
    shape = (init.size, 3, 1, LAT.size, LON.size)
    ocean = MASK.values
    truth = np.where(ocean, rng.normal(size=shape), np.nan).astype(np.float32)
    model = (truth + rng.normal(scale=0.7, size=shape)).astype(np.float32)
    model[5, 1, 0, 2, 1] = np.nan  # a cell-day without a forecast is left out
    clim = np.where(ocean, 0.0, np.nan).astype(np.float32) * np.ones(shape, dtype=np.float32)
    threshold = xr.DataArray(
        np.where(ocean, 0.8, np.nan)[None, None] + np.linspace(-0.2, 0.2, 366)[:, None, None, None],
        dims=("dayofyear", "variable", "lat", "lon"),
        coords={"dayofyear": np.arange(1, 367), "variable": ["sst"], "lat": LAT, "lon": LON},
    ).astype("float32")
    weights = metrics.area_weights(LAT, MASK)
    spec = events.EventSpec(variables=("sst",), min_duration_days=3)
    counter = events.EventCounts(spec, threshold, weights, step=np.timedelta64(1, "D"))
    i = 0
    for size in sizes:
        part = slice(i, i + size)
        counter.add(
            {"model": _cube(model[part], init[part], "model"), "truth_itself": _cube(truth[part], init[part], "t")},
            _cube(truth[part], init[part], "truth"),
            _cube(clim[part], init[part], "clim"),
        )
        i += size
    got = counter.counts()
    assert counter.gaps == 1
    # the whole period in numpy: exceedance of the day's threshold, runs of 3 along initial times, counts
    valid = init[:, None] + np.arange(1, 4)[None, :] * np.timedelta64(1, "D")
    thr = threshold.values[_calendar_day(pd.DatetimeIndex(valid.ravel())).reshape(valid.shape) - 1]
    breaks = np.zeros(init.size, dtype=bool)
    breaks[[0, 12]] = True
    w = weights.values
    observed = events.min_duration(np.nan_to_num(truth - clim, nan=-9) > thr, breaks, 3)
    for name, forecast in (("model", model), ("truth_itself", truth)):
        ok = np.isfinite(forecast) & np.isfinite(truth) & ocean
        forecasted = events.min_duration(np.nan_to_num(forecast - clim, nan=-9) > thr, breaks, 3)
        expected = np.stack(
            [
                np.where(ok & f & o, w, 0).sum(axis=(-2, -1))
                for f, o in (
                    (forecasted, observed),
                    (~forecasted, observed),
                    (forecasted, ~observed),
                    (~forecasted, ~observed),
                )
            ],
            axis=-1,
        )
        np.testing.assert_allclose(got[name], expected, rtol=1e-12)
    assert got["model"].shape == (init.size, 3, 1, 4) and got["model"][..., 0].sum() > 0
    assert (got["truth_itself"][..., 1:3] == 0).all()  # the truth as forecast: no miss, no false alarm


# ---------------------------------------------------------------------------------------------
# through the train and evaluate steps


def _config(tmp_path: Path, events_section: dict) -> dict:
    return validate_config(
        {
            "experiment": "test-events",
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": False},
            "variables": {"inputs": ["sst"], "targets": ["sst"]},
            "windows": {"input_steps": 3, "lead_steps": 2},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [2]}},
            "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "max_batches_per_epoch": 2},
            "evaluate": {"animation_lead": 0, "events": events_section},
        }
    )


def test_the_evaluate_step_writes_the_event_rows(tmp_path: Path) -> None:
    import mlflow

    n_time = 850  # 730 training days (two years), 40 validation, 80 test
    values = moving_waves(n_time, 1, *GRID, seed=5, noise=0.6)
    fractions = (730 / n_time, 40 / n_time, 80 / n_time)
    fx = make_windows_store(tmp_path / "w.zarr", values=values, start=START, split_fractions=fractions)
    assert fx.starts["train"].max() + 5 == 730 and fx.starts["test"].size > 60
    cfg = _config(tmp_path, {"variables": ["sst"], "smooth_days": 1})
    train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=tmp_path / "train")
    out = tmp_path / "evaluate"
    evaluate.main(
        cfg, run="convlstm", windows=fx.store, stats=fx.stats, checkpoint=tmp_path / "train" / "model.pt", out_dir=out
    )
    table = pd.read_csv(out / "metrics.csv")
    rows = table[table["metric"].str.startswith(events.PREFIX)]
    models = ["convlstm", "persistence", "climatology", "damped_persistence", "training_mean"]
    assert set(rows["model"]) == set(models) and set(rows["variable"]) == {"sst"}
    assert set(rows["region"]) == set(rows["season"]) == {"all"}
    assert len(rows) == len(models) * 2 * len(events.METRICS)  # per model, lead and metric
    assert (rows[rows["metric"] == events.MEANINGFUL]["value"] == 1).all()

    def value(model: str, metric: str, lead: int) -> float:
        sel = rows[(rows["model"] == model) & (rows["metric"] == f"{events.PREFIX}{metric}") & (rows["lead"] == lead)]
        return float(sel["value"].iloc[0])

    for model in ("convlstm", "persistence"):
        for lead in (1, 2):
            assert value(model, "sedi_lower", lead) <= value(model, "sedi", lead) <= value(model, "sedi_upper", lead)
    assert value("climatology", "pod", 1) == 0.0 and math.isnan(value("climatology", "sedi", 1))  # no anomaly

    # persistence's hit rate and false alarm ratio, independently: the threshold in numpy from the
    # training anomalies within 5 days of each valid day, its events and area-weighted counts
    with xr.open_dataset(fx.stats) as stats:
        clim = stats["climatology"].sel(variable="sst").values  # (366, lat, lon), calendar day of year
    times = fx.time
    phys = fx.physical[:, 0].astype(np.float64)
    anomaly = phys - clim[times.day_of_year.to_numpy() - 1]
    train_days = _calendar_day(times[:730])
    w = np.cos(np.deg2rad(fx.lat))[:, None] * fx.mask
    init_idx = fx.starts["test"] + fx.input_steps - 1
    for lead in (1, 2):
        valid_idx = init_idx + lead
        days = _calendar_day(times[valid_idx])
        near = np.minimum(
            np.abs(days[:, None] - train_days[None]) % 366, 366 - np.abs(days[:, None] - train_days[None]) % 366
        )
        thr = np.stack([np.quantile(anomaly[:730][near[i] <= 5], 0.9, axis=0) for i in range(days.size)])
        observed = anomaly[valid_idx] > thr
        forecast = phys[init_idx] - clim[times[valid_idx].day_of_year.to_numpy() - 1] > thr
        a = (w * (forecast & observed)).sum()
        c = (w * (~forecast & observed)).sum()
        b = (w * (forecast & ~observed)).sum()
        assert value("persistence", "pod", lead) == pytest.approx(a / (a + c), rel=1e-4)
        assert value("persistence", "far", lead) == pytest.approx(b / (a + b), rel=1e-4)
        assert value("persistence", "base_rate", lead) == pytest.approx((a + c) / (w.sum() * init_idx.size), rel=1e-4)

    client = mlflow.MlflowClient(cfg["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("test-events")
    assert experiment is not None
    logged = client.search_runs([experiment.experiment_id])[0].data.metrics
    assert logged["event_sedi_sst_lead1"] == pytest.approx(value("convlstm", "sedi", 1))
    assert logged["persistence_event_pod_sst_lead2"] == pytest.approx(value("persistence", "pod", 2))
    assert "event_sedi_lower_sst_lead1" in logged and "event_meaningful_sst_lead1" in logged
    assert not any("event_ets" in k or "base_rate" in k for k in logged)  # metrics.csv only
