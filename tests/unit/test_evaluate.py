"""Evaluate step: scores table, MLflow names, CF predictions file, plots, and the whole step end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.artifacts import checkpoint as checkpoint_file
from conv2dlstm.artifacts import digests, provenance
from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.config import keys
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError, DataError, TrackingError
from conv2dlstm.evaluation import inference, metrics, plots, scores
from conv2dlstm.steps import evaluate
from conv2dlstm.zarrstore import write_store
from tests.support.cases import LAT, LON, MASK

# ---------------------------------------------------------------------------------------------
# small helpers


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


def test_metrics_csv_columns_and_values(scored, tmp_path):
    table = scores.metrics_table(scored, run="exp1", model_name="convlstm")
    path = tmp_path / "metrics.csv"
    evaluate.write_csv(table, path)
    back = pd.read_csv(path)
    assert list(back.columns) == ["run", "model", "variable", "region", "season", "lead", "metric", "value"]
    assert set(back["region"]) == set(back["season"]) == {"all"}  # no evaluate.regions nor by_season
    assert set(back["run"]) == {"exp1"}
    assert set(back["model"]) == {"convlstm", "persistence", "climatology"}
    assert back["lead"].dtype.kind == "i"
    assert list(dict.fromkeys(back["model"])) == ["convlstm", "persistence", "climatology"]
    row = back[
        (back["model"] == "convlstm")
        & (back["metric"] == "skill_vs_climatology")
        & (back["variable"] == "no3")
        & (back["lead"] == 2)
    ]
    assert float(row["value"].iloc[0]) == pytest.approx(0.75)
    assert not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------------------------
# predictions.nc


# ---------------------------------------------------------------------------------------------
# plots


# ---------------------------------------------------------------------------------------------
# streaming evaluation equals the in-memory reference (metrics.py)


def test_commit_outputs_moves_marker_last(tmp_path):
    out, staging = tmp_path / "out", tmp_path / "out" / ".evaluate.x.partial"
    staging.mkdir(parents=True)
    for name in ("a.nc", "metrics.csv", "b.png"):
        (out / name).write_text("old")
        (staging / name).write_text("new")
    evaluate.commit_outputs(staging, out, ["a.nc", "metrics.csv", "b.png"])
    assert {f.name: f.read_text() for f in out.iterdir() if f.is_file()} == {
        "a.nc": "new",
        "metrics.csv": "new",
        "b.png": "new",
    }
    # a commit that fails part way leaves no metrics.csv: the result reads as not done
    for name in ("a.nc", "b.png", "metrics.csv"):
        (staging / name).write_text("newer")
    (out / "b.png").unlink()
    (out / "b.png").mkdir()
    (out / "b.png" / "keep").write_text("")  # renaming a file onto a non-empty folder fails after a.nc moved
    with pytest.raises(OSError):
        evaluate.commit_outputs(staging, out, ["a.nc", "b.png", "metrics.csv"])
    assert (out / "a.nc").read_text() == "newer"
    assert not (out / "metrics.csv").exists()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        evaluate.commit_outputs(staging, out, ["missing.png"])


def test_metrics_to_log_skips_values_already_logged():
    logged = {"test_rmse_sst_lead1": 1.5, "test_acc_sst_lead1": 0.25}
    values = {"test_rmse_sst_lead1": 1.5, "test_acc_sst_lead1": 0.5, "test_mae_sst_lead1": 1.0}
    assert evaluate.metrics_to_log(values, logged) == {"test_acc_sst_lead1": 0.5, "test_mae_sst_lead1": 1.0}
    assert evaluate.metrics_to_log(values, values) == {}


# ---------------------------------------------------------------------------------------------
# end to end: a hand-built windows store, stats.nc, checkpoint and MLflow run

MEAN, STD = 15.0, 2.0
INPUT_STEPS, LEAD_STEPS = 3, 2
STATS_RECORD = provenance.make_record("normalize", "c" * 16, {"regrid": "a" * 16})


def _windows_record(anomalies: bool) -> dict:
    """The provenance of a windows store: the two stores of these tests hold different data."""
    return provenance.make_record(
        "windows", "d" * 16, {"regrid": ("b" if anomalies else "a") * 16, "stats": STATS_RECORD["digest"]}
    )


def _train_record(cfg: dict, anomalies: bool) -> dict:
    """The provenance of a checkpoint trained with ``cfg`` on one of the two windows stores."""
    inputs = {"windows": _windows_record(anomalies)["digest"], "stats": STATS_RECORD["digest"]}
    return provenance.for_step(cfg, "train", inputs)


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
        # a 61-day climatology window: the training days (January) support the test days (to 1 March)
        attrs={
            "train_start": "2021-01-01",
            "train_end": "2021-01-31",
            "per_pixel": 0,
            "climatology_window": 61,
            "format_version": stats_file.FORMAT_VERSION,
            **provenance.to_attrs(STATS_RECORD),
        },
    )


def _anomaly(times: pd.DatetimeIndex) -> np.ndarray:
    """(time, lat, lon) seeded departures from the climatology: a slow wave plus noise."""
    rng = np.random.default_rng(11)
    t = np.arange(times.size)[:, None, None]
    wave = 1.5 * np.sin(2 * np.pi * t / 9.0 + 0.7 * np.arange(LON.size)[None, None, :])
    return wave + rng.normal(0.0, 0.6, size=(times.size, LAT.size, LON.size))


def _windows_dataset(times: pd.DatetimeIndex, anomaly: np.ndarray | None = None) -> xr.Dataset:
    phys = (_seasonal(times) + (0.0 if anomaly is None else anomaly))[:, None]  # (time, variable, lat, lon)
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
            "test_period": f"{times[45]:%Y-%m-%d}..{times[-1]:%Y-%m-%d}",
            **provenance.to_attrs(_windows_record(anomaly is not None)),
        },
    )


def sst_config(root: Path, *, hidden_channels: list[int], batch_size: int) -> dict:
    """SST -> SST on the test windows with a small ConvLSTM on the CPU, tracked in ``root``."""
    return validate_config(
        {
            "variables": {"inputs": ["sst"], "targets": ["sst"]},
            "windows": {"input_steps": INPUT_STEPS, "lead_steps": LEAD_STEPS},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": hidden_channels, "kernel_size": 3}},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "log_model": False},
            "train": {"device": "cpu"},
            "evaluate": {"batch_size": batch_size},
        }
    )


@pytest.fixture(scope="module")
def pipeline_inputs(tmp_path_factory):
    import mlflow
    import torch

    from conv2dlstm.training import models

    root = tmp_path_factory.mktemp("evaluate_e2e")
    times = pd.date_range("2021-01-01", periods=60, freq="D")
    windows = root / "windows.zarr"
    write_store(_windows_dataset(times).chunk({"time": INPUT_STEPS + LEAD_STEPS}), windows)
    windows_anomalies = root / "windows_anomalies.zarr"
    write_store(_windows_dataset(times, _anomaly(times)).chunk({"time": INPUT_STEPS + LEAD_STEPS}), windows_anomalies)
    stats = root / "stats.nc"
    _stats_dataset().to_netcdf(stats)

    cfg = sst_config(root, hidden_channels=[4], batch_size=4)
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
            "format_version": checkpoint_file.FORMAT_VERSION,
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
            "provenance": _train_record(cfg, anomalies=False),
            "result_config": keys.result_config(cfg, "train"),
        },
        checkpoint,
    )
    return {
        "root": root,
        "windows": windows,
        "windows_anomalies": windows_anomalies,
        "stats": stats,
        "checkpoint": checkpoint,
        "cfg": cfg,
        "run_id": run_id,
        "experiment_id": experiment_id,
        "times": times,
    }


def test_evaluate_end_to_end(pipeline_inputs, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    figures = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.update({Path(path).name: fig}), save(fig, path)))
    p = pipeline_inputs
    out_dir = p["root"] / "evaluate" / "convlstm"
    evaluate.main(
        p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=p["checkpoint"], out_dir=out_dir
    )
    for name in (*evaluate.OUTPUT_FILES, "animation.gif"):  # evaluate.animation_lead 1 by default
        assert (out_dir / name).exists(), name
    assert not list(out_dir.glob(".*"))

    # the figures name each quantity's unit (the statistics') and the leads in days (the windows' step)
    def labels(name: str, *, x: bool = False) -> set[str]:
        return {ax.get_xlabel() if x else ax.get_ylabel() for ax in figures[name].axes if ax.get_title() == "sst"}

    assert labels("rmse_vs_lead.png") == {"area-weighted RMSE [degC]"}
    for name in ("rmse_vs_lead.png", "acc_vs_lead.png", "skill_vs_lead.png"):
        assert labels(name, x=True) == {"lead (days)"}, name
    assert [ax.get_ylabel() for ax in figures["rmse_map.png"].axes if ax.get_label() == "<colorbar>"] == ["RMSE [degC]"]

    times = p["times"]
    test_starts = np.arange(45, times.size - INPUT_STEPS - LEAD_STEPS + 1)
    init_idx = test_starts + INPUT_STEPS - 1
    with predictions_file.open(out_dir / "predictions.nc") as ds:
        ds = ds.load()
    np.testing.assert_array_equal(ds["time"].values, times.values[init_idx])
    np.testing.assert_array_equal(ds["valid_time"].values[:, 1], times.values[init_idx + 2])
    assert ds["sst"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert ds["sst"].shape == (init_idx.size, LEAD_STEPS, LAT.size, LON.size)
    assert np.isnan(ds["sst"].values[..., ~MASK.values]).all()
    with predictions_file.open(out_dir / "predictions.zarr") as store:  # the Zarr copy, batch by batch too
        xr.testing.assert_identical(store.load(), ds)

    # the animation: one frame per test window at lead 1, all of one size
    from PIL import Image

    from conv2dlstm.evaluation import animation

    with Image.open(out_dir / "animation.gif") as gif:
        assert gif.n_frames == init_idx.size
        assert gif.size[0] == animation.layout(1, LAT.size, LON.size).size[0]

    table = pd.read_csv(out_dir / "metrics.csv")
    assert list(table.columns) == ["run", "model", "variable", "region", "season", "lead", "metric", "value"]
    assert set(table["region"]) == set(table["season"]) == {"all"}  # no evaluate.regions nor by_season
    assert set(table["model"]) == {"convlstm", "persistence", "climatology", "damped_persistence", "training_mean"}

    def value(model, metric, lead):
        sel = table[(table["model"] == model) & (table["metric"] == metric) & (table["lead"] == lead)]
        return float(sel["value"].iloc[0])

    # independent computation: the truth is the climatology, so climatology is perfect
    phys = _seasonal(times)
    cos = np.cos(np.deg2rad(LAT))[:, None] * MASK.values
    for lead in (1, 2):
        truth = phys[init_idx + lead]
        assert value("climatology", "rmse", lead) == pytest.approx(0.0, abs=1e-5)
        assert value("damped_persistence", "rmse", lead) == pytest.approx(0.0, abs=1e-5)  # no anomaly to damp
        pers_err2 = ((phys[init_idx] - truth) ** 2 * cos).sum(axis=(1, 2)) / cos.sum()
        assert value("persistence", "rmse", lead) == pytest.approx(math.sqrt(pers_err2.mean()), rel=1e-4)
        cell_mean = phys[times <= "2021-01-31"].mean(axis=0)  # each cell over the training period (January)
        mean_err2 = ((cell_mean - truth) ** 2 * cos).sum(axis=(1, 2)) / cos.sum()
        assert value("training_mean", "rmse", lead) == pytest.approx(math.sqrt(mean_err2.mean()), rel=1e-4)
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
    for suffix in ("lower", "upper", "significant", "meaningful", "block_length"):
        assert f"skill_vs_damped_persistence_{suffix}_sst_lead1" in logged, suffix
    assert logged["skill_vs_climatology_meaningful_sst_lead2"] == 1.0  # the 61-day window supports the test days
    assert "damped_persistence_rho_sst_lead1" in logged
    artifacts = {a.path for a in client.list_artifacts(p["run_id"], "evaluate")}
    assert {
        "evaluate/metrics.csv",
        "evaluate/rmse_vs_lead.png",
        "evaluate/skill_vs_lead.png",
        "evaluate/maps.png",
    } <= artifacts

    # provenance: of the checkpoint, windows and statistics, in predictions.nc and as MLflow tags
    trained = _train_record(p["cfg"], anomalies=False)
    record = provenance.read_netcdf(out_dir / "predictions.nc", step="evaluate")
    assert record == provenance.for_step(
        p["cfg"],
        "evaluate",
        {"checkpoint": trained["digest"], "windows": _windows_record(False)["digest"], "stats": STATS_RECORD["digest"]},
    )
    assert digests.digest_of(out_dir / "predictions.nc") == record["digest"]
    tags = client.get_run(p["run_id"]).data.tags
    assert tags["evaluate.provenance.digest"] == record["digest"]
    assert tags["evaluate.provenance.inputs.checkpoint"] == trained["digest"]
    assert tags["evaluate.provenance.config_digest"] == keys.result_digest(p["cfg"], "evaluate")


def test_evaluate_bad_plot_date_leaves_no_output(pipeline_inputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    cfg = {**p["cfg"], "evaluate": {**p["cfg"]["evaluate"], "plot_date": "1999-01-01"}}
    out_dir = p["root"] / "evaluate" / "bad"
    with pytest.raises(ConfigError, match="evaluate.plot_date"):
        evaluate.main(
            cfg, run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=p["checkpoint"], out_dir=out_dir
        )
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
        evaluate.main(
            p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=checkpoint, out_dir=out_dir
        )
    assert not out_dir.exists() or list(out_dir.iterdir()) == []  # checked before any work: no output


def test_evaluate_checkpoint_for_other_variables_is_refused(pipeline_inputs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    checkpoint = _variant_checkpoint(p, "train_no3", target_variables=["no3"])
    out_dir = p["root"] / "evaluate" / "no3"
    with pytest.raises(DataError, match=r"target_variables \['no3'\]"):
        evaluate.main(
            p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=checkpoint, out_dir=out_dir
        )
    assert not out_dir.exists()


def _new_mlflow_run(p: dict, name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"])
    run_id = client.create_run(p["experiment_id"], run_name=name).info.run_id
    client.set_terminated(run_id)
    return run_id


def _weighted_mean(field: np.ndarray) -> np.ndarray:
    """(time, lat, lon) -> (time,) cos(lat)-weighted mean over the ocean cells (numpy, independent)."""
    w = np.cos(np.deg2rad(LAT))[:, None] * MASK.values
    return (np.where(MASK.values, field, 0.0) * w).sum(axis=(1, 2)) / w.sum()


def _acc(forecast: np.ndarray, truth: np.ndarray, clim: np.ndarray) -> float:
    """Time mean of the per-time uncentered anomaly correlation over the ocean (numpy, independent)."""
    w = np.cos(np.deg2rad(LAT))[:, None] * MASK.values
    f = np.where(MASK.values, forecast - clim, 0.0)
    t = np.where(MASK.values, truth - clim, 0.0)
    per_time = (w * f * t).sum(axis=(1, 2)) / np.sqrt((w * f**2).sum(axis=(1, 2)) * (w * t**2).sum(axis=(1, 2)))
    return float(per_time.mean())


def test_evaluate_model_acc_hand_computed_and_rerun_logs_once(pipeline_inputs, monkeypatch):
    """Truth = climatology + anomalies: every score of every forecast against an independent numpy computation."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    run_id = _new_mlflow_run(p, "anomalies")
    checkpoint = _variant_checkpoint(
        p, "train_anomalies", mlflow_run_id=run_id, provenance=_train_record(p["cfg"], anomalies=True)
    )
    cfg = {**p["cfg"], "evaluate": {**p["cfg"]["evaluate"], "plot_date": "2021-02-23"}}  # in the second batch
    cfg["evaluate"]["animation_lead"] = 0  # no animation.gif: the listings below hold none
    out_dir = p["root"] / "evaluate" / "anomalies"
    kwargs = {"run": "convlstm", "windows": p["windows_anomalies"], "stats": p["stats"], "checkpoint": checkpoint}
    evaluate.main(cfg, **kwargs, out_dir=out_dir)
    assert sorted(f.name for f in out_dir.iterdir()) == sorted(evaluate.OUTPUT_FILES)

    times = p["times"]
    init_idx = np.arange(45, times.size - INPUT_STEPS - LEAD_STEPS + 1) + INPUT_STEPS - 1  # 11 windows, 3 batches
    phys = _seasonal(times) + _anomaly(times)
    seasonal = _seasonal(times)
    with predictions_file.open(out_dir / "predictions.nc") as ds:
        pred_all = ds["sst"].values.astype("float64")
    table = pd.read_csv(out_dir / "metrics.csv")

    def value(model, metric, lead):
        sel = table[(table["model"] == model) & (table["metric"] == metric) & (table["lead"] == lead)]
        assert len(sel) == 1
        return float(sel["value"].iloc[0])

    for lead in (1, 2):
        truth, clim = phys[init_idx + lead], seasonal[init_idx + lead]
        forecasts = {"convlstm": pred_all[:, lead - 1], "persistence": phys[init_idx], "climatology": clim}
        for name, forecast in forecasts.items():
            err = forecast - truth
            assert value(name, "rmse", lead) == pytest.approx(math.sqrt(_weighted_mean(err**2).mean()), rel=1e-5)
            assert value(name, "mae", lead) == pytest.approx(_weighted_mean(np.abs(err)).mean(), rel=1e-5)
            assert value(name, "bias", lead) == pytest.approx(_weighted_mean(err).mean(), rel=1e-4, abs=1e-5)
        model_acc = _acc(forecasts["convlstm"], truth, clim)
        assert 0.05 < abs(model_acc) < 0.99  # a non-trivial correlation
        assert value("convlstm", "acc", lead) == pytest.approx(model_acc, abs=1e-5)
        assert value("persistence", "acc", lead) == pytest.approx(_acc(forecasts["persistence"], truth, clim), abs=1e-5)
        for baseline in ("persistence", "climatology"):
            assert value("convlstm", f"skill_vs_{baseline}", lead) == pytest.approx(
                1 - value("convlstm", "rmse", lead) / value(baseline, "rmse", lead), rel=1e-12
            )

    # Damped persistence and the skill intervals, by hand: rho from the training anomalies (the
    # statistics' training period, January: store days 0..30) pooled over ocean cells with
    # cos-latitude weights; each interval is metrics.bootstrap_skill of the per-initial-time MSE
    # series computed here from predictions.nc and the fields.
    train = _anomaly(times)[:31]
    w = np.cos(np.deg2rad(LAT))[:, None] * MASK.values
    for lead in (1, 2):
        x, y = train[:-lead], train[lead:]
        rho = (w * x * y).sum() / np.sqrt((w * x * x).sum() * (w * y * y).sum())
        assert value("damped_persistence", "rho", lead) == pytest.approx(rho, abs=1e-4)
        truth, clim = phys[init_idx + lead], seasonal[init_idx + lead]
        damped = clim + rho * (phys[init_idx] - seasonal[init_idx])
        err = damped - truth
        assert value("damped_persistence", "rmse", lead) == pytest.approx(
            math.sqrt(_weighted_mean(err**2).mean()), rel=1e-4
        )
        forecasts = {
            "convlstm": pred_all[:, lead - 1],
            "persistence": phys[init_idx],
            "climatology": clim,
            "damped_persistence": damped,
        }
        mse = {name: _weighted_mean((f - truth) ** 2) for name, f in forecasts.items()}
        for baseline in ("persistence", "climatology", "damped_persistence"):
            expected = metrics.bootstrap_skill(mse["convlstm"], mse[baseline], seed=0)
            assert value("convlstm", f"skill_vs_{baseline}", lead) == pytest.approx(expected.skill, abs=1e-5)
            assert value("convlstm", f"skill_vs_{baseline}_lower", lead) == pytest.approx(expected.lower, abs=1e-4)
            assert value("convlstm", f"skill_vs_{baseline}_upper", lead) == pytest.approx(expected.upper, abs=1e-4)
            assert value("convlstm", f"skill_vs_{baseline}_block_length", lead) == expected.block_length
            assert value("convlstm", f"skill_vs_{baseline}_significant", lead) == float(expected.significant)
            assert value("convlstm", f"skill_vs_{baseline}_meaningful", lead) == 1.0
            assert expected.lower < expected.upper  # a real interval, not a point
        expected = metrics.bootstrap_skill(mse["damped_persistence"], mse["persistence"], seed=0)
        assert value("damped_persistence", "skill_vs_persistence_lower", lead) == pytest.approx(
            expected.lower, abs=1e-4
        )

    client = mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"])
    logged = client.get_run(run_id).data.metrics
    assert logged["test_acc_sst_lead1"] == pytest.approx(value("convlstm", "acc", 1))
    assert logged["skill_vs_damped_persistence_upper_sst_lead2"] == pytest.approx(
        value("convlstm", "skill_vs_damped_persistence_upper", 2)
    )
    assert logged["climatology_rmse_sst_lead2"] == pytest.approx(value("climatology", "rmse", 2))

    # a rerun replaces the files and logs nothing twice
    first = (out_dir / "metrics.csv").read_text()
    evaluate.main(cfg, **kwargs, out_dir=out_dir)
    assert (out_dir / "metrics.csv").read_text() == first
    assert sorted(f.name for f in out_dir.iterdir()) == sorted(evaluate.OUTPUT_FILES)
    for key in ("test_acc_sst_lead1", "persistence_rmse_sst_lead2", "skill_vs_climatology_sst_mean"):
        history = client.get_metric_history(run_id, key)
        assert [(m.step, m.value) for m in history] == [(0, pytest.approx(logged[key]))], key


