"""Evaluate step: scores table, MLflow names, CF predictions file, plots, and the whole step end to end."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm import evaluate, metrics, plots
from conv2dlstm.config import validate_config
from conv2dlstm.errors import ConfigError, DataError, TrackingError

LAT = np.array([20.0, 21.0, 22.0])
LON = np.array([-60.0, -59.0, -58.0, -57.0])
MASK = xr.DataArray(
    np.array([[True, True, True, False], [True, True, False, False], [True, True, True, True]]),
    dims=("lat", "lon"),
    coords={"lat": LAT, "lon": LON},
)


def _forecast(values: np.ndarray, variables=("sst",), n_lead: int = 2) -> xr.DataArray:
    n = values.shape[0]
    init = pd.date_range("2021-07-01", periods=n, freq="D").values
    valid = init[:, None] + np.arange(1, n_lead + 1)[None, :] * np.timedelta64(1, "D")
    return evaluate.forecast_array(values, init_times=init, valid_times=valid, variables=list(variables), lat=LAT, lon=LON)


def _shape(n=5, n_lead=2, n_var=1):
    return (n, n_lead, n_var, LAT.size, LON.size)


# ---------------------------------------------------------------------------------------------
# small helpers


def test_window_indices():
    init, valid = evaluate.window_indices(np.array([0, 3, 4]), input_steps=3, lead_steps=2)
    np.testing.assert_array_equal(init, [2, 5, 6])
    np.testing.assert_array_equal(valid, [[3, 4], [6, 7], [7, 8]])


def test_forecast_array_coordinates():
    da = _forecast(np.zeros(_shape(n=3, n_lead=4)), n_lead=4)
    assert da.dims == ("time", "lead", "variable", "lat", "lon")
    np.testing.assert_array_equal(da["lead"].values, [1, 2, 3, 4])
    np.testing.assert_array_equal(da["lead_time"].values, np.arange(1, 5) * np.timedelta64(1, "D"))
    assert da["valid_time"].dims == ("time", "lead")
    assert pd.Timestamp(da["valid_time"].values[2, 3]) == pd.Timestamp("2021-07-07")
    with pytest.raises(DataError, match="shape"):
        evaluate.forecast_array(
            np.zeros((3, 2, 2, 3, 4)),
            init_times=da["time"].values,
            valid_times=da["valid_time"].values[:, :2],
            variables=["sst"],
            lat=LAT,
            lon=LON,
        )


def test_resolve_run_id(tmp_path):
    ckpt_path = tmp_path / "best.pt"
    assert evaluate.resolve_run_id(ckpt_path, {"mlflow_run_id": "abc123"}) == "abc123"
    with pytest.raises(TrackingError, match="mlflow_run_id"):
        evaluate.resolve_run_id(ckpt_path, {})
    (tmp_path / "mlflow_run_id.txt").write_text("fromfile42\n")
    assert evaluate.resolve_run_id(ckpt_path, {"mlflow_run_id": ""}) == "fromfile42"


def test_plot_sample():
    init = pd.DatetimeIndex(pd.date_range("2021-07-01", periods=5, freq="D"))
    assert evaluate.plot_sample(init, "") == 0
    assert evaluate.plot_sample(init, "2021-07-03") == 2
    with pytest.raises(ConfigError, match="2021-07-01 to 2021-07-05"):
        evaluate.plot_sample(init, "2021-08-01")
    with pytest.raises(ConfigError, match="not a date"):
        evaluate.plot_sample(init, "tomorrow")


# ---------------------------------------------------------------------------------------------
# scores and the tidy table


@pytest.fixture
def scored():
    """Model off by +1, persistence by +2, climatology by -4 everywhere on the ocean."""
    rng = np.random.default_rng(0)
    truth = _forecast(rng.normal(20, 3, size=_shape(n_var=2)), variables=("sst", "no3")).where(MASK)
    clim = truth - 4.0
    forecasts = {"model": truth + 1.0, "persistence": truth + 2.0, "climatology": clim}
    weights = metrics.area_weights(LAT, MASK)
    return evaluate.score_forecasts(forecasts, truth, clim, weights)


def test_score_forecasts_hand_values(scored):
    def value(model, metric, variable="sst", lead=1):
        sel = scored[
            (scored["model"] == model) & (scored["metric"] == metric) & (scored["variable"] == variable) & (scored["lead"] == lead)
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
    assert not ((scored["model"] == "climatology") & (scored["metric"] == "acc")).any()
    assert not scored["model"].isin(["persistence", "climatology"]).pipe(
        lambda base: scored[base]["metric"].str.startswith("skill").any()
    )
    # model: 4 scores + 2 skills, persistence 4, climatology 3; x 2 variables x 2 leads
    assert len(scored) == (6 + 4 + 3) * 2 * 2


def test_metrics_csv_columns_and_values(scored, tmp_path):
    table = evaluate.metrics_table(scored, run="exp1", model_name="convlstm")
    path = tmp_path / "metrics.csv"
    evaluate.write_csv(table, path)
    back = pd.read_csv(path)
    assert list(back.columns) == ["run", "model", "variable", "lead", "metric", "value"]
    assert set(back["run"]) == {"exp1"}
    assert set(back["model"]) == {"convlstm", "persistence", "climatology"}
    assert back["lead"].dtype.kind == "i"
    assert list(dict.fromkeys(back["model"])) == ["convlstm", "persistence", "climatology"]
    row = back[(back["model"] == "convlstm") & (back["metric"] == "skill_vs_climatology") & (back["variable"] == "no3") & (back["lead"] == 2)]
    assert float(row["value"].iloc[0]) == pytest.approx(0.75)
    assert not list(tmp_path.glob(".*partial"))


def test_mlflow_metric_names(scored):
    table = evaluate.metrics_table(scored, run="exp1", model_name="convlstm")
    names = evaluate.mlflow_metrics(table, model_name="convlstm")
    assert names["test_rmse_sst_lead1"] == pytest.approx(1.0)
    assert names["test_acc_no3_lead2"] == pytest.approx(1.0)
    assert names["persistence_rmse_sst_lead1"] == pytest.approx(2.0)
    assert names["climatology_rmse_no3_lead2"] == pytest.approx(4.0)
    assert names["skill_vs_persistence_sst_lead1"] == pytest.approx(0.5)
    assert names["skill_vs_climatology_sst_mean"] == pytest.approx(0.75)
    assert names["test_rmse_sst_mean"] == pytest.approx(1.0)
    assert "climatology_acc_sst_lead1" not in names
    assert not any(k.startswith("test_skill") for k in names)


# ---------------------------------------------------------------------------------------------
# predictions.nc


def test_predictions_netcdf_is_cf_and_decodes(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.normal(20, 2, size=_shape(n=4, n_lead=3, n_var=2)).astype("float32")
    fc = _forecast(values, variables=("sst", "no3"), n_lead=3).where(MASK)
    ds = evaluate.predictions_dataset(fc, units={"sst": "degC", "no3": "mmol m-3"}, attrs={"run": "exp1"})
    path = tmp_path / "predictions.nc"
    evaluate.write_netcdf(ds, path)
    assert not list(tmp_path.glob(".*partial"))
    with xr.open_dataset(path) as back:
        back = back.load()
    assert back.attrs["Conventions"] == "CF-1.8"
    assert back.attrs["run"] == "exp1"
    assert set(back.data_vars) == {"sst", "no3"}
    sst = back["sst"]
    assert sst.dims == ("time", "lead", "lat", "lon")
    assert sst.dtype == np.float32
    assert sst.attrs["units"] == "degC"
    assert sst.attrs["standard_name"] == "sea_surface_temperature"
    assert back["no3"].attrs["standard_name"] == "mole_concentration_of_nitrate_in_sea_water"
    assert np.issubdtype(back["time"].dtype, np.datetime64)
    assert back["time"].attrs["standard_name"] == "forecast_reference_time"
    np.testing.assert_array_equal(back["lead"].values, [1, 2, 3])
    assert np.issubdtype(back["lead_time"].dtype, np.timedelta64)
    np.testing.assert_array_equal(back["lead_time"].values, np.arange(1, 4) * np.timedelta64(1, "D"))
    assert back["valid_time"].dims == ("time", "lead")
    assert np.issubdtype(back["valid_time"].dtype, np.datetime64)
    np.testing.assert_array_equal(back["valid_time"].values, fc["valid_time"].values)
    assert back["lat"].attrs["units"] == "degrees_north" and back["lon"].attrs["units"] == "degrees_east"
    np.testing.assert_allclose(back["no3"].values, fc.sel(variable="no3").values, rtol=1e-6)
    assert np.isnan(back["sst"].values[:, :, ~MASK.values]).all()
    assert np.isfinite(back["sst"].values[:, :, MASK.values]).all()


def test_variable_units_from_stats():
    stats = xr.Dataset(
        {"variable_units": ("variable", np.array(["degC", "mmol m-3"], dtype=object))},
        coords={"variable": ["sst", "no3"]},
    )
    assert evaluate.variable_units(stats) == {"sst": "degC", "no3": "mmol m-3"}


# ---------------------------------------------------------------------------------------------
# plots


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path, scored):
    from matplotlib.image import imread

    table = evaluate.metrics_table(scored, run="exp1", model_name="convlstm").assign(label=lambda t: t["model"])
    plots.lines_vs_lead(table[table["metric"] == "rmse"], tmp_path / "rmse.png", ylabel="RMSE", title="t")
    rng = np.random.default_rng(1)
    fc = _forecast(rng.normal(size=_shape(n_var=2)), variables=("sst", "no3")).where(MASK)
    plots.forecast_maps(fc.isel(time=0, lead=0), (fc + 1).isel(time=0, lead=0), tmp_path / "maps.png", title="t", units={"sst": "degC"})
    plots.field_maps(metrics.rmse_per_cell(fc.sel(lead=1), fc.sel(lead=1) * 0, MASK), tmp_path / "rmse_map.png", title="t")
    for name in ("rmse.png", "maps.png", "rmse_map.png"):
        assert _is_png(tmp_path / name)
        height, width = imread(tmp_path / name).shape[:2]
        assert height > 100 and width > 100
    assert not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------------------------
# end to end: a hand-built windows store, stats.nc, checkpoint and MLflow run

_NEEDED = ("conv2dlstm.data", "conv2dlstm.models", "conv2dlstm.normalize", "conv2dlstm.tracking")


def _missing_modules() -> list[str]:
    missing = []
    for name in _NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


MEAN, STD = 15.0, 2.0
INPUT_STEPS, LEAD_STEPS = 3, 2


def _seasonal(times: pd.DatetimeIndex) -> np.ndarray:
    """(time, lat, lon) SST equal to the stats climatology at each day of year."""
    doy = times.day_of_year.values
    cycle = MEAN + 3.0 * np.sin(2 * np.pi * (doy - 1) / 366.0)
    grad = 0.2 * (LAT[:, None] - LAT.mean()) + 0.05 * (LON[None, :] - LON.mean())
    return cycle[:, None, None] + grad[None]


def _stats_dataset() -> xr.Dataset:
    doy = np.arange(1, 367)
    times = pd.Timestamp("2020-01-01") + pd.to_timedelta(doy - 1, "D")  # a leap year covers 1..366
    clim = _seasonal(pd.DatetimeIndex(times))[:, None]  # (dayofyear, variable, lat, lon)
    return xr.Dataset(
        {
            "mean": ("variable", [MEAN]),
            "std": ("variable", [STD]),
            "climatology": (("dayofyear", "variable", "lat", "lon"), clim),
            "mask": (("lat", "lon"), MASK.values),
            "variable_units": ("variable", np.array(["degC"], dtype=object)),
        },
        coords={"variable": ["sst"], "dayofyear": doy, "lat": LAT, "lon": LON},
        attrs={"train_start": "2021-01-01", "train_end": "2021-01-31", "per_pixel": 0},
    )


def _windows_dataset(times: pd.DatetimeIndex) -> xr.Dataset:
    phys = _seasonal(times)[:, None]  # (time, variable, lat, lon)
    data = ((phys - MEAN) / STD).astype("float32")
    data[:, :, ~MASK.values] = 0.0
    n = times.size
    span = INPUT_STEPS + LEAD_STEPS
    # train: days 0..29, val: 30..44, test: 45..n-1 (each window inside its split)
    train = np.arange(0, 30 - span + 1)
    val = np.arange(30, 45 - span + 1)
    test = np.arange(45, n - span + 1)
    return xr.Dataset(
        {
            "data": (("time", "variable", "lat", "lon"), data),
            "mask": (("lat", "lon"), MASK.values),
            "train_start": ("train_sample", train.astype("int64")),
            "val_start": ("val_sample", val.astype("int64")),
            "test_start": ("test_sample", test.astype("int64")),
        },
        coords={"time": times, "variable": np.array(["sst"], dtype=object), "lat": LAT, "lon": LON},
        attrs={
            "input_variables": ["sst"],
            "target_variables": ["sst"],
            "input_steps": INPUT_STEPS,
            "lead_steps": LEAD_STEPS,
            "stats_sha256": "0" * 64,
            "format_version": 1,
        },
    )


@pytest.fixture(scope="module")
def pipeline_inputs(tmp_path_factory):
    missing = _missing_modules()
    if missing:
        pytest.skip(f"end-to-end evaluate needs {', '.join(missing)}, which is not importable yet")
    import mlflow
    import torch

    from conv2dlstm import models

    root = tmp_path_factory.mktemp("evaluate_e2e")
    times = pd.date_range("2021-01-01", periods=60, freq="D")
    windows = root / "windows.zarr"
    _windows_dataset(times).chunk({"time": INPUT_STEPS + LEAD_STEPS}).to_zarr(windows, zarr_format=3, mode="w", consolidated=False)
    stats = root / "stats.nc"
    _stats_dataset().to_netcdf(stats)

    cfg = validate_config(
        {
            "variables": {"inputs": ["sst"], "targets": ["sst"]},
            "windows": {"input_steps": INPUT_STEPS, "lead_steps": LEAD_STEPS},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4], "kernel_size": 3}},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "log_model": False},
            "train": {"device": "cpu"},
            "evaluate": {"batch_size": 4},
        }
    )
    kwargs = models.model_kwargs_from_config(
        cfg["model"],
        input_variables=["sst"],
        target_variables=["sst"],
        input_steps=INPUT_STEPS,
        lead_steps=LEAD_STEPS,
        height=LAT.size,
        width=LON.size,
    )
    torch.manual_seed(0)
    model = models.build_model("convlstm", **kwargs)
    client = mlflow.MlflowClient(cfg["mlflow"]["tracking_uri"])
    experiment_id = client.create_experiment(cfg["experiment"], artifact_location=(root / "mlruns").as_uri())
    run_id = client.create_run(experiment_id, run_name="convlstm").info.run_id
    client.set_terminated(run_id)
    checkpoint = root / "train" / "best.pt"
    checkpoint.parent.mkdir()
    torch.save(
        {
            "model_name": "convlstm",
            "model_kwargs": kwargs,
            "model_state": model.state_dict(),
            "optimizer_state": {},
            "scheduler_state": {},
            "rng_state": {},
            "epoch": 1,
            "best_val_loss": 1.0,
            "config": cfg,
            "input_variables": ["sst"],
            "target_variables": ["sst"],
            "mlflow_run_id": run_id,
        },
        checkpoint,
    )
    return {"root": root, "windows": windows, "stats": stats, "checkpoint": checkpoint, "cfg": cfg, "run_id": run_id, "times": times}


def test_evaluate_end_to_end(pipeline_inputs, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    out_dir = p["root"] / "evaluate" / "convlstm"
    evaluate.main(p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=p["checkpoint"], out_dir=out_dir)
    for name in evaluate.OUTPUT_FILES:
        assert (out_dir / name).is_file(), name
    assert not list(out_dir.glob(".*"))

    times = p["times"]
    test_starts = np.arange(45, times.size - INPUT_STEPS - LEAD_STEPS + 1)
    init_idx = test_starts + INPUT_STEPS - 1
    with xr.open_dataset(out_dir / "predictions.nc") as ds:
        ds = ds.load()
    np.testing.assert_array_equal(ds["time"].values, times.values[init_idx])
    np.testing.assert_array_equal(ds["valid_time"].values[:, 1], times.values[init_idx + 2])
    assert ds["sst"].shape == (init_idx.size, LEAD_STEPS, LAT.size, LON.size)
    assert np.isnan(ds["sst"].values[..., ~MASK.values]).all()

    table = pd.read_csv(out_dir / "metrics.csv")
    assert list(table.columns) == ["run", "model", "variable", "lead", "metric", "value"]
    assert set(table["model"]) == {"convlstm", "persistence", "climatology"}

    def value(model, metric, lead):
        sel = table[(table["model"] == model) & (table["metric"] == metric) & (table["lead"] == lead)]
        return float(sel["value"].iloc[0])

    # independent computation: the truth is the climatology, so climatology is perfect
    phys = _seasonal(times)
    cos = np.cos(np.deg2rad(LAT))[:, None] * MASK.values
    for lead in (1, 2):
        truth = phys[init_idx + lead]
        assert value("climatology", "rmse", lead) == pytest.approx(0.0, abs=1e-5)
        pers_err2 = ((phys[init_idx] - truth) ** 2 * cos).sum(axis=(1, 2)) / cos.sum()
        assert value("persistence", "rmse", lead) == pytest.approx(math.sqrt(pers_err2.mean()), rel=1e-4)
        pred = ds["sst"].values[:, lead - 1]
        model_err2 = (np.where(MASK.values, (pred - truth) ** 2, 0) * cos).sum(axis=(1, 2)) / cos.sum()
        assert value("convlstm", "rmse", lead) == pytest.approx(math.sqrt(model_err2.mean()), rel=1e-4)
        assert value("convlstm", "skill_vs_persistence", lead) == pytest.approx(
            1 - value("convlstm", "rmse", lead) / value("persistence", "rmse", lead)
        )

    client = mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"])
    logged = client.get_run(p["run_id"]).data.metrics
    assert logged["test_rmse_sst_lead1"] == pytest.approx(value("convlstm", "rmse", 1))
    assert logged["persistence_rmse_sst_lead1"] == pytest.approx(value("persistence", "rmse", 1))
    assert "skill_vs_persistence_sst_lead2" in logged
    artifacts = {a.path for a in client.list_artifacts(p["run_id"], "evaluate")}
    assert {"evaluate/metrics.csv", "evaluate/rmse_vs_lead.png", "evaluate/maps.png"} <= artifacts


def test_evaluate_bad_plot_date_leaves_no_output(pipeline_inputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    cfg = {**p["cfg"], "evaluate": {**p["cfg"]["evaluate"], "plot_date": "1999-01-01"}}
    out_dir = p["root"] / "evaluate" / "bad"
    with pytest.raises(ConfigError, match="evaluate.plot_date"):
        evaluate.main(cfg, run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=p["checkpoint"], out_dir=out_dir)
    assert not out_dir.exists() or not any(out_dir.iterdir())


def _variant_checkpoint(p: dict, name: str, **changes) -> Path:
    import torch

    ckpt = torch.load(p["checkpoint"], weights_only=True)
    ckpt.update(changes)
    path = p["root"] / name / "best.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save(ckpt, path)
    return path


def test_evaluate_unknown_mlflow_run_fails_and_leaves_no_output(pipeline_inputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    checkpoint = _variant_checkpoint(p, "train_norun", mlflow_run_id="0" * 32)
    out_dir = p["root"] / "evaluate" / "norun"
    with pytest.raises(TrackingError, match="0" * 32):
        evaluate.main(p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=checkpoint, out_dir=out_dir)
    assert list(out_dir.iterdir()) == []  # no output, no staging folder


def test_evaluate_checkpoint_for_other_variables_is_refused(pipeline_inputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    checkpoint = _variant_checkpoint(p, "train_no3", target_variables=["no3"])
    out_dir = p["root"] / "evaluate" / "no3"
    with pytest.raises(DataError, match=r"target_variables \['no3'\]"):
        evaluate.main(p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=checkpoint, out_dir=out_dir)
    assert not out_dir.exists()
