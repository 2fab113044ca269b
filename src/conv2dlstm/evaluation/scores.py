"""The tidy score table: forecasts and truth in physical units turned into the rows of ``metrics.csv``.

One concern: scoring. Per forecast (the model and each baseline of
:data:`conv2dlstm.evaluation.baselines.BASELINE_NAMES`), variable and lead, the area-weighted scores of
:mod:`conv2dlstm.evaluation.metrics` (RMSE, MAE, bias, ACC) averaged over initial times, accumulated batch by
batch (:class:`StreamingScores`, :class:`CellRmse` for the per-cell RMSE map), and the skill
``1 - RMSE/RMSE(baseline)`` against every other baseline with a 95% paired block-bootstrap interval
(:func:`skill_frame`), and the skill horizon: the last lead up to which that interval stays above
zero (:func:`skill_horizon`, :func:`skill_horizons`); then the tidy ``metrics.csv`` table
(:func:`metrics_table`, :data:`CSV_COLUMNS`), its flat MLflow metric names (:func:`mlflow_metrics`)
and its skill rows in wide form (:func:`skill_intervals`, read by the evaluate step's plots and the
compare step).

Is the gain real? The skill interval comes from a paired circular block bootstrap over initial
times (:func:`conv2dlstm.evaluation.metrics.bootstrap_skill_table`): the per-initial-time MSE series are
resampled in blocks of consecutive initial times whose length is the integral time scale
(decorrelation time) of the loss difference, so that serially correlated errors do not make the
interval too narrow; :data:`BOOTSTRAP_RESAMPLES` resamples, seed :data:`BOOTSTRAP_SEED`
(reproducible). A model is better than a baseline at a lead only where the interval lies above zero.

Strata: every score, skill and horizon is computed per region and per group of initial times
(:mod:`conv2dlstm.evaluation.strata`) by one code path: :class:`StreamingScores` takes named area
weights (``all``, the whole grid, then each region) and a time grouping (seasons or months of the
first valid time), and scores every ``(region, group)`` with the same functions, a group's bootstrap
resampling its own initial times. The table's ``region`` and ``season`` columns name the stratum
(:data:`CSV_COLUMNS`; ``all`` and ``all``, the headline, first); :func:`headline` selects the
headline rows, :func:`read_metrics_csv` reads a ``metrics.csv`` (one written before the strata
existed as headline rows), :func:`stratum_suffix` ends a stratum's MLflow names.

Used by the evaluate step (:mod:`conv2dlstm.steps.evaluate`), which writes the table, and the compare
step (:mod:`conv2dlstm.steps.compare`) and :mod:`conv2dlstm.evaluation.results`, which read it.
Nothing here writes files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import events, metrics
from conv2dlstm.evaluation.baselines import BASELINE_NAMES
from conv2dlstm.evaluation.strata import ALL, STRATA, TimeGrouping


def _sqrt(mse: xr.DataArray) -> xr.DataArray:
    return cast(xr.DataArray, np.sqrt(mse))  # a DataArray ufunc


@dataclass(frozen=True)
class Score:
    """One score of the table: a metric is one :data:`SCORES` entry, which :class:`StreamingScores`,
    the table, MLflow and the compare step take their names from."""

    per_time: Callable[[xr.DataArray, xr.DataArray, xr.DataArray, xr.DataArray], xr.DataArray]
    """``(forecast, truth, climatology, weights) -> (time, lead, variable)``: the area-weighted value
    of each initial time (of :mod:`conv2dlstm.evaluation.metrics`)."""
    report: Callable[[xr.DataArray], xr.DataArray] | None = None
    """Applied to the mean over initial times (RMSE: the square root of the mean MSE)."""
    of_climatology: bool = True
    """Scored for the climatology forecast too (ACC is not: its anomaly is zero)."""


SCORES: dict[str, Score] = {
    "rmse": Score(lambda f, t, c, w: metrics.mse_per_time(f, t, w), report=_sqrt),
    "mae": Score(lambda f, t, c, w: metrics.mae_per_time(f, t, w)),
    "bias": Score(lambda f, t, c, w: metrics.bias_per_time(f, t, w)),
    "acc": Score(lambda f, t, c, w: metrics.acc_per_time(f, t, c, w), of_climatology=False),
}
"""The scores of every forecast, per lead and variable, in the order of ``metrics.csv``."""
BOOTSTRAPPED = "rmse"
"""The score whose per-initial-time values (MSE) the skill bootstrap resamples."""
CSV_COLUMNS: list[str] = ["run", "model", "variable", "region", "season", "lead", "metric", "value"]
"""The columns of ``metrics.csv``. ``region`` and ``season`` name the stratum of a row
(:mod:`conv2dlstm.evaluation.strata`): ``all`` and ``all`` for the headline scores (the whole grid,
every initial time), a region of ``evaluate.regions``, a season or month of ``evaluate.by_season``."""
LEGACY_COLUMNS: list[str] = ["run", "model", "variable", "lead", "metric", "value"]
"""The columns of a ``metrics.csv`` written before strata existed: every row is a headline row."""

SKILL_METRICS: tuple[str, ...] = ("", "_lower", "_upper", "_significant", "_meaningful", "_block_length")
"""Suffixes of the ``skill_vs_<baseline>`` rows of ``metrics.csv`` (see :func:`skill_frame`)."""
HORIZON_PREFIX = "skill_horizon_vs_"
"""Metric prefix of the skill horizon rows ``skill_horizon_vs_<baseline>`` of ``metrics.csv`` (:func:`horizon_rows`)."""
HORIZON_LEAD = 0
"""The ``lead`` of the ``skill_horizon_vs_<baseline>`` rows: one value over all leads, so not a lead (leads
are ``1..N``); an integer keeps the column integer, and no reader that selects a metric per lead meets it."""
BOOTSTRAP_RESAMPLES = metrics.DEFAULT_RESAMPLES
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def tidy(da: xr.DataArray, *, model: str, metric: str) -> pd.DataFrame:
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


def _lead_flags(flags: Mapping[str, xr.DataArray], name: str, like: xr.DataArray) -> xr.DataArray:
    """``flags[name]`` ``(lead,)`` broadcast to ``like`` ``(lead, variable)``; all False when absent."""
    out = xr.zeros_like(like, dtype=bool)
    if name in flags:
        with xr.set_options(arithmetic_join="exact"):
            out = out | flags[name].reset_coords(drop=True)
    return out


def skill_frame(
    mse: Mapping[str, xr.DataArray], not_meaningful: Mapping[str, xr.DataArray] | None = None
) -> pd.DataFrame:
    """Skill of each forecast against each (other) baseline with a 95% bootstrap interval, as tidy rows.

    For every forecast ``f`` of ``mse`` and every baseline ``b`` of
    :data:`conv2dlstm.evaluation.baselines.BASELINE_NAMES` present (``b != f``), per ``(lead, variable)``:
    :func:`conv2dlstm.evaluation.metrics.bootstrap_skill_table` of the per-initial-time MSE series of ``f`` and ``b``
    (``1 - RMSE_f / RMSE_b`` with a paired circular block bootstrap over initial times, block length from the
    decorrelation time of the loss difference, :data:`BOOTSTRAP_RESAMPLES` resamples, seed :data:`BOOTSTRAP_SEED`).
    Metrics:

    - ``skill_vs_<b>``, ``skill_vs_<b>_lower``, ``skill_vs_<b>_upper``: the skill and its interval;
    - ``skill_vs_<b>_significant``: 1 where the interval excludes 0, else 0;
    - ``skill_vs_<b>_meaningful``: 0 where ``f`` or ``b`` relies on a climatology that no training
      day supports at that lead (``not_meaningful``); the four rows above are then NaN;
    - ``skill_vs_<b>_block_length``: the bootstrap block length, in initial times;
    - ``skill_horizon_vs_<b>`` (one row per forecast, baseline and variable, ``lead`` :data:`HORIZON_LEAD`):
      the skill horizon in lead steps (:func:`horizon_rows`).

    Args:
        mse: name -> per-initial-time MSE ``(time, lead, variable)``, the same initial times for all.
        not_meaningful: name -> ``(lead,)`` bool (:func:`conv2dlstm.evaluation.baselines.not_meaningful_leads`).
    """
    flags = dict(not_meaningful or {})
    frames = []
    for name, series in mse.items():
        for baseline in BASELINE_NAMES:
            if baseline == name or baseline not in mse:
                continue
            table = metrics.bootstrap_skill_table(
                series.reset_coords(drop=True),
                mse[baseline].reset_coords(drop=True),
                n_resamples=BOOTSTRAP_RESAMPLES,
                confidence=CONFIDENCE,
                seed=BOOTSTRAP_SEED,
            )
            ok = ~(_lead_flags(flags, name, table["skill"]) | _lead_flags(flags, baseline, table["skill"]))
            prefix = f"skill_vs_{baseline}"
            values = {
                "": table["skill"].where(ok),
                "_lower": table["lower"].where(ok),
                "_upper": table["upper"].where(ok),
                "_significant": table["significant"].astype("float64").where(ok),
                "_meaningful": ok.astype("float64"),
                "_block_length": table["block_length"].astype("float64"),
            }
            frames += [tidy(da, model=name, metric=prefix + suffix) for suffix, da in values.items()]
    if not frames:
        return pd.DataFrame(columns=["model", "variable", "lead", "metric", "value"])
    skills = pd.concat(frames, ignore_index=True)
    return pd.concat([skills, horizon_rows(skill_intervals(skills))], ignore_index=True)


def skill_horizon(lower: Sequence[float] | np.ndarray) -> int:
    """The skill horizon, in lead steps: the largest ``k`` such that the lower bound of the skill's 95%
    interval is above 0 at every lead ``1..k``.

    Args:
        lower: the lower bounds at leads ``1, 2, ..., N``, in that order. A NaN (no interval, or a skill
            not meaningful at that lead) ends the run like a bound at or below 0.

    Returns:
        ``k`` in ``0..N``: 0 when lead 1 already fails, ``N`` when every lead passes (the horizon is then
        at least the last lead scored). A positive lead after a failing one does not extend it.
    """
    values = np.asarray(lower, dtype="float64")
    if values.ndim != 1:
        raise ValueError(f"skill_horizon: expected the lower bounds of leads 1..N (1-D), got shape {values.shape}")
    above = values > 0  # NaN compares False
    return int(above.size if above.all() else np.argmin(above))


def lead_horizon(rows: pd.DataFrame) -> int:
    """:func:`skill_horizon` of one forecast, baseline and variable from its per-lead rows (columns ``lead``
    and ``lower``, one row per lead, e.g. of :func:`skill_intervals`). The leads are ``1..`` the largest
    one; a lead without a row ends the run."""
    if rows.empty:
        return 0
    lower = pd.Series(rows["lower"].to_numpy(dtype="float64"), index=rows["lead"].astype("int64").to_numpy())
    return skill_horizon(lower.reindex(range(1, int(lower.index.max()) + 1)).to_numpy())


def skill_horizons(skills: pd.DataFrame, *, by: str = "model") -> pd.DataFrame:
    """The skill horizon (:func:`lead_horizon`) per ``by``, baseline and variable (and stratum, where
    ``skills`` has the ``region`` and ``season`` columns) of the wide skill rows ``skills``
    (:func:`skill_intervals`): columns ``by``, the stratum columns, ``baseline``, ``variable``,
    ``horizon`` (int)."""
    keys = [by, *_strata_in(skills), "baseline", "variable"]
    records = [
        {**dict(zip(keys, key, strict=True)), "horizon": lead_horizon(group)}
        for key, group in skills.groupby(keys, sort=False)
    ]
    return pd.DataFrame(records, columns=[*keys, "horizon"]).astype({"horizon": "int64"})


def horizon_rows(skills: pd.DataFrame, *, by: str = "model") -> pd.DataFrame:
    """Tidy rows ``by, variable, lead, metric, value`` (and the stratum columns of ``skills``, after
    ``variable``) of the skill horizons of :func:`skill_horizons`: metric ``skill_horizon_vs_<baseline>``,
    ``lead`` :data:`HORIZON_LEAD`, value the horizon in lead steps."""
    horizons = skill_horizons(skills, by=by)
    strata = _strata_in(skills)
    return pd.DataFrame(
        {
            by: horizons[by],
            "variable": horizons["variable"],
            **{column: horizons[column] for column in strata},
            "lead": np.full(len(horizons), HORIZON_LEAD, dtype="int64"),
            "metric": HORIZON_PREFIX + horizons["baseline"].astype(str),
            "value": horizons["horizon"].astype("float64"),
        },
        columns=[by, "variable", *strata, "lead", "metric", "value"],
    )


def score_frame(scores: Mapping[str, Mapping[str, xr.DataArray]], skills: pd.DataFrame) -> pd.DataFrame:
    """Tidy rows of time-mean ``(lead, variable)`` scores per forecast, then the skill rows."""
    frames = [
        tidy(da, model=name, metric=metric) for name, by_metric in scores.items() for metric, da in by_metric.items()
    ]
    return pd.concat([*frames, skills], ignore_index=True)


def stratum_frame(frame: pd.DataFrame, *, region: str = ALL, season: str = ALL) -> pd.DataFrame:
    """Tidy rows ``model, variable, lead, metric, value`` of one stratum with its ``region`` and
    ``season`` columns after ``variable``."""
    out = frame.drop(columns=[c for c in STRATA if c in frame.columns])
    at = list(out.columns).index("variable") + 1 if "variable" in out.columns else 0
    out.insert(at, "region", region)
    out.insert(at + 1, "season", season)
    return out


def with_strata(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the :data:`~conv2dlstm.evaluation.strata.STRATA` columns, a row without a
    stratum (a table written before strata existed, the damping rows) being a headline row (``all``)."""
    missing = [c for c in STRATA if c not in table.columns]
    if not missing and not table[list(STRATA)].isna().any().any():
        return table
    out = table.copy()
    for column in STRATA:
        out[column] = out[column].fillna(ALL).astype(str) if column in out.columns else ALL
    return out


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """The headline rows of a ``metrics.csv``-like table: region and season :data:`ALL` (the whole
    grid over the whole test period); every row of a table without those columns."""
    present = [c for c in STRATA if c in table.columns]
    if not present:
        return table
    keep = np.logical_and.reduce([table[c].fillna(ALL).astype(str) == ALL for c in present])
    return table[keep]


