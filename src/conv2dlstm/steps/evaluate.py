"""Evaluate step: score a trained run and the baselines on the test period, commit the outputs, log them.

This module is the step, and only the step: :func:`main` resolves the training run's MLflow run id
(:func:`resolve_run_id`) and checks that the checkpoint was trained on these windows and statistics
with this configuration (:func:`check_provenance`), all before any work; :func:`evaluate_split`
drives the batches; the outputs are staged and committed (:func:`staging_dir`,
:func:`commit_outputs`), the figures drawn (:func:`write_figures`), and the scores logged into
MLflow (:func:`log_to_mlflow`). The work itself lives in the modules it imports:

- :mod:`conv2dlstm.evaluation.inference`: reading the test windows, predicting each on its own with the
  network (so that a window's prediction does not depend on its batch and the forecast step
  reproduces it exactly), denormalizing, clipping the checkpoint's nonnegative targets at 0. With
  ``evaluate.max_lead`` above ``windows.lead_steps`` the test windows are those that reach that lead
  within the test period (:class:`~conv2dlstm.evaluation.inference.Horizon`), and the network is
  rolled out on its own outputs past its trained leads
  (:func:`~conv2dlstm.evaluation.inference.rollout`); every score, baseline and interval below runs
  to ``max_lead``;
- :mod:`conv2dlstm.evaluation.baselines`: persistence, the training climatology and damped anomaly
  persistence, whose damping ``rho(lead)`` is fitted on the training part of the windows store
  before the test windows are read (:func:`damping`);
- :mod:`conv2dlstm.evaluation.scores`: the scores (area-weighted, land excluded, per target variable and
  lead), the skill ``1 - RMSE/RMSE(baseline)`` of every forecast against every other baseline with
  a 95% paired circular block-bootstrap interval over initial times (1000 resamples, seed 0), the
  ``metrics.csv`` table and the MLflow metric names;
- :mod:`conv2dlstm.artifacts.predictions`: the ``predictions.nc`` artifact and its writer;
- :mod:`conv2dlstm.evaluation.plots`: the figures; :mod:`conv2dlstm.evaluation.animation`: the
  test period as an animated GIF.

Honest on short records: a baseline that uses the climatology of a day that no training day
supports (:func:`conv2dlstm.evaluation.baselines.climatology_support`, the statistics' training period and
climatology window; climatology: the valid day; damped persistence: the initial and the valid day)
has its skill marked not meaningful at that lead (:func:`unsupported_leads`): the skill and its
interval are NaN, the ``skill_vs_<baseline>_meaningful`` row is 0, the log warns, the plots say so.

Outputs in ``out_dir`` (:data:`OUTPUT_FILES`):

- ``predictions.nc`` and its Zarr copy ``predictions.zarr``: CF-1.8, one variable per target, dims
  ``(time, prediction_timedelta, latitude, longitude)``, the forecast step's (WeatherBench 2's) layout
  (:mod:`conv2dlstm.artifacts.predictions`);
- ``metrics.csv``: tidy table ``run,model,variable,region,season,lead,metric,value``. ``region`` and
  ``season`` name the stratum a row was scored on (:mod:`conv2dlstm.evaluation.strata`): ``all`` and
  ``all``, the whole grid over every initial time (the headline, the only rows without
  ``evaluate.regions`` and ``evaluate.by_season``), a region of ``evaluate.regions`` (area-weighted
  over its ocean cells), a season or month (the initial times whose first valid time falls in it;
  its bootstrap resamples those only). ``model`` is the run's model or a baseline; metrics ``rmse``,
  ``mae``, ``bias``, ``acc`` (not for climatology), ``rho`` (damped persistence: its damping), and
  per baseline ``skill_vs_<baseline>`` with ``_lower``, ``_upper`` (the 95% interval),
  ``_significant`` (1: the interval excludes 0), ``_meaningful`` (0: the climatology is unsupported;
  the four before are NaN) and ``_block_length`` (:func:`conv2dlstm.evaluation.scores.skill_frame`),
  and ``skill_horizon_vs_<baseline>`` (lead 0, one row per model and variable): the last lead up to
  which the skill's 95% interval stays above 0, in lead steps
  (:func:`conv2dlstm.evaluation.scores.skill_horizon`); with ``evaluate.events``, per forecast, event
  variable and lead (headline only), the extreme-event scores ``event_pod``, ``event_far``,
  ``event_sedi``, ``event_ets`` with ``_lower``, ``_upper``, and ``event_base_rate``,
  ``event_frequency_bias``, ``event_meaningful`` (:mod:`conv2dlstm.evaluation.events`: anomalies beyond
  the training period's day-of-year percentile, Hobday et al. 2016; area-weighted contingency
  counts; the intervals from the block bootstrap of the per-initial-time counts);
- ``rmse_vs_lead.png``, ``acc_vs_lead.png``, ``skill_vs_lead.png`` (skill with shaded intervals, the
  skill horizon dashed),
  ``maps.png``, ``rmse_map.png`` (land grey, an ocean cell without a score hatched);
- ``animation.gif`` (with ``evaluate.animation_lead`` above 0): the test period at that lead, truth,
  forecast and error, at most ``evaluate.animation_frames`` frames (:mod:`conv2dlstm.evaluation.animation`).
- ``skill_by_region.png``, ``skill_by_season.png`` (with ``evaluate.regions``, ``evaluate.by_season``):
  the run's skill against each baseline per region or season at each lead, with its 95% interval
  (:func:`_stage_stratified_figures`).

Memory is bounded by one batch of ``B = evaluate.batch_size`` windows, not by the length of the
test period. Per batch the step holds the inputs, the prediction, the truth and the baselines
(``B x T_out x C_out x H x W`` float32 each; the statistics are cast to float32 so that nothing is
upcast to float64) and the float64 temporaries of the metric code: the peak is about 50 times
``B x T_out x C_out x H x W x 4`` bytes, plus the network's activations (lower
``evaluate.batch_size`` to lower it). The damping is fitted on chunks of ``B x T_out`` training
steps. Across batches it keeps only:

- per score, model and ``(lead, variable)``: the sum and the count of the per-initial-time scores
  (:class:`conv2dlstm.evaluation.scores.StreamingScores`). Each per-time score (the weighted spatial mean of
  the squared, absolute and signed error, and the anomaly correlation) depends on one initial time
  only, so the time mean taken at the end equals the definition of :mod:`conv2dlstm.evaluation.metrics` on
  the whole test set;
- per forecast the per-initial-time MSE series, ``N x T_out x C_out`` floats for ``N`` test
  windows, for the bootstrap (one series per region: ``R + 1`` of them with ``R`` regions; a season's
  bootstrap takes its initial times from them, by the season of each initial time, ``N`` labels).
  Each region's scores of a batch are computed on their own, so the time per batch grows with the
  number of regions, and the memory of a batch does not;
- the per-cell sum of squared errors at lead 1 for ``rmse_map.png``
  (:class:`conv2dlstm.evaluation.scores.CellRmse`, ``C_out x H x W``);
- the one sample shown in ``maps.png``;
- with ``evaluate.events``: the event threshold (``366 x V_e x H x W`` float32, estimated on the
  training part before the test windows, :func:`event_threshold`) and per forecast the four
  contingency counts of each initial time, lead and event variable, ``N x T_out x V_e x 4``, plus
  the last ``min_duration_days - 1`` days of exceedance still undecided
  (:class:`conv2dlstm.evaluation.events.EventCounts`);
- the time coordinates (``N x T_out`` datetimes).

``predictions.nc`` and ``predictions.zarr`` are written batch by batch
(:class:`conv2dlstm.artifacts.predictions.PredictionsWriter`), and the climatology is read from the
statistics file only for the days of year of the current batch. ``animation.gif``
(``evaluate.animation_lead``, :func:`_stage_animation`) reads the frames it draws back, a batch at a
time, from the windows store (the truth) and the written ``predictions.nc`` (the forecast), twice
(the colour limits, then the frames); it holds the drawn frames, small palette images, not the maps.

Commit and logging. Every output is first written into one hidden staging folder
``out_dir/.evaluate.*.partial``; when all of them are complete they are moved into ``out_dir``
(:func:`commit_outputs`, same file system, one atomic rename per file). ``metrics.csv`` marks a
complete result: the previous one is removed before the first rename and the new one is moved
last. The remaining window is a crash between the first and the last rename: it leaves new and
old files side by side but no ``metrics.csv``, so the step reads as not done (Snakemake also
deletes the outputs of a failed job) and a rerun replaces every file. A failure before the commit
leaves ``out_dir`` as it was.

Only then are the scores logged into the training run's MLflow run
(:func:`conv2dlstm.evaluation.scores.mlflow_metrics`: metrics named like ``test_rmse_sst_lead1``,
``persistence_rmse_sst_lead1``, ``skill_vs_persistence_sst_lead1``,
``skill_vs_persistence_lower_sst_lead1``, ``skill_vs_climatology_meaningful_sst_lead1``,
``skill_horizon_vs_persistence_sst``, and per region or season the same names ending
``_region_<name>`` or ``_season_<group>`` (:func:`conv2dlstm.evaluation.scores.stratum_suffix`; a
region within a season is in ``metrics.csv`` only), all at step
0; the CSV and the plots as artifacts under ``evaluate/``). The run is checked to exist before
any work starts. A rerun does not duplicate metrics: a metric whose latest logged value equals the
new one is skipped, a changed value is appended at step 0 and becomes the latest; artifacts are
overwritten. If logging fails after the commit the step fails, and a rerun logs what is missing.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.artifacts import provenance
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.config import keys
from conv2dlstm.config.strata import PLOT_BY_REGION, stratified_plots
from conv2dlstm.config.validate import max_lead
from conv2dlstm.errors import ConfigError, DataError, TrackingError
from conv2dlstm.evaluation import animation, baselines, events, metrics, plots, strata
from conv2dlstm.evaluation.inference import (
    Horizon,
    batch_forecasts,
    feedback_channels,
    forecast_array,
    nonnegative_targets,
    physical,
    predict_batch,
    read_batch,
)
from conv2dlstm.evaluation.scores import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    CellRmse,
    StreamingScores,
    headline,
    metrics_table,
    mlflow_metrics,
    skill_intervals,
    stratum_frame,
    tidy,
)
from conv2dlstm.fsutil import atomic_output, discard_partials, full_disk_named, sha256_file

log = logging.getLogger(__name__)

SPLIT = "test"
RUN_ID_FILE = "mlflow_run_id.txt"
ARTIFACT_DIR = "evaluate"
MLFLOW_STEP = 0
COMMIT_MARKER = "metrics.csv"
OUTPUT_FILES: tuple[str, ...] = (
    predictions_file.FILENAME,
    predictions_file.ZARR_NAME,
    "metrics.csv",
    "rmse_vs_lead.png",
    "acc_vs_lead.png",
    "skill_vs_lead.png",
    "maps.png",
    "rmse_map.png",
)
_STAGING_PREFIX, _STAGING_SUFFIX = ".evaluate.", ".partial"


# --------------------------------------------------------------------------------------------------
# Run id, checks before the work, small helpers


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


def rollout_feedback(ckpt: Mapping[str, Any], store: Any) -> list[int] | None:
    """The feedback channels of a rollout (:func:`conv2dlstm.evaluation.inference.feedback_channels`)
    when ``store`` is read to more leads than the checkpoint's network predicts, else None."""
    if int(store.lead_steps) <= int(ckpt["model_kwargs"]["lead_steps"]):
        return None
    return feedback_channels(list(store.input_variables), list(store.target_variables))