def test_read_batch_matches_store_samples(pipeline_inputs):
    from conv2dlstm.artifacts.windows_store import WindowsStore

    store = WindowsStore(pipeline_inputs["windows_anomalies"])
    cube = xr.open_zarr(pipeline_inputs["windows_anomalies"], consolidated=False)["data"].values
    starts = store.starts("test")
    for indices in ([0, 1, 2, 3], [0, 10], [7]):  # consecutive windows (one read), far apart, one
        x, y, last = inference.read_batch(store, "test", indices)
        assert x.shape == (len(indices), INPUT_STEPS, 1, LAT.size, LON.size)
        assert y.shape == (len(indices), LEAD_STEPS, 1, LAT.size, LON.size)
        for j, i in enumerate(indices):
            x_i, y_i = store.sample("test", i)
            np.testing.assert_array_equal(x[j], x_i)
            np.testing.assert_array_equal(y[j], y_i)
            np.testing.assert_array_equal(last[j], cube[starts[i] + INPUT_STEPS - 1, [0]])


def _write_stats(p: dict, name: str, stats: xr.Dataset) -> Path:
    path = p["root"] / name
    stats.to_netcdf(path)
    return path


@pytest.mark.parametrize("problem", ["no_climatology", "other_grid"])
def test_evaluate_bad_statistics_fail_before_any_output(pipeline_inputs, monkeypatch, problem):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    if problem == "no_climatology":
        stats = _write_stats(p, "stats_noclim.nc", _stats_dataset().drop_vars("climatology"))
        match = r"has no \['climatology'\].*re-run the normalize step"
    else:
        stats = _write_stats(p, "stats_grid.nc", _stats_dataset().assign_coords(lat=LAT + 0.5))
        match = "different lat coordinates; re-run the normalize and windows steps"
    out_dir = p["root"] / "evaluate" / f"stats_{problem}"
    with pytest.raises(DataError, match=match):
        evaluate.main(
            p["cfg"], run="convlstm", windows=p["windows"], stats=stats, checkpoint=p["checkpoint"], out_dir=out_dir
        )
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_evaluate_failure_mid_prediction_leaves_old_outputs(pipeline_inputs, monkeypatch):
    """A checkpoint whose model predicts 3 leads for 2-lead windows fails in the first batch."""
    import torch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    ckpt = torch.load(p["checkpoint"], weights_only=True)
    checkpoint = _variant_checkpoint(p, "train_3leads", model_kwargs={**ckpt["model_kwargs"], "lead_steps": 3})
    out_dir = p["root"] / "evaluate" / "threeleads"
    out_dir.mkdir(parents=True)
    (out_dir / "metrics.csv").write_text("previous result\n")
    with pytest.raises(DataError, match=r"predicts shape \(3, 1, 3, 4\) per window"):
        evaluate.main(
            p["cfg"], run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=checkpoint, out_dir=out_dir
        )
    assert [f.name for f in out_dir.iterdir()] == ["metrics.csv"]  # no staging folder left, old result kept
    assert (out_dir / "metrics.csv").read_text() == "previous result\n"


