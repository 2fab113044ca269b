"""Compare step: one table and one figure over every evaluated run and the baselines.

Each run's ``metrics.csv`` (from :mod:`conv2dlstm.steps.evaluate`) carries its own copy of the baseline
scores (:data:`conv2dlstm.evaluation.baselines.BASELINE_NAMES`); runs of one configuration share the test
windows, so these copies are identical and each baseline appears once in the output (a copy that
differs is reported with a warning and the first one is kept).

``compare.csv`` has one row per run or baseline, per variable and per stratum (``region`` and
``season``, :mod:`conv2dlstm.evaluation.strata`: the headline rows, ``all`` and ``all``, come first,
exactly as without strata; then a row per region and per season of ``evaluate.regions`` and
``evaluate.by_season``), with columns :data:`SUMMARY_COLUMNS`: the run's ``rank`` among the runs
and ensemble means (1: the lowest RMSE averaged over leads, per variable and stratum; runs are listed
in rank order, then the ensemble means, then the baselines), RMSE averaged over leads, at the first
and at the last lead, MAE, bias and ACC averaged over leads, and per baseline ``b``:

- ``skill_vs_<b>_mean``: the skill ``1 - RMSE / RMSE(b)`` averaged over leads, from the
  ``skill_vs_<b>`` rows of ``metrics.csv``; NaN when a lead's skill is NaN (not meaningful: its
  climatology is unsupported by training days), or when the file has no such rows. A file without
  skill rows for a baseline entry (written before they existed) gets it derived from the two RMSE
  rows (:func:`conv2dlstm.evaluation.metrics.skill_score`, 0 against itself);
- ``better_than_<b>``: ``yes`` where the 95% bootstrap interval of the skill lies above zero at
  every lead, ``partly`` at some leads, ``no`` at none, ``not meaningful`` where the skill is not
  meaningful at some lead, empty without an interval (or against itself). A run is marked better
  only where the interval excludes zero;
- ``better_leads_vs_<b>``: the leads where the interval lies above zero, space separated;
- ``skill_horizon_vs_<b>``: the skill horizon in lead steps, the last lead ``k`` such that the
  interval lies above zero at every lead ``1..k`` (:func:`conv2dlstm.evaluation.scores.skill_horizon`;
  0 when lead 1 already fails, a lead not meaningful ends it): the ``skill_horizon_vs_<b>`` row of
  ``metrics.csv``, or for a file written before those rows existed, computed from the same interval
  rows as ``better_than_<b>``. Empty without an interval (against itself, or a file written before
  intervals existed). Rows are per variable, so no aggregation over variables is needed: a run's
  horizon over all its variables is the minimum of its rows'.

Ensembles (``--ensembles``, the ensemble step's ``metrics.csv`` of each seed ensemble,
:mod:`conv2dlstm.steps.ensemble`): the ensemble mean is one more entry, ``kind`` ``ensemble``, named
after the ensemble, with the same columns (its rows of model ``<ensemble>``; its CRPS and spread are in
its own ``metrics.csv``), ranked with the runs and listed after them (:func:`read_ensemble_means`).

``compare.png`` (the headline rows): RMSE against lead, and per baseline each run's skill with its
shaded interval (filled markers where the interval excludes zero). The RMSE axis of each variable names its unit,
``harmonize.units.<variable>.unit`` of the configuration (:func:`units_of`; ``(physical units)``
without a configuration or an entry); the lead axis the time step of the leads, read from the
``prediction_timedelta`` coordinate of the ``predictions.nc`` that the evaluate step writes beside each
``metrics.csv`` (:func:`lead_step_of`; steps without a unit when it is absent).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import metrics, plots
from conv2dlstm.evaluation.baselines import BASELINE_NAMES
from conv2dlstm.evaluation.scores import (
    HORIZON_PREFIX,
    headline,
    lead_horizon,
    read_metrics_csv,
    skill_intervals,
    verdict,
)
from conv2dlstm.evaluation.strata import ALL, STRATA
from conv2dlstm.fsutil import atomic_output, discard_partials

log = logging.getLogger(__name__)

SUMMARY_COLUMNS: list[str] = [
    "name",
    "kind",
    "model",
    "variable",
    "region",
    "season",
    "rank",
    "leads",
    "rmse_mean",
    "rmse_lead1",
    "rmse_last_lead",
    "mae_mean",
    "bias_mean",
    "acc_mean",
    *[
        column
        for b in BASELINE_NAMES
        for column in (f"skill_vs_{b}_mean", f"better_than_{b}", f"better_leads_vs_{b}", f"skill_horizon_vs_{b}")
    ],
]
FORECASTS: tuple[str, ...] = ("run", "ensemble")
"""The kinds of ``compare.csv`` entries ranked against each other: the runs and the ensemble means."""
HORIZON_COLUMNS: list[str] = [f"skill_horizon_vs_{b}" for b in BASELINE_NAMES]
"""The skill horizon columns of ``compare.csv``: integers, empty without an interval."""


def read_metrics(paths: Sequence[Path]) -> pd.DataFrame:
    """Concatenate ``metrics.csv`` files after checking their columns
    (:func:`conv2dlstm.evaluation.scores.read_metrics_csv`: a file written before the ``region`` and
    ``season`` columns existed has headline rows only)."""
    if not paths:
        raise DataError("compare: no metrics.csv given; pass at least one with --metrics")
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"compare: {path} does not exist; run the evaluate step first")
        try:
            frames.append(read_metrics_csv(path))
        except DataError as exc:
            raise DataError(f"compare: {exc}") from exc
    table = pd.concat(frames, ignore_index=True)
    model_runs = table[~table["model"].isin(BASELINE_NAMES)]
    per_file_runs = [set(f.loc[~f["model"].isin(BASELINE_NAMES), "run"]) for f in frames]
    seen: set[str] = set()
    for path, runs in zip(paths, per_file_runs, strict=True):
        if runs & seen:
            raise DataError(f"compare: run(s) {sorted(runs & seen)} of {path} appear in more than one metrics.csv")
        seen |= runs
    if model_runs.empty:
        raise DataError("compare: the metrics files contain no model scores, only baselines")
    return table


def read_ensemble_means(paths: Sequence[Path]) -> pd.DataFrame:
    """The ensemble means' rows of the ensemble step's ``metrics.csv`` files: model equal to run (the
    ensemble's name); not the baselines (the runs' copies are kept) nor the members' rows."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"compare: {path} does not exist; run the ensemble step first")
        try:
            table = read_metrics_csv(path)
        except DataError as exc:
            raise DataError(f"compare: {exc}") from exc
        frames.append(table[table["model"] == table["run"]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def entries(table: pd.DataFrame, ensembles: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows ``name, kind, model, variable, region, season, lead, metric, value``: runs as they are,
    the ``ensembles``' means (:func:`read_ensemble_means`) as kind ``ensemble``, baselines once (per
    stratum)."""
    runs = table[~table["model"].isin(BASELINE_NAMES)].assign(kind="run", name=lambda t: t["run"])
    if ensembles is not None and not ensembles.empty:
        clash = sorted(set(ensembles["run"]) & set(runs["name"]))
        if clash:
            raise DataError(f"compare: ensemble(s) {clash} are named like runs; each entry needs a name of its own")
        runs = pd.concat([runs, ensembles.assign(kind="ensemble", name=lambda t: t["run"])], ignore_index=True)
    base = table[table["model"].isin(BASELINE_NAMES)]
    key = ["model", "variable", *STRATA, "lead", "metric"]
    spread = base.groupby(key)["value"].agg(lambda v: float(np.nanmax(v) - np.nanmin(v)) if v.notna().any() else 0.0)
    scale = base.groupby(key)["value"].agg(lambda v: float(np.nanmax(np.abs(v))) if v.notna().any() else 0.0)
    differ = spread > 1e-6 * np.maximum(scale, 1.0)
    if differ.any():
        first = differ[differ].index[0]
        warnings.warn(
            f"baseline scores differ between runs (e.g. {first}); the runs were not evaluated on the "
            "same test windows; keeping the first run's baselines",
            stacklevel=2,
        )
    base = base.drop_duplicates(key, keep="first").assign(kind="baseline", name=lambda t: t["model"])
    columns = ["name", "kind", "model", "variable", *STRATA, "lead", "metric", "value"]
    return pd.concat([runs, base], ignore_index=True)[columns]


def _strict_mean(series: pd.Series) -> float:
    """Mean over leads, NaN when any lead is NaN (a skill not meaningful at one lead has no mean)."""
    return float(series.mean(skipna=False)) if len(series) else np.nan


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per entry, variable and stratum with the main scores (:data:`SUMMARY_COLUMNS`).

    The headline rows (region and season ``all``) come first, ranked among the runs as before any
    stratum existed; then each region and season of the metrics (in their order there), the runs
    ranked within it."""
    rmse = rows[rows["metric"] == "rmse"]
    baseline_rmse = {
        name: rmse[rmse["name"] == name].set_index(["variable", *STRATA, "lead"])["value"] for name in BASELINE_NAMES
    }
    intervals = skill_intervals(rows, by="name")
    out = []
    for (name, variable, region, season), group in rows.groupby(["name", "variable", *STRATA], sort=False):
        by_metric = {m: g.sort_values("lead").set_index("lead")["value"] for m, g in group.groupby("metric")}
        r = by_metric.get("rmse", pd.Series(dtype="float64"))
        kind = group["kind"].iloc[0]
        record = {
            "name": name,
            "kind": kind,
            "model": group["model"].iloc[0],
            "variable": variable,
            "region": region,
            "season": season,
            "leads": int(r.size),
            "rmse_mean": float(r.mean()) if r.size else np.nan,
            "rmse_lead1": float(r.iloc[0]) if r.size else np.nan,
            "rmse_last_lead": float(r.iloc[-1]) if r.size else np.nan,
        }
        for metric in ("mae", "bias", "acc"):
            record[f"{metric}_mean"] = _lead_mean(by_metric.get(metric))
        here = intervals[
            (intervals["name"] == name)
            & (intervals["variable"] == variable)
            & (intervals["region"] == region)
            & (intervals["season"] == season)
        ]
        for baseline in BASELINE_NAMES:
            column = f"skill_vs_{baseline}_mean"
            sk = here[here["baseline"] == baseline]
            record[f"better_than_{baseline}"], record[f"better_leads_vs_{baseline}"] = verdict(sk)
            record[f"skill_horizon_vs_{baseline}"] = _horizon(sk, by_metric.get(f"{HORIZON_PREFIX}{baseline}"))
            if kind in FORECASTS or not sk.empty:
                record[column] = _strict_mean(sk.sort_values("lead")["skill"]) if not sk.empty else np.nan
                continue
            ref = baseline_rmse[baseline]
            if ref.empty or not r.size:
                record[column] = np.nan
                continue
            ref_v = ref.xs((variable, region, season), level=["variable", *STRATA]).reindex(r.index)
            record[column] = _lead_mean(metrics.skill_score(r, ref_v))
        out.append(record)
    summary = pd.DataFrame(out, columns=SUMMARY_COLUMNS).astype({c: "Int64" for c in HORIZON_COLUMNS})
    runs = summary["kind"].isin(FORECASTS)
    summary.loc[runs, "rank"] = summary[runs].groupby(["variable", *STRATA])["rmse_mean"].rank(method="min")
    summary["rank"] = summary["rank"].astype("Int64")
    order = {"run": 0, "ensemble": 1, "baseline": 2}
    strata = list(dict.fromkeys([(ALL, ALL), *zip(summary["region"], summary["season"], strict=True)]))
    summary["_s"] = [strata.index(k) for k in zip(summary["region"], summary["season"], strict=True)]
    summary["_k"] = summary["kind"].map(order)
    summary["_b"] = summary["name"].map({b: i for i, b in enumerate(BASELINE_NAMES)}).fillna(-1)
    summary = summary.sort_values(["_s", "_k", "_b", "rank", "name", "variable"], kind="stable", na_position="last")
    return summary.drop(columns=["_s", "_k", "_b"]).reset_index(drop=True)


def _horizon(skills: pd.DataFrame, stored: pd.Series | None) -> float:
    """The skill horizon of one entry, variable and baseline: its ``skill_horizon_vs_<b>`` row of
    ``metrics.csv`` (``stored``), else (a file written before those rows existed) the
    :func:`conv2dlstm.evaluation.scores.lead_horizon` of its per-lead interval rows
    (:func:`skill_intervals`); NaN without an interval (no rows, or a file written before intervals
    existed: no lower bound and every lead meaningful)."""
    if stored is not None and stored.notna().any():
        return float(stored.dropna().iloc[0])
    if skills.empty or (skills["lower"].isna().all() and skills["meaningful"].all()):
        return np.nan
    return float(lead_horizon(skills))


def _lead_mean(series: pd.Series | None) -> float:
    """Mean over leads of a per-lead score (NaN leads left out); NaN when there is none."""
    if series is None or not series.notna().any():
        return np.nan
    return float(series.mean())


def units_of(cfg: dict | None) -> dict[str, str]:
    """The canonical unit per variable, ``harmonize.units.<variable>.unit`` of ``cfg`` (none without
    ``cfg``): what the regrid step converts every source to, hence the unit of the scores."""
    entries = ((cfg or {}).get("harmonize") or {}).get("units") or {}
    return {
        str(var): str(entry["unit"]) for var, entry in entries.items() if isinstance(entry, dict) and entry.get("unit")
    }


def lead_step_of(metrics_paths: Sequence[Path]) -> pd.Timedelta | None:
    """The time step of the leads (:func:`conv2dlstm.evaluation.plots.lead_step`), from the ``prediction_timedelta``
    of the ``predictions.nc`` that the evaluate step writes beside each ``metrics.csv`` in the same job.
    None when a file is missing or unreadable, or the runs disagree."""
    steps = set()
    for path in metrics_paths:
        predictions = Path(path).parent / predictions_file.FILENAME
        if not predictions.is_file():
            return None
        try:
            with predictions_file.open(predictions) as ds:
                steps.add(plots.lead_step(ds["prediction_timedelta"].values))
        except (DataError, KeyError) as exc:
            log.warning("compare: lead axis in steps: no lead time from %s (%s)", predictions, exc)
            return None
    return steps.pop() if len(steps) == 1 else None


def _labels(rows: pd.DataFrame) -> pd.Series:
    """Legend labels: ``run (model)`` for runs named differently from their model, else the name."""
    named = rows["kind"].isin(FORECASTS) & (rows["name"] != rows["model"])
    return rows["name"].where(~named, rows["name"] + " (" + rows["model"] + ")")


def main(
    *,
    metrics: list[Path],
    out_csv: Path,
    out_plot: Path,
    cfg: dict | None = None,
    models: list[Path] | None = None,
    ensembles: Sequence[Path] = (),
) -> None:
    """Write ``compare.csv`` (main scores per run/baseline and variable) and ``compare.png`` (RMSE and skill vs lead).

    With the configuration ``cfg`` (and the runs' ``model.pt``), then tag the runs with their sweep
    and register the experiment's best model as ``models:/<experiment>@champion``
    (:func:`conv2dlstm.tracking.registry.after_compare`).
    """
    for out in (Path(out_csv), Path(out_plot)):
        for stray in discard_partials(out.parent, of=out.name):
            log.info("compare: discarded %s left by an interrupted run", stray)
    rows = entries(read_metrics([Path(p) for p in metrics]), read_ensemble_means([Path(p) for p in ensembles]))
    summary = summarize(rows)
    rows = headline(rows)  # the figure: the whole grid over the whole test period
    rmse = rows[rows["metric"] == "rmse"].assign(label=_labels)
    runs = sorted(set(rows.loc[rows["kind"].isin(FORECASTS), "name"]))
    labels = dict(zip(rmse["name"], rmse["label"], strict=True))
    skills = skill_intervals(rows[rows["kind"].isin(FORECASTS)], by="name")
    skills = skills.assign(label=skills["name"].map(labels).fillna(skills["name"]))
    with atomic_output(out_csv) as tmp_csv, atomic_output(out_plot) as tmp_plot:
        summary.to_csv(tmp_csv, index=False)
        plots.compare_figure(
            rmse,
            skills,
            tmp_plot,
            units=units_of(cfg),
            lead_step=lead_step_of([Path(p) for p in metrics]),
            title=f"Test period: RMSE and RMSE skill (95% block-bootstrap intervals) by lead, run(s) "
            f"{', '.join(runs)} vs {', '.join(BASELINE_NAMES)}",
        )
    log.info("compared %d run(s): %s, %s", len(runs), out_csv, out_plot)
    if cfg is not None:
        from conv2dlstm.tracking import registry

        registry.after_compare(cfg, [Path(p) for p in models or []])