def _check_checkpoint(ckpt: Mapping[str, Any], store: Any, checkpoint: Path) -> None:
    for key in ("input_variables", "target_variables"):
        trained = list(ckpt.get(key) or [])
        stored = list(getattr(store, key))
        if trained and trained != stored:
            raise DataError(
                f"checkpoint {checkpoint} was trained with {key} {trained} but the windows store has "
                f"{stored}; evaluate with the windows the run was trained on (re-run train)"
            )


_RETRAIN = (
    "the checkpoint is stale: rerun the train step on the current data and configuration "
    "(`snakemake --forcerun train`, or rerun the workflow)"
)


def check_provenance(
    ckpt: Mapping[str, Any],
    *,
    checkpoint: Path,
    windows: Mapping[str, Any],
    stats: Mapping[str, Any],
    train_config: Mapping[str, Any],
) -> dict[str, Any]:
    """The checkpoint's provenance record, after checking that it was trained on these inputs.

    ``windows`` and ``stats`` are the provenance records of the windows store and statistics the
    step is given, ``train_config`` the train step's result configuration of the run. Raises
    :class:`DataError` naming what differs and the step to rerun (train) when the checkpoint
    records no provenance, other windows or statistics digests, or another result configuration.
    """
    try:
        record = provenance.from_checkpoint(ckpt, where=f"checkpoint {checkpoint}")
    except DataError as exc:
        raise DataError(f"{str(exc).split(';')[0]}; {_RETRAIN}") from exc
    given = {"windows": windows["digest"], "stats": stats["digest"]}
    problems = [
        f"it was trained on {name} digest {record['inputs'].get(name, '(none)')} but the {name} given have "
        f"digest {digest}"
        for name, digest in given.items()
        if record["inputs"].get(name) != digest
    ]
    if record["config_digest"] != keys.result_digest(dict(train_config), "train"):
        old = ckpt.get(provenance.RESULT_CONFIG_KEY)
        changed = provenance.config_changes(old, train_config) if isinstance(old, Mapping) else []
        problems.append("it was trained with another configuration" + (f" ({'; '.join(changed)})" if changed else ""))
    if problems:
        raise DataError(f"checkpoint {checkpoint} does not match its inputs: {'; '.join(problems)}; {_RETRAIN}")
    return record