def _refused(p: dict, name: str, checkpoint: Path, match: str, *, windows: Path | None = None, cfg: dict | None = None):
    out_dir = p["root"] / "evaluate" / name
    with pytest.raises(DataError, match=match) as info:
        evaluate.main(
            cfg or p["cfg"],
            run="convlstm",
            windows=windows or p["windows"],
            stats=p["stats"],
            checkpoint=checkpoint,
            out_dir=out_dir,
        )
    assert "rerun the train step" in str(info.value) and "snakemake --forcerun train" in str(info.value)
    assert not out_dir.exists()


def test_evaluate_refuses_a_checkpoint_trained_on_other_windows(pipeline_inputs, monkeypatch):
    """The windows store was rebuilt (other data, other digest) after training: the model is stale."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    old, new = _windows_record(False)["digest"], _windows_record(True)["digest"]
    _refused(
        p,
        "other_windows",
        p["checkpoint"],
        rf"trained on windows digest {old} but the windows given have "
        rf"digest {new}",
        windows=p["windows_anomalies"],
    )


def test_evaluate_refuses_a_checkpoint_of_other_statistics_or_config(pipeline_inputs, monkeypatch):
    import torch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    other_stats = provenance.make_record(
        "train", keys.result_digest(p["cfg"], "train"), {"windows": _windows_record(False)["digest"], "stats": "e" * 16}
    )
    checkpoint = _variant_checkpoint(p, "train_other_stats", provenance=other_stats)
    _refused(
        p,
        "other_stats",
        checkpoint,
        rf"trained on stats digest e{{16}} but the stats given have digest "
        rf"{STATS_RECORD['digest']}",
    )

    changed = {**p["cfg"], "train": {**p["cfg"]["train"], "learning_rate": 0.5}}
    _refused(
        p, "other_config", p["checkpoint"], r"another configuration \(train.learning_rate: 0.003 -> 0.5\)", cfg=changed
    )

    ckpt = torch.load(p["checkpoint"], weights_only=True)
    del ckpt["provenance"]
    legacy = p["root"] / "train_legacy" / "best.pt"
    legacy.parent.mkdir()
    torch.save(ckpt, legacy)
    _refused(p, "legacy", legacy, "has no provenance record")


def test_evaluate_discards_partials_of_a_killed_attempt(pipeline_inputs, monkeypatch, caplog):
    import logging

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    out_dir = p["root"] / "evaluate" / "partials"
    (out_dir / ".evaluate.abcd1234.partial").mkdir(parents=True)  # a killed run's staging folder
    (out_dir / ".metrics.csv.1234abcd.partial").write_text("half a table")
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        evaluate.main(
            p["cfg"],
            run="convlstm",
            windows=p["windows"],
            stats=p["stats"],
            checkpoint=p["checkpoint"],
            out_dir=out_dir,
        )
    assert sorted(f.name for f in out_dir.iterdir()) == sorted((*evaluate.OUTPUT_FILES, "animation.gif"))
    assert caplog.text.count("discarded") == 2


# ---------------------------------------------------------------------------------------------
# Is the gain real? the skill interval of the evaluation on known cases


def test_evaluate_on_a_short_record_marks_the_climatology_not_meaningful(
    pipeline_inputs, monkeypatch, caplog, tmp_path
):
    """A 1-day climatology window: the January training days support no test day (February): skill
    against climatology and damped persistence is NaN and flagged in metrics.csv, MLflow, the log
    and compare.csv; skill against persistence is unaffected."""
    import logging

    import mlflow

    from conv2dlstm.steps import compare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    stats = _write_stats(p, "stats_short.nc", _stats_dataset().assign_attrs(climatology_window=1))
    run_id = _new_mlflow_run(p, "short")
    checkpoint = _variant_checkpoint(
        p, "train_short", mlflow_run_id=run_id, provenance=_train_record(p["cfg"], anomalies=True)
    )
    out_dir = p["root"] / "evaluate" / "short"
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        evaluate.main(
            p["cfg"],
            run="convlstm",
            windows=p["windows_anomalies"],
            stats=stats,
            checkpoint=checkpoint,
            out_dir=out_dir,
        )
    assert "climatology relies on the training climatology of days that no training day supports" in caplog.text
    assert "damped_persistence relies on" in caplog.text and "2021-02-18" in caplog.text  # the first valid day
    table = pd.read_csv(out_dir / "metrics.csv")
    model = table[table["model"] == "convlstm"].set_index(["metric", "lead"])["value"]
    for lead in (1, 2):
        for baseline in ("climatology", "damped_persistence"):
            assert model[(f"skill_vs_{baseline}_meaningful", lead)] == 0.0
            for suffix in ("", "_lower", "_upper", "_significant"):
                assert np.isnan(model[(f"skill_vs_{baseline}{suffix}", lead)]), (baseline, suffix)
        assert model[("skill_vs_persistence_meaningful", lead)] == 1.0
        assert np.isfinite(model[("skill_vs_persistence", lead)])
    logged = mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"]).get_run(run_id).data.metrics
    assert logged["skill_vs_climatology_meaningful_sst_lead1"] == 0.0
    assert "skill_vs_climatology_sst_lead1" not in logged and "skill_vs_persistence_sst_lead1" in logged
    compare.main(metrics=[out_dir / "metrics.csv"], out_csv=tmp_path / "compare.csv", out_plot=tmp_path / "compare.png")
    summary = pd.read_csv(tmp_path / "compare.csv").set_index("name")
    assert summary.loc["convlstm", "better_than_climatology"] == "not meaningful"
    assert summary.loc["convlstm", "better_than_damped_persistence"] == "not meaningful"
    assert np.isnan(summary.loc["convlstm", "skill_vs_climatology_mean"])
    assert summary.loc["convlstm", "better_than_persistence"] in ("yes", "partly", "no")


# ---------------------------------------------------------------------------------------------
# damped persistence wired into the evaluation: an AR(1) anomaly field with known skill

AR_PHI, AR_SD = 0.8, 0.5  # lag-1 autocorrelation and standard deviation (degC) of the anomalies
AR_LAT = np.arange(20.0, 32.0)
AR_LON = np.arange(-70.0, -58.0)


@pytest.fixture(scope="module")
def ar1_inputs(tmp_path_factory):
    """A windows store of climatology + AR(1) anomalies, independent per cell: 600 training days, 10
    validation days, 300 test windows; the true (constant) climatology in the statistics; an untrained model."""
    import mlflow
    import torch

    from conv2dlstm.training import models

    root = tmp_path_factory.mktemp("evaluate_ar1")
    n_train, n_val, n_test = 600, 10, 300 + INPUT_STEPS + LEAD_STEPS - 1
    times = pd.date_range("2019-01-01", periods=n_train + n_val + n_test, freq="D")
    mask = np.ones((AR_LAT.size, AR_LON.size), dtype=bool)
    mask[:2, :3] = False  # a little land
    # A climatology constant in time (a spatial gradient): with a seasonal cycle, persistence would
    # also pay for the day-to-day change of the climatology, which the analytic MSEs leave out.
    seasonal = np.broadcast_to(MEAN + 0.1 * AR_LAT[None, :, None], (times.size, AR_LAT.size, AR_LON.size))
    rng = np.random.default_rng(2024)
    anomaly = np.empty((times.size, AR_LAT.size, AR_LON.size))
    anomaly[0] = rng.normal(0, AR_SD, size=anomaly.shape[1:])
    for t in range(1, times.size):
        anomaly[t] = AR_PHI * anomaly[t - 1] + np.sqrt(1 - AR_PHI**2) * rng.normal(0, AR_SD, size=anomaly.shape[1:])
    data = (((seasonal + anomaly) - MEAN) / STD).astype("float32")[:, None]
    data[:, :, ~mask] = 0.0
    span = INPUT_STEPS + LEAD_STEPS
    starts = {
        "train": np.arange(0, n_train - span + 1),
        "val": np.arange(n_train, n_train + n_val - span + 1),
        "test": np.arange(n_train + n_val, times.size - span + 1),
    }
    stats_record = provenance.make_record("normalize", "c" * 16, {"regrid": "f" * 16})
    windows_record = provenance.make_record("windows", "d" * 16, {"regrid": "f" * 16, "stats": stats_record["digest"]})
    clim = np.where(mask, np.broadcast_to(seasonal[:1], (366, AR_LAT.size, AR_LON.size)), np.nan)[:, None]
    xr.Dataset(
        {
            "mean": ("variable", [MEAN]),
            "std": ("variable", [STD]),
            "climatology": (("dayofyear", "variable", "lat", "lon"), clim),
            "mask": (("lat", "lon"), mask),
            "variable_units": ("variable", np.array(["degC"], dtype=object)),
        },
        coords={"variable": ["sst"], "dayofyear": np.arange(1, 367), "lat": AR_LAT, "lon": AR_LON},
        attrs={
            "train_start": str(times[0].date()),
            "train_end": str(times[n_train - 1].date()),
            "per_pixel": 0,
            "climatology_window": 31,
            "format_version": stats_file.FORMAT_VERSION,
            **provenance.to_attrs(stats_record),
        },
    ).to_netcdf(root / "stats.nc")
    xr.Dataset(
        {
            "data": (("time", "variable", "lat", "lon"), data),
            "mask": (("lat", "lon"), mask),
            **{f"{s}_start": (f"{s}_sample", v.astype("int64")) for s, v in starts.items()},
        },
        coords={"time": times, "variable": np.array(["sst"], dtype=object), "lat": AR_LAT, "lon": AR_LON},
        attrs={
            "input_variables": ["sst"],
            "target_variables": ["sst"],
            "input_steps": INPUT_STEPS,
            "lead_steps": LEAD_STEPS,
            "stats_sha256": "0" * 64,
            "format_version": 1,
            **provenance.to_attrs(windows_record),
        },
    ).pipe(lambda ds: write_store(ds.chunk({"time": 64}), root / "windows.zarr"))
    cfg = sst_config(root, hidden_channels=[2], batch_size=64)
    kwargs = models.model_kwargs_from_config(
        cfg["model"],
        input_variables=["sst"],
        target_variables=["sst"],
        input_steps=INPUT_STEPS,
        lead_steps=LEAD_STEPS,
        height=AR_LAT.size,
        width=AR_LON.size,
    )
    torch.manual_seed(0)
    client = mlflow.MlflowClient(cfg["mlflow"]["tracking_uri"])
    experiment_id = client.create_experiment(cfg["experiment"], artifact_location=(root / "mlruns").as_uri())
    run_id = client.create_run(experiment_id, run_name="convlstm").info.run_id
    client.set_terminated(run_id)
    checkpoint = root / "train" / "best.pt"
    checkpoint.parent.mkdir()
    torch.save(
        {
            "format_version": checkpoint_file.FORMAT_VERSION,
            "model_name": "convlstm",
            "model_kwargs": kwargs,
            "model_state": models.build_model("convlstm", **kwargs).state_dict(),
            "config": cfg,
            "input_variables": ["sst"],
            "target_variables": ["sst"],
            "mlflow_run_id": run_id,
            "provenance": provenance.for_step(
                cfg, "train", {"windows": windows_record["digest"], "stats": stats_record["digest"]}
            ),
            "result_config": keys.result_config(cfg, "train"),
        },
        checkpoint,
    )
    return {"root": root, "cfg": cfg, "checkpoint": checkpoint}


def test_evaluate_damped_persistence_on_ar1_anomalies_has_the_analytic_skill(ar1_inputs, monkeypatch):
    """AR(1) anomalies a_t = phi a_(t-1) + e_t of standard deviation s: the damping fitted on the
    training period is phi^k, and the test RMSEs are s sqrt(1 - phi^2k) (damped persistence),
    s sqrt(2 (1 - phi^k)) (persistence) and s (climatology); damped persistence's skill against
    persistence, 1 - sqrt((1 + phi^k) / 2), lies in its interval, which excludes zero."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = ar1_inputs
    out_dir = p["root"] / "evaluate"
    evaluate.main(
        p["cfg"],
        run="convlstm",
        windows=p["root"] / "windows.zarr",
        stats=p["root"] / "stats.nc",
        checkpoint=p["checkpoint"],
        out_dir=out_dir,
    )
    table = pd.read_csv(out_dir / "metrics.csv")
    value = table.set_index(["model", "metric", "lead"])["value"]
    rows = scores.skill_intervals(table)
    damped_vs = rows[rows["model"] == "damped_persistence"].set_index(["baseline", "lead"])
    for lead in (1, 2):
        decay = AR_PHI**lead
        assert value[("damped_persistence", "rho", lead)] == pytest.approx(decay, abs=0.01)
        assert value[("damped_persistence", "rmse", lead)] == pytest.approx(AR_SD * math.sqrt(1 - decay**2), rel=0.03)
        assert value[("persistence", "rmse", lead)] == pytest.approx(AR_SD * math.sqrt(2 * (1 - decay)), rel=0.03)
        assert value[("climatology", "rmse", lead)] == pytest.approx(AR_SD, rel=0.03)
        row = damped_vs.loc[("persistence", lead)]
        analytic = 1 - math.sqrt((1 + decay) / 2)
        assert row["lower"] < analytic < row["upper"] and row["significant"] and row["meaningful"]
        row = damped_vs.loc[("climatology", lead)]
        assert row["lower"] < 1 - math.sqrt(1 - decay**2) < row["upper"] and row["significant"]


