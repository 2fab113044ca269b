"""Extreme-event scores: marine heatwaves (and cold spells, high and low events) after Hobday et al. (2016).

Definition (``evaluate.events``). For a target variable of ``evaluate.events.variables``, a cell and
a valid day, the *anomaly* is the value minus the training climatology of its day of year (the
statistics' ``climatology``, the mean state every baseline uses). Its *threshold* is the
``quantile``-th quantile of the training period's anomalies of that cell whose day of year lies
within :data:`WINDOW_HALF_DAYS` (5) days of it (Hobday's 11-day window, pooled over the training
years), then smoothed over the days of year by a circular running mean of ``smooth_days`` days
(Hobday's 31; 1 = not smoothed) (:func:`percentile_threshold`). Days of year are counted on a
366-day calendar (:func:`calendar_day`: 29 February is day 60; in other years the days from 1 March
on move up by one, as in Hobday's code), so that a window never straddles a missing leap day.
A ``quantile`` of 0.5 or more scores *high* events (the anomaly above the threshold: marine
heatwaves at 0.9), below 0.5 *low* events (below it: cold spells at 0.1).

The exceedance (anomaly beyond threshold) of the truth and of every forecast becomes an *event*
where it lasts at least ``min_duration_days`` (Hobday's 5; 1 = every exceedance is an event):
along the valid times of one lead, the forecasts of consecutive initial times form a daily series
per cell, and an exceedance is kept only inside a run of at least that many consecutive steps
(:func:`min_duration`, streamed by :class:`DurationFilter`); a gap between initial times ends a run.
The truth is treated the same way, per lead along the same valid times, so forecast and truth
events are paired cell by cell and day by day.

Per forecast (the model and every baseline), variable and lead, the contingency table over ocean
cells and test initial times counts *hits* (event forecast and observed), *misses*, *false alarms*
and *correct negatives*, **area-weighted**: each cell-day counts its ``cos(latitude)`` weight of
:func:`conv2dlstm.evaluation.metrics.area_weights` (mean 1 over the ocean, so the four counts add
up to the number of ocean cell-days scored, a cell-day near the pole counting less). A cell-day
where the truth, the forecast or the threshold is not finite is left out. From the counts
(:func:`contingency_scores`): hit rate ``POD = a / (a + c)``, false alarm ratio ``FAR = b / (a + b)``,
the symmetric extremal dependence index SEDI (Ferro & Stephenson 2011, Weather and Forecasting
26:699; :func:`sedi`), the equitable threat score ETS, the base rate and the frequency bias; each
with a 95% interval from the project's circular block bootstrap over initial times
(:func:`bootstrap_scores`: the per-initial-time counts resampled in blocks,
:func:`conv2dlstm.evaluation.metrics.circular_block_indices`, the block length
:func:`conv2dlstm.evaluation.metrics.block_length` of the series of misses plus false alarms, and
every score recomputed on each resample's summed counts).

Too short a training period (:func:`training_years`, :func:`unsupported_event_leads`): a day of
year's threshold needs ``min_training_years`` years whose 11-day window around it is at least half
training days; at a lead where some test valid day's day of year has fewer, the event rows are
NaN and ``event_meaningful`` is 0 (as the skill against an unsupported climatology is).

Memory: the threshold is ``366 x V_e x H x W`` float32 for the ``V_e`` event variables; it is
estimated from the training part of the windows store read a block of days of year at a time:
about ``max(chunk_steps, 21 x Y)`` time steps of the event variables for ``Y`` training years in
memory at once (a block of at least 11 days of year and the 5 days either side, in every year),
each training step read about twice with the smallest blocks. Across the test batches
:class:`EventCounts` keeps the four counts of each initial time, lead and variable per forecast
(``N x T_out x V_e x 4`` floats) and, with ``min_duration_days`` above 1, the last
``min_duration_days - 1`` steps of exceedance per forecast, still undecided.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.data.dayofyear import circular_running_mean
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.evaluation import baselines, metrics

WINDOW_HALF_DAYS = 5
"""Half width, in days of year, of the window the threshold pools (Hobday et al. 2016: 11 days)."""
CALENDAR_DAYS = 366
"""Days of the calendar of :func:`calendar_day` (every day of a leap year)."""
PREFIX = "event_"
"""Prefix of every event metric of ``metrics.csv``."""
COUNTS: tuple[str, str, str, str] = ("hits", "misses", "false_alarms", "correct_negatives")
"""The contingency counts, in the order of the last axis of every count array here."""
INTERVAL_SCORES: tuple[str, ...] = ("pod", "far", "sedi", "ets")
"""The scores with a 95% bootstrap interval (rows ``event_<score>``, ``_lower``, ``_upper``)."""
POINT_SCORES: tuple[str, ...] = ("base_rate", "frequency_bias")
"""The scores reported without an interval."""
MEANINGFUL = f"{PREFIX}meaningful"
"""The row that is 0 where the training period is too short for the threshold (the others NaN)."""
METRICS: tuple[str, ...] = (
    *(f"{PREFIX}{s}{suffix}" for s in INTERVAL_SCORES for suffix in ("", "_lower", "_upper")),
    *(f"{PREFIX}{s}" for s in POINT_SCORES),
    MEANINGFUL,
)
"""Every event metric of ``metrics.csv``, per forecast, event variable and lead."""
MLFLOW_METRICS: frozenset[str] = frozenset(
    {f"{PREFIX}pod", f"{PREFIX}far", f"{PREFIX}sedi", f"{PREFIX}sedi_lower", f"{PREFIX}sedi_upper", MEANINGFUL}
)
"""The event metrics logged into MLflow (the rest are in ``metrics.csv`` only)."""


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class EventSpec:
    """``evaluate.events``: which variables, which quantile, how long an event lasts at least."""

    variables: tuple[str, ...]
    quantile: float = 0.9
    min_duration_days: int = 1
    min_training_years: int = 2
    smooth_days: int = 31

    @property
    def high(self) -> bool:
        """True: events are anomalies above the threshold (``quantile >= 0.5``); False: below it."""
        return self.quantile >= 0.5

    @property
    def window_days(self) -> int:
        """Length of the day-of-year window the threshold pools (11)."""
        return 2 * WINDOW_HALF_DAYS + 1

    def describe(self) -> str:
        """One line saying what an event is."""
        side = "above" if self.high else "below"
        smooth = f", smoothed over {self.smooth_days} days" if self.smooth_days > 1 else ""
        duration = (
            f", lasting at least {self.min_duration_days} days" if self.min_duration_days > 1 else " (any duration)"
        )
        return (
            f"anomaly {side} the training period's {100 * self.quantile:g}th percentile of its day of year "
            f"({self.window_days}-day window{smooth}){duration}"
        )

    @classmethod
    def from_config(cls, section: Mapping[str, Any], targets: Sequence[str]) -> EventSpec | None:
        """The spec of the ``evaluate.events`` config section, None when no variable is named (off).
        A variable that is not among ``targets`` is a :class:`ConfigError` naming it."""
        variables = tuple(str(v) for v in section.get("variables") or ())
        if not variables:
            return None
        unknown = [v for v in variables if v not in targets]
        if unknown:
            raise ConfigError(
                f"config key evaluate.events.variables: {unknown} are not target variables ({list(targets)}); "
                "name targets only (events are scored on forecasts), or add them to variables.targets"
            )
        return cls(
            variables=variables,
            quantile=float(section.get("quantile", 0.9)),
            min_duration_days=int(section.get("min_duration_days", 1)),
            min_training_years=int(section.get("min_training_years", 2)),
            smooth_days=int(section.get("smooth_days", 31)),
        )


# --------------------------------------------------------------------------------------------------
# Days of year and the support of the threshold


def calendar_day(times: np.ndarray | pd.DatetimeIndex) -> np.ndarray:
    """Day of year ``1..366`` on a 366-day calendar: 29 February is day 60, and in a year without it
    1 March onwards move up by one (1 March is day 61, 31 December day 366 in every year)."""
    index = pd.DatetimeIndex(np.asarray(times, dtype="datetime64[ns]").reshape(-1))
    day = index.day_of_year.to_numpy().astype(np.int64)
    shift = (~index.is_leap_year) & (index.month > 2)
    return (day + shift.astype(np.int64)).reshape(np.shape(times))


def day_distance(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Circular distance in days between days of year of :func:`calendar_day` (``0..183``)."""
    diff = np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)) % CALENDAR_DAYS
    return np.minimum(diff, CALENDAR_DAYS - diff)


