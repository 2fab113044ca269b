"""Evaluate step: score a trained run, persistence and climatology on the test period.

:func:`main` predicts every test window with the trained network, converts predictions, truth and
the two baselines to physical units, and scores all three with the same functions of
:mod:`conv2dlstm.metrics` (area-weighted, land excluded) per target variable and lead. Outputs in
``out_dir``:

- ``predictions.nc``: CF-1.8 netCDF, one variable per target, dims ``(time, lead, lat, lon)`` with
  ``time`` the initial time, ``lead_time(lead)`` and ``valid_time(time, lead)`` coordinates;
- ``metrics.csv``: tidy table ``run,model,variable,lead,metric,value``;
- ``rmse_vs_lead.png``, ``acc_vs_lead.png``, ``maps.png``, ``rmse_map.png``.

Everything is also logged into the training run's MLflow run (metrics named like
``test_rmse_sst_lead1``, ``persistence_rmse_sst_lead1``, ``skill_vs_persistence_sst_lead1``; the CSV
and the plots as artifacts under ``evaluate/``). The outputs are built in a hidden staging folder
and moved into place only after logging succeeded, so a failure leaves no partial output.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm import __version__, baselines, metrics, plots
from conv2dlstm.errors import ConfigError, DataError, TrackingError
from conv2dlstm.fsutil import atomic_output, sha256_file

log = logging.getLogger(__name__)

SPLIT = "test"
BASELINE_NAMES: tuple[str, ...] = ("persistence", "climatology")
SCORES: tuple[str, ...] = ("rmse", "mae", "bias", "acc")
CSV_COLUMNS: list[str] = ["run", "model", "variable", "lead", "metric", "value"]
RUN_ID_FILE = "mlflow_run_id.txt"
ARTIFACT_DIR = "evaluate"
OUTPUT_FILES: tuple[str, ...] = (
    "predictions.nc",
    "metrics.csv",
    "rmse_vs_lead.png",
    "acc_vs_lead.png",
    "maps.png",
    "rmse_map.png",
)

STANDARD_NAMES: dict[str, str] = {
    "sst": "sea_surface_temperature",
    "sss": "sea_surface_salinity",
    "no3": "mole_concentration_of_nitrate_in_sea_water",
    "po4": "mole_concentration_of_phosphate_in_sea_water",
    "si": "mole_concentration_of_silicate_in_sea_water",
    "fe": "mole_concentration_of_dissolved_iron_in_sea_water",
    "chl": "mass_concentration_of_chlorophyll_a_in_sea_water",
    "o2": "mole_concentration_of_dissolved_molecular_oxygen_in_sea_water",
}
LONG_NAMES: dict[str, str] = {
    "sst": "sea surface temperature",
    "sss": "sea surface salinity",
    "no3": "nitrate concentration",
    "po4": "phosphate concentration",
    "si": "silicate concentration",
    "fe": "dissolved iron concentration",
    "chl": "chlorophyll-a concentration",
    "o2": "dissolved oxygen concentration",
}


# --------------------------------------------------------------------------------------------------
# Pure helpers


def resolve_run_id(checkpoint: str | os.PathLike, ckpt: Mapping[str, Any]) -> str:
    """MLflow run id of the training run: from the checkpoint, else ``mlflow_run_id.txt`` beside it."""
    run_id = str(ckpt.get("mlflow_run_id") or "").strip()
    if run_id:
        return run_id
    sidecar = Path(checkpoint).parent / RUN_ID_FILE
    if sidecar.is_file():
        run_id = sidecar.read_text().strip()
        if run_id:
            return run_id
    raise TrackingError(
        f"checkpoint {checkpoint} names no MLflow run (no 'mlflow_run_id' entry and no non-empty "
        f"{sidecar}); re-run the train step so that evaluation can log into its run"
    )


def window_indices(starts: np.ndarray, input_steps: int, lead_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Time indices of each window's initial time ``(N,)`` and of its valid times ``(N, lead_steps)``."""
    init = np.asarray(starts, dtype="int64") + input_steps - 1
    valid = init[:, None] + np.arange(1, lead_steps + 1, dtype="int64")[None, :]
    return init, valid