def read_metrics_csv(path: str | Path) -> pd.DataFrame:
    """A ``metrics.csv`` as written by the evaluate step, names as strings; a file written before
    strata existed (:data:`LEGACY_COLUMNS`) gets its rows as headline rows (:func:`with_strata`).
    Other columns are a :class:`DataError` naming the file."""
    text = {c: str for c in ("run", "model", "variable", *STRATA, "metric")}
    frame = pd.read_csv(path, dtype=text)
    if list(frame.columns) not in (CSV_COLUMNS, LEGACY_COLUMNS):
        raise DataError(
            f"{path} has columns {list(frame.columns)}; expected {CSV_COLUMNS} (a metrics.csv written by the "
            "evaluate step)"
        )
    return with_strata(frame)[CSV_COLUMNS]


class StreamingScores:
    """The score table of forecasts, accumulated over batches of initial times, per stratum.

    A stratum is a region (a named weight field: ``all``, the whole grid, and each configured
    region, :mod:`conv2dlstm.evaluation.strata`) and a group of initial times (``all``, and with a
    :class:`~conv2dlstm.evaluation.strata.TimeGrouping` each season or month present); every stratum
    is scored by the same code: its area weights and its initial times.

    :meth:`add` computes the per-initial-time scores of a batch with the ``*_per_time`` functions
    of :mod:`conv2dlstm.evaluation.metrics`, once per region, and keeps, per forecast, score, region,
    time group, lead and variable, only their sum and the number of defined (non-NaN) values, plus
    per region the per-initial-time MSE series that the bootstrap of the skill needs
    (``N x T_out x C_out`` floats per forecast and region for ``N`` initial times) and the time
    group of each initial time; a time group's bootstrap resamples the MSE series of its own initial
    times. :meth:`table` takes the time means (RMSE: the square root of the mean MSE) and the skills.
    Memory does not grow with the grid.
    """

    def __init__(
        self, weights: xr.DataArray | Mapping[str, xr.DataArray], grouping: TimeGrouping | None = None
    ) -> None:
        """``weights``: the area weights (:func:`conv2dlstm.evaluation.metrics.area_weights`) of the
        whole grid, or region name -> weights with the whole grid's first under :data:`ALL`;
        ``grouping``: how initial times are grouped besides all of them (None: not grouped)."""
        named = {ALL: weights} if isinstance(weights, xr.DataArray) else dict(weights)
        if next(iter(named), None) != ALL:
            raise ValueError(f"StreamingScores: the first weight field must be the whole grid's, named {ALL!r}")
        self.weights = named
        self.grouping = grouping
        self._sums: dict[tuple[str, str, str, str], xr.DataArray] = {}
        self._counts: dict[tuple[str, str, str, str], xr.DataArray] = {}
        self._series: dict[tuple[str, str], list[xr.DataArray]] = {}
        self._groups: list[np.ndarray] = []
        self._order: list[str] = []

    def _selections(self, truth: xr.DataArray) -> list[tuple[str, np.ndarray | slice]]:
        """``(group, initial times of the batch)``: all of them, then each group present (recorded)."""
        out: list[tuple[str, np.ndarray | slice]] = [(ALL, slice(None))]
        if self.grouping is not None:
            labels = self.grouping.of(truth)
            self._groups.append(labels)
            out += [(group, labels == group) for group in self.grouping.order if (labels == group).any()]
        return out

    def add(self, forecasts: Mapping[str, xr.DataArray], truth: xr.DataArray, climatology: xr.DataArray) -> None:
        """Add one batch: ``(time, lead, variable, lat, lon)`` forecasts, truth and climatology (with
        the ``valid_time`` coordinate when initial times are grouped)."""
        selections = self._selections(truth)
        for name in forecasts:
            if name not in self._order:
                self._order.append(name)
        for region, w in self.weights.items():
            for name, forecast in forecasts.items():
                per_time = {
                    metric: score.per_time(forecast, truth, climatology, w)
                    for metric, score in SCORES.items()
                    if score.of_climatology or name != "climatology"
                }
                self._series.setdefault((name, region), []).append(
                    per_time[BOOTSTRAPPED]
                    .transpose("time", "lead", "variable")
                    .reset_coords(drop=True)
                    .astype("float64")
                )
                for metric, values in per_time.items():
                    for group, times in selections:
                        part = values.isel(time=times)
                        self._accumulate((name, metric, region, group), part)

    def _accumulate(self, key: tuple[str, str, str, str], values: xr.DataArray) -> None:
        total = values.fillna(0.0).sum("time").astype("float64")
        count = values.notnull().sum("time")
        if key in self._sums:
            with xr.set_options(arithmetic_join="exact"):
                total, count = self._sums[key] + total, self._counts[key] + count
        self._sums[key], self._counts[key] = total, count

    def strata(self) -> list[tuple[str, str]]:
        """``(region, group)`` of every stratum scored: the whole grid and period first, then the
        regions in their order, each with all initial times, then every group present in calendar order."""
        groups = [ALL]
        if self.grouping is not None and self._groups:
            present = set(np.concatenate(self._groups).tolist())
            groups += [g for g in self.grouping.order if g in present]
        return [(region, group) for region in self.weights for group in groups]

    def mse_series(self, region: str = ALL, group: str = ALL) -> dict[str, xr.DataArray]:
        """``name -> (time, lead, variable)`` per-initial-time MSE over ``region`` of every batch, in
        order; of the initial times of time group ``group`` only (all of them for :data:`ALL`)."""
        out = {name: xr.concat(parts, dim="time") for (name, r), parts in self._series.items() if r == region}
        if group == ALL:
            return out
        keep = np.concatenate(self._groups) == group
        return {name: series.isel(time=keep) for name, series in out.items()}

    def time_means(self, region: str = ALL, group: str = ALL) -> dict[str, dict[str, xr.DataArray]]:
        """``name -> metric -> (lead, variable)`` time means over ``region`` and the initial times of
        ``group``, each :data:`SCORES` entry's ``report`` applied."""
        out: dict[str, dict[str, xr.DataArray]] = {}
        for name in self._order:
            out[name] = {}
            for metric, score in SCORES.items():
                key = (name, metric, region, group)
                if key not in self._sums:
                    continue
                count = self._counts[key]
                mean = (self._sums[key] / count.where(count > 0)).transpose("lead", "variable")
                out[name][metric] = score.report(mean) if score.report is not None else mean
        return out

    def table(self, not_meaningful: Mapping[str, xr.DataArray] | None = None) -> pd.DataFrame:
        """Tidy frame ``model, variable, region, season, lead, metric, value``: per stratum
        (:meth:`strata`) the time-mean scores of each forecast, then its skill rows (:func:`skill_frame`);
        the same table as the in-memory reference of the tests (``tests/support/reference.py``), which
        scores whole arrays with :mod:`conv2dlstm.evaluation.metrics`. The flags ``not_meaningful`` (of
        the whole test period) apply to every stratum."""
        if not self._sums:
            raise DataError("no batch was scored; the test split has no window")
        frames = []
        for region, group in self.strata():
            skills = skill_frame(self.mse_series(region, group), not_meaningful)
            frames.append(
                stratum_frame(score_frame(self.time_means(region, group), skills), region=region, season=group)
            )
        return pd.concat(frames, ignore_index=True)