def test_variable_units_from_stats():
    stats = xr.Dataset(
        {"variable_units": ("variable", np.array(["degC", "mmol m-3"], dtype=object))},
        coords={"variable": ["sst", "no3"]},
    )
    assert stats_file.units(stats) == {"sst": "degC", "no3": "mmol m-3"}


@pytest.mark.parametrize("problem", ["missing", "garbage", "truncated", "no_climatology", "no_mask", "no_variable"])
def test_bad_statistics_file_names_path_and_normalize(tmp_path, problem):
    path = tmp_path / "stats.nc"
    stats = _stats_dataset()
    if problem == "garbage":
        path.write_text("not a netCDF file\n")
    elif problem == "truncated":
        stats.to_netcdf(path)
        path.write_bytes(path.read_bytes()[:400])
    elif problem == "no_climatology":
        stats.drop_vars("climatology").to_netcdf(path)
    elif problem == "no_mask":
        stats.drop_vars("mask").to_netcdf(path)
    elif problem == "no_variable":
        stats.to_netcdf(path)
    variables = ["no3"] if problem == "no_variable" else ["sst"]
    with pytest.raises(DataError, match=rf"(?s)statistics file {path}.*re-run the normalize step"):
        with stats_file.open_lazy(path, variables):
            pass


def test_open_stats_loads_float32_statistics(tmp_path):
    path = tmp_path / "stats.nc"
    _stats_dataset().to_netcdf(path)
    with stats_file.open_lazy(path, ["sst"]) as stats:
        assert stats["mean"].dtype == np.float32 and stats["std"].dtype == np.float32
        valid = xr.DataArray(pd.date_range("2021-03-01", periods=2).values.reshape(1, 2), dims=("time", "lead"))
        clim = inference.climatology_at(valid, stats, ["sst"])
        assert clim.dtype == np.float32 and clim.dims == ("time", "lead", "variable", "lat", "lon")