# --------------------------------------------------------------------------------------------------
# Commit and MLflow


def staging_dir(out_dir: Path) -> Path:
    """A new hidden staging folder in ``out_dir`` (same file system: the commit renames are atomic).

    Staging folders left by a killed evaluation of ``out_dir`` are removed first: one evaluation
    writes into ``out_dir`` at a time (Snakemake locks a job's outputs).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{_STAGING_PREFIX}*{_STAGING_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, suffix=_STAGING_SUFFIX, dir=out_dir))


def commit_outputs(staging: Path, out_dir: Path, names: Sequence[str], *, marker: str = COMMIT_MARKER) -> None:
    """Move the files (and folders: Zarr stores) ``names`` from ``staging`` into ``out_dir``, ``marker`` last.

    The old ``marker`` is removed before the first rename, so until the last rename ``out_dir``
    has no ``marker``: a crash in between leaves an incomplete-looking result, never a mix that
    looks complete. Each rename is atomic (``os.replace`` within one file system); a folder that
    replaces an older one first moves the older one into ``staging`` (removed with it).
    """
    missing = [name for name in names if not (staging / name).exists()]
    if missing:
        raise FileNotFoundError(f"commit_outputs: {missing} were not written to {staging}")
    ordered = [name for name in names if name != marker] + ([marker] if marker in names else [])
    (out_dir / marker).unlink(missing_ok=True)
    for name in ordered:
        if (staging / name).is_dir() and (out_dir / name).exists():  # os.replace cannot replace a non-empty folder
            os.replace(out_dir / name, staging / f".replaced.{name}")
        os.replace(staging / name, out_dir / name)


def metrics_to_log(values: Mapping[str, float], logged: Mapping[str, float]) -> dict[str, float]:
    """The metrics of ``values`` whose latest logged value (``logged``) is absent or different."""
    return {
        k: v for k, v in values.items() if k not in logged or not math.isclose(logged[k], v, rel_tol=1e-12, abs_tol=0.0)
    }


def log_to_mlflow(
    uri: str,
    run_id: str,
    values: Mapping[str, float],
    artifacts: Sequence[Path],
    tags: Mapping[str, str] | None = None,
) -> int:
    """Log scores (step 0), files and ``tags`` into the existing (training) MLflow run ``run_id``.

    Metrics already logged with the same value are skipped, so a rerun adds no duplicate; returns
    the number of metrics logged.
    """
    from mlflow import MlflowClient

    from conv2dlstm.tracking import store as tracking

    with tracking.resume_run(run_id, tracking_uri=uri) as tracker:
        new = metrics_to_log(values, MlflowClient(uri).get_run(run_id).data.metrics)
        names = sorted(new)
        for i in range(0, len(names), 500):  # MLflow caps the metrics of one batch request
            tracker.log_metrics({k: new[k] for k in names[i : i + 500]}, step=MLFLOW_STEP)
        for path in artifacts:
            tracker.log_artifact(path, artifact_path=ARTIFACT_DIR)
        if tags:
            tracker.set_tags(dict(tags))
    return len(names)


# --------------------------------------------------------------------------------------------------
# The batches: forecasts, baselines and truth in physical units, scored


def damping(store: Any, stats: xr.Dataset, *, weights: xr.DataArray, chunk_steps: int) -> xr.DataArray:
    """``(lag, variable)`` damping of damped persistence, fitted on the training part of ``store``
    (:func:`conv2dlstm.evaluation.baselines.fit_damping`), logged; lags ``1..lead_steps``."""
    rho = baselines.fit_damping(store, stats, max_lag=int(store.lead_steps), weights=weights, chunk_steps=chunk_steps)
    for variable in rho["variable"].values:
        values = ", ".join(f"{float(r):.3f}" for r in rho.sel(variable=variable).values)
        log.info(
            "damped persistence: %s anomaly autocorrelation at lags 1..%d (training period): %s",
            variable,
            rho.sizes["lag"],
            values,
        )
    if bool(rho.isnull().any()):
        log.warning(
            "damped persistence: the training record gives no autocorrelation for some lag; its forecast is NaN there"
        )
    return rho


def unsupported_leads(store: Any, stats: xr.Dataset, *, split: str = SPLIT) -> dict[str, xr.DataArray]:
    """Per baseline, the leads where its skill is not meaningful (climatology days without training
    days, :func:`conv2dlstm.evaluation.baselines.not_meaningful_leads`), with a warning naming them."""
    train_times = baselines.training_times(store.time, stats)
    window = baselines.climatology_window(stats)
    support = baselines.climatology_support(train_times, window)
    init, valid = store.init_times(split), store.valid_times(split)
    flags = baselines.not_meaningful_leads(init, valid, support)
    start, end = baselines.training_period(stats)
    for name, bad in flags.items():
        if bool(bad.any()):
            leads = [int(k) for k in bad["lead"].values[bad.values]]
            days = sorted(
                {
                    str(pd.Timestamp(t).date())
                    for t in np.asarray(valid).ravel()
                    if not bool(support.sel(dayofyear=pd.Timestamp(t).day_of_year))
                }
            )
            log.warning(
                "%s relies on the training climatology of days that no training day supports (training period "
                "%s..%s, climatology window %d days; unsupported %s days: %s%s): skill against it is marked not "
                "meaningful (NaN, skill_vs_%s_meaningful = 0) at lead(s) %s",
                name,
                start,
                end,
                window,
                split,
                ", ".join(days[:5]),
                " ..." if len(days) > 5 else "",
                name,
                leads,
            )
    return flags


def event_threshold(
    store: Any, stats: xr.Dataset, spec: events.EventSpec, *, chunk_steps: int, split: str = SPLIT
) -> tuple[np.ndarray, xr.DataArray | None]:
    """The leads whose event scores are not meaningful (``(lead,)`` bool: a test valid day whose day of
    year has fewer than ``evaluate.events.min_training_years`` training years,
    :func:`conv2dlstm.evaluation.events.unsupported_event_leads`, with a warning naming the days) and,
    unless every lead is, the event threshold fitted on the training part of ``store``
    (:func:`conv2dlstm.evaluation.events.percentile_threshold`), logged."""
    train_times = baselines.training_times(store.time, stats)
    years = events.training_years(train_times)
    valid = np.asarray(store.valid_times(split), dtype="datetime64[ns]")
    flags = events.unsupported_event_leads(valid, years, spec.min_training_years)
    start, end = baselines.training_period(stats)
    days = events.calendar_day(valid).ravel()
    log.info(
        "extreme events of %s: %s; %d..%d training years per test valid day",
        ", ".join(spec.variables),
        spec.describe(),
        int(years[days - 1].min()) if days.size else 0,
        int(years[days - 1].max()) if days.size else 0,
    )
    if flags.any():
        short = sorted(
            {str(pd.Timestamp(t).date()) for t, d in zip(valid.ravel(), days) if years[d - 1] < spec.min_training_years}
        )
        log.warning(
            "extreme events: the training period %s..%s gives the threshold of some test valid days fewer than %d "
            "years (evaluate.events.min_training_years; e.g. %s%s): the event scores are NaN and event_meaningful "
            "is 0 at lead(s) %s; lengthen splits.train or lower evaluate.events.min_training_years",
            start,
            end,
            spec.min_training_years,
            ", ".join(short[:5]),
            " ..." if len(short) > 5 else "",
            [int(k) + 1 for k in np.flatnonzero(flags)],
        )
    if flags.all():
        return flags, None
    threshold = events.percentile_threshold(store, stats, spec, chunk_steps=chunk_steps)
    for variable in spec.variables:
        values = threshold.sel(variable=variable).values
        log.info(
            "extreme events: %s threshold fitted on the training period %s..%s: anomalies %.3g..%.3g over days of "
            "year and ocean cells",
            variable,
            start,
            end,
            float(np.nanmin(values)),
            float(np.nanmax(values)),
        )
    return flags, threshold


def _event_rows(counts: events.EventCounts, spec: events.EventSpec, flags: np.ndarray) -> pd.DataFrame:
    """The ``event_*`` rows of the accumulated ``counts`` (:func:`conv2dlstm.evaluation.events.event_rows`,
    the bootstrap of the skill intervals: :data:`BOOTSTRAP_RESAMPLES` resamples, seed :data:`BOOTSTRAP_SEED`)."""
    if counts.gaps and counts.min_steps > 1:
        log.warning(
            "extreme events: %d gap(s) between consecutive test initial times end runs of exceedance "
            "(evaluate.events.min_duration_days %d counts consecutive initial times only)",
            counts.gaps,
            spec.min_duration_days,
        )
    rows = events.event_rows(
        counts.counts(),
        variables=spec.variables,
        unsupported=flags,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence=CONFIDENCE,
        seed=BOOTSTRAP_SEED,
    )
    headline = rows[(rows["model"] == "model") & (rows["metric"] == f"{events.PREFIX}sedi")]
    for variable, group in headline.groupby("variable", sort=False):
        log.info(
            "extreme events: %s SEDI of the model at leads 1..%d: %s",
            variable,
            len(group),
            ", ".join(f"{v:.3f}" for v in group["value"]),
        )
    return rows


def evaluate_split(
    model: Any,
    store: Any,
    stats: xr.Dataset,
    *,
    device: Any,
    batch_size: int,
    writer: predictions_file.PredictionsWriter,
    shown_sample: int,
    checkpoint: Path,
    nonnegative: Sequence[str] = (),
    feedback: Sequence[int] | None = None,
    regions: Mapping[str, xr.DataArray] | None = None,
    grouping: strata.TimeGrouping | None = None,
    event_spec: events.EventSpec | None = None,
) -> tuple[pd.DataFrame, xr.DataArray, tuple[xr.DataArray, xr.DataArray]]:
    """Predict and score the test windows batch by batch, writing the predictions with ``writer``.

    Before the test windows, damped persistence's damping is fitted on the store's training part
    (:func:`damping`) and the leads whose baselines rely on an unsupported climatology are found
    (:func:`unsupported_leads`). Every score is computed on the whole grid over every initial time
    (region and season ``all``), on each of ``regions`` (name -> ``(lat, lon)`` boolean field of its
    ocean cells, :func:`conv2dlstm.evaluation.strata.region_masks`; area-weighted within it) and on
    each group of initial times of ``grouping`` (:mod:`conv2dlstm.evaluation.strata`), by
    :class:`~conv2dlstm.evaluation.scores.StreamingScores`. With ``event_spec`` (``evaluate.events``)
    the extreme-event threshold is estimated on the training part too (:func:`event_threshold`) and
    every forecast's event counts are accumulated (:class:`conv2dlstm.evaluation.events.EventCounts`),
    on the whole grid over every initial time only.

    Returns:
        The scores (layout of :meth:`conv2dlstm.evaluation.scores.StreamingScores.table`, plus the ``rho`` rows of
        damped persistence and the ``event_*`` rows of :func:`conv2dlstm.evaluation.events.event_rows`),
        the lead-1 RMSE per grid cell ``(variable, lat, lon)``, and the lead-1 truth and prediction
        ``(variable, lat, lon)`` of sample ``shown_sample``.
    """
    n = int(store.starts(SPLIT).size)
    init_all = np.asarray(store.init_times(SPLIT), dtype="datetime64[ns]")  # (N,)
    valid_all = np.asarray(store.valid_times(SPLIT), dtype="datetime64[ns]")  # (N, T_out)
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    mask = xr.DataArray(np.asarray(store.mask, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})
    targets = [str(v) for v in store.target_variables]
    expected = (int(store.lead_steps), len(targets), lat.size, lon.size)
    weights = metrics.area_weights(lat, mask)
    named = {strata.ALL: weights, **{name: metrics.area_weights(lat, cells) for name, cells in (regions or {}).items()}}
    scores, cell_rmse = StreamingScores(named, grouping), CellRmse(mask)
    rho = damping(store, stats, weights=weights, chunk_steps=max(batch_size, 1) * expected[0])
    cell_mean = baselines.training_mean(store, stats, chunk_steps=max(batch_size, 1) * expected[0])
    not_meaningful = unsupported_leads(store, stats)
    event_counts, event_flags = None, np.zeros(expected[0], dtype=bool)
    if event_spec is not None:
        event_flags, threshold = event_threshold(store, stats, event_spec, chunk_steps=max(batch_size, 1) * expected[0])
        step = events.time_step(store.time)
        event_counts = events.EventCounts(event_spec, threshold, weights, step=step)
    shown: tuple[xr.DataArray, xr.DataArray] | None = None
    log.info("predicting %d test windows on %s in batches of %d", n, device, batch_size)
    for i0 in range(0, n, batch_size):
        batch = slice(i0, min(i0 + batch_size, n))
        x_n, y_n, last_n = read_batch(store, SPLIT, range(batch.start, batch.stop))
        pred_n = predict_batch(  # (B, T_out, C_out, H, W), normalized; rolled out past the trained leads
            model, x_n, device=device, leads=expected[0], feedback=feedback, ocean=store.mask
        )
        if pred_n.shape[1:] != expected:
            raise DataError(
                f"the model of {checkpoint} predicts shape {pred_n.shape[1:]} per window but the windows "
                f"store needs {expected}; the checkpoint does not match these windows (re-run train)"
            )
        forecasts, truth = batch_forecasts(
            pred_n,
            y_n,
            last_n,
            init_times=init_all[batch],
            valid_times=valid_all[batch],
            variables=targets,
            mask=mask,
            stats=stats,
            rho=rho,
            cell_mean=cell_mean,
            nonnegative=nonnegative,
        )
        scores.add(forecasts, truth, forecasts["climatology"])
        if event_counts is not None:
            event_counts.add(forecasts, truth, forecasts["climatology"])
        cell_rmse.add(forecasts["model"].sel(lead=1), truth.sel(lead=1))
        writer.write(i0, forecasts["model"].values)
        if batch.start <= shown_sample < batch.stop:  # keep only the sample shown in maps.png
            j = shown_sample - i0
            shown = (truth.isel(time=j).sel(lead=1).copy(), forecasts["model"].isel(time=j).sel(lead=1).copy())
    if shown is None:
        raise DataError(f"sample {shown_sample} for maps.png is not one of the {n} test windows")
    leads = np.arange(1, expected[0] + 1, dtype="int64")
    rho_rows = stratum_frame(tidy(rho.rename(lag="lead").sel(lead=leads), model="damped_persistence", metric="rho"))
    frames = [scores.table(not_meaningful), rho_rows]
    if event_spec is not None and event_counts is not None:
        frames.append(stratum_frame(_event_rows(event_counts, event_spec, event_flags)))
    table = pd.concat(frames, ignore_index=True)
    return table, cell_rmse.result(), shown


# --------------------------------------------------------------------------------------------------
# Figures


def line_labels(table: pd.DataFrame) -> pd.Series:
    """Legend label of each row: the model name, with a note on baselines whose skill is not meaningful."""
    flags = table[table["metric"].str.startswith("skill_vs_") & table["metric"].str.endswith("_meaningful")]
    flagged = {
        metric[len("skill_vs_") : -len("_meaningful")]
        for metric, value in zip(flags["metric"], flags["value"], strict=True)
        if value == 0
    }
    note = " (climatology unsupported: skill not meaningful)"
    return table["model"].where(~table["model"].isin(flagged), table["model"] + note)


def write_figures(
    staging: Path,
    table: pd.DataFrame,
    *,
    rmse_map: xr.DataArray,
    shown: tuple[xr.DataArray, xr.DataArray],
    shown_title: str,
    who: str,
    period: str,
    units: Mapping[str, str],
    model_name: str,
    lead_step: pd.Timedelta | None = None,
    ocean: xr.DataArray | None = None,
) -> None:
    """``rmse_vs_lead.png``, ``acc_vs_lead.png``, ``skill_vs_lead.png``, ``maps.png`` and ``rmse_map.png``
    in ``staging``: scores with the variables' ``units``, leads in ``lead_step`` (the time step of
    the windows, :func:`conv2dlstm.evaluation.plots.lead_label`); in the maps, land grey and, with the
    ``ocean`` mask, an ocean cell without a score hatched."""
    labelled = table.assign(label=line_labels(table))
    plots.lines_vs_lead(
        labelled[labelled["metric"] == "rmse"],
        staging / "rmse_vs_lead.png",
        ylabel="area-weighted RMSE",
        units=dict(units),
        lead_step=lead_step,
        title=f"{who} vs baselines: RMSE by lead, test initial times {period}",
    )
    plots.lines_vs_lead(
        labelled[labelled["metric"] == "acc"],
        staging / "acc_vs_lead.png",
        ylabel="anomaly correlation (ACC)",
        lead_step=lead_step,
        title=f"{who} vs persistence and damped persistence: ACC by lead, test initial times {period}",
    )
    skills = skill_intervals(table[table["model"] == model_name])
    plots.skill_vs_lead(
        skills.assign(label="vs " + skills["baseline"]),
        staging / "skill_vs_lead.png",
        lead_step=lead_step,
        title=f"{who}: RMSE skill 1 - RMSE/RMSE(baseline) with 95% block-bootstrap intervals, test initial "
        f"times {period} (filled: the interval excludes 0)",
    )
    plots.forecast_maps(
        shown[0], shown[1], staging / "maps.png", title=f"{who}: {shown_title}", units=dict(units), ocean=ocean
    )
    plots.field_maps(
        rmse_map,
        staging / "rmse_map.png",
        title=f"{who}: RMSE per grid cell at lead 1, test initial times {period}",
        quantity="RMSE",
        units=dict(units),
        ocean=ocean,
    )


# --------------------------------------------------------------------------------------------------
# Entry point


def main(cfg: dict[str, Any], *, run: str, windows: Path, stats: Path, checkpoint: Path, out_dir: Path) -> None:
    """Predict the test split batch by batch, score the run and the baselines, write, commit, then log.

    The checkpoint must have been trained on this windows store and these statistics with this
    configuration (:func:`check_provenance`); ``predictions.nc`` (attribute ``provenance``) and the
    MLflow run (tags ``evaluate.provenance.*``) record the evaluation's provenance.
    """
    from conv2dlstm.tracking import store as tracking
    from conv2dlstm.training.devices import resolve_device

    windows, stats, checkpoint, out_dir = Path(windows), Path(stats), Path(checkpoint), Path(out_dir)
    for stray in discard_partials(out_dir):
        log.info("evaluate: discarded %s left by an interrupted run", stray)
    inputs = _open_inputs(cfg, run=run, windows=windows, checkpoint=checkpoint)
    outputs = (*OUTPUT_FILES, *inputs.stratified, *inputs.animation_files)
    device = resolve_device(cfg["train"]["device"])
    uri = tracking.resolve_tracking_uri(dict(cfg))
    tracking.check_run(uri, inputs.run_id)  # an unknown run fails before the work, not after the commit

    with stats_file.open_lazy(stats, inputs.targets) as stats_ds:
        record = _evaluate_record(cfg, inputs, stats_ds, windows=windows, stats=stats)
        staging = staging_dir(out_dir)
        try:
            # the free space and the staged outputs' size are read before the staging folder is removed
            with full_disk_named(out_dir, partial=staging):
                table = _stage_outputs(
                    staging,
                    inputs,
                    stats_ds,
                    record=record,
                    device=device,
                    batch_size=int(cfg["evaluate"]["batch_size"]),
                )
            commit_outputs(staging, out_dir, outputs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s", ", ".join(str(out_dir / name) for name in outputs))
    logged = log_to_mlflow(
        uri,
        inputs.run_id,
        mlflow_metrics(table, model_name=inputs.model_name),
        [out_dir / name for name in outputs if name not in (predictions_file.FILENAME, predictions_file.ZARR_NAME)],
        tags=provenance.mlflow_tags(record, prefix="evaluate.provenance"),
    )
    log.info("logged %d new metrics and the plots into MLflow run %s", logged, inputs.run_id)


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of an evaluation (:func:`_open_inputs`)."""

    run: str
    store: Any  # the windows store
    model: Any  # the network, in eval mode on the CPU (conv2dlstm.training.models.load_model)
    ckpt: dict[str, Any]  # its checkpoint
    checkpoint: Path
    run_id: str  # the training's MLflow run
    model_name: str
    init_times: pd.DatetimeIndex  # of the test windows
    shown_sample: int  # the test window drawn in maps.png
    regions: dict[str, xr.DataArray] = field(default_factory=dict)  # evaluate.regions: their ocean cells
    grouping: strata.TimeGrouping | None = None  # evaluate.by_season
    stratified: tuple[str, ...] = ()  # the figures of the strata (conv2dlstm.config.strata.stratified_plots)
    animation_lead: int = 0  # evaluate.animation_lead (0: no animation)
    animation_frames: int = 0  # evaluate.animation_frames (0: every initial time)
    event_spec: events.EventSpec | None = None  # evaluate.events (None: no event scores)

    @property
    def animation_files(self) -> tuple[str, ...]:
        """``animation.gif`` when the animation is on."""
        return (animation.FILENAME,) if self.animation_lead > 0 else ()

    @property
    def targets(self) -> list[str]:
        return [str(v) for v in self.store.target_variables]


