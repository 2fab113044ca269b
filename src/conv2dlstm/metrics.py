"""Deterministic forecast scores, following the WeatherBench 2 definitions.

Every score takes DataArrays with dimensions ``(time, lat, lon)`` plus any extra dimensions (for
example ``lead`` and ``variable``) and reduces over ``time``, ``lat`` and ``lon`` only, so the result
keeps the extra dimensions. ``time`` is the forecast initial time; its name is configurable with
``time_dim``.

Spatial averages are weighted by :func:`area_weights`: ``cos(latitude)`` of the cell centres, zero on
land, normalized to mean 1 over the ocean cells. Land cells, and any NaN, never contribute: they are
dropped before the weighted mean (their weights drop out of the denominator too).

Order of the reductions (WeatherBench 2): for each forecast time the weighted spatial mean is taken
first, then the mean over forecast times; :func:`rmse` takes the square root last, and :func:`acc`
computes one correlation per forecast time and then averages the correlations. The per-time values
(``*_per_time``) are independent of each other, so a caller can compute them batch by batch and
take the time mean at the end (:func:`time_mean` is the mean of the non-NaN values).
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import xarray as xr

from conv2dlstm.errors import DataError

SPATIAL_DIMS: tuple[str, str] = ("lat", "lon")


def area_weights(lat: xr.DataArray | np.ndarray, mask: xr.DataArray) -> xr.DataArray:
    """Area weights of a regular lat/lon grid: ``cos(lat)`` at the cell centres, 0 on land.

    The weights are normalized so that their mean over the ocean cells is 1 (a weighted mean of a
    constant field is that constant). Cell-centre cosines stay finite and positive on any regional
    box, unlike formulas based on cell edges, which break when an edge reaches +-90 degrees.

    Args:
        lat: latitudes of the cell centres in degrees north, shape ``(lat,)``.
        mask: ``(lat, lon)`` boolean, True on ocean cells.

    Returns:
        ``(lat, lon)`` float64 weights with the coordinates of ``mask``.
    """
    if mask.dims != SPATIAL_DIMS:
        raise DataError(f"area_weights: mask has dimensions {mask.dims}; expected {SPATIAL_DIMS}")
    lat_values = np.asarray(lat, dtype="float64").reshape(-1)
    if lat_values.size != mask.sizes["lat"]:
        raise DataError(
            f"area_weights: {lat_values.size} latitudes for a mask with {mask.sizes['lat']} rows; "
            "pass the latitudes of the mask's grid"
        )
    if not np.all(np.isfinite(lat_values)) or np.any(np.abs(lat_values) > 90):
        raise DataError(
            f"area_weights: latitudes must be finite and within [-90, 90] degrees, got "
            f"{lat_values.min()}..{lat_values.max()}; check the lat coordinate"
        )
    if "lat" in mask.coords and not np.allclose(np.asarray(mask["lat"], dtype="float64"), lat_values):
        raise DataError(
            "area_weights: the latitudes given differ from the mask's lat coordinate; pass the "
            "latitudes of the mask's own grid"
        )
    ocean = mask.astype(bool)
    n_ocean = int(ocean.sum())
    if n_ocean == 0:
        raise DataError("area_weights: the mask has no ocean cell; nothing can be scored")
    cos_lat = np.clip(np.cos(np.deg2rad(lat_values)), 0.0, None)
    coords = {"lat": mask["lat"]} if "lat" in mask.coords else None
    weights = xr.DataArray(cos_lat, dims=("lat",), coords=coords)
    weights = (weights * ocean).astype("float64")
    total = float(weights.sum())
    if total <= 0:
        raise DataError("area_weights: every ocean cell lies at +-90 degrees; the weights are all zero")
    weights = weights * (n_ocean / total)
    weights.name = "area_weights"
    return weights.transpose(*SPATIAL_DIMS)


def _check(forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, time_dim: Hashable) -> None:
    for name, da in (("forecast", forecast), ("truth", truth)):
        missing = [d for d in (time_dim, *SPATIAL_DIMS) if d not in da.dims]
        if missing:
            raise DataError(
                f"{name} has dimensions {da.dims} and lacks {missing}; scores need "
                f"({time_dim}, lat, lon) (set time_dim to the name of the forecast time dimension)"
            )
    if set(weights.dims) != set(SPATIAL_DIMS):
        raise DataError(f"weights have dimensions {weights.dims}; expected (lat, lon) from area_weights")


def _aligned(
    *arrays: xr.DataArray, names: tuple[str, ...] = ("forecast", "truth", "weights")
) -> tuple[xr.DataArray, ...]:
    """Align exactly: a coordinate mismatch is an error instead of a silent intersection."""
    try:
        return xr.align(*arrays, join="exact")
    except ValueError as exc:
        listed = ", ".join(names[:-1]) + f" and {names[-1]}"
        raise DataError(
            f"{listed} have different coordinates ({exc}); select the same times, leads, variables "
            "and grid before scoring"
        ) from exc


def spatial_mean(field: xr.DataArray, weights: xr.DataArray) -> xr.DataArray:
    """Area-weighted mean over ``(lat, lon)``; land (weight 0) and NaN cells are left out.

    Returns NaN where no ocean cell is finite.
    """
    field = field.where(weights > 0)
    return field.weighted(weights).mean(SPATIAL_DIMS, skipna=True)


def time_mean(per_time: xr.DataArray, time_dim: Hashable = "time") -> xr.DataArray:
    """Mean over forecast times of per-time scores; NaN (undefined) times are left out."""
    return per_time.mean(time_dim, skipna=True)


def mse_per_time(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Weighted spatial mean of ``(forecast - truth)^2`` for each forecast time (keeps ``time_dim``)."""
    _check(forecast, truth, weights, time_dim)
    forecast, truth, weights = _aligned(forecast, truth, weights)
    return spatial_mean((forecast - truth) ** 2, weights)


