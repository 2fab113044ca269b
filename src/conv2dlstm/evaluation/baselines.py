"""Reference forecasts every model must beat: persistence, day-of-year climatology, damped anomaly
persistence and each cell's training mean.

Both work in physical units and return arrays shaped like the model's forecasts,
``(time, lead, variable, lat, lon)`` with ``time`` the forecast initial time, so that the same
metric code scores all three.

Persistence needs each *target* variable at the initial time. A target need not be a model input,
so its value is taken from the windows store's ``data`` cube, which holds the union of the input and
target variables at every time step: channel ``target_channels`` at time index
``start + input_steps - 1`` of each window (the last input step). The evaluate step reads it with
the window itself through the store (:func:`conv2dlstm.evaluation.inference.read_batch`).

Damped anomaly persistence (:func:`damped_persistence`) lets the initial anomaly decay towards the
climatology with the anomalies' lag autocorrelation, fitted on the training period with the
streaming :class:`AnomalyAutocorrelation`. :func:`climatology_support` and
:func:`unsupported_times` say which days of year the training period actually covers, so that skill
against a climatology interpolated across unseen seasons can be marked not meaningful.

Every baseline name lives here, in :data:`BASELINES` (evaluate, compare and the plots read it): its
description, which days' climatology it relies on (so that its skill is marked not meaningful where
no training day supports them: :func:`not_meaningful_leads`) and its plot style.

The damping of :func:`damped_persistence` is fitted by :func:`fit_damping` on the training part of
the windows store (the statistics' training period), streamed chunk by chunk; :func:`training_mean`,
each cell's mean over the same steps, is the baseline that stays meaningful when the training period
does not cover the test season (where the climatology's skill is not).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.data.dayofyear import circular_running_mean
from conv2dlstm.errors import DataError

DAYS_OF_YEAR = 366
"""Length of the climatology's ``dayofyear`` axis (``conv2dlstm.steps.normalize.DAYS``)."""


@dataclass(frozen=True)
class BaselineSpec:
    """One reference forecast.

    Attributes:
        name: its name in ``metrics.csv`` (column ``model``), ``compare.csv`` and MLflow.
        description: one line saying what it forecasts.
        climatology_days: the days whose training climatology it uses, among ``"initial"`` (the
            initial time) and ``"valid"`` (the valid time); empty when it uses none. Where one of
            them is not supported by a training day (:func:`climatology_support`) its skill is
            not meaningful.
        style: matplotlib colour, line style and marker of its curves.
    """

    name: str
    description: str
    climatology_days: tuple[str, ...]
    style: tuple[str, str, str]


BASELINES: dict[str, BaselineSpec] = {
    spec.name: spec
    for spec in (
        BaselineSpec("persistence", "the state at the initial time, for every lead", (), ("0.35", "--", "s")),
        BaselineSpec(
            "climatology", "the training-period day-of-year mean at the valid time", ("valid",), ("0.6", ":", "^")
        ),
        BaselineSpec(
            "damped_persistence",
            "the initial anomaly decaying towards the climatology with the training lag autocorrelation",
            ("initial", "valid"),
            ("0.1", "-.", "D"),
        ),
        BaselineSpec(
            "training_mean",
            "each cell's mean over the training period, whatever the season: meaningful on any record",
            (),
            ("0.55", "-", "v"),
        ),
    )
}
"""Every baseline, in the order of tables and legends."""
BASELINE_NAMES: tuple[str, ...] = tuple(BASELINES)
"""The baseline names; any other forecast in a table is a model."""


