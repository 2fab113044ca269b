"""Forecast step on the embedded data: the real Snakemake rules, the champion, run id and checkpoint
choices, equality with the evaluate step's predictions, the WeatherBench 2 / CF layout, and refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conv2dlstm import cli
from conv2dlstm.artifacts import checkpoint, digests, provenance
from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.steps import forecast
from tests.support.workflow import run_snakemake

pytestmark = pytest.mark.e2e

STATS = "results/normalize/oisst.nc"
PREDICTIONS = "results/evaluate/convlstm/predictions.nc"
MODEL = "results/train/convlstm/model.pt"


@pytest.fixture(scope="module")
def wf(tiny_run: Path, tmp_path_factory) -> Path:
    """A copy of the complete tiny pipeline (the forecasts must not touch the shared run)."""
    dest = tmp_path_factory.mktemp("forecast") / "wf"
    shutil.copytree(tiny_run, dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def test_init(wf: Path) -> pd.Timestamp:
    """An initial time of the test period, in the middle of it."""
    with predictions_file.open(wf / PREDICTIONS) as ds:
        return pd.Timestamp(ds["time"].values[ds.sizes["time"] // 2])


def _prediction_at(wf: Path, init: pd.Timestamp) -> xr.DataArray:
    with predictions_file.open(wf / PREDICTIONS) as ds:
        return ds["sst"].sel(time=init).load()  # (lead, lat, lon)


def _cli(wf: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.chdir(wf)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = cli.main(["forecast", *args])
    return code, capsys.readouterr().err


def _config(wf: Path, name: str, **changes) -> str:
    cfg = yaml.safe_load((wf / "tiny.yaml").read_text())
    for section, values in changes.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    (wf / name).write_text(yaml.safe_dump(cfg))
    return name


@pytest.fixture(scope="module")
def rule_outputs(wf: Path, test_init: pd.Timestamp) -> dict[str, Path]:
    """One Snakemake call with both targets: the rule by name (latest) and an output path (a test day)."""
    dated = f"results/forecast/{test_init:%Y-%m-%d}.nc"
    proc = run_snakemake(wf, "forecast", dated, "--cores", "1", "--configfile", "tiny.yaml")  # targets first
    out = proc.stdout + proc.stderr
    for rule in ("train", "evaluate", "compare", "regrid"):
        assert f"rule {rule}:" not in out, f"{rule} re-ran"
    return {"latest": wf / "results/forecast/latest.nc", "dated": wf / dated}


def test_forecast_of_a_test_day_reproduces_evaluate_exactly(wf, test_init, rule_outputs):
    with xr.open_dataset(rule_outputs["dated"]) as ds:
        ds = ds.load()
    assert dict(ds.sizes) == {"time": 1, "prediction_timedelta": 3, "latitude": 5, "longitude": 5}
    assert ds["sst"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert pd.Timestamp(ds["time"].values[0]) == test_init
    expected = _prediction_at(wf, test_init)
    np.testing.assert_array_equal(ds["sst"].values[0], expected.values)  # bit for bit, NaN on land
    assert np.isfinite(ds["sst"].values).any()
    zarr_ds = xr.open_zarr(rule_outputs["dated"].with_suffix(".zarr"))
    np.testing.assert_array_equal(zarr_ds["sst"].values, ds["sst"].values)
    # one reader, one layout: the forecast is the evaluate step's row of that initial time, coordinates,
    # dtypes and attributes of the variables and coordinates included, from the netCDF and the Zarr copy
    for evaluated in (wf / PREDICTIONS, (wf / PREDICTIONS).with_suffix(".zarr")):
        with predictions_file.open(rule_outputs["dated"]) as fc, predictions_file.open(evaluated) as pred:
            row = pred.sel(time=[test_init]).load()
            fc = fc.load()
        xr.testing.assert_equal(fc, row)
        for name in (*row.data_vars, *row.coords):
            assert fc[name].dtype == row[name].dtype and fc[name].attrs == row[name].attrs, (evaluated, name)
    log = (wf / f"results/logs/forecast/{test_init:%Y-%m-%d}.log").read_text()
    assert "no models:/tiny@champion" in log  # mlflow.log_model false registers nothing: the run's model.pt


def test_forecast_layout_units_and_provenance(wf, rule_outputs):
    with xr.open_dataset(rule_outputs["latest"]) as ds:
        ds = ds.load()
    assert pd.Timestamp(ds["time"].values[0]).normalize() == pd.Timestamp("2019-06-30")  # source.end of tiny.yaml
    lead = ds["prediction_timedelta"]
    assert lead.dtype.kind == "m" and list(lead.values) == [np.timedelta64(k, "D") for k in (1, 2, 3)]
    assert lead.attrs["standard_name"] == "forecast_period"
    np.testing.assert_array_equal(ds["valid_time"].values, ds["time"].values[:, None] + lead.values[None, :])
    assert ds["time"].attrs["standard_name"] == "forecast_reference_time"
    assert ds["latitude"].attrs["units"] == "degrees_north" and ds["longitude"].attrs["units"] == "degrees_east"
    assert ds["sst"].attrs["units"] == "degC" and ds["sst"].attrs["standard_name"] == "sea_surface_temperature"
    assert ds.attrs["Conventions"] == "CF-1.8"
    with predictions_file.open(wf / PREDICTIONS) as pred:
        assert ds.attrs["model_run_id"] == pred.attrs["mlflow_run_id"]
    assert ds.attrs["checkpoint_digest"] == checkpoint.read_provenance(wf / MODEL)["digest"]
    assert ds.attrs["stats_digest"] == digests.digest_of(wf / STATS)
    record = provenance.validate(ds.attrs["provenance"], where="forecast", step="forecast")
    assert record["inputs"]["checkpoint"] == ds.attrs["checkpoint_digest"]
    assert record["inputs"]["manifest"] == ds.attrs["input_manifest_sha256"]
    assert digests.digest_of(rule_outputs["latest"]) == record["digest"]
    zarr_ds = xr.open_zarr(rule_outputs["latest"].with_suffix(".zarr"))  # Zarr v2, consolidated: WB2 reads it
    assert set(zarr_ds.dims) == {"time", "prediction_timedelta", "latitude", "longitude"}
    assert (rule_outputs["latest"].with_suffix(".zarr") / ".zmetadata").is_file()


def test_forecast_with_the_champion_a_run_id_or_a_checkpoint(wf, test_init, tmp_path, monkeypatch, capsys):
    """The registered champion is used when it exists; --run-id and --checkpoint give the same model."""
    import mlflow

    monkeypatch.chdir(wf)
    run_id = (wf / "results/train/convlstm/mlflow_run_id.txt").read_text().strip()
    client = mlflow.MlflowClient("sqlite:///mlflow.db")
    if not client.search_registered_models(filter_string="name = 'tiny'"):
        client.create_registered_model("tiny")
    version = client.create_model_version("tiny", source=f"runs:/{run_id}/checkpoints", run_id=run_id)
    client.set_registered_model_alias("tiny", "champion", version.version)
    expected = _prediction_at(wf, test_init).values
    common = ["--config", "tiny.yaml", "--stats", STATS, "--init-date", f"{test_init:%Y-%m-%d}"]
    for label, extra in (("champion", []), ("run", ["--run-id", run_id]), ("file", ["--checkpoint", MODEL])):
        out = tmp_path / label
        code, err = _cli(
            wf, monkeypatch, capsys, *common, *extra, "--out-nc", str(out / "f.nc"), "--out-zarr", str(out / "f.zarr")
        )
        assert code == 0, err
        with xr.open_dataset(out / "f.nc") as ds:
            np.testing.assert_array_equal(ds["sst"].values[0], expected)
            assert ds.attrs["model_run_id"] == run_id, label
            if label == "champion":
                assert ds.attrs["model_source"].startswith("models:/tiny@champion"), ds.attrs["model_source"]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("variables", r"trained with input_variables \['sst'\] but variables.inputs is \['sst', 'sss'\]"),
        ("grid", r"other settings \(grid.lat: .*30.5.* -> .*31.5"),
        ("stats", r"are not those the model .* was normalized with \(digest"),
        ("no_data", r"needs the 5 input days 2019-07-06\.\.2019-07-10 .*give an --init-date whose input days"),
        ("bad_date", r"--init-date 'yesterday' is not a date"),
    ],
)
def test_forecast_refusals_name_what_differs_and_write_nothing(wf, case, match, tmp_path, monkeypatch, capsys):
    args = ["--config", "tiny.yaml", "--stats", STATS, "--checkpoint", MODEL]
    if case == "variables":
        args[1] = _config(wf, "vars.yaml", variables={"inputs": ["sst", "sss"]})
    elif case == "grid":
        args[1] = _config(wf, "grid.yaml", grid={"lat": {"start": 31.5, "stop": 35.5, "step": 1.0}})
    elif case == "stats":
        other = tmp_path / "other_stats.nc"
        with xr.open_dataset(wf / STATS) as ds:
            ds = ds.load()
        ds.attrs.update(provenance.to_attrs(provenance.make_record("normalize", "0" * 16, {"regrid": "1" * 16})))
        ds.to_netcdf(other)
        args[3] = str(other)
    elif case == "no_data":
        args += ["--init-date", "2019-07-10"]  # after the embedded data
    else:
        args += ["--init-date", "yesterday"]
    out_nc, out_zarr = tmp_path / "out" / "f.nc", tmp_path / "out" / "f.zarr"
    code, err = _cli(wf, monkeypatch, capsys, *args, "--out-nc", str(out_nc), "--out-zarr", str(out_zarr))
    assert code == 2, err
    assert __import__("re").search(match, err), err
    assert "max_missing" not in err and "source.start" not in err  # which do not apply to a forecast
    assert not out_nc.exists() and not out_zarr.exists()


def test_check_grid_names_both_grids():
    stats = xr.Dataset(coords={"lat": [30.5, 31.5], "lon": [-69.5, -68.5]})
    forecast.check_grid("the input", np.array([30.5, 31.5]), np.array([-69.5, -68.5]), stats, stats_path=Path("s.nc"))
    with pytest.raises(Exception, match=r"the input has lat 3 cells 30.5..32.5 but the model's grid .* 2 cells"):
        forecast.check_grid(
            "the input", np.array([30.5, 31.5, 32.5]), np.array([-69.5, -68.5]), stats, stats_path=Path("s.nc")
        )
