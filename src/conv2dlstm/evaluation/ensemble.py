"""A seed ensemble scored: its mean like a network, the ensemble as a distribution.

The members are runs that differ only in ``train.seed`` (:mod:`conv2dlstm.config.ensembles`); their
forecasts are the evaluate step's ``predictions.nc`` (:mod:`conv2dlstm.artifacts.predictions`), read
back a batch of initial times at a time. Per batch (:func:`score_ensemble`):

- the truth and the baselines in physical units, exactly as the evaluate step builds them
  (:func:`conv2dlstm.evaluation.inference.batch_forecasts` without a network, :class:`References`: the
  same function on the same training fits, so the ensemble's baseline rows equal those of each member's
  ``metrics.csv``);
- the ensemble mean (the mean over members, NaN where a member is NaN) scored with the baselines by
  :class:`conv2dlstm.evaluation.scores.StreamingScores`: RMSE, MAE, bias, ACC and the skill against
  every baseline with its 95% block-bootstrap interval and horizon, as for a network;
- each member scored on its own (its RMSE, for comparison with the mean);
- the probabilistic scores (:class:`EnsembleScores`), per lead and variable:

  - ``crps``: the continuous ranked probability score of the members' empirical distribution
    (``xskillscore.crps_ensemble``, properscoring's estimator, not the "fair" one) at every ocean
    cell, averaged like every other score: the area-weighted mean over ocean cells
    (:func:`conv2dlstm.evaluation.metrics.spatial_mean`, land left out) per initial time, then the
    mean over initial times. With one member it is the MAE; so each member and each deterministic
    baseline gets a ``crps`` row too, its MAE averaged the same way (:func:`deterministic_crps`), to
    set the ensemble's CRPS against;
  - ``spread``: the square root of the time mean of the area-weighted mean of the members' unbiased
    variance (``ddof=1``);
  - ``spread_skill_ratio``: ``sqrt((M + 1) / M) * spread / RMSE(ensemble mean)`` with ``M`` members:
    about 1 for a calibrated ensemble (whose truth is one more draw from the members' distribution;
    the factor corrects for the finite ensemble, Fortin et al. 2014, MWR 142), below 1 for an
    under-dispersed (overconfident) one, above 1 for an over-dispersed one;
  - the rank histogram (:func:`rank_counts`, ``xskillscore.rank_histogram``): how often the truth
    falls at rank ``1..M+1`` among the members, over every ocean cell and initial time (counts, not
    area-weighted); ties broken at random with a seeded generator (reproducible). Flat for a
    calibrated ensemble, U-shaped for an under-dispersed one, dome-shaped for an over-dispersed
    one, sloped for a biased one.

Memory is bounded by one batch of ``B`` initial times times the members: ``M x B x T_out x C_out x
H x W`` float32 forecasts plus the baselines and temporaries of the evaluate step's batch; across
batches only the per-initial-time scores (``N x T_out x C_out`` per forecast) and the rank counts are
kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.artifacts import provenance
from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import baselines, metrics
from conv2dlstm.evaluation.inference import batch_forecasts, read_batch
from conv2dlstm.evaluation.scores import StreamingScores, metrics_table, stratum_frame, tidy

log = logging.getLogger(__name__)

SPLIT = "test"
MEMBER = "member"
"""The dimension of the members."""
PROBABILISTIC_METRICS: tuple[str, ...] = ("crps", "spread", "spread_skill_ratio")
"""The metrics of the ensemble as a distribution, in ``metrics.csv`` (model: the ensemble's name)."""
MEMBER_METRICS: tuple[str, ...] = ("rmse", "crps")
"""The scores of each member kept in ``metrics.csv`` (model: the member's run); its ``crps`` is its MAE
(:func:`deterministic_crps`)."""
RANK_SEED = 0
"""Seed of the random tie-breaking of the rank histogram (the batch's first index is added)."""
RANK_COLUMNS: list[str] = ["variable", "lead", "rank", "count", "frequency"]
"""The columns of ``rank_histogram.csv``."""


# --------------------------------------------------------------------------------------------------
# Probabilistic scores


def crps_per_time(members: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray) -> xr.DataArray:
    """``(time, lead, variable)``: the CRPS of the ``members`` (dim :data:`MEMBER`) at every cell
    (``xskillscore.crps_ensemble``), area-weighted over the ocean cells of ``weights``."""
    import xskillscore as xs

    with warnings.catch_warnings():  # properscoring averages the member weights of a land cell: no finite member
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        cells = xs.crps_ensemble(truth, members, member_dim=MEMBER, dim=[])
    return metrics.spatial_mean(cells, weights)


def deterministic_crps(table: pd.DataFrame) -> pd.DataFrame:
    """``crps`` rows for the deterministic forecasts of a tidy ``table``: a copy of its ``mae`` rows.
    The CRPS of a single forecast (a point mass) is its absolute error, cell by cell, and both are
    averaged alike (area-weighted over ocean cells per initial time, then over initial times), so the
    rows compare directly with the ensemble's ``crps``."""
    return table[table["metric"] == "mae"].assign(metric="crps")


def variance_per_time(members: xr.DataArray, weights: xr.DataArray) -> xr.DataArray:
    """``(time, lead, variable)``: the members' unbiased variance (``ddof=1``) at every cell, area-weighted
    over the ocean cells of ``weights`` (NaN at a cell where a member is NaN)."""
    variance = members.astype("float64").var(MEMBER, ddof=1, skipna=False)
    return metrics.spatial_mean(variance, weights)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """NumPy's global generator seeded within the block (xskillscore breaks ties with it), restored after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def rank_counts(members: xr.DataArray, truth: xr.DataArray, *, seed: int = RANK_SEED) -> xr.DataArray:
    """``(lead, variable, rank)`` int64: how often the truth has rank ``1..M+1`` among the ``M`` members
    (``xskillscore.rank_histogram``), over every initial time and cell where the truth and every member
    are finite (land left out); ties broken at random with NumPy's generator seeded ``seed``."""
    import xskillscore as xs

    m = members.sizes[MEMBER]
    leads, variables = truth["lead"].values, truth["variable"].values
    obs = truth.transpose("lead", "variable", "time", "lat", "lon").values.reshape(leads.size, variables.size, -1)
    fc = members.transpose("lead", "variable", "time", "lat", "lon", MEMBER).values
    fc = fc.reshape(leads.size, variables.size, -1, m)
    counts = np.zeros((leads.size, variables.size, m + 1), dtype="int64")
    with _seeded(seed):
        for i in range(leads.size):
            for j in range(variables.size):
                keep = np.isfinite(obs[i, j]) & np.isfinite(fc[i, j]).all(axis=-1)
                if not keep.any():
                    continue
                hist = xs.rank_histogram(
                    xr.DataArray(obs[i, j][keep], dims=("sample",)),
                    xr.DataArray(fc[i, j][keep], dims=("sample", MEMBER)),
                    dim=["sample"],
                    member_dim=MEMBER,
                )
                counts[i, j] = np.asarray(hist.values, dtype="int64")
    return xr.DataArray(
        counts,
        dims=("lead", "variable", "rank"),
        coords={"lead": leads, "variable": variables, "rank": np.arange(1, m + 2, dtype="int64")},
    )


class EnsembleScores:
    """The probabilistic scores of an ensemble (module docstring), accumulated batch by batch: per
    ``(lead, variable)`` the sums and counts of the per-initial-time CRPS, member variance and MSE of
    the ensemble mean, and the rank counts."""

    def __init__(self, weights: xr.DataArray, n_members: int) -> None:
        if n_members < 2:
            raise DataError(f"an ensemble needs at least 2 members, got {n_members}")
        self.weights = weights
        self.n_members = int(n_members)
        self._sums: dict[str, xr.DataArray] = {}
        self._counts: dict[str, xr.DataArray] = {}
        self._ranks: xr.DataArray | None = None

    def add(self, members: xr.DataArray, truth: xr.DataArray, *, seed: int = RANK_SEED) -> None:
        """Add one batch: ``members`` ``(member, time, lead, variable, lat, lon)`` and ``truth``
        ``(time, lead, variable, lat, lon)``, physical units, NaN on land."""
        if members.sizes[MEMBER] != self.n_members:
            raise DataError(f"a batch holds {members.sizes[MEMBER]} members, the ensemble {self.n_members}")
        mean = members.mean(MEMBER, skipna=False)
        per_time = {
            "crps": crps_per_time(members, truth, self.weights),
            "variance": variance_per_time(members, self.weights),
            "mse": metrics.mse_per_time(mean, truth, self.weights),
        }
        for name, values in per_time.items():
            total = values.fillna(0.0).sum("time").astype("float64")
            count = values.notnull().sum("time")
            if name in self._sums:
                with xr.set_options(arithmetic_join="exact"):
                    total, count = self._sums[name] + total, self._counts[name] + count
            self._sums[name], self._counts[name] = total, count
        ranks = rank_counts(members, truth, seed=seed)
        if self._ranks is not None:
            with xr.set_options(arithmetic_join="exact"):
                ranks = self._ranks + ranks
        self._ranks = ranks

    def time_means(self) -> dict[str, xr.DataArray]:
        """``crps``, ``spread``, ``spread_skill_ratio`` ``(lead, variable)`` (module docstring)."""
        if not self._sums:
            raise DataError("no batch was scored; the test split has no window")
        mean = {name: (s / self._counts[name].where(self._counts[name] > 0)) for name, s in self._sums.items()}
        spread = cast(xr.DataArray, np.sqrt(mean["variance"]))  # a DataArray ufunc
        rmse = cast(xr.DataArray, np.sqrt(mean["mse"]))
        ratio = math.sqrt((self.n_members + 1) / self.n_members) * spread / rmse.where(rmse > 0)
        out = {"crps": mean["crps"], "spread": spread, "spread_skill_ratio": ratio}
        return {name: da.transpose("lead", "variable") for name, da in out.items()}

    def table(self, model: str) -> pd.DataFrame:
        """Tidy rows ``model, variable, region, season, lead, metric, value`` of
        :data:`PROBABILISTIC_METRICS` (the whole grid and test period: region and season ``all``)."""
        frames = [tidy(da, model=model, metric=metric) for metric, da in self.time_means().items()]
        return stratum_frame(pd.concat(frames, ignore_index=True))

    def rank_histogram(self) -> pd.DataFrame:
        """``rank_histogram.csv``: :data:`RANK_COLUMNS`, one row per variable, lead and rank; ``frequency``
        is the count over the lead's and variable's total."""
        if self._ranks is None:
            raise DataError("no batch was scored; the test split has no window")
        counts = self._ranks.transpose("variable", "lead", "rank")
        totals = counts.sum("rank")
        frequency = counts / totals.where(totals > 0)
        rows = [
            {
                "variable": str(v),
                "lead": int(k),
                "rank": int(r),
                "count": int(counts.sel(variable=v, lead=k, rank=r)),
                "frequency": float(frequency.sel(variable=v, lead=k, rank=r)),
            }
            for v in counts["variable"].values
            for k in counts["lead"].values
            for r in counts["rank"].values
        ]
        return pd.DataFrame(rows, columns=RANK_COLUMNS)


# --------------------------------------------------------------------------------------------------
# Truth and baselines of a batch, as the evaluate step builds them


@dataclass(frozen=True)
class References:
    """What the baselines of every batch need, fitted once on the training part of the windows store
    with the evaluate step's functions and chunking: the damping ``rho`` ``(lag, variable)`` of damped
    persistence, each cell's training mean, and per baseline the leads where its skill is not
    meaningful (its climatology unsupported by training days)."""

    rho: xr.DataArray
    cell_mean: xr.DataArray
    not_meaningful: dict[str, xr.DataArray] = field(default_factory=dict)


def fit_references(store: Any, stats: xr.Dataset, *, weights: xr.DataArray, chunk_steps: int) -> References:
    """:class:`References` of ``store``'s test windows (:func:`~conv2dlstm.evaluation.baselines.fit_damping`,
    :func:`~conv2dlstm.evaluation.baselines.training_mean`,
    :func:`~conv2dlstm.evaluation.baselines.not_meaningful_leads`)."""
    rho = baselines.fit_damping(store, stats, max_lag=int(store.lead_steps), weights=weights, chunk_steps=chunk_steps)
    cell_mean = baselines.training_mean(store, stats, chunk_steps=chunk_steps)
    support = baselines.climatology_support(
        baselines.training_times(store.time, stats), baselines.climatology_window(stats)
    )
    flags = baselines.not_meaningful_leads(store.init_times(SPLIT), store.valid_times(SPLIT), support)
    for name, bad in flags.items():
        if bool(bad.any()):
            leads = [int(k) for k in bad["lead"].values[bad.values]]
            log.warning("skill against %s is not meaningful at lead(s) %s (climatology unsupported)", name, leads)
    return References(rho, cell_mean, flags)


# --------------------------------------------------------------------------------------------------
# The members' forecasts


def member_problems(ds: xr.Dataset, store: Any, variables: Sequence[str]) -> list[str]:
    """How the forecasts ``ds`` (one member's ``predictions.nc``) depart from the windows ``store``'s test
    windows: other initial times, leads, grid or variables (empty when none)."""
    problems = []
    init = np.asarray(store.init_times(SPLIT), dtype="datetime64[ns]")
    times = np.asarray(ds["time"].values, dtype="datetime64[ns]")
    if times.shape != init.shape or not np.array_equal(times, init):
        problems.append(f"its {times.size} initial times are not the store's {init.size} test initial times")
    if ds.sizes["prediction_timedelta"] != int(store.lead_steps):
        problems.append(f"it has {ds.sizes['prediction_timedelta']} leads, the test windows {int(store.lead_steps)}")
    for name, axis in (("latitude", store.lat), ("longitude", store.lon)):
        have = np.asarray(ds[name].values, dtype="float64")
        if have.shape != np.shape(axis) or not np.allclose(have, np.asarray(axis, dtype="float64")):
            problems.append(f"its {name} is not the store's grid")
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        problems.append(f"it has no forecast of {missing}")
    return problems


def check_members(
    members: Mapping[str, xr.Dataset],
    store: Any,
    *,
    variables: Sequence[str],
    windows_digest: str,
    stats_digest: str,
    paths: Mapping[str, str | os.PathLike],
) -> dict[str, str]:
    """Check each member's forecasts (run name -> ``predictions.nc`` opened) against the windows store:
    written by the evaluate step of that run (attribute ``run``), on these windows and statistics (its
    provenance record's ``windows`` and ``stats`` digests), with the store's test initial times, leads,
    grid and variables (:func:`member_problems`). :class:`DataError` naming the file and the fix
    otherwise. Returns run name -> the MLflow run id its evaluation logged into (attribute
    ``mlflow_run_id``)."""
    run_ids = {}
    for run, ds in members.items():
        where = f"{paths[run]} (ensemble member {run})"
        fix = f"rerun the evaluate step of run {run} (`snakemake --forcerun evaluate`)"
        if str(ds.attrs.get("run", "")) != run:
            raise DataError(f"{where} holds the forecasts of run {ds.attrs.get('run')!r}, not {run!r}; {fix}")
        record = provenance.from_attrs(ds.attrs, where=where, step="evaluate")
        given = {"windows": windows_digest, "stats": stats_digest}
        stale = [
            f"{name} digest {record['inputs'].get(name)} (the {name} given: {digest})"
            for name, digest in given.items()
            if record["inputs"].get(name) != digest
        ]
        problems = ([f"it was evaluated on other inputs: {'; '.join(stale)}"] if stale else []) + member_problems(
            ds, store, variables
        )
        if problems:
            raise DataError(f"{where}: {'; '.join(problems)}; {fix}")
        run_ids[run] = str(ds.attrs.get("mlflow_run_id", ""))
    return run_ids


def member_batch(members: Mapping[str, xr.Dataset], rows: slice, truth: xr.DataArray) -> xr.DataArray:
    """``(member, time, lead, variable, lat, lon)`` float32: the initial times ``rows`` of every member's
    forecasts, with the coordinates of ``truth`` (the batch's) and the members' run names."""
    variables = [str(v) for v in truth["variable"].values]
    values = np.stack(
        [np.stack([ds[v].isel(time=rows).values for v in variables], axis=2) for ds in members.values()]
    ).astype("float32")
    return xr.DataArray(
        values,
        dims=(MEMBER, *truth.dims),
        coords={**{k: v for k, v in truth.coords.items()}, MEMBER: list(members)},
    )


# --------------------------------------------------------------------------------------------------
# The whole test period


@dataclass(frozen=True)
class EnsembleResult:
    """The scores of :func:`score_ensemble`: ``metrics.csv`` and ``rank_histogram.csv`` as tables."""

    metrics: pd.DataFrame
    rank_histogram: pd.DataFrame


def score_ensemble(
    members: Mapping[str, xr.Dataset],
    store: Any,
    stats: xr.Dataset,
    *,
    name: str,
    batch_size: int,
    nonnegative: Sequence[str] = (),
) -> EnsembleResult:
    """Score the ensemble ``name`` of ``members`` (run name -> its checked forecasts, :func:`check_members`)
    on the test windows of ``store``, ``batch_size`` initial times at a time (module docstring).

    ``metrics.csv`` (:func:`conv2dlstm.evaluation.scores.metrics_table`, run ``name``): the ensemble mean
    as model ``name`` (rmse, mae, bias, acc, skill against every baseline with its interval and
    horizon), the baselines (and damped persistence's ``rho``), :data:`PROBABILISTIC_METRICS` of model
    ``name``, the ``crps`` of each baseline (its MAE), and :data:`MEMBER_METRICS` of each member
    (model: its run); whole grid and test period."""
    n = int(store.starts(SPLIT).size)
    if n == 0:
        raise DataError(f"the windows store {store.path} has no test window; lengthen splits.test")
    init_all = np.asarray(store.init_times(SPLIT), dtype="datetime64[ns]")
    valid_all = np.asarray(store.valid_times(SPLIT), dtype="datetime64[ns]")
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    mask = xr.DataArray(np.asarray(store.mask, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})
    targets = [str(v) for v in store.target_variables]
    weights = metrics.area_weights(lat, mask)
    step = max(int(batch_size), 1)
    refs = fit_references(store, stats, weights=weights, chunk_steps=step * int(store.lead_steps))
    mean_scores, member_scores = StreamingScores(weights), StreamingScores(weights)
    probabilistic = EnsembleScores(weights, len(members))
    log.info("scoring ensemble %s of %d members on %d test windows in batches of %d", name, len(members), n, step)
    for i0 in range(0, n, step):
        rows = slice(i0, min(i0 + step, n))
        _, y, last = read_batch(store, SPLIT, range(rows.start, rows.stop))
        forecasts, truth = batch_forecasts(
            None,
            y,
            last,
            init_times=init_all[rows],
            valid_times=valid_all[rows],
            variables=targets,
            mask=mask,
            stats=stats,
            rho=refs.rho,
            cell_mean=refs.cell_mean,
            nonnegative=nonnegative,
        )
        batch = member_batch(members, rows, truth)
        mean_scores.add({"model": batch.mean(MEMBER, skipna=False), **forecasts}, truth, forecasts["climatology"])
        member_scores.add(
            {run: batch.sel({MEMBER: run}, drop=True) for run in members}, truth, forecasts["climatology"]
        )
        probabilistic.add(batch, truth, seed=RANK_SEED + i0)
    leads = np.arange(1, int(store.lead_steps) + 1, dtype="int64")
    rho = stratum_frame(tidy(refs.rho.rename(lag="lead").sel(lead=leads), model="damped_persistence", metric="rho"))
    own = member_scores.table()
    own = pd.concat([own, deterministic_crps(own)], ignore_index=True)
    scored = mean_scores.table(refs.not_meaningful)
    baseline_rows = scored[scored["model"].isin(baselines.BASELINE_NAMES)]
    table = pd.concat(
        [
            scored,
            rho,
            probabilistic.table("model"),
            deterministic_crps(baseline_rows),
            own[own["metric"].isin(MEMBER_METRICS)],
        ],
        ignore_index=True,
    )
    return EnsembleResult(metrics_table(table, run=name, model_name=name), probabilistic.rank_histogram())


# --------------------------------------------------------------------------------------------------
# Figure


def rank_histogram_figure(
    hist: pd.DataFrame, path: str | os.PathLike, *, title: str, lead_step: pd.Timedelta | None = None
) -> Any:
    """``rank_histogram.png``: one panel per variable, the relative frequency of each rank of the truth
    among the members (``hist``: :data:`RANK_COLUMNS`), one line per lead (darker: later), and the flat
    frequency ``1 / (M + 1)`` of a calibrated ensemble dashed. Returns the figure."""
    from matplotlib import colormaps

    from conv2dlstm.evaluation import plots

    variables = list(dict.fromkeys(hist["variable"]))
    fig, axes = plots._panels(max(len(variables), 1))
    for ax, variable in zip(axes, variables, strict=False):
        rows = hist[hist["variable"] == variable]
        leads = sorted(set(rows["lead"]))
        colors = colormaps["viridis_r"](np.linspace(0.15, 0.95, max(len(leads), 1)))
        for color, lead in zip(colors, leads, strict=True):
            one = rows[rows["lead"] == lead].sort_values("rank")
            duration = plots.lead_duration(int(lead), lead_step)
            label = f"lead {lead}" + (f" ({duration})" if duration else "")
            ax.plot(one["rank"], one["frequency"], marker="o", color=color, label=label)
        n_ranks = int(rows["rank"].max()) if not rows.empty else 1
        ax.axhline(1.0 / n_ranks, color="0.3", linestyle="--", label=f"calibrated: 1/{n_ranks}")
        ax.set_xticks(range(1, n_ranks + 1))
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"rank of the truth among the {n_ranks - 1} members")
        ax.set_ylabel("relative frequency")
        ax.set_title(variable)
        ax.legend(fontsize="small")
    plots._title(fig, title)
    plots._save(fig, path)
    return fig
