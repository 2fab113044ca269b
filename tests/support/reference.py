"""Reference implementations that only the tests call: the definitions that the evaluate step's
streaming code must reproduce.

- :func:`score_forecasts`: the score table of forecasts held in memory, with the metric functions of
  :mod:`conv2dlstm.evaluation.metrics` on whole arrays; :class:`conv2dlstm.evaluation.scores.StreamingScores`
  computes the same table batch by batch.
- :func:`predictions_dataset` and :func:`write_netcdf`: ``predictions.nc`` of forecasts held in
  memory, written by xarray; :class:`conv2dlstm.artifacts.predictions.PredictionsWriter` writes the
  same file batch by batch.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.evaluation import metrics
from conv2dlstm.evaluation.scores import score_frame, skill_frame, stratum_frame
from conv2dlstm.evaluation.strata import ALL, TimeGrouping
from conv2dlstm.fsutil import atomic_output


def score_forecasts(
    forecasts: Mapping[str, xr.DataArray],
    truth: xr.DataArray,
    climatology: xr.DataArray,
    weights: xr.DataArray | Mapping[str, xr.DataArray],
    not_meaningful: Mapping[str, xr.DataArray] | None = None,
    grouping: TimeGrouping | None = None,
) -> pd.DataFrame:
    """Score each forecast against ``truth`` with the metric functions, on arrays held in memory.

    This is the reference definition; :class:`conv2dlstm.evaluation.scores.StreamingScores` computes the same
    table batch by batch.

    Args:
        forecasts: name -> ``(time, lead, variable, lat, lon)`` forecast, physical units. Names in
            :data:`conv2dlstm.evaluation.baselines.BASELINE_NAMES` are baselines. Every forecast gets
            ``skill_vs_<baseline>`` rows against each other baseline present
            (:func:`conv2dlstm.evaluation.scores.skill_frame`).
        truth: observed values at the valid times, same layout.
        climatology: day-of-year climatology at the valid times (for ACC), same layout.
        weights: ``(lat, lon)`` from :func:`conv2dlstm.evaluation.metrics.area_weights`, or region name ->
            weights, the whole grid's first under ``all``.
        not_meaningful: per baseline, the leads where its climatology is unsupported
            (:func:`conv2dlstm.evaluation.scores.skill_frame`).
        grouping: groups of initial times scored on their own besides all of them.

    Returns:
        Tidy frame with columns ``model, variable, region, season, lead, metric, value``: per region (in
        order) and time group (all, then each present in calendar order) the scores, then the skills. The
        ACC of the climatology forecast is undefined (its anomalies are zero) and is not reported.
    """
    named = {ALL: weights} if isinstance(weights, xr.DataArray) else dict(weights)
    labels = None if grouping is None else grouping.of(truth)
    groups = [ALL] + ([] if labels is None else [g for g in grouping.order if (labels == g).any()])
    frames = []
    for region, w in named.items():
        for group in groups:
            times = slice(None) if group == ALL else labels == group
            pick = {name: forecast.isel(time=times) for name, forecast in forecasts.items()}
            frame = _score(pick, truth.isel(time=times), climatology.isel(time=times), w, not_meaningful)
            frames.append(stratum_frame(frame, region=region, season=group))
    return pd.concat(frames, ignore_index=True)


def _score(
    forecasts: Mapping[str, xr.DataArray],
    truth: xr.DataArray,
    climatology: xr.DataArray,
    weights: xr.DataArray,
    not_meaningful: Mapping[str, xr.DataArray] | None,
) -> pd.DataFrame:
    """The scores and skills of one stratum: forecasts, truth and climatology of its initial times,
    the weights of its region."""
    scores: dict[str, dict[str, xr.DataArray]] = {}
    series: dict[str, xr.DataArray] = {}
    for name, forecast in forecasts.items():
        scores[name] = {
            "rmse": metrics.rmse(forecast, truth, weights),
            "mae": metrics.mae(forecast, truth, weights),
            "bias": metrics.bias(forecast, truth, weights),
        }
        if name != "climatology":
            scores[name]["acc"] = metrics.acc(forecast, truth, climatology, weights)
        series[name] = metrics.mse_per_time(forecast, truth, weights).transpose("time", "lead", "variable")
    return score_frame(scores, skill_frame(series, not_meaningful))


def predictions_dataset(
    forecast: xr.DataArray,
    *,
    units: Mapping[str, str],
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """CF-1.8 dataset of forecasts held in memory: one float32 variable per target, dims
    ``(time, prediction_timedelta, latitude, longitude)`` (WeatherBench 2's).

    :class:`conv2dlstm.artifacts.predictions.PredictionsWriter` writes the same file batch by batch.
    """
    data_vars = {}
    for variable in forecast["variable"].values:
        variable = str(variable)
        da = forecast.sel(variable=variable, drop=True).astype("float32")
        da = da.swap_dims(lead="lead_time").drop_vars("lead")
        da = da.rename(lead_time="prediction_timedelta", lat="latitude", lon="longitude")
        da.attrs = predictions_file.variable_attrs(variable, units)
        data_vars[variable] = da
    ds = xr.Dataset(data_vars)
    for name, coord_attrs in predictions_file.COORD_ATTRS.items():
        ds[name].attrs = dict(coord_attrs)
    ds.attrs = predictions_file.global_attrs(attrs)
    return ds


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` as compressed netCDF4 atomically (float variables NaN-filled on land)."""
    encoding: dict[Hashable, dict[str, Any]] = {
        name: {"zlib": True, "complevel": 4, "_FillValue": np.float32(np.nan)} for name in ds.data_vars
    }
    for name in ("time", "valid_time"):
        encoding[name] = {
            "units": predictions_file.TIME_UNITS,
            "calendar": predictions_file.TIME_CALENDAR,
            "dtype": "float64",
        }
    encoding["prediction_timedelta"] = {"units": "hours", "dtype": "float64"}
    with atomic_output(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