class CellRmse:
    """RMSE of each grid cell over initial times (:func:`conv2dlstm.evaluation.metrics.rmse_per_cell`), accumulated
    batch by batch: the per-cell sum of squared errors and the number of finite ones."""

    def __init__(self, mask: xr.DataArray) -> None:
        self.mask = mask.astype(bool)
        self._sum: xr.DataArray | None = None
        self._count: xr.DataArray | None = None

    def add(self, forecast: xr.DataArray, truth: xr.DataArray) -> None:
        """Add ``(time, variable, lat, lon)`` forecasts and truth of one batch."""
        squared = ((forecast - truth) ** 2).where(self.mask)
        total = squared.fillna(0.0).astype("float64").sum("time")
        count = squared.notnull().sum("time")
        if self._sum is not None:
            if self._count is None:
                raise RuntimeError("CellRmse holds a sum of squared errors without its count")
            with xr.set_options(arithmetic_join="exact"):
                total, count = self._sum + total, self._count + count
        self._sum, self._count = total, count

    def result(self) -> xr.DataArray:
        """``(variable, lat, lon)`` RMSE, NaN on land and where no error was finite."""
        if self._sum is None or self._count is None:
            raise DataError("no batch was scored; the test split has no window")
        rms = cast(xr.DataArray, np.sqrt(self._sum / self._count.where(self._count > 0)))  # a DataArray ufunc
        return rms.transpose("variable", "lat", "lon")