def _open_inputs(cfg: Mapping[str, Any], *, run: str, windows: Path, checkpoint: Path) -> _Inputs:
    """The windows store and the model of ``checkpoint``, once the model's variables are the store's
    (:func:`_check_checkpoint`), the checkpoint names its MLflow run (:func:`resolve_run_id`), the store
    has test windows and ``evaluate.plot_date`` is the initial date of one (:func:`plot_sample`)."""
    from conv2dlstm.artifacts.windows_store import WindowsStore
    from conv2dlstm.training import models

    store: Any = WindowsStore(windows)
    model, ckpt = models.load_model(checkpoint)
    _check_checkpoint(ckpt, store, checkpoint)
    run_id = resolve_run_id(checkpoint, ckpt)
    model_name = str(ckpt.get("model_name") or cfg["model"]["name"])
    if store.starts(SPLIT).size == 0:
        raise DataError(
            f"the windows store {windows} has no test window; lengthen splits.test or shorten "
            "windows.input_steps + windows.lead_steps"
        )
    leads = max_lead(cfg)
    if leads > store.lead_steps:
        store = Horizon(store, SPLIT, lead_steps=leads)
        if store.starts(SPLIT).size == 0:
            raise DataError(
                f"no test window of {windows} reaches lead {leads} (evaluate.max_lead) within splits.test: lengthen "
                f"splits.test or lower evaluate.max_lead (windows.input_steps + evaluate.max_lead steps must fit)"
            )
    init_times = pd.DatetimeIndex(store.init_times(SPLIT))
    k = plot_sample(init_times, cfg["evaluate"]["plot_date"])  # a bad plot_date fails before the work
    ocean = xr.DataArray(
        np.asarray(store.mask, dtype=bool),
        dims=("lat", "lon"),
        coords={"lat": np.asarray(store.lat, dtype="float64"), "lon": np.asarray(store.lon, dtype="float64")},
    )
    regions = strata.region_masks(cfg["evaluate"]["regions"], ocean)  # a region off the ocean fails here
    grouping = strata.time_grouping(cfg["evaluate"]["by_season"])
    return _Inputs(
        run,
        store,
        model,
        ckpt,
        checkpoint,
        run_id,
        model_name,
        init_times,
        k,
        regions,
        grouping,
        tuple(stratified_plots(cfg)),
        animation_lead=_animation_lead(cfg, store),
        animation_frames=int(cfg["evaluate"]["animation_frames"]),
        event_spec=events.EventSpec.from_config(cfg["evaluate"]["events"], store.target_variables),
    )