def persistence(x_last: xr.DataArray, lead_steps: int) -> xr.DataArray:
    """Persistence forecast: the state at the initial time repeated for every lead.

    Args:
        x_last: target variables at each initial time, physical units, dims ``(time, ..., lat, lon)``
            (typically ``(time, variable, lat, lon)``).
        lead_steps: number of leads.

    Returns:
        ``x_last`` with a ``lead`` dimension (coordinate ``1..lead_steps``) inserted after ``time``.
    """
    if lead_steps < 1:
        raise DataError(f"persistence: lead_steps must be at least 1, got {lead_steps}")
    if "time" not in x_last.dims:
        raise DataError(f"persistence: x_last has dimensions {x_last.dims}; it needs a time dimension (initial times)")
    axis = x_last.dims.index("time") + 1
    out = x_last.expand_dims(lead=np.arange(1, lead_steps + 1, dtype="int64"), axis=axis)
    out.name = x_last.name
    return out


def climatology(valid_times: xr.DataArray, stats: xr.Dataset, variables: Sequence[str] | None = None) -> xr.DataArray:
    """Climatology forecast: the training-period day-of-year mean at each valid time.

    Args:
        valid_times: datetime64 DataArray of any shape, typically ``(time, lead)``.
        stats: normalization statistics with ``climatology(dayofyear, variable, lat, lon)`` in
            physical units, ``dayofyear`` 1..366 (the calendar day of year, 366 only in leap years).
        variables: variables to keep, in this order (default: all of ``stats.variable``).

    Returns:
        ``(*valid_times.dims, variable, lat, lon)`` DataArray in physical units.
    """
    if "climatology" not in stats:
        raise DataError("the statistics file has no 'climatology' variable; rebuild it with the normalize step")
    clim = stats["climatology"]
    if variables is not None:
        missing = [v for v in variables if v not in clim["variable"].values]
        if missing:
            raise DataError(
                f"variables {missing} have no climatology in the statistics file (it has "
                f"{list(clim['variable'].values)}); rebuild the statistics with these variables"
            )
        clim = clim.sel(variable=list(variables))
    if not np.issubdtype(valid_times.dtype, np.datetime64):
        raise DataError(f"climatology: valid_times must be datetime64, got {valid_times.dtype}")
    doy = valid_times.dt.dayofyear
    available = set(np.asarray(clim["dayofyear"]).tolist())
    absent = sorted(set(np.unique(doy.values).tolist()) - available)
    if absent:
        raise DataError(
            f"the climatology lacks day(s) of year {absent[:10]}; it must cover days 1..366 "
            "(rebuild the statistics with the normalize step)"
        )
    out = clim.sel(dayofyear=doy).drop_vars("dayofyear")
    out = out.transpose(*valid_times.dims, "variable", ...)
    out.name = "climatology"
    return out


def anomalies(field: xr.DataArray, stats: xr.Dataset) -> xr.DataArray:
    """``field`` minus the training climatology of its own day of year (:func:`climatology`).

    Args:
        field: physical values ``(time, variable, lat, lon)`` with a datetime64 ``time`` coordinate.
        stats: normalization statistics with ``climatology`` (see :func:`climatology`).

    Returns:
        Anomalies shaped like ``field``; land stays NaN (the climatology is NaN there).
    """
    if "time" not in field.dims or "variable" not in field.dims:
        raise DataError(f"anomalies: field has dimensions {field.dims}; it needs time and variable")
    clim = climatology(field["time"], stats, [str(v) for v in field["variable"].values])
    try:
        with xr.set_options(arithmetic_join="exact"):
            out = field - clim
    except ValueError as exc:
        raise DataError(f"anomalies: the field's grid does not match the statistics' grid: {exc}") from exc
    return out.transpose(*field.dims)