def _first_seen(values: pd.Series) -> dict[str, int]:
    """Rank of each value by its first appearance, :data:`ALL` first."""
    return {v: i for i, v in enumerate(dict.fromkeys([ALL, *values.astype(str)]))}


def metrics_table(scores: pd.DataFrame, *, run: str, model_name: str, source: str = "model") -> pd.DataFrame:
    """The tidy ``metrics.csv`` table: rows of ``scores`` with the run, and ``source`` renamed to ``model_name``.

    Rows are ordered by stratum (the headline rows, region and season ``all``, first; then the
    regions and seasons in the order they come in ``scores``), then by model (the run's, then the
    baselines), variable, metric and lead. A row without a stratum is a headline row (:func:`with_strata`).
    """
    table = with_strata(scores.copy())
    table.loc[table["model"] == source, "model"] = model_name
    table.insert(0, "run", run)
    table["lead"] = table["lead"].astype("int64")
    order = {
        "model": {name: i for i, name in enumerate([model_name, *BASELINE_NAMES])},
        **{column: _first_seen(table[column]) for column in STRATA},
    }
    table = table.sort_values(
        [*STRATA, "model", "variable", "metric", "lead"],
        key=lambda s: s.map(order[str(s.name)]) if s.name in order else s,
        kind="stable",
    )
    return table[CSV_COLUMNS].reset_index(drop=True)