def _evaluate_record(
    cfg: Mapping[str, Any], inputs: _Inputs, stats_ds: xr.Dataset, *, windows: Path, stats: Path
) -> dict[str, Any]:
    """The evaluation's provenance record, once the statistics ``stats_ds`` are on the store's grid and
    the checkpoint was trained on these windows and statistics with this configuration
    (:func:`check_provenance`)."""
    store, checkpoint = inputs.store, inputs.checkpoint
    stats_file.check_grid(stats_ds, store.lat, store.lon, stats_path=stats, data=f"windows store {windows}")
    trained = check_provenance(
        inputs.ckpt,
        checkpoint=checkpoint,
        windows=provenance.from_attrs(store.attrs, where=f"windows store {windows}", step="windows"),
        stats=provenance.from_attrs(stats_ds.attrs, where=f"statistics file {stats}", step="normalize"),
        train_config=keys.result_config(dict(cfg), "train"),
    )
    return provenance.for_step(
        cfg,
        "evaluate",
        {"checkpoint": trained["digest"], **{k: trained["inputs"][k] for k in ("windows", "stats")}},
    )


def _stage_outputs(
    staging: Path, inputs: _Inputs, stats_ds: xr.Dataset, *, record: dict[str, Any], device: Any, batch_size: int
) -> pd.DataFrame:
    """Write the outputs (:data:`OUTPUT_FILES`) into ``staging``: the test predictions (attributes naming
    the run, its model, checkpoint and MLflow run, and the provenance ``record``), ``metrics.csv``,
    returned as a table, and the figures."""
    store, checkpoint, run, model_name = inputs.store, inputs.checkpoint, inputs.run, inputs.model_name
    units = stats_file.units(stats_ds)
    with predictions_file.PredictionsWriter(
        staging / predictions_file.FILENAME,
        zarr_path=staging / predictions_file.ZARR_NAME,
        init_times=store.init_times(SPLIT),
        valid_times=store.valid_times(SPLIT),
        variables=inputs.targets,
        lat=store.lat,
        lon=store.lon,
        units=units,
        attrs={
            "run": run,
            "model_name": model_name,
            "checkpoint": checkpoint.name,
            "checkpoint_sha256": sha256_file(checkpoint),
            "mlflow_run_id": inputs.run_id,
            **provenance.to_attrs(record),
        },
    ) as writer:
        scores, rmse_map, shown = evaluate_split(
            inputs.model.to(device).eval(),
            store,
            stats_ds,
            device=device,
            batch_size=batch_size,
            writer=writer,
            shown_sample=inputs.shown_sample,
            checkpoint=checkpoint,
            nonnegative=nonnegative_targets(inputs.ckpt),
            feedback=rollout_feedback(inputs.ckpt, store),
            regions=inputs.regions,
            grouping=inputs.grouping,
            event_spec=inputs.event_spec,
        )
    table = metrics_table(scores, run=run, model_name=model_name)
    write_csv(table, staging / "metrics.csv")
    _stage_figures(staging, headline(table), inputs, rmse_map=rmse_map, shown=shown, units=units)
    _stage_stratified_figures(staging, table, inputs)
    _stage_animation(staging, inputs, stats_ds, units=units, batch_size=batch_size)
    return table