def test_evaluate_rolls_the_network_out_to_max_lead(pipeline_inputs, monkeypatch):
    """evaluate.max_lead past the trained leads: the test windows that reach it, every forecast and
    baseline to that lead, the network fed its own outputs, its trained leads unchanged."""
    import torch

    from conv2dlstm.training import models

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = pipeline_inputs
    max_lead = LEAD_STEPS + 3
    cfg = validate_config({**p["cfg"], "evaluate": {**p["cfg"]["evaluate"], "max_lead": max_lead}})
    short, long = p["root"] / "evaluate" / "short", p["root"] / "evaluate" / "long"
    for out_dir, config in ((short, p["cfg"]), (long, cfg)):
        evaluate.main(
            config, run="convlstm", windows=p["windows"], stats=p["stats"], checkpoint=p["checkpoint"], out_dir=out_dir
        )
    with predictions_file.open(short / "predictions.nc") as a, predictions_file.open(long / "predictions.nc") as b:
        a, b = a.load(), b.load()
    times = p["times"]
    reach = np.arange(
        45, times.size - INPUT_STEPS - max_lead + 1
    )  # windows whose max_lead steps stay in the test period
    np.testing.assert_array_equal(b["time"].values, times.values[reach + INPUT_STEPS - 1])
    assert b["sst"].shape == (reach.size, max_lead, LAT.size, LON.size)
    np.testing.assert_array_equal(b["valid_time"].values[:, -1], times.values[reach + INPUT_STEPS - 1 + max_lead])
    # the trained leads are the plain prediction, bit for bit
    np.testing.assert_array_equal(b["sst"].values[:, :LEAD_STEPS], a["sst"].values[: reach.size])

    # leads 3..4: the network on its own first two leads (normalized, land 0), as a forecaster would run it
    model, _ = models.load_model(p["checkpoint"])
    stats = xr.open_dataset(p["stats"])
    mean, std = float(stats["mean"].squeeze()), float(stats["std"].squeeze())
    ocean = torch.as_tensor(MASK.values, dtype=torch.float32)
    window = torch.as_tensor(xr.open_zarr(p["windows"])["data"].values[reach[0] : reach[0] + INPUT_STEPS])[None]
    with torch.no_grad():
        first = model(window)  # (1, LEAD_STEPS, 1, H, W)
        second = model(torch.cat([window, first * ocean], dim=1)[:, -INPUT_STEPS:])
    expected = (second[0, :, 0].numpy() * std + mean)[:, MASK.values]
    np.testing.assert_allclose(b["sst"].values[0, LEAD_STEPS : 2 * LEAD_STEPS][:, MASK.values], expected, rtol=1e-5)

    table = pd.read_csv(long / "metrics.csv")
    rmse = table[table["metric"] == "rmse"]
    for model_name in ("convlstm", "persistence", "climatology", "damped_persistence"):
        assert sorted(rmse[rmse["model"] == model_name]["lead"]) == list(range(1, max_lead + 1)), model_name
    assert sorted(table[table["metric"] == "skill_vs_persistence_lower"]["lead"].unique()) == list(
        range(1, max_lead + 1)
    )
    phys = _seasonal(times)  # persistence at lead 5, by hand
    cos = np.cos(np.deg2rad(LAT))[:, None] * MASK.values
    init_idx = reach + INPUT_STEPS - 1
    err2 = ((phys[init_idx] - phys[init_idx + max_lead]) ** 2 * cos).sum(axis=(1, 2)) / cos.sum()
    got = rmse[(rmse["model"] == "persistence") & (rmse["lead"] == max_lead)]["value"].iloc[0]
    assert got == pytest.approx(math.sqrt(err2.mean()), rel=1e-4)