def forecast_array(
    values: np.ndarray,
    *,
    init_times: np.ndarray,
    valid_times: np.ndarray,
    variables: Sequence[str],
    lat: np.ndarray,
    lon: np.ndarray,
    name: str = "forecast",
) -> xr.DataArray:
    """Wrap ``(time, lead, variable, lat, lon)`` values with forecast coordinates.

    Coordinates: ``time`` (initial time), ``lead`` (1..T_out), ``lead_time(lead)`` (timedelta of the
    first window; windows span no gap so it is the same for all), ``valid_time(time, lead)``,
    ``variable``, ``lat``, ``lon``.
    """
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    valid_times = np.asarray(valid_times, dtype="datetime64[ns]")
    n, n_lead = valid_times.shape
    if values.shape[:3] != (n, n_lead, len(variables)):
        raise DataError(
            f"forecast values have shape {values.shape}; expected ({n}, {n_lead}, {len(variables)}, lat, lon)"
        )
    lead_time = (valid_times[0] - init_times[0]) if n else np.zeros(n_lead, dtype="timedelta64[ns]")
    return xr.DataArray(
        values,
        dims=("time", "lead", "variable", "lat", "lon"),
        coords={
            "time": init_times,
            "lead": np.arange(1, n_lead + 1, dtype="int64"),
            "lead_time": ("lead", np.asarray(lead_time, dtype="timedelta64[ns]")),
            "valid_time": (("time", "lead"), valid_times),
            "variable": list(variables),
            "lat": np.asarray(lat, dtype="float64"),
            "lon": np.asarray(lon, dtype="float64"),
        },
        name=name,
    )


def score_forecasts(
    forecasts: Mapping[str, xr.DataArray],
    truth: xr.DataArray,
    climatology: xr.DataArray,
    weights: xr.DataArray,
) -> pd.DataFrame:
    """Score each forecast against ``truth`` with the same metric code.

    Args:
        forecasts: name -> ``(time, lead, variable, lat, lon)`` forecast, physical units. Names in
            :data:`BASELINE_NAMES` are baselines; every other entry also gets
            ``skill_vs_<baseline>`` = 1 - RMSE / RMSE(baseline) for each baseline present.
        truth: observed values at the valid times, same layout.
        climatology: day-of-year climatology at the valid times (for ACC), same layout.
        weights: ``(lat, lon)`` from :func:`conv2dlstm.metrics.area_weights`.

    Returns:
        Tidy frame with columns ``model, variable, lead, metric, value``. The ACC of the climatology
        forecast is undefined (its anomalies are zero) and is not reported.
    """
    frames: list[pd.DataFrame] = []
    rmse_of: dict[str, xr.DataArray] = {}
    for name, forecast in forecasts.items():
        scores = {
            "rmse": metrics.rmse(forecast, truth, weights),
            "mae": metrics.mae(forecast, truth, weights),
            "bias": metrics.bias(forecast, truth, weights),
        }
        if name != "climatology":
            scores["acc"] = metrics.acc(forecast, truth, climatology, weights)
        rmse_of[name] = scores["rmse"]
        for metric, da in scores.items():
            frames.append(_tidy(da, model=name, metric=metric))
    for name in forecasts:
        if name in BASELINE_NAMES:
            continue
        for baseline in BASELINE_NAMES:
            if baseline in rmse_of:
                skill = metrics.skill_score(rmse_of[name], rmse_of[baseline])
                frames.append(_tidy(skill, model=name, metric=f"skill_vs_{baseline}"))
    return pd.concat(frames, ignore_index=True)


def _tidy(da: xr.DataArray, *, model: str, metric: str) -> pd.DataFrame:
    """``(lead, variable)`` scores as rows ``model, variable, lead, metric, value``."""
    da = da.transpose("variable", "lead")
    values = np.asarray(da.values, dtype="float64")
    variables = [str(v) for v in da["variable"].values]
    leads = [int(k) for k in da["lead"].values]
    rows = [
        {"model": model, "variable": v, "lead": k, "metric": metric, "value": float(values[i, j])}
        for i, v in enumerate(variables)
        for j, k in enumerate(leads)
    ]
    return pd.DataFrame(rows, columns=["model", "variable", "lead", "metric", "value"])


def metrics_table(scores: pd.DataFrame, *, run: str, model_name: str, source: str = "model") -> pd.DataFrame:
    """The tidy ``metrics.csv`` table: rows of ``scores`` with the run, and ``source`` renamed to ``model_name``."""
    table = scores.copy()
    table.loc[table["model"] == source, "model"] = model_name
    table.insert(0, "run", run)
    table["lead"] = table["lead"].astype("int64")
    order = {name: i for i, name in enumerate([model_name, *BASELINE_NAMES])}
    table = table.sort_values(
        ["model", "variable", "metric", "lead"], key=lambda s: s.map(order) if s.name == "model" else s, kind="stable"
    )
    return table[CSV_COLUMNS].reset_index(drop=True)