def _stage_figures(
    staging: Path,
    table: pd.DataFrame,
    inputs: _Inputs,
    *,
    rmse_map: xr.DataArray,
    shown: tuple[xr.DataArray, xr.DataArray],
    units: Mapping[str, str],
) -> None:
    """:func:`write_figures` of the evaluation, titled with the run, the test period and the window shown."""
    init_times, k, run, model_name = inputs.init_times, inputs.shown_sample, inputs.run, inputs.model_name
    lead_times = np.asarray(inputs.store.valid_times(SPLIT), dtype="datetime64[ns]") - init_times.values[:, None]
    valid = pd.Timestamp(inputs.store.valid_times(SPLIT)[k, 0])
    write_figures(
        staging,
        table,
        rmse_map=rmse_map,
        shown=shown,
        shown_title=f"lead 1 forecast initialized {init_times[k]:%Y-%m-%d}, valid {valid:%Y-%m-%d} (land grey)",
        who=run if run == model_name else f"{run} ({model_name})",
        period=f"{init_times.min():%Y-%m-%d}..{init_times.max():%Y-%m-%d}",
        units=units,
        model_name=model_name,
        lead_step=plots.lead_step(lead_times),
        ocean=_ocean(inputs.store),
    )


def _stage_stratified_figures(staging: Path, table: pd.DataFrame, inputs: _Inputs) -> None:
    """The figures of the strata (``inputs.stratified``, :func:`conv2dlstm.config.strata.stratified_plots`):
    the run's skill against each baseline with its 95% interval per lead, one marker per region
    (``skill_by_region.png``: every initial time) or per season or month (``skill_by_season.png``: the
    whole grid), the headline (``all``) among them (:func:`conv2dlstm.evaluation.plots.skill_by_stratum`)."""
    if not inputs.stratified:
        return
    init_times, run, model_name = inputs.init_times, inputs.run, inputs.model_name
    who = run if run == model_name else f"{run} ({model_name})"
    period = f"{init_times.min():%Y-%m-%d}..{init_times.max():%Y-%m-%d}"
    lead_times = np.asarray(inputs.store.valid_times(SPLIT), dtype="datetime64[ns]") - init_times.values[:, None]
    skills = skill_intervals(table[table["model"] == model_name])
    for name in inputs.stratified:
        by, other = ("region", "season") if name == PLOT_BY_REGION else ("season", "region")
        what = (
            "region (every initial time)"
            if by == "region"
            else f"{inputs.grouping.name if inputs.grouping else by} of the first valid time (whole grid)"
        )
        plots.skill_by_stratum(
            skills[skills[other] == strata.ALL],
            staging / name,
            by=by,
            lead_step=plots.lead_step(lead_times),
            title=f"{who}: RMSE skill 1 - RMSE/RMSE(baseline) by {what} with 95% block-bootstrap intervals, test "
            f"initial times {period} (filled: the interval excludes 0)",
        )