def test_rollout_feeds_the_network_its_own_outputs_with_land_zero():
    """A network predicting the last input + 1, + 2: rolled out to 5 leads it counts on from its own
    outputs; on land the fed-back frames are 0, so land restarts from 0 after the trained leads."""
    import torch

    def plus(x):  # x (B, T_in, C_in, H, W) -> (B, 2, C_in, H, W)
        return torch.stack([x[:, -1] + 1, x[:, -1] + 2], dim=1)

    x = torch.full((1, 3, 1, 2, 2), 10.0)
    ocean = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = inference.rollout(plus, x, leads=5, feedback=[0], ocean=ocean)
    assert y.shape == (1, 5, 1, 2, 2)
    assert y[0, :, 0, 0, 0].tolist() == [11, 12, 13, 14, 15]
    assert y[0, :, 0, 0, 1].tolist() == [11, 12, 1, 2, 1]  # land: fed back as 0
    with pytest.raises(ConfigError, match=r"\['b'\] are not targets"):
        inference.feedback_channels(["a", "b"], ["a"])
    assert inference.feedback_channels(["b", "a"], ["a", "b", "c"]) == [1, 0]


def test_max_lead_past_the_trained_leads_needs_every_input_as_a_target():
    with pytest.raises(ConfigError, match=r"input variables \['fe', 'po4'\] are not targets"):
        validate_config({"evaluate": {"max_lead": 10}, "variables": {"inputs": ["fe", "po4"], "targets": ["no3"]}})
    with pytest.raises(ConfigError, match="evaluate.max_lead: 2 is below windows.lead_steps = 3"):
        validate_config({"evaluate": {"max_lead": 2}})
    assert validate_config({"evaluate": {"max_lead": 10}})["evaluate"]["max_lead"] == 10  # sst -> sst rolls out