def mlflow_metrics(table: pd.DataFrame, *, model_name: str) -> dict[str, float]:
    """Flat MLflow metric names for a ``metrics.csv`` table (non-finite values are left out).

    Model scores are ``test_<metric>_<variable>_lead<k>``, skill scores
    ``skill_vs_<baseline>_<variable>_lead<k>``, baseline scores ``<baseline>_<metric>_<variable>_lead<k>``;
    each also gets a ``..._<variable>_mean`` over leads.
    """
    out: dict[str, float] = {}

    def prefix(model: str, metric: str) -> str:
        if model == model_name:
            return metric if metric.startswith("skill_vs_") else f"test_{metric}"
        return f"{model}_{metric}"

    for row in table.itertuples(index=False):
        if np.isfinite(row.value):
            out[f"{prefix(row.model, row.metric)}_{row.variable}_lead{row.lead}"] = float(row.value)
    means = table.groupby(["model", "metric", "variable"], sort=False)["value"].mean()
    for (model, metric, variable), value in means.items():
        if np.isfinite(value):
            out[f"{prefix(model, metric)}_{variable}_mean"] = float(value)
    return out


def variable_units(stats: xr.Dataset) -> dict[str, str]:
    """Units per variable from the statistics file's ``variable_units`` (empty strings if absent)."""
    names = [str(v) for v in stats["variable"].values] if "variable" in stats.coords else []
    if "variable_units" in stats:
        return {n: str(u) for n, u in zip(names, np.asarray(stats["variable_units"].values).tolist(), strict=True)}
    return {n: str(stats.attrs.get(f"units_{n}", "")) for n in names}