def _ocean(store: Any) -> xr.DataArray:
    """The store's ``(lat, lon)`` ocean mask with its coordinates."""
    lat, lon = np.asarray(store.lat, dtype="float64"), np.asarray(store.lon, dtype="float64")
    return xr.DataArray(np.asarray(store.mask, dtype=bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})


def _animation_lead(cfg: Mapping[str, Any], store: Any) -> int:
    """``evaluate.animation_lead``, once it is a lead the store's test windows reach (before the work)."""
    lead = int(cfg["evaluate"]["animation_lead"])
    if lead > int(store.lead_steps):
        raise ConfigError(
            f"config key evaluate.animation_lead: {lead} is past the last lead scored ({int(store.lead_steps)}, "
            "evaluate.max_lead or windows.lead_steps); animate a lead up to it, or 0 for no animation"
        )
    return lead


def animation_frames(
    store: Any, stats: xr.Dataset, predictions: Path, *, indices: np.ndarray, lead: int, batch_size: int
) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """A function returning an iterator over the frames of ``animation.gif``: per test window of
    ``indices``, the ``(variable, lat, lon)`` physical truth and forecast at ``lead``, the truth read from
    the windows ``store`` (NaN on land), the forecast from the written ``predictions`` file; read
    ``batch_size`` windows at a time."""
    ocean = _ocean(store)
    targets = [str(v) for v in store.target_variables]
    init_all = np.asarray(store.init_times(SPLIT), dtype="datetime64[ns]")
    valid_all = np.asarray(store.valid_times(SPLIT), dtype="datetime64[ns]")

    def frames() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with predictions_file.open(predictions) as ds:
            for i0 in range(0, indices.size, max(batch_size, 1)):
                chunk = indices[i0 : i0 + max(batch_size, 1)]
                _, y, _ = read_batch(store, SPLIT, chunk.tolist())
                truth = physical(
                    forecast_array(
                        y[:, lead - 1 : lead],
                        init_times=init_all[chunk],
                        valid_times=valid_all[chunk, lead - 1 : lead],
                        variables=targets,
                        lat=ocean["lat"].values,
                        lon=ocean["lon"].values,
                    ),
                    stats,
                    ocean,
                ).values[:, 0]
                forecast = np.stack(
                    [ds[v].isel(time=chunk, prediction_timedelta=lead - 1).values for v in targets], axis=1
                )
                yield from zip(truth, forecast, strict=True)

    return frames


