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

Skill against a baseline with uncertainty: :func:`bootstrap_skill` takes the per-initial-time MSE
series of a model and of a baseline (shape ``(time,)``, one pair per variable and lead) and returns
``1 - RMSE_model / RMSE_baseline`` with a 95% interval from a paired circular block bootstrap over
initial times, whose block length is the integral time scale of the loss difference
(:func:`block_length`); :func:`bootstrap_skill_table` does it for every ``(lead, variable)`` of
DataArrays and :func:`excludes_zero` says which skills are significant.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import xarray as xr

from conv2dlstm.errors import DataError

SPATIAL_DIMS: tuple[str, str] = ("lat", "lon")

ArrayLikeT = TypeVar("ArrayLikeT", float, np.ndarray, xr.DataArray)


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
    return per_time.mean(time_dim, skipna=True)  # type: ignore[arg-type]  # xarray takes any Hashable dim


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
    # numpy's stubs return an ndarray from a ufunc; on a DataArray it returns a DataArray (__array_ufunc__)
    den = cast(
        xr.DataArray,
        np.sqrt(
            (f_anom**2).weighted(weights).sum(SPATIAL_DIMS, skipna=True)
            * (t_anom**2).weighted(weights).sum(SPATIAL_DIMS, skipna=True)
        ),
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
    return cast(xr.DataArray, np.sqrt(mse(forecast, truth, weights, time_dim=time_dim)))  # a DataArray ufunc


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
    rms = np.sqrt(squared.mean(time_dim, skipna=True))  # type: ignore[arg-type]  # xarray takes any Hashable dim
    return cast(xr.DataArray, rms)  # a DataArray ufunc


# ---------------------------------------------------------------------------------------------
# Skill against a baseline with a block-bootstrap confidence interval
#
# Per-initial-time scores of consecutive initial times are serially correlated (a slow anomaly spoils
# several forecasts in a row), so resampling single times would understate the sampling spread of a
# time mean. The functions below resample blocks of consecutive initial times instead (circular
# block bootstrap, Politis & Romano 1992), with a block length taken from the decorrelation time of
# the per-time loss difference.

DEFAULT_RESAMPLES = 1000
"""Default number of bootstrap resamples of :func:`bootstrap_skill`."""


@dataclass(frozen=True)
class SkillInterval:
    """Skill of a model against a baseline with a bootstrap confidence interval.

    Attributes:
        skill: ``1 - RMSE_model / RMSE_baseline`` on the ``n`` paired initial times.
        lower, upper: percentile bounds of the bootstrap distribution of the skill (NaN when
            ``n < 2``).
        block_length: length, in initial times, of the resampled blocks.
        n: number of initial times where both per-time MSEs are defined.
        confidence: nominal coverage of ``[lower, upper]`` (0.95 by default).
    """

    skill: float
    lower: float
    upper: float
    block_length: int
    n: int
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """True only when the interval excludes zero (see :func:`excludes_zero`)."""
        return bool(excludes_zero(self.lower, self.upper))


def excludes_zero(lower: ArrayLikeT, upper: ArrayLikeT) -> ArrayLikeT:
    """Element-wise "significant": the interval ``[lower, upper]`` lies entirely above or below 0.

    Works on floats, numpy arrays and DataArrays alike. An interval touching zero, and a NaN bound
    (an undefined interval), are not significant.
    """
    return (lower > 0) | (upper < 0)


def integral_time_scale(series: np.ndarray) -> float:
    """Integral time scale ``1 + 2 * sum_k rho_k`` of a series, in time steps (at least 1).

    ``rho_k`` is the sample autocorrelation at lag ``k`` (mean removed; lag products summed over the
    ``n - k`` pairs and divided by the lag-0 sum, the usual biased estimator). The sum runs over
    positive lags ``k = 1, 2, ...`` and stops before the first ``rho_k <= 0`` (the initial positive
    sequence of Geyer 1992, Statistical Science 7:473), or at lag ``n - 1``. For an AR(1) series with
    coefficient ``phi`` it estimates ``(1 + phi) / (1 - phi)``, the factor by which serial
    correlation inflates the variance of the time mean, i.e. the number of time steps per
    independent sample (von Storch & Zwiers 1999, Statistical Analysis in Climate Research, sec.
    17.1; Wilks 2011, Statistical Methods in the Atmospheric Sciences, eq. 5.12). A constant series,
    or one shorter than 3, gives 1; a negative sum is clipped to 1.
    """
    x = np.asarray(series, dtype=np.float64).reshape(-1)
    n = x.size
    if n < 3:
        return 1.0
    x = x - x.mean()
    c0 = float(np.dot(x, x))
    if not np.isfinite(c0) or c0 <= 0:
        return 1.0
    # Autocovariance at every lag at once (FFT of the zero-padded series); lags 1..n-1.
    size = 1 << int(2 * n - 1).bit_length()
    spectrum = np.fft.rfft(x, size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), size)[1:n]
    rho = acov / c0
    nonpositive = np.flatnonzero(rho <= 0)
    stop = int(nonpositive[0]) if nonpositive.size else rho.size
    return max(1.0, 1.0 + 2.0 * float(rho[:stop].sum()))