def mae_per_time(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Weighted spatial mean of ``|forecast - truth|`` for each forecast time (keeps ``time_dim``)."""
    _check(forecast, truth, weights, time_dim)
    forecast, truth, weights = _aligned(forecast, truth, weights)
    return spatial_mean(abs(forecast - truth), weights)


def bias_per_time(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Weighted spatial mean of ``forecast - truth`` for each forecast time (keeps ``time_dim``)."""
    _check(forecast, truth, weights, time_dim)
    forecast, truth, weights = _aligned(forecast, truth, weights)
    return spatial_mean(forecast - truth, weights)


def acc_per_time(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    climatology: xr.DataArray,
    weights: xr.DataArray,
    *,
    time_dim: Hashable = "time",
) -> xr.DataArray:
    """Anomaly correlation of each forecast time (keeps ``time_dim``); see :func:`acc`.

    ``climatology`` is aligned exactly with the forecast, like the truth: a coordinate mismatch is
    a :class:`DataError`, never a silent intersection.
    """
    _check(forecast, truth, weights, time_dim)
    forecast, truth, climatology, weights = _aligned(
        forecast, truth, climatology, weights, names=("forecast", "truth", "climatology", "weights")
    )
    f_anom = forecast - climatology
    t_anom = truth - climatology
    valid = f_anom.notnull() & t_anom.notnull() & (weights > 0)
    f_anom = f_anom.where(valid)
    t_anom = t_anom.where(valid)
    num = (f_anom * t_anom).weighted(weights).sum(SPATIAL_DIMS, skipna=True)
    den = np.sqrt(
        (f_anom**2).weighted(weights).sum(SPATIAL_DIMS, skipna=True)
        * (t_anom**2).weighted(weights).sum(SPATIAL_DIMS, skipna=True)
    )
    return (num / den.where(den > 0)).transpose(*[d for d in forecast.dims if d not in SPATIAL_DIMS], ...)


def mse(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Mean squared error: weighted spatial mean per forecast time, then mean over times."""
    return time_mean(mse_per_time(forecast, truth, weights, time_dim=time_dim), time_dim)


def rmse(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Root mean squared error: ``sqrt`` of :func:`mse` (spatial mean, then time mean, then sqrt)."""
    return np.sqrt(mse(forecast, truth, weights, time_dim=time_dim))


def mae(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Mean absolute error: weighted spatial mean of ``|forecast - truth|`` per time, then time mean."""
    return time_mean(mae_per_time(forecast, truth, weights, time_dim=time_dim), time_dim)


def bias(
    forecast: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """Mean error ``forecast - truth``: weighted spatial mean per time, then time mean."""
    return time_mean(bias_per_time(forecast, truth, weights, time_dim=time_dim), time_dim)


def acc(
    forecast: xr.DataArray,
    truth: xr.DataArray,
    climatology: xr.DataArray,
    weights: xr.DataArray,
    *,
    time_dim: Hashable = "time",
) -> xr.DataArray:
    """Anomaly correlation coefficient (uncentered), per forecast time, then averaged over times.

    With anomalies ``f' = forecast - climatology`` and ``t' = truth - climatology`` (the
    climatology at each valid time, broadcastable to ``forecast``):
    ``ACC = sum(w f' t') / sqrt(sum(w f'^2) * sum(w t'^2))`` over the ocean cells where both are
    finite. A forecast time whose anomalies are all zero has an undefined ACC (NaN) and is left out
    of the time mean; the climatology forecast itself therefore has ACC NaN. The climatology's
    coordinates must equal the forecast's on every shared dimension (:class:`DataError` otherwise).
    """
    return time_mean(acc_per_time(forecast, truth, climatology, weights, time_dim=time_dim), time_dim)


def skill_score(model_rmse: xr.DataArray | float, baseline_rmse: xr.DataArray | float) -> xr.DataArray | float:
    """``1 - model / baseline``: 1 is perfect, 0 is no better than the baseline, < 0 is worse."""
    return 1 - model_rmse / baseline_rmse


def rmse_per_cell(
    forecast: xr.DataArray, truth: xr.DataArray, mask: xr.DataArray, *, time_dim: Hashable = "time"
) -> xr.DataArray:
    """RMSE of each grid cell over forecast times (NaN on land): ``sqrt(mean_t (f - t)^2)``."""
    if time_dim not in forecast.dims:
        raise DataError(f"forecast has dimensions {forecast.dims} and lacks the time dimension {time_dim!r}")
    forecast, truth = _aligned(forecast, truth, names=("forecast", "truth"))
    squared = ((forecast - truth) ** 2).where(mask.astype(bool))
    return np.sqrt(squared.mean(time_dim, skipna=True))