def time_step(times: np.ndarray) -> np.timedelta64:
    """The record's time step: the most common spacing of ``times`` (one day with fewer than 2)."""
    values = np.asarray(times, dtype="datetime64[ns]")
    if values.size < 2:
        return np.timedelta64(1, "D").astype("timedelta64[ns]")
    diffs, counts = np.unique(np.diff(values), return_counts=True)
    return np.timedelta64(diffs[np.argmax(counts)], "ns")


def step_days(times: np.ndarray) -> float:
    """:func:`time_step` in days."""
    return float(time_step(times) / np.timedelta64(1, "D"))


def training_years(train_times: np.ndarray, *, half: int = WINDOW_HALF_DAYS) -> np.ndarray:
    """Per day of year ``1..366`` (index ``d - 1``), the number of years whose window around it
    supports its threshold.

    The window of day ``d`` in a year is the ``2 half + 1`` days of year around ``d`` (circular,
    :func:`day_distance`); a training time step at distance ``o`` from ``d`` belongs to the window of
    the date it lies ``o`` days from, whose calendar year names the window (so the window of 1 January
    runs from the previous year's 27 December). A year counts when at least half of its window's time
    steps are training steps (``ceil((2 half + 1) / (2 step))`` steps, step in days): two training
    years from any first day give every day of year 2, a year and a half gives the days that the
    half year covers 2 and the others 1.
    """
    times = np.asarray(train_times, dtype="datetime64[ns]").reshape(-1)
    out = np.zeros(CALENDAR_DAYS, dtype=np.int64)
    if times.size == 0:
        return out
    need = max(1, math.ceil((2 * half + 1) / (2 * step_days(times))))
    day = calendar_day(times)
    counts: dict[tuple[int, int], int] = {}
    for offset in range(-half, half + 1):
        target = (day + offset - 1) % CALENDAR_DAYS + 1  # the window's day: `offset` days after the step
        years = pd.DatetimeIndex(times + np.timedelta64(offset, "D")).year.to_numpy()  # the year of that date
        keys, n = np.unique(np.stack([target, years]), axis=1, return_counts=True)
        for (d, y), c in zip(keys.T.tolist(), n.tolist(), strict=True):
            counts[(d, y)] = counts.get((d, y), 0) + c
    for (d, _), c in counts.items():
        if c >= need:
            out[d - 1] += 1
    return out