def predictions_dataset(
    forecast: xr.DataArray,
    *,
    units: Mapping[str, str],
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """CF-1.8 dataset of forecasts: one float32 variable per target, dims ``(time, lead, lat, lon)``."""
    data_vars = {}
    for variable in forecast["variable"].values:
        variable = str(variable)
        da = forecast.sel(variable=variable, drop=True).astype("float32")
        da.attrs = {
            "long_name": f"predicted {LONG_NAMES.get(variable, variable)}",
            "units": units.get(variable, "1") or "1",
        }
        if variable in STANDARD_NAMES:
            da.attrs["standard_name"] = STANDARD_NAMES[variable]
        data_vars[variable] = da
    ds = xr.Dataset(data_vars)
    ds["time"].attrs = {"standard_name": "forecast_reference_time", "long_name": "forecast initial time"}
    ds["lead"].attrs = {"long_name": "lead step after the initial time", "units": "1"}
    ds["lead_time"].attrs = {"standard_name": "forecast_period", "long_name": "lead time"}
    ds["valid_time"].attrs = {"standard_name": "time", "long_name": "valid time of the forecast"}
    ds["lat"].attrs = {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}
    ds["lon"].attrs = {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}
    ds.attrs = {
        "Conventions": "CF-1.8",
        "title": "Forecasts on the test period",
        "source": f"conv2dlstm {__version__}",
        "history": f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} conv2dlstm evaluate",
        **(attrs or {}),
    }
    return ds


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` as compressed netCDF4 atomically (float variables NaN-filled on land)."""
    encoding: dict[str, dict[str, Any]] = {
        name: {"zlib": True, "complevel": 4, "_FillValue": np.float32(np.nan)} for name in ds.data_vars
    }
    for name in ("time", "valid_time"):
        encoding[name] = {
            "units": "hours since 1970-01-01 00:00:00",
            "calendar": "proleptic_gregorian",
            "dtype": "float64",
        }
    encoding["lead_time"] = {"units": "hours", "dtype": "float64"}
    with atomic_output(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)


def write_csv(table: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a table as CSV atomically."""
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False)


def plot_sample(init_times: pd.DatetimeIndex, plot_date: str) -> int:
    """Index of the test sample shown in ``maps.png``: the one initialized on ``plot_date`` (or 0)."""
    if not plot_date:
        return 0
    try:
        day = pd.Timestamp(plot_date).normalize()
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"config key evaluate.plot_date: {plot_date!r} is not a date; write it as YYYY-MM-DD"
        ) from exc
    hits = np.flatnonzero(init_times.normalize() == day)
    if hits.size == 0:
        raise ConfigError(
            f"config key evaluate.plot_date: {plot_date} is not the initial date of a test sample; "
            f"test initial times run from {init_times.min():%Y-%m-%d} to {init_times.max():%Y-%m-%d} "
            "(leave it empty for the first sample)"
        )
    return int(hits[0])


def select_device(name: str) -> Any:
    """``torch.device`` for ``train.device`` (auto = CUDA when present)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key train.device: 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def predict(model: Any, samples: Iterable[np.ndarray], *, batch_size: int, device: Any) -> Iterable[np.ndarray]:
    """Run ``model`` on ``(T_in, C_in, H, W)`` samples in batches; yield ``(B, T_out, C_out, H, W)`` arrays."""
    import torch

    model = model.to(device).eval()
    batch: list[np.ndarray] = []

    def run(batch: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(batch)).to(device=device, dtype=torch.float32)  # (B, T_in, C_in, H, W)
        with torch.inference_mode():
            y = model(x)  # (B, T_out, C_out, H, W)
        return y.float().cpu().numpy()

    for sample in samples:
        batch.append(np.asarray(sample, dtype="float32"))
        if len(batch) == batch_size:
            yield run(batch)
            batch = []
    if batch:
        yield run(batch)


def _check_checkpoint(ckpt: Mapping[str, Any], store: Any, checkpoint: Path) -> None:
    for key in ("input_variables", "target_variables"):
        trained = list(ckpt.get(key) or [])
        stored = list(getattr(store, key))
        if trained and trained != stored:
            raise DataError(
                f"checkpoint {checkpoint} was trained with {key} {trained} but the windows store has "
                f"{stored}; evaluate with the windows the run was trained on (re-run train)"
            )


def _log_to_mlflow(cfg: Mapping[str, Any], run_id: str, values: Mapping[str, float], artifacts: Sequence[Path]) -> None:
    """Log scores and files into the existing (training) MLflow run ``run_id``."""
    from conv2dlstm import tracking

    with tracking.resume_run(run_id, tracking_uri=tracking.resolve_tracking_uri(dict(cfg))) as tracker:
        names = sorted(values)
        for i in range(0, len(names), 500):  # MLflow caps the metrics of one batch request
            tracker.log_metrics({k: values[k] for k in names[i : i + 500]})
        for path in artifacts:
            tracker.log_artifact(path, artifact_path=ARTIFACT_DIR)


# --------------------------------------------------------------------------------------------------
# Entry point


def main(cfg: dict[str, Any], *, run: str, windows: Path, stats: Path, checkpoint: Path, out_dir: Path) -> None:
    """Predict the test split, score the run and the baselines, write and log the results."""
    import zarr

    from conv2dlstm import data, models, normalize

    windows, stats, checkpoint, out_dir = Path(windows), Path(stats), Path(checkpoint), Path(out_dir)
    store = data.WindowsStore(windows)
    model, ckpt = models.load_model(checkpoint)
    _check_checkpoint(ckpt, store, checkpoint)
    run_id = resolve_run_id(checkpoint, ckpt)
    model_name = str(ckpt.get("model_name") or cfg["model"]["name"])

    starts = np.asarray(store.starts(SPLIT), dtype="int64")
    if starts.size == 0:
        raise DataError(
            f"the windows store {windows} has no test window; lengthen splits.test or shorten "
            "windows.input_steps + windows.lead_steps"
        )
    time = np.asarray(store.time, dtype="datetime64[ns]")
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    targets = [str(v) for v in store.target_variables]
    n_in, n_out = int(store.input_steps), int(store.lead_steps)
    init_idx, valid_idx = window_indices(starts, n_in, n_out)
    mask = xr.DataArray(np.asarray(store.mask, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})
    weights = metrics.area_weights(lat, mask)

    init_times = pd.DatetimeIndex(time[init_idx])
    k = plot_sample(init_times, cfg["evaluate"]["plot_date"])  # a bad plot_date fails before the work

    device = select_device(cfg["train"]["device"])
    log.info("predicting %d test windows on %s", starts.size, device)
    truth_list: list[np.ndarray] = []

    def inputs() -> Iterable[np.ndarray]:
        for i in range(starts.size):
            x, y = store.sample(SPLIT, i)  # (T_in, C_in, H, W), (T_out, C_out, H, W)
            truth_list.append(y)
            yield x

    batches = predict(model, inputs(), batch_size=cfg["evaluate"]["batch_size"], device=device)
    pred_n = np.concatenate(list(batches))  # (N, T_out, C_out, H, W), normalized
    truth_n = np.stack(truth_list)  # (N, T_out, C_out, H, W), normalized
    expected = (starts.size, n_out, len(targets), lat.size, lon.size)
    if pred_n.shape != expected:
        raise DataError(
            f"the model of {checkpoint} predicts shape {pred_n.shape} but the windows store needs "
            f"{expected}; the checkpoint does not match these windows (re-run train)"
        )
    cube = zarr.open_group(str(windows), mode="r")["data"]
    last_n = baselines.target_at_init(cube, init_idx, list(store.target_channels))  # (N, C_out, H, W)

    with xr.open_dataset(stats) as opened:
        stats_ds = opened.load()
    coords = {
        "init_times": time[init_idx],
        "valid_times": time[valid_idx],
        "variables": targets,
        "lat": lat,
        "lon": lon,
    }

    def physical(values: np.ndarray, name: str) -> xr.DataArray:
        da = forecast_array(values, name=name, **coords)
        return normalize.denormalize(da, stats_ds).where(mask).transpose(*da.dims)

    forecast = physical(pred_n, "prediction")
    truth = physical(truth_n, "truth")
    last = xr.DataArray(
        last_n,
        dims=("time", "variable", "lat", "lon"),
        coords={"time": forecast["time"], "variable": targets, "lat": lat, "lon": lon},
    )
    last = normalize.denormalize(last, stats_ds).where(mask).transpose(*last.dims)
    persist = baselines.persistence(last, n_out).assign_coords(
        lead_time=forecast["lead_time"], valid_time=forecast["valid_time"]
    )
    clim = baselines.climatology(forecast["valid_time"], stats_ds, targets).where(mask)

    scores = score_forecasts(
        {"model": forecast, "persistence": persist, "climatology": clim}, truth, clim, weights
    )
    table = metrics_table(scores, run=run, model_name=model_name)
    units = variable_units(stats_ds)
    period = f"{init_times.min():%Y-%m-%d}..{init_times.max():%Y-%m-%d}"
    who = run if run == model_name else f"{run} ({model_name})"

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evaluate.", suffix=".partial", dir=out_dir))
    try:
        ds = predictions_dataset(
            forecast,
            units=units,
            attrs={
                "run": run,
                "model_name": model_name,
                "checkpoint": checkpoint.name,
                "checkpoint_sha256": sha256_file(checkpoint),
                "mlflow_run_id": run_id,
            },
        )
        write_netcdf(ds, staging / "predictions.nc")
        write_csv(table, staging / "metrics.csv")
        labelled = table.assign(label=table["model"])
        plots.lines_vs_lead(
            labelled[labelled["metric"] == "rmse"],
            staging / "rmse_vs_lead.png",
            ylabel="area-weighted RMSE (physical units)",
            title=f"{who} vs baselines: RMSE by lead, test initial times {period}",
        )
        plots.lines_vs_lead(
            labelled[labelled["metric"] == "acc"],
            staging / "acc_vs_lead.png",
            ylabel="anomaly correlation (ACC)",
            title=f"{who} vs persistence: ACC by lead, test initial times {period}",
        )
        plots.forecast_maps(
            truth.isel(time=k).sel(lead=1),
            forecast.isel(time=k).sel(lead=1),
            staging / "maps.png",
            title=(
                f"{who}: lead 1 forecast initialized {init_times[k]:%Y-%m-%d}, "
                f"valid {pd.Timestamp(forecast['valid_time'].values[k, 0]):%Y-%m-%d} (land grey)"
            ),
            units=units,
        )
        plots.field_maps(
            metrics.rmse_per_cell(forecast.sel(lead=1), truth.sel(lead=1), mask),
            staging / "rmse_map.png",
            title=f"{who}: RMSE per grid cell at lead 1, test initial times {period}",
            units=units,
        )
        _log_to_mlflow(
            cfg,
            run_id,
            mlflow_metrics(table, model_name=model_name),
            [staging / name for name in OUTPUT_FILES if name != "predictions.nc"],
        )
        for name in OUTPUT_FILES:
            with atomic_output(out_dir / name) as tmp:
                os.replace(staging / name, tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s", ", ".join(str(out_dir / n) for n in OUTPUT_FILES))