class AnomalyAutocorrelation:
    """Lag autocorrelation of anomalies, pooled over ocean cells, accumulated chunk by chunk in time.

    For each variable and lag ``k = 1..max_lag`` (in time steps) it estimates

    ``rho(k) = S_xy / sqrt(S_xx * S_yy)``, with ``S_xy = sum w_c a_t a_{t+k}``,
    ``S_xx = sum w_c a_t^2`` and ``S_yy = sum w_c a_{t+k}^2``,

    the sums running over every cell ``c`` with weight ``w_c > 0`` and every pair of time steps
    ``(t, t+k)`` of the record where both anomalies are finite. The products are *uncentred*:
    anomalies are deviations from the training climatology, whose expected value is zero by
    construction, so no sample mean is removed (which would need a second pass). For a stationary
    anomaly field this is the pooled lag-``k`` correlation; for an AR(1) process
    ``a_t = phi a_{t-1} + e_t`` it estimates ``phi**k``, and ``S_xy / S_xx`` (equal to it up to
    sampling error) is the least-squares damping factor of the anomaly at lead ``k``.

    Streaming: :meth:`add` takes consecutive chunks of the record in time order. Only the sums (per
    lag and variable) and the last ``max_lag`` time steps (to pair with the next chunk's first
    steps) are kept, so memory does not grow with the record, and each pair is counted exactly once
    whatever the chunking: the result equals a single :meth:`add` of the whole record up to float
    rounding. Time steps must be equally spaced (a lag is a number of steps); missing steps should
    be present as NaN. Chunks with a datetime64 or numeric ``time`` coordinate are checked for
    equal spacing, within and across chunks.

    Args:
        max_lag: largest lag ``L`` (at least 1), typically the number of forecast leads.
        weights: optional weights over the pooled (non-time, non-variable) dimensions, e.g.
            :func:`conv2dlstm.evaluation.metrics.area_weights` ``(lat, lon)``; cells with weight 0 (land) are
            left out. Default: every cell weighs 1 (NaN cells are left out in any case).
    """

    def __init__(self, max_lag: int, weights: xr.DataArray | None = None) -> None:
        if max_lag < 1:
            raise DataError(f"AnomalyAutocorrelation: max_lag must be at least 1, got {max_lag}")
        self.max_lag = int(max_lag)
        self.weights = weights
        self._variables: np.ndarray | None = None
        self._cell_dims: tuple[Hashable, ...] = ()
        self._w: np.ndarray | None = None  # (cell,)
        self._tail: np.ndarray | None = None  # (<= max_lag, variable, cell), masked
        self._last_time: np.generic | None = None
        self._step: np.generic | None = None
        self._sxy = self._sxx = self._syy = np.zeros(0)
        self._pairs = np.zeros(0, dtype=np.int64)

    def _setup(self, chunk: xr.DataArray) -> None:
        self._variables = np.asarray(chunk["variable"].values)
        self._cell_dims = tuple(d for d in chunk.dims if d not in ("time", "variable"))
        cells = chunk.isel(time=0, variable=0, drop=True)
        if self.weights is None:
            w = np.ones(cells.shape, dtype=np.float64)
        else:
            extra = [d for d in self.weights.dims if d not in self._cell_dims]
            if extra:
                raise DataError(
                    f"AnomalyAutocorrelation: weights have dimensions {self.weights.dims}, not all among "
                    f"the pooled dimensions {self._cell_dims}"
                )
            try:
                weights, cells = xr.align(self.weights, cells, join="exact")
            except ValueError as exc:
                raise DataError(f"AnomalyAutocorrelation: weights and anomalies differ in grid: {exc}") from exc
            w = np.asarray(weights.broadcast_like(cells).transpose(*self._cell_dims).values, dtype=np.float64)
        if np.any(~np.isfinite(w)) or np.any(w < 0):
            raise DataError("AnomalyAutocorrelation: weights must be finite and non-negative")
        self._w = w.reshape(-1)
        shape = (self.max_lag, self._variables.size)
        self._sxy, self._sxx, self._syy = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self._pairs = np.zeros(shape, dtype=np.int64)

    def _check_times(self, chunk: xr.DataArray) -> None:
        if "time" not in chunk.coords:
            return
        times = np.asarray(chunk["time"].values)
        if not (np.issubdtype(times.dtype, np.datetime64) or np.issubdtype(times.dtype, np.number)):
            return
        if self._last_time is not None:
            times = np.concatenate([np.asarray([self._last_time], dtype=times.dtype), times])
        steps = np.unique(np.diff(times))
        if self._step is not None:
            steps = np.unique(np.concatenate([steps, np.asarray([self._step], dtype=steps.dtype)]))
        if steps.size > 1 or bool(np.any(steps <= np.zeros(1, dtype=steps.dtype))):
            raise DataError(
                "AnomalyAutocorrelation: time steps are not equally spaced and increasing (steps "
                f"{steps[:5]}); add chunks in time order and reindex the record to a regular time axis "
                "with missing steps as NaN"
            )
        if steps.size == 1:
            self._step = steps[0]
        self._last_time = times[-1]

    def add(self, chunk: xr.DataArray) -> None:
        """Add the next chunk of anomalies, dims ``(time, variable, ...)`` in any order.

        The ``variable`` coordinate and the pooled dimensions must equal the first chunk's.
        """
        missing = [d for d in ("time", "variable") if d not in chunk.dims]
        if missing:
            raise DataError(f"AnomalyAutocorrelation.add: chunk has dimensions {chunk.dims} and lacks {missing}")
        if chunk.sizes["time"] == 0:
            return
        if self._variables is None:
            self._setup(chunk)
        elif not np.array_equal(np.asarray(chunk["variable"].values), self._variables) or set(chunk.dims) != {
            "time",
            "variable",
            *self._cell_dims,
        }:
            raise DataError(
                "AnomalyAutocorrelation.add: the chunk's variables or pooled dimensions differ from the "
                f"first chunk's ({list(self._variables)}, {self._cell_dims})"
            )
        self._check_times(chunk)
        assert self._w is not None
        values = np.asarray(chunk.transpose("time", "variable", *self._cell_dims).values, dtype=np.float64)
        values = values.reshape(values.shape[0], values.shape[1], -1)
        values = np.where(np.isfinite(values) & (self._w > 0), values, np.nan)
        head = 0 if self._tail is None else self._tail.shape[0]
        buf = values if self._tail is None else np.concatenate([self._tail, values], axis=0)
        for k in range(1, self.max_lag + 1):
            first = max(head, k)  # the later member of each pair is new: every pair counted once
            if first >= buf.shape[0]:
                continue
            y = buf[first:]
            x = buf[first - k : buf.shape[0] - k]
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
            self._sxy[k - 1] += np.einsum("tvc,c->v", x * y, self._w)
            self._sxx[k - 1] += np.einsum("tvc,c->v", x * x, self._w)
            self._syy[k - 1] += np.einsum("tvc,c->v", y * y, self._w)
            self._pairs[k - 1] += ok.sum(axis=(0, 2))
        self._tail = buf[-self.max_lag :].copy()

    def _frame(self, values: np.ndarray, name: str) -> xr.DataArray:
        if self._variables is None:
            raise DataError("AnomalyAutocorrelation: no chunk was added; nothing to estimate")
        return xr.DataArray(
            values,
            dims=("lag", "variable"),
            coords={"lag": np.arange(1, self.max_lag + 1, dtype="int64"), "variable": self._variables},
            name=name,
        )

    def pairs(self) -> xr.DataArray:
        """``(lag, variable)`` number of (cell, time-pair) products that entered each estimate."""
        return self._frame(self._pairs.copy(), "pairs")

    def result(self) -> xr.DataArray:
        """``(lag, variable)`` autocorrelation ``rho`` (coordinate ``lag`` = 1..max_lag).

        NaN where no pair was finite or the anomalies were all zero.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            den = np.sqrt(self._sxx * self._syy)
            rho = np.where(den > 0, self._sxy / np.where(den > 0, den, 1.0), np.nan)
        return self._frame(rho, "rho")


def anomaly_autocorrelation(anomalies: xr.DataArray, max_lag: int, weights: xr.DataArray | None = None) -> xr.DataArray:
    """One-shot :class:`AnomalyAutocorrelation` of a whole (training-period) anomaly record.

    Returns the ``(lag, variable)`` pooled lag autocorrelation for lags ``1..max_lag``.
    """
    acc = AnomalyAutocorrelation(max_lag, weights)
    acc.add(anomalies)
    return acc.result()


def damped_persistence(
    x_last: xr.DataArray, clim_initial: xr.DataArray, clim_valid: xr.DataArray, rho: xr.DataArray
) -> xr.DataArray:
    """Damped anomaly persistence: ``clim(valid) + rho(lead) * (x(initial) - clim(initial))``.

    The anomaly at the initial time decays towards the climatology with the lag-``lead``
    autocorrelation of the anomalies fitted on the training period
    (:class:`AnomalyAutocorrelation`). For an AR(1) anomaly of variance ``s^2`` and coefficient
    ``phi`` with ``rho = phi**k`` its expected MSE at lead ``k`` is ``s^2 (1 - phi**(2k))``, below
    both persistence (``2 s^2 (1 - phi**k)``) and climatology (``s^2``).

    Args:
        x_last: target variables at each initial time, physical units, ``(time, variable, lat, lon)``
            (as for :func:`persistence`).
        clim_initial: climatology at each initial time, dims like ``x_last``
            (:func:`climatology` of the initial times).
        clim_valid: climatology at each valid time, ``(time, lead, variable, lat, lon)``
            (:func:`climatology` of the ``(time, lead)`` valid times).
        rho: autocorrelation per lead, dims ``(lead, variable)`` or ``(lag, variable)`` (the result
            of :meth:`AnomalyAutocorrelation.result`), or without ``variable`` for one value per
            lead. It must have every lead of ``clim_valid``.

    Returns:
        ``(time, lead, variable, lat, lon)`` forecast in physical units, like :func:`persistence`.
        Coordinates are aligned exactly: a mismatch is a :class:`DataError`.
    """
    if "lag" in rho.dims:
        rho = rho.rename(lag="lead")
    for name, da, dims in (
        ("x_last", x_last, ("time",)),
        ("clim_initial", clim_initial, ("time",)),
        ("clim_valid", clim_valid, ("time", "lead")),
        ("rho", rho, ("lead",)),
    ):
        missing = [d for d in dims if d not in da.dims]
        if missing:
            raise DataError(f"damped_persistence: {name} has dimensions {da.dims} and lacks {missing}")
    leads = clim_valid["lead"].values
    absent = sorted(set(leads.tolist()) - set(rho["lead"].values.tolist()))
    if absent:
        raise DataError(
            f"damped_persistence: rho has no value for lead(s) {absent} (it has "
            f"{rho['lead'].values.tolist()}); fit the autocorrelation up to the largest lead"
        )
    rho = rho.sel(lead=leads)
    try:
        with xr.set_options(arithmetic_join="exact"):
            out = clim_valid + rho * (x_last - clim_initial)
    except ValueError as exc:
        raise DataError(
            f"damped_persistence: x_last, climatologies and rho have different coordinates ({exc}); select "
            "the same initial times, variables and grid"
        ) from exc
    out = out.transpose("time", "lead", *[d for d in x_last.dims if d != "time"])
    out.name = x_last.name
    return out


def climatology_support(train_times: np.ndarray | pd.DatetimeIndex | xr.DataArray, window: int) -> xr.DataArray:
    """Days of year whose climatology rests on training data, as built by ``normalize.fit_stats``.

    ``fit_stats`` averages the training time steps by calendar day of year (1..366, 366 only in leap
    years), then smooths with a circular running mean of ``window`` days over the 366 days
    (:func:`conv2dlstm.data.dayofyear.circular_running_mean`: day ``d`` averages days
    ``d - window//2 .. d - window//2 + window - 1``, wrapping around); a day with no training day in
    that window gets a value interpolated between the nearest supported days, possibly across
    months never seen. This returns True for a day of year exactly when its window contains the
    day of year of at least one training time step.

    Args:
        train_times: the training period's time steps (datetime64), any shape.
        window: the climatology smoothing window in days (``stats.attrs["climatology_window"]``,
            config ``normalize.climatology_window``).

    Returns:
        ``(dayofyear,)`` bool DataArray, ``dayofyear`` 1..366, named ``climatology_supported``.
    """
    if window < 1:
        raise DataError(f"climatology_support: window must be at least 1 day, got {window}")
    times = np.asarray(train_times.values if isinstance(train_times, xr.DataArray) else train_times).reshape(-1)
    if times.size and not np.issubdtype(times.dtype, np.datetime64):
        raise DataError(f"climatology_support: train_times must be datetime64, got {times.dtype}")
    observed = np.zeros(DAYS_OF_YEAR, dtype=bool)
    if times.size:
        observed[pd.DatetimeIndex(times).day_of_year.to_numpy() - 1] = True
    supported = np.isfinite(circular_running_mean(np.where(observed, 1.0, np.nan), window))
    return xr.DataArray(
        supported,
        dims=("dayofyear",),
        coords={"dayofyear": np.arange(1, DAYS_OF_YEAR + 1)},
        name="climatology_supported",
        attrs={"window_days": int(window)},
    )


def unsupported_times(times: xr.DataArray, support: xr.DataArray) -> xr.DataArray:
    """True where a time's day of year has no training data behind its climatology.

    Skill against the climatology (or any baseline built on it) at such valid times compares with
    an interpolated, unobserved season and is not meaningful.

    Args:
        times: datetime64 DataArray of any shape, e.g. the ``(time, lead)`` valid times (no NaT).
        support: the result of :func:`climatology_support`.

    Returns:
        bool DataArray shaped like ``times``, named ``climatology_unsupported``.
    """
    if not np.issubdtype(times.dtype, np.datetime64):
        raise DataError(f"unsupported_times: times must be datetime64, got {times.dtype}")
    doy = times.dt.dayofyear
    flags = ~support.sel(dayofyear=doy).drop_vars("dayofyear")
    flags.name = "climatology_unsupported"
    return flags


def climatology_window(stats: xr.Dataset) -> int:
    """The smoothing window (days) of the statistics' climatology: attribute ``climatology_window``
    (written by the normalize step), else the ``window_days`` attribute of ``climatology``."""
    value = stats.attrs.get("climatology_window")
    if value is None and "climatology" in stats:
        value = stats["climatology"].attrs.get("window_days")
    if value is None:
        raise DataError(
            "the statistics file records no climatology window (attribute climatology_window); rebuild it "
            "with the normalize step"
        )
    return int(value)


def training_period(stats: xr.Dataset) -> tuple[str, str]:
    """``(train_start, train_end)`` the statistics were fitted on (their attributes)."""
    missing = [a for a in ("train_start", "train_end") if a not in stats.attrs]
    if missing:
        raise DataError(
            f"the statistics file has no attribute(s) {missing}: the period its climatology was fitted on is "
            "unknown; rebuild it with the normalize step"
        )
    return str(stats.attrs["train_start"]), str(stats.attrs["train_end"])


def training_times(times: np.ndarray, stats: xr.Dataset) -> np.ndarray:
    """The ``times`` (e.g. the windows store's time axis) inside the statistics' training period."""
    from conv2dlstm.data.harmonize import in_period

    start, end = training_period(stats)
    times = np.asarray(times, dtype="datetime64[ns]")
    return times[in_period(times, start, end)]


def not_meaningful_leads(
    init_times: np.ndarray, valid_times: np.ndarray, support: xr.DataArray
) -> dict[str, xr.DataArray]:
    """Per baseline, the leads at which its climatology is unsupported for at least one forecast.

    Args:
        init_times: ``(time,)`` initial times of the scored forecasts.
        valid_times: ``(time, lead)`` their valid times.
        support: :func:`climatology_support` of the statistics' training period and window.

    Returns:
        ``name -> (lead,)`` bool DataArray (coordinate ``lead`` = 1..T_out), True where the skill
        against that baseline is not meaningful: some forecast's initial day (for baselines using
        the climatology at the initial time) or valid day (at the valid time) has no training day
        in its smoothing window. Baselines using no climatology are always False.
    """
    init = xr.DataArray(np.asarray(init_times, dtype="datetime64[ns]"), dims=("time",))
    valid = xr.DataArray(np.asarray(valid_times, dtype="datetime64[ns]"), dims=("time", "lead"))
    leads = np.arange(1, valid.sizes["lead"] + 1, dtype="int64")
    flags = {
        "initial": unsupported_times(init, support).broadcast_like(valid),
        "valid": unsupported_times(valid, support),
    }
    out: dict[str, xr.DataArray] = {}
    for name, spec in BASELINES.items():
        bad = xr.zeros_like(valid, dtype=bool)
        for day in spec.climatology_days:
            bad = bad | flags[day]
        out[name] = bad.any("time").assign_coords(lead=leads).rename(name)
    return out


def training_mean(store: TrainingRecord, stats: xr.Dataset, *, chunk_steps: int = 64) -> xr.DataArray:
    """Each target's mean at each cell over the windows store's time steps inside the statistics'
    training period (:func:`training_times`), in physical units, NaN on land: ``(variable, lat, lon)``
    float32, the ``training_mean`` baseline. Streamed ``chunk_steps`` steps at a time (a float64 sum
    per cell); the mean of the normalized values is denormalized (the transform is linear)."""
    from conv2dlstm.artifacts import stats as stats_file

    all_times = np.asarray(store.time, dtype="datetime64[ns]")
    keep = np.flatnonzero(np.isin(all_times, training_times(all_times, stats)))
    if keep.size == 0:
        start, end = training_period(stats)
        raise DataError(
            f"the windows store holds no time step of the training period {start}..{end}; the training mean "
            "baseline needs the training record (rebuild the windows store)"
        )
    channels = list(store.target_channels)
    total = np.zeros((len(channels), len(store.lat), len(store.lon)), dtype=np.float64)
    first, last, step = int(keep[0]), int(keep[-1]) + 1, max(1, int(chunk_steps))
    for a in range(first, last, step):
        total += store.read_time_range(a, min(a + step, last))[:, channels].sum(axis=0, dtype=np.float64)
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    normed = xr.DataArray(
        (total / (last - first)).astype(np.float32),
        dims=("variable", "lat", "lon"),
        coords={"variable": [str(v) for v in store.target_variables], "lat": lat, "lon": lon},
    )
    mask = xr.DataArray(np.asarray(store.mask, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})
    return stats_file.denormalize(normed, stats).where(mask).transpose(*normed.dims).astype("float32")


class TrainingRecord(Protocol):
    """What :func:`fit_damping` reads: the windows store's interface
    (:class:`conv2dlstm.artifacts.windows_store.WindowsStore`)."""

    time: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    mask: np.ndarray
    target_variables: list[str]
    target_channels: list[int]

    def read_time_range(self, start: int, stop: int) -> np.ndarray: ...


def _regular_positions(times: np.ndarray) -> np.ndarray:
    """Index of each time on the regular axis ``times[0] + k * step`` (``step`` the most common spacing)."""
    if times.size < 2:
        return np.zeros(times.size, dtype=np.int64)
    diffs, counts = np.unique(np.diff(times), return_counts=True)
    step = diffs[np.argmax(counts)]
    offsets = (times - times[0]) / step
    positions = np.rint(offsets).astype(np.int64)
    if not np.allclose(offsets, positions, rtol=0, atol=1e-6):
        raise DataError(
            f"the training times are not on a regular axis of step {step} (first off-axis time "
            f"{times[np.flatnonzero(~np.isclose(offsets, positions))[0]]}); the damping of damped persistence "
            "needs equally spaced steps"
        )
    return positions


def fit_damping(
    store: TrainingRecord,
    stats: xr.Dataset,
    *,
    max_lag: int,
    weights: xr.DataArray | None = None,
    chunk_steps: int = 64,
) -> xr.DataArray:
    """Damping ``rho(lag)`` of :func:`damped_persistence`, fitted on the training period only.

    Reads the target variables of the windows store's time steps inside the statistics' training
    period (:func:`training_times`, the period the climatology was fitted on), ``chunk_steps`` steps
    at a time, back in physical units (:func:`conv2dlstm.artifacts.stats.denormalize`, land NaN), subtracts
    the training climatology of each step's day of year (:func:`anomalies`) and feeds the anomalies
    to :class:`AnomalyAutocorrelation` (pooled over ocean cells with ``weights``). A missing step
    (a gap in the time axis) is filled with NaN rows so that no pair straddles it: ``min(gap,
    max_lag)`` NaN rows break every pair across the gap at lags up to ``max_lag``, exactly as the
    whole gap would. Memory: one chunk of ``chunk_steps x C_out x H x W`` values.

    Returns:
        ``(lag, variable)`` float64 ``rho`` for lags ``1..max_lag`` (NaN where no pair was finite),
        with attribute ``pairs`` (the smallest number of products behind an estimate).
    """
    from conv2dlstm.artifacts import stats as stats_file

    all_times = np.asarray(store.time, dtype="datetime64[ns]")
    keep = np.flatnonzero(np.isin(all_times, training_times(all_times, stats)))
    targets = [str(v) for v in store.target_variables]
    if keep.size < 2:
        start, end = training_period(stats)
        raise DataError(
            f"the windows store holds {keep.size} time step(s) of the training period {start}..{end}; damped "
            "persistence needs the training record to fit its damping (rebuild the windows store)"
        )
    positions = _regular_positions(all_times[keep])
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    mask = xr.DataArray(np.asarray(store.mask, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})
    accumulator = AnomalyAutocorrelation(max_lag, weights)
    first, last = int(keep[0]), int(keep[-1]) + 1  # training steps are contiguous in the sorted axis
    previous = None
    for a in range(first, last, max(1, int(chunk_steps))):
        b = min(a + max(1, int(chunk_steps)), last)
        block = store.read_time_range(a, b)[:, list(store.target_channels)]  # (n, C_out, H, W) normalized
        pos = positions[a - first : b - first]
        gaps = np.diff(np.concatenate([[pos[0] - 1 if previous is None else previous], pos])) - 1
        filler = np.minimum(gaps, max_lag)
        rows = np.arange(pos.size) + np.cumsum(filler)  # row of each step once NaN rows are inserted
        values = np.full((int(rows[-1]) + 1, *block.shape[1:]), np.nan, dtype=np.float32)
        values[rows] = block
        times = np.full(values.shape[0], all_times[a], dtype="datetime64[ns]")  # climatology day of each row
        times[rows] = all_times[a:b]
        normed = xr.DataArray(
            values,
            dims=("time", "variable", "lat", "lon"),
            coords={"time": times, "variable": targets, "lat": lat, "lon": lon},
        )
        physical = stats_file.denormalize(normed, stats).where(mask).transpose(*normed.dims)
        anomaly = anomalies(physical, stats).drop_vars("time")  # rows need no spacing check: gaps are NaN rows
        accumulator.add(anomaly)
        previous = int(pos[-1])
    rho = accumulator.result()
    rho.attrs["pairs"] = int(accumulator.pairs().min())
    return rho