def _mean_metric(metric: str) -> bool:
    """Whether a metric gets a mean over leads in MLflow: the scores and the point skills."""
    return metric in SCORES or (metric.startswith("skill_vs_") and metric[len("skill_vs_") :] in BASELINE_NAMES)


def stratum_suffix(region: str, season: str) -> str | None:
    """The end of the MLflow names of a stratum's metrics: ``""`` for the headline (region and season
    ``all``), ``_region_<name>`` for a region over every initial time, ``_season_<group>`` for a
    season or month over the whole grid; None for a region within a season (in ``metrics.csv``
    only, so that the metrics of a run grow with regions plus seasons, not their product)."""
    if region == ALL:
        return "" if season == ALL else f"_season_{season}"
    return f"_region_{region}" if season == ALL else None


def mlflow_metrics(table: pd.DataFrame, *, model_name: str) -> dict[str, float]:
    """Flat MLflow metric names for a ``metrics.csv`` table (non-finite values are left out).

    Model scores are ``test_<metric>_<variable>_lead<k>``, its skill rows (with their interval,
    significance and meaningfulness flags, :func:`skill_frame`) ``skill_vs_<baseline>[_<suffix>]_<variable>_lead<k>``,
    its skill horizons (one per baseline and variable, in lead steps, :func:`horizon_rows`)
    ``skill_horizon_vs_<baseline>_<variable>``, baseline rows ``<baseline>_<metric>_<variable>_lead<k>``
    (``<baseline>_skill_horizon_vs_<other>_<variable>``). The scores and the point skills also
    get a ``..._<variable>_mean`` over leads; a skill not meaningful at some lead (NaN) has no mean,
    and its ``..._meaningful_...`` metric is 0.

    Extreme-event rows (:mod:`conv2dlstm.evaluation.events`, headline only): those of
    :data:`conv2dlstm.evaluation.events.MLFLOW_METRICS` only, named like the skill rows
    (``event_sedi_sst_lead1``, ``event_sedi_lower_sst_lead1``, ``persistence_event_pod_sst_lead1``);
    the rest of them (ETS, base rate, frequency bias, the other intervals) are in ``metrics.csv`` only.

    Rows of a region or a season end in :func:`stratum_suffix` (``test_rmse_sst_lead1_region_gulf``,
    ``skill_vs_persistence_sst_lead1_season_DJF``, ``skill_horizon_vs_persistence_sst_region_gulf``,
    ``test_rmse_sst_mean_season_JJA``); the headline rows keep the names above, and a region within a
    season is not logged (it is in ``metrics.csv``).
    """
    out: dict[str, float] = {}
    table = with_strata(table)

    def prefix(model: str, metric: str) -> str:
        if model == model_name:
            return metric if metric.startswith(("skill_vs_", HORIZON_PREFIX, events.PREFIX)) else f"test_{metric}"
        return f"{model}_{metric}"

    for row in table.itertuples(index=False):
        suffix = stratum_suffix(str(row.region), str(row.season))
        if str(row.metric).startswith(events.PREFIX) and row.metric not in events.MLFLOW_METRICS:
            continue
        if suffix is not None and np.isfinite(row.value):
            at = "" if str(row.metric).startswith(HORIZON_PREFIX) else f"_lead{row.lead}"  # one value over leads
            out[f"{prefix(row.model, row.metric)}_{row.variable}{at}{suffix}"] = float(row.value)
    averaged = table[table["metric"].map(_mean_metric)]
    means = averaged.groupby(["model", "metric", "variable", *STRATA], sort=False)["value"].agg(
        lambda v: v.mean(skipna=False)
    )
    for (model, metric, variable, region, season), value in means.items():
        suffix = stratum_suffix(str(region), str(season))
        if suffix is not None and np.isfinite(value):
            out[f"{prefix(model, metric)}_{variable}_mean{suffix}"] = float(value)
    return out