def test_evaluate_scores_each_region_and_month(pipeline_inputs, monkeypatch, tmp_path):
    """evaluate.regions (a box and a mask file) and evaluate.by_season: per region the model's RMSE is the
    cos(lat)-weighted one over the region's ocean cells (numpy, independent), every stratum is in
    metrics.csv, MLflow and the two figures; a region without an ocean cell stops before any output."""
    import mlflow

    from conv2dlstm.evaluation.baselines import BASELINE_NAMES

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    figures = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.update({Path(path).name: fig}), save(fig, path)))
    p = pipeline_inputs
    north = np.zeros((LAT.size, LON.size))
    north[-1] = 1.0  # the northern row: 4 ocean cells
    xr.Dataset({"mask": (("lat", "lon"), north)}, coords={"lat": LAT, "lon": LON}).to_netcdf(tmp_path / "north.nc")
    regions = {"west": {"lon": [-60.0, -59.0]}, "north": {"mask": str(tmp_path / "north.nc")}}
    cfg = validate_config({**p["cfg"], "evaluate": {**p["cfg"]["evaluate"], "regions": regions, "by_season": "month"}})
    out_dir = p["root"] / "evaluate" / "strata"
    kwargs = {"run": "convlstm", "windows": p["windows"], "stats": p["stats"], "checkpoint": p["checkpoint"]}
    evaluate.main(cfg, **kwargs, out_dir=out_dir)
    for name in ("skill_by_region.png", "skill_by_season.png", "metrics.csv"):
        assert (out_dir / name).is_file(), name

    table = pd.read_csv(out_dir / "metrics.csv")
    assert list(dict.fromkeys(zip(table["region"], table["season"], strict=True))) == [
        (r, s)
        for r in ("all", "west", "north")
        for s in ("all", "Feb")  # first valid days 17..27 February
    ]
    times = p["times"]
    init_idx = np.arange(45, times.size - INPUT_STEPS - LEAD_STEPS + 1) + INPUT_STEPS - 1
    with predictions_file.open(out_dir / "predictions.nc") as ds:
        pred = np.asarray(ds["sst"].values)  # (time, lead, lat, lon)
    phys = _seasonal(times)
    cos = np.cos(np.deg2rad(LAT))[:, None] * np.ones((1, LON.size))
    cells = {
        "west": MASK.values & (LON[None, :] <= -59.0),
        "north": MASK.values & (north > 0),
        "all": MASK.values,
    }
    for region, inside in cells.items():
        w = cos * inside
        for lead in (1, 2):
            err2 = (np.where(inside, (pred[:, lead - 1] - phys[init_idx + lead]) ** 2, 0) * w).sum(
                axis=(1, 2)
            ) / w.sum()
            for season in ("all", "Feb"):
                rows = table[
                    (table["model"] == "convlstm")
                    & (table["metric"] == "rmse")
                    & (table["lead"] == lead)
                    & (table["region"] == region)
                    & (table["season"] == season)
                ]
                assert float(rows["value"].iloc[0]) == pytest.approx(math.sqrt(err2.mean()), rel=1e-4), (region, lead)

    logged = mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"]).get_run(p["run_id"]).data.metrics
    west = table[(table["model"] == "convlstm") & (table["metric"] == "rmse") & (table["region"] == "west")]
    assert logged["test_rmse_sst_lead1_region_west"] == pytest.approx(float(west["value"].iloc[0]))
    assert "skill_vs_persistence_sst_lead1_season_Feb" in logged
    assert "skill_horizon_vs_damped_persistence_sst_region_north" in logged
    assert not any("_region_" in k and "_season_" in k for k in logged)  # a region within a month: metrics.csv only
    artifacts = {
        a.path for a in mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"]).list_artifacts(p["run_id"], "evaluate")
    }
    assert {"evaluate/skill_by_region.png", "evaluate/skill_by_season.png"} <= artifacts

    # one panel per baseline, one interval per stratum in each (the whole grid first)
    by_region = figures["skill_by_region.png"]
    assert len(by_region.axes) == len(BASELINE_NAMES)
    assert [t.get_text() for t in by_region.axes[0].get_legend().get_texts()] == ["all", "west", "north"]
    assert [t.get_text() for t in figures["skill_by_season.png"].axes[0].get_legend().get_texts()] == ["all", "Feb"]

    # a region on land only: refused before any output, naming it
    land = {"corner": {"lat": [20.5, 21.5], "lon": [-58.0, -57.0]}}
    cfg = validate_config({**p["cfg"], "evaluate": {**p["cfg"]["evaluate"], "regions": land}})
    with pytest.raises(DataError, match=r"evaluate.regions.corner: .* holds no ocean cell"):
        evaluate.main(cfg, **kwargs, out_dir=p["root"] / "evaluate" / "land")
    assert not (p["root"] / "evaluate" / "land").exists()