def unsupported_event_leads(valid_times: np.ndarray, years: np.ndarray, min_years: int) -> np.ndarray:
    """``(lead,)`` bool: True at a lead where some valid time's day of year (``valid_times``
    ``(time, lead)``) has fewer than ``min_years`` supporting training years (:func:`training_years`)."""
    valid = np.asarray(valid_times, dtype="datetime64[ns]")
    if valid.ndim != 2:
        raise DataError(f"unsupported_event_leads: valid_times must be (time, lead), got shape {valid.shape}")
    if valid.shape[0] == 0:
        return np.zeros(valid.shape[1], dtype=bool)
    return np.asarray(np.asarray(years[calendar_day(valid) - 1] < int(min_years)).any(axis=0), dtype=bool)


# --------------------------------------------------------------------------------------------------
# The threshold


def day_quantiles(
    anomalies: np.ndarray, days: np.ndarray, targets: Sequence[int], quantile: float, *, half: int = WINDOW_HALF_DAYS
) -> np.ndarray:
    """The ``quantile`` of ``anomalies`` ``(n, ...)`` over the rows whose day of year (``days``,
    :func:`calendar_day`, ``(n,)``) lies within ``half`` days of each of ``targets``: ``(len(targets), ...)``
    float32, NaN for a day with no row (linear interpolation between order statistics, NaN values
    left out)."""
    values = np.asarray(anomalies)
    out = np.full((len(targets), *values.shape[1:]), np.nan, dtype=np.float32)
    for i, target in enumerate(targets):
        rows = values[day_distance(days, target) <= half]
        if rows.shape[0] == 0:
            continue
        if not np.isnan(rows).any():
            out[i] = np.quantile(rows, quantile, axis=0)
            continue
        with warnings.catch_warnings():  # an all-NaN cell (land) has a NaN quantile, as meant
            warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
            out[i] = np.nanquantile(rows, quantile, axis=0)
    return out


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of consecutive integers of the sorted ``indices``."""
    if indices.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(part[0]), int(part[-1]) + 1) for part in np.split(indices, cuts)]


def percentile_threshold(store: Any, stats: xr.Dataset, spec: EventSpec, *, chunk_steps: int = 64) -> xr.DataArray:
    """The event threshold ``(dayofyear, variable, lat, lon)`` (days 1..366 of :func:`calendar_day`),
    in physical anomaly units (the variable's unit), NaN on land and for a day of year no training
    step supports.

    Reads the event variables of the windows ``store``'s time steps inside the statistics' training
    period (:func:`conv2dlstm.evaluation.baselines.training_times`), back in physical units minus the
    climatology of their day (:func:`conv2dlstm.evaluation.baselines.anomalies`), a block of days of
    year at a time: for days ``d0 .. d1`` the steps within :data:`WINDOW_HALF_DAYS` of them (about
    ``chunk_steps`` steps, at least 21 days per training year), then
    :func:`day_quantiles` for each of them over its ocean cells and :func:`circular_running_mean` of
    ``spec.smooth_days``. Every training step is read about ``(block + 10) / block`` times.
    """
    from conv2dlstm.artifacts import stats as stats_file

    all_times = np.asarray(store.time, dtype="datetime64[ns]")
    keep = np.flatnonzero(np.isin(all_times, baselines.training_times(all_times, stats)))
    if keep.size == 0:
        start, end = baselines.training_period(stats)
        raise DataError(
            f"the windows store holds no time step of the training period {start}..{end}; the event threshold "
            "needs the training record (rebuild the windows store)"
        )
    targets = [str(v) for v in store.target_variables]
    channels = [int(store.target_channels[targets.index(v)]) for v in spec.variables]
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    ocean = np.asarray(store.mask, dtype=bool)
    days = calendar_day(all_times[keep])
    half = WINDOW_HALF_DAYS
    n_years = max(1, math.ceil(keep.size * step_days(all_times[keep]) / 365.25))
    per_block = max(2 * half + 1, int(chunk_steps) // n_years - 2 * half)
    result = np.full((CALENDAR_DAYS, len(channels), int(ocean.sum())), np.nan, dtype=np.float32)
    for d0 in range(1, CALENDAR_DAYS + 1, per_block):
        block = np.arange(d0, min(d0 + per_block, CALENDAR_DAYS + 1))
        near = (day_distance(days[:, None], block[None, :]) <= half).any(axis=1)
        rows = np.flatnonzero(near)
        if rows.size == 0:
            continue
        parts = [store.read_time_range(a, b)[:, channels] for a, b in _runs(keep[rows])]
        normed = xr.DataArray(
            np.concatenate(parts, axis=0),
            dims=("time", "variable", "lat", "lon"),
            coords={"time": all_times[keep[rows]], "variable": list(spec.variables), "lat": lat, "lon": lon},
        )
        physical = stats_file.denormalize(normed, stats).transpose(*normed.dims)
        anomaly = np.asarray(baselines.anomalies(physical, stats).values, dtype=np.float32)[:, :, ocean]
        result[block - 1] = day_quantiles(anomaly, days[rows], block.tolist(), spec.quantile, half=half)
    smooth = circular_running_mean(result, spec.smooth_days).astype(np.float32)
    field = np.full((CALENDAR_DAYS, len(channels), lat.size, lon.size), np.nan, dtype=np.float32)
    field[:, :, ocean] = smooth
    return xr.DataArray(
        field,
        dims=("dayofyear", "variable", "lat", "lon"),
        coords={
            "dayofyear": np.arange(1, CALENDAR_DAYS + 1),
            "variable": list(spec.variables),
            "lat": lat,
            "lon": lon,
        },
        name="event_threshold",
        attrs={"quantile": spec.quantile, "window_days": spec.window_days, "smooth_days": spec.smooth_days},
    )


# --------------------------------------------------------------------------------------------------
# Minimum duration


def _marked(exceed: np.ndarray, breaks: np.ndarray, run_before: np.ndarray, min_length: int) -> np.ndarray:
    """Events of ``exceed`` ``(n, ...)``: steps inside a run of at least ``min_length`` consecutive
    exceedances, a run ending at a ``breaks`` step's predecessor (True: the step does not follow the
    previous one), ``run_before`` the run ending just before the first step; the series is taken to
    end after the last step."""
    n = exceed.shape[0]
    back = np.zeros(exceed.shape, dtype=np.int64)
    ahead = np.zeros(exceed.shape, dtype=np.int64)
    previous = run_before
    for t in range(n):
        previous = np.where(exceed[t], (0 if breaks[t] else previous) + 1, 0)
        back[t] = previous
    following = np.zeros(exceed.shape[1:], dtype=np.int64)
    for t in range(n - 1, -1, -1):
        following = np.where(exceed[t], (0 if t + 1 < n and breaks[t + 1] else following) + 1, 0)
        ahead[t] = following
    return np.asarray(exceed, dtype=bool) & (back + ahead - 1 >= min_length)


def min_duration(exceed: np.ndarray, breaks: np.ndarray | None, min_length: int) -> np.ndarray:
    """``exceed`` ``(time, ...)`` (bool) kept only inside runs of at least ``min_length`` consecutive
    True steps along ``time``; ``breaks`` ``(time,)``: True where a step does not follow the previous
    one (a gap), which ends a run (None: no gap). ``min_length`` 1 returns ``exceed``: with 5, an
    exceedance of 4 days is no event and one of 6 is."""
    values = np.asarray(exceed, dtype=bool)
    if min_length <= 1:
        return values.copy()
    gaps = np.zeros(values.shape[0], dtype=bool) if breaks is None else np.asarray(breaks, dtype=bool)
    return _marked(values, gaps, np.zeros(values.shape[1:], dtype=np.int64), int(min_length))


class DurationFilter:
    """:func:`min_duration` streamed in time: :meth:`push` takes consecutive blocks of steps and
    returns the events of the steps decided so far (a step is decided once ``min_length - 1`` later
    steps are known), :meth:`flush` the rest at the end; together they equal :func:`min_duration` of
    the whole series. Keeps the last ``min_length - 1`` steps and the length of the run before them."""

    def __init__(self, min_length: int) -> None:
        self.min_length = max(1, int(min_length))
        self._pending: np.ndarray | None = None
        self._breaks = np.zeros(0, dtype=bool)
        self._run: np.ndarray | int = 0

    def push(self, exceed: np.ndarray, breaks: np.ndarray) -> np.ndarray:
        """Add ``exceed`` ``(n, ...)`` (bool) with its ``breaks`` ``(n,)``; the events of the decided steps."""
        values = np.asarray(exceed, dtype=bool)
        if self.min_length == 1:
            return values.copy()
        buf = values if self._pending is None else np.concatenate([self._pending, values], axis=0)
        gaps = np.concatenate([self._breaks, np.asarray(breaks, dtype=bool)])
        decided = max(0, buf.shape[0] - (self.min_length - 1))
        run = np.broadcast_to(np.asarray(self._run, dtype=np.int64), buf.shape[1:])
        events = _marked(buf, gaps, run, self.min_length)[:decided]
        if decided:
            back = run
            for t in range(decided):  # the run length at the last decided step, carried to the next push
                back = np.where(buf[t], (0 if gaps[t] else back) + 1, 0)
            self._run = back
        self._pending, self._breaks = buf[decided:], gaps[decided:]
        return events

    def flush(self) -> np.ndarray:
        """The events of the steps still pending (the series ends after them); the filter is then empty."""
        if self._pending is None:
            return np.zeros((0,), dtype=bool)
        run = np.broadcast_to(np.asarray(self._run, dtype=np.int64), self._pending.shape[1:])
        events = _marked(self._pending, self._breaks, run, self.min_length)
        self._pending, self._breaks, self._run = None, np.zeros(0, dtype=bool), 0
        return events


def time_breaks(times: np.ndarray, step: np.timedelta64, previous: np.datetime64 | None = None) -> np.ndarray:
    """``(n,)`` bool: True where a time does not follow the one before (``previous`` for the first;
    None: the series starts there) by exactly ``step``."""
    values = np.asarray(times, dtype="datetime64[ns]")
    before = np.concatenate([[np.datetime64("NaT") if previous is None else previous], values[:-1]]).astype(
        "datetime64[ns]"
    )
    gaps = values - before
    return np.asarray(np.isnat(before) | (gaps != np.timedelta64(step, "ns")), dtype=bool)


# --------------------------------------------------------------------------------------------------
# Contingency counts and scores


def contingency(forecast: np.ndarray, truth: np.ndarray, valid: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Area-weighted counts ``(..., 4)`` (:data:`COUNTS`) of events ``forecast`` and ``truth``
    ``(..., lat, lon)`` (bool) over the cells where ``valid``, each cell counting its ``weights``
    ``(lat, lon)`` (0 on land)."""
    f, o = np.asarray(forecast, dtype=bool), np.asarray(truth, dtype=bool)
    w = np.where(np.asarray(valid, dtype=bool), np.asarray(weights, dtype=np.float64), 0.0)
    parts = [f & o, ~f & o, f & ~o, ~f & ~o]
    return np.stack([(p * w).sum(axis=(-2, -1)) for p in parts], axis=-1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def sedi(hit_rate: np.ndarray, false_alarm_rate: np.ndarray) -> np.ndarray:
    """The symmetric extremal dependence index of hit rate ``H`` and false alarm rate ``F``
    (Ferro & Stephenson 2011, eq. 2):

    ``SEDI = (ln F - ln H - ln(1 - F) + ln(1 - H)) / (ln F + ln H + ln(1 - F) + ln(1 - H))``,

    1 for a perfect forecast, 0 for a random one, -1 for the worst, independent of the base rate.
    Undefined where ``H`` or ``F`` is 0 or 1, except at its two limits: ``H = 1, F = 0`` (no miss, no
    false alarm) gives 1 and ``H = 0, F = 1`` gives -1; the other such cases (no event forecast:
    ``H = F = 0``) are NaN, as is a NaN rate.
    """
    h = np.asarray(hit_rate, dtype=np.float64)
    f = np.asarray(false_alarm_rate, dtype=np.float64)
    inside = (h > 0) & (h < 1) & (f > 0) & (f < 1)
    hh, ff = np.where(inside, h, 0.5), np.where(inside, f, 0.25)
    with np.errstate(divide="ignore", invalid="ignore"):
        num = np.log(ff) - np.log(hh) - np.log1p(-ff) + np.log1p(-hh)
        den = np.log(ff) + np.log(hh) + np.log1p(-ff) + np.log1p(-hh)
        value = num / den
    out = np.where(inside, value, np.nan)
    out = np.where((h == 1) & (f == 0), 1.0, out)
    return np.asarray(np.where((h == 0) & (f == 1), -1.0, out))


def contingency_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """The scores of counts ``(..., 4)`` (:data:`COUNTS`: ``a`` hits, ``c`` misses, ``b`` false alarms,
    ``d`` correct negatives, ``n`` their sum), each ``(...)``:

    - ``pod``: hit rate ``H = a / (a + c)`` (NaN without an observed event);
    - ``far``: false alarm ratio ``b / (a + b)`` (NaN without a forecast event);
    - ``sedi``: :func:`sedi` of ``H`` and the false alarm rate ``F = b / (b + d)``;
    - ``ets``: equitable threat score ``(a - a_r) / (a + b + c - a_r)``, ``a_r = (a + b)(a + c) / n``;
    - ``base_rate``: the observed event frequency ``(a + c) / n``;
    - ``frequency_bias``: forecast over observed events ``(a + b) / (a + c)``.
    """
    values = np.asarray(counts, dtype=np.float64)
    a, c, b, d = (values[..., i] for i in range(4))
    n = a + b + c + d
    hit_rate, false_alarm_rate = _ratio(a, a + c), _ratio(b, b + d)
    chance = _ratio((a + b) * (a + c), n)
    return {
        "pod": hit_rate,
        "far": _ratio(b, a + b),
        "sedi": sedi(hit_rate, false_alarm_rate),
        "ets": _ratio(a - chance, a + b + c - chance),
        "base_rate": _ratio(a + c, n),
        "frequency_bias": _ratio(a + b, a + c),
    }


def bootstrap_scores(
    counts: np.ndarray, *, n_resamples: int = metrics.DEFAULT_RESAMPLES, confidence: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Per score of :data:`INTERVAL_SCORES`, ``(value, lower, upper)`` from the per-initial-time counts
    ``(time, 4)``: the value of the summed counts, and the ``(1 -+ confidence) / 2`` quantiles of the
    scores of ``n_resamples`` circular-block-bootstrap resamples of the initial times
    (:func:`conv2dlstm.evaluation.metrics.circular_block_indices`, block length
    :func:`conv2dlstm.evaluation.metrics.block_length` of misses plus false alarms per initial time,
    generator seeded with ``seed``: the same resamples for every forecast of equal block length).
    A resample where a score is undefined (no observed event in it) is left out of that score's
    quantiles; with fewer than 2 initial times the bounds are NaN."""
    values = np.asarray(counts, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 4:
        raise DataError(f"bootstrap_scores: counts must be (time, 4), got shape {values.shape}")
    point = contingency_scores(values.sum(axis=0))
    n = values.shape[0]
    if n < 2:
        return {s: (float(point[s]), math.nan, math.nan) for s in INTERVAL_SCORES}
    block = metrics.block_length(values[:, 1] + values[:, 2])
    idx = metrics.circular_block_indices(n, block, n_resamples, np.random.default_rng(seed))
    step = 250  # resamples summed at a time: (250, time, 4) floats at most
    sums = np.concatenate([values[idx[i : i + step]].sum(axis=1) for i in range(0, n_resamples, step)])
    samples = contingency_scores(sums)
    alpha = (1.0 - confidence) / 2.0
    out = {}
    for s in INTERVAL_SCORES:
        finite = samples[s][np.isfinite(samples[s])]
        lower, upper = np.quantile(finite, [alpha, 1.0 - alpha]) if finite.size else (math.nan, math.nan)
        out[s] = (float(point[s]), float(lower), float(upper))
    return out


def event_rows(
    counts: Mapping[str, np.ndarray],
    *,
    variables: Sequence[str],
    unsupported: np.ndarray,
    n_resamples: int = metrics.DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Tidy rows ``model, variable, lead, metric, value`` (:data:`METRICS`) of the per-initial-time
    counts ``name -> (time, lead, variable, 4)`` (:meth:`EventCounts.counts`): per forecast,
    variable and lead, :func:`bootstrap_scores` and the point scores; at a lead where ``unsupported``
    ``(lead,)`` is True every score is NaN and ``event_meaningful`` 0 (else 1). A forecast whose
    counts have no time (events off) gets NaN rows."""
    flags = np.asarray(unsupported, dtype=bool)
    rows = []
    for name, series in counts.items():
        values = np.asarray(series, dtype=np.float64)
        for j, variable in enumerate(variables):
            for k in range(flags.size):
                scored = not flags[k] and values.shape[0] > 0
                per_time = values[:, k, j] if scored else np.zeros((0, 4))
                found: dict[str, float] = {}
                if scored:
                    for s, (v, lo, hi) in bootstrap_scores(
                        per_time, n_resamples=n_resamples, confidence=confidence, seed=seed
                    ).items():
                        found |= {f"{PREFIX}{s}": v, f"{PREFIX}{s}_lower": lo, f"{PREFIX}{s}_upper": hi}
                    point = contingency_scores(per_time.sum(axis=0))
                    found |= {f"{PREFIX}{s}": float(point[s]) for s in POINT_SCORES}
                found[MEANINGFUL] = 1.0 if scored else 0.0
                rows += [
                    {"model": name, "variable": variable, "lead": k + 1, "metric": m, "value": found.get(m, math.nan)}
                    for m in METRICS
                ]
    return pd.DataFrame(rows, columns=["model", "variable", "lead", "metric", "value"])


# --------------------------------------------------------------------------------------------------
# Streaming accumulation over the test batches


class EventCounts:
    """The per-initial-time contingency counts of every forecast, accumulated batch by batch.

    :meth:`add` takes one batch of physical forecasts, truth and climatology ``(time, lead, variable,
    lat, lon)`` (the ``valid_time`` coordinate ``(time, lead)``, consecutive batches in time order),
    turns the anomalies into exceedances of ``threshold`` at each valid time's day of year, applies
    the minimum duration along initial times (:class:`DurationFilter`, runs ended where consecutive
    initial times are not ``step`` apart) and counts (:func:`contingency`); :meth:`counts` returns
    ``name -> (time, lead, variable, 4)`` over every initial time, equal to :func:`min_duration` and
    :func:`contingency` of the whole test period at once. Without a ``threshold`` (events off) it
    only records the forecasts' names.
    """

    def __init__(
        self,
        spec: EventSpec,
        threshold: xr.DataArray | None,
        weights: xr.DataArray,
        *,
        step: np.timedelta64,
    ) -> None:
        self.spec = spec
        self.threshold = None if threshold is None else np.asarray(threshold.values, dtype=np.float32)
        self.weights = np.asarray(weights.transpose("lat", "lon").values, dtype=np.float64)
        self.step = np.timedelta64(step, "ns")
        self.min_steps = max(1, math.ceil(spec.min_duration_days / (self.step / np.timedelta64(1, "D")) - 1e-9))
        self._truth = DurationFilter(self.min_steps)
        self._filters: dict[str, DurationFilter] = {}
        self._valid: dict[str, np.ndarray] = {}  # the validity of the steps still pending, per forecast
        self._counts: dict[str, list[np.ndarray]] = {}
        self._last: np.datetime64 | None = None
        self._gaps = 0

    @property
    def gaps(self) -> int:
        """How many times consecutive initial times were not one step apart (a run ended there)."""
        return self._gaps

    def _exceed(self, anomaly: np.ndarray, threshold: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return anomaly > threshold if self.spec.high else anomaly < threshold

    def add(self, forecasts: Mapping[str, xr.DataArray], truth: xr.DataArray, climatology: xr.DataArray) -> None:
        """Add one batch (see the class)."""
        for name in forecasts:
            self._counts.setdefault(name, [])
        if self.threshold is None:
            return
        variables = list(self.spec.variables)
        dims = ("time", "lead", "variable", "lat", "lon")

        def values(da: xr.DataArray) -> np.ndarray:
            return np.asarray(da.sel(variable=variables).transpose(*dims).values, dtype=np.float32)

        clim = values(climatology)
        days = calendar_day(np.asarray(truth["valid_time"].values))  # (time, lead)
        threshold = self.threshold[days - 1]  # (time, lead, variable, lat, lon)
        times = np.asarray(truth["time"].values, dtype="datetime64[ns]")
        breaks = time_breaks(times, self.step, self._last)
        self._gaps += int(breaks[1:].sum()) + int(self._last is not None and bool(breaks[0]))
        self._last = times[-1]
        truth_anomaly = values(truth) - clim
        truth_valid = np.isfinite(truth_anomaly) & np.isfinite(threshold) & (self.weights > 0)
        observed = self._truth.push(self._exceed(truth_anomaly, threshold) & truth_valid, breaks)
        for name, forecast in forecasts.items():
            anomaly = values(forecast) - clim
            valid = truth_valid & np.isfinite(anomaly)
            events = self._filters.setdefault(name, DurationFilter(self.min_steps)).push(
                self._exceed(anomaly, threshold) & valid, breaks
            )
            pending = self._valid.get(name)
            valid_all = valid if pending is None else np.concatenate([pending, valid], axis=0)
            decided = events.shape[0]
            self._valid[name] = valid_all[decided:]
            self._counts[name].append(
                contingency(events, observed[:decided], valid_all[:decided], self.weights).astype(np.float64)
            )

    def counts(self) -> dict[str, np.ndarray]:
        """``name -> (time, lead, variable, 4)`` counts of every initial time added (the pending steps
        decided as the end of the series); ``(0, lead, variable, 4)``-like empty arrays when off."""
        if self.threshold is None:
            return {name: np.zeros((0, 0, len(self.spec.variables), 4)) for name in self._counts}
        observed = self._truth.flush()
        out = {}
        for name, parts in self._counts.items():
            events = self._filters[name].flush()
            if events.shape[0]:
                parts.append(contingency(events, observed, self._valid[name], self.weights).astype(np.float64))
            self._valid[name] = self._valid[name][:0]
            out[name] = np.concatenate(parts, axis=0)
        self._counts = {name: [series] for name, series in out.items()}
        return out