def block_length(loss_difference: np.ndarray) -> int:
    """Bootstrap block length for a per-time loss-difference series of length ``n``.

    ``ceil`` of :func:`integral_time_scale` (blocks about one decorrelation time long, so that
    neighbouring blocks are roughly independent while the dependence within a block is kept),
    at least 1 and at most ``n // 2`` (so that a resample draws at least two blocks).
    Politis & White (2004, Econometric Reviews 23:53) give an MSE-optimal alternative based on a
    flat-top spectral estimate; the integral time scale is used here because it is simple, has a
    closed form for AR(1) series and errs on the long (conservative) side for persistent series.
    """
    x = np.asarray(loss_difference, dtype=np.float64).reshape(-1)
    cap = max(1, x.size // 2)
    return int(min(cap, max(1, math.ceil(integral_time_scale(x) - 1e-9))))


def circular_block_indices(n: int, block: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n_resamples`` circular-block-bootstrap resamples of a series of length ``n``.

    Each resample concatenates ``ceil(n / block)`` blocks of ``block`` consecutive indices whose
    start is drawn uniformly from ``0..n-1``; a block running past the end wraps around to the start
    (circular block bootstrap, Politis & Romano 1992), so that every time step is equally likely to
    be drawn, which the moving-block bootstrap (Kuensch 1989) does not give at the ends. The
    concatenation is cut to ``n``. Returns an ``(n_resamples, n)`` int64 array.
    """
    if n < 1 or block < 1:
        raise DataError(f"circular_block_indices: n ({n}) and block ({block}) must be at least 1")
    n_blocks = -(-n // block)
    starts = rng.integers(0, n, size=(n_resamples, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]) % n
    return idx.reshape(n_resamples, n_blocks * block)[:, :n]


def _skill_from_mse(mse_model: np.ndarray, mse_baseline: np.ndarray) -> np.ndarray:
    """``1 - sqrt(mean mse_model) / sqrt(mean mse_baseline)`` along the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - np.sqrt(mse_model.mean(axis=-1)) / np.sqrt(mse_baseline.mean(axis=-1))


def bootstrap_skill(
    mse_model: np.ndarray,
    mse_baseline: np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
    block: int | None = None,
) -> SkillInterval:
    """RMSE skill of a model against a baseline, with a paired circular-block-bootstrap interval.

    Statistic: ``skill = 1 - RMSE_model / RMSE_baseline`` with ``RMSE = sqrt(mean_t MSE_t)``, the
    square root of the mean of the per-initial-time MSEs (the order of :func:`rmse`).

    Interval: the initial times are resampled with the circular block bootstrap
    (:func:`circular_block_indices`), the *same* indices for model and baseline (paired: both were
    scored on the same truth, so their errors are correlated and the pairing removes that common
    part), the skill is recomputed on each of ``n_resamples`` resamples, and ``[lower, upper]`` are
    the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those skills (percentile
    interval). The block length is :func:`block_length` of the loss difference
    ``MSE_model - MSE_baseline`` unless ``block`` is given.

    Args:
        mse_model, mse_baseline: per-initial-time MSE series, shape ``(time,)``, in time order,
            equally spaced. Times where either is NaN are dropped (both series together); the
            remaining times are treated as consecutive.
        n_resamples: number of bootstrap resamples.
        confidence: nominal coverage of the interval, in ``(0, 1)``.
        seed: seed of the ``numpy.random.Generator`` (PCG64): equal inputs and seed give equal
            results.
        block: block length to use instead of the estimated one (capped at ``n``).

    Returns:
        :class:`SkillInterval`; with fewer than 2 paired times the bounds are NaN (and with none the
        skill too). A baseline MSE of zero gives a non-finite skill.
    """
    model = np.asarray(mse_model, dtype=np.float64).reshape(-1)
    baseline = np.asarray(mse_baseline, dtype=np.float64).reshape(-1)
    if model.shape != baseline.shape:
        raise DataError(
            f"bootstrap_skill: model and baseline series have {model.size} and {baseline.size} times; "
            "score both on the same initial times"
        )
    if not 0 < confidence < 1:
        raise DataError(f"bootstrap_skill: confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise DataError(f"bootstrap_skill: n_resamples must be at least 1, got {n_resamples}")
    ok = np.isfinite(model) & np.isfinite(baseline)
    model, baseline = model[ok], baseline[ok]
    n = int(model.size)
    if n == 0:
        return SkillInterval(math.nan, math.nan, math.nan, 0, 0, confidence)
    skill = float(_skill_from_mse(model, baseline))
    if n < 2:
        return SkillInterval(skill, math.nan, math.nan, 1, n, confidence)
    if block is None:
        length = block_length(model - baseline)
    else:
        if block < 1:
            raise DataError(f"bootstrap_skill: block must be at least 1, got {block}")
        length = int(min(block, n))
    idx = circular_block_indices(n, length, n_resamples, np.random.default_rng(seed))
    samples = _skill_from_mse(model[idx], baseline[idx])
    alpha = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(samples, [alpha, 1.0 - alpha])
    return SkillInterval(skill, float(lower), float(upper), length, n, confidence)


def bootstrap_skill_table(
    mse_model: xr.DataArray,
    mse_baseline: xr.DataArray,
    *,
    time_dim: Hashable = "time",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> xr.Dataset:
    """:func:`bootstrap_skill` for every entry of the non-time dimensions (e.g. ``(lead, variable)``).

    Args:
        mse_model, mse_baseline: per-initial-time MSE, dims ``(time_dim, ...)`` with equal
            coordinates (aligned exactly: a mismatch is a :class:`DataError`).
        time_dim, n_resamples, confidence, seed: as in :func:`bootstrap_skill`; every series is
            resampled with a generator seeded with ``seed``, its own block length and its own
            paired-NaN filter.

    Returns:
        Dataset over the non-time dimensions with ``skill``, ``lower``, ``upper`` (float64),
        ``block_length``, ``n`` (int64) and ``significant`` (bool, :func:`excludes_zero`);
        attribute ``confidence``.
    """
    for name, da in (("mse_model", mse_model), ("mse_baseline", mse_baseline)):
        if time_dim not in da.dims:
            raise DataError(f"bootstrap_skill_table: {name} has dimensions {da.dims} and lacks {time_dim!r}")
    model, baseline = _aligned(mse_model, mse_baseline, names=("mse_model", "mse_baseline"))
    baseline = baseline.transpose(*model.dims)
    other = [d for d in model.dims if d != time_dim]
    model = model.transpose(*other, time_dim)
    baseline = baseline.transpose(*other, time_dim)
    shape = tuple(model.sizes[d] for d in other)
    fields = {k: np.full(shape, np.nan) for k in ("skill", "lower", "upper")}
    counts = {k: np.zeros(shape, dtype=np.int64) for k in ("block_length", "n")}
    m_values = np.asarray(model.values, dtype=np.float64)
    b_values = np.asarray(baseline.values, dtype=np.float64)
    for pos in np.ndindex(*shape):
        res = bootstrap_skill(m_values[pos], b_values[pos], n_resamples=n_resamples, confidence=confidence, seed=seed)
        fields["skill"][pos], fields["lower"][pos], fields["upper"][pos] = res.skill, res.lower, res.upper
        counts["block_length"][pos], counts["n"][pos] = res.block_length, res.n
    coords = {k: v for k, v in model.coords.items() if time_dim not in v.dims}
    out = xr.Dataset({k: (tuple(other), v) for k, v in {**fields, **counts}.items()}, coords=coords)
    out["significant"] = excludes_zero(out["lower"], out["upper"])
    out.attrs["confidence"] = float(confidence)
    return out