def _stage_animation(
    staging: Path, inputs: _Inputs, stats_ds: xr.Dataset, *, units: Mapping[str, str], batch_size: int
) -> None:
    """``animation.gif`` of the test period at ``evaluate.animation_lead`` (:mod:`conv2dlstm.evaluation.animation`),
    at most ``evaluate.animation_frames`` initial times with an even stride; nothing when it is off."""
    lead = inputs.animation_lead
    if lead <= 0:
        return
    store, init_times = inputs.store, inputs.init_times
    indices = animation.frame_indices(init_times.size, inputs.animation_frames)
    valid = pd.DatetimeIndex(np.asarray(store.valid_times(SPLIT), dtype="datetime64[ns]")[indices, lead - 1])
    lead_times = np.asarray(store.valid_times(SPLIT), dtype="datetime64[ns]") - init_times.values[:, None]
    duration = plots.lead_duration(lead, plots.lead_step(lead_times))
    who = inputs.run if inputs.run == inputs.model_name else f"{inputs.run} ({inputs.model_name})"
    hours = any(t.normalize() != t for t in (*init_times[indices], *valid))
    fmt = "%Y-%m-%d %H:%M" if hours else "%Y-%m-%d"
    titles = [
        f"{who}: lead {lead}" + (f" ({duration})" if duration else "") + f", initialized {init_times[i]:{fmt}}, "
        f"valid {v:{fmt}} ({k + 1}/{indices.size})"
        for k, (i, v) in enumerate(zip(indices, valid, strict=True))
    ]
    frames = animation_frames(
        store, stats_ds, staging / predictions_file.FILENAME, indices=indices, lead=lead, batch_size=batch_size
    )
    animation.write_animation(
        staging / animation.FILENAME,
        frames,
        titles=titles,
        variables=inputs.targets,
        units=units,
        ocean=np.asarray(store.mask, dtype=bool),
        lat=np.asarray(store.lat, dtype="float64"),
    )