SKILL_COLUMNS: list[str] = ["baseline", "variable", "lead", "skill", "lower", "upper", "significant", "meaningful"]


def _strata_in(table: pd.DataFrame) -> list[str]:
    """The :data:`~conv2dlstm.evaluation.strata.STRATA` columns ``table`` has."""
    return [c for c in STRATA if c in table.columns]


def skill_intervals(table: pd.DataFrame, *, by: str = "model") -> pd.DataFrame:
    """The skill rows of a ``metrics.csv``-like table, one row per ``by``, baseline, variable and lead
    (and stratum, where the table has the ``region`` and ``season`` columns).

    Columns ``by``, the stratum columns of the table and :data:`SKILL_COLUMNS`: ``skill``, ``lower``,
    ``upper`` (NaN when not meaningful or absent), ``significant`` and ``meaningful`` as booleans (a
    table written before intervals existed has ``skill`` only: ``lower``/``upper`` NaN,
    ``significant`` False, ``meaningful`` True). The ``skill_horizon_vs_<baseline>`` rows are not
    among them (their horizon is :func:`skill_horizons` of these rows).
    """
    strata = _strata_in(table)
    parts = []
    for baseline in BASELINE_NAMES:
        prefix = f"skill_vs_{baseline}"
        rows = table[table["metric"].isin([prefix + suffix for suffix in SKILL_METRICS])]
        if rows.empty:
            continue
        fields = rows.assign(field=rows["metric"].str[len(prefix) :])
        wide = fields.groupby([by, *strata, "variable", "lead", "field"], sort=False)["value"].first().unstack("field")
        wide = wide.reindex(columns=list(SKILL_METRICS))
        parts.append(
            pd.DataFrame(
                {
                    "baseline": baseline,
                    "skill": wide[""],
                    "lower": wide["_lower"],
                    "upper": wide["_upper"],
                    "significant": wide["_significant"].fillna(0.0) > 0.5,
                    "meaningful": wide["_meaningful"].fillna(1.0) > 0.5,
                },
                index=wide.index,
            ).reset_index()
        )
    if not parts:
        return pd.DataFrame(columns=[by, *strata, *SKILL_COLUMNS])
    return pd.concat(parts, ignore_index=True)[[by, *strata, *SKILL_COLUMNS]]


def verdict(skills: pd.DataFrame) -> tuple[str, str]:
    """``(better_than, better_leads)`` of one entry, variable and baseline from its per-lead interval rows
    (:func:`skill_intervals`): ``yes`` where the 95% interval lies above zero at every lead,
    ``partly`` at some, ``no`` at none, ``not meaningful`` where a lead's skill is not, empty without
    an interval; and those leads, space separated."""
    if skills.empty:
        return "", ""
    if not skills["meaningful"].all():
        return "not meaningful", ""
    if skills["lower"].isna().all():
        return "", ""
    better = sorted(int(k) for k in skills.loc[skills["lower"] > 0, "lead"])
    label = "yes" if len(better) == len(skills) else ("partly" if better else "no")
    return label, " ".join(map(str, better))
