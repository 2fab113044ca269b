"""Ensemble step: score a seed ensemble (runs that differ only in ``train.seed``) on the test period.

The ensemble and its members come from the configuration (:mod:`conv2dlstm.config.ensembles`); the
members' forecasts are their evaluate step's ``predictions.nc``. Before any work the step checks that
the files given are exactly the members' and that each was evaluated on this windows store and these
statistics, with the store's test initial times, leads, grid and variables
(:func:`conv2dlstm.evaluation.ensemble.check_members`), and that the MLflow store can be used. The
scores are :func:`conv2dlstm.evaluation.ensemble.score_ensemble`'s, read ``evaluate.batch_size``
initial times at a time.

Outputs in ``out_dir`` (``<outdir>/ensemble/<name>/``, :data:`OUTPUT_FILES`):

- ``metrics.csv``: the evaluate step's columns ``run,model,variable,region,season,lead,metric,value``
  (run: the ensemble's name; the whole grid and test period). Model ``<name>``: the ensemble mean's
  ``rmse``, ``mae``, ``bias``, ``acc`` and ``skill_vs_<baseline>`` with its interval, significance,
  meaningfulness and skill horizon rows, computed as the evaluate step computes a network's, and the
  ensemble's ``crps``, ``spread`` and ``spread_skill_ratio``; the baselines' rows as in each member's
  ``metrics.csv`` and their ``crps`` (a single forecast's: its MAE); model ``<member run>``: each
  member's ``rmse`` and ``crps``;
- ``rank_histogram.csv`` (``variable,lead,rank,count,frequency``) and ``rank_histogram.png``.

``metrics.csv`` is written last, after the old one is removed: a folder without it is an unfinished
result (each file is written atomically). Then the scores are logged into the ensemble's own MLflow
run in the configuration's experiment, named after the ensemble, with the params of its first
member but ``train.seed``, the tags ``ensemble``, ``ensemble.members``, ``ensemble.seeds``,
``ensemble.member_run_ids`` and ``ensemble.member.<run>`` (each member's MLflow run, from its
``predictions.nc``) and the sweep's tags; metrics named as the evaluate step names them
(:func:`conv2dlstm.evaluation.scores.mlflow_metrics`: ``test_rmse_sst_lead1``, ``test_crps_sst_lead1``,
``test_spread_skill_ratio_sst_lead1``, ``skill_vs_persistence_sst_lead1``, a member's
``<run>_rmse_sst_lead1`` and ``<run>_crps_sst_lead1``), the files as artifacts under ``ensemble/``.
The run's id is kept in ``mlflow_run_id.txt`` beside the outputs: a rerun logs into the same run,
skipping the metrics it already holds with the same value.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.artifacts import provenance
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.config.ensembles import Ensemble, ensemble
from conv2dlstm.config.validate import max_lead
from conv2dlstm.errors import DataError
from conv2dlstm.evaluation import plots
from conv2dlstm.evaluation.ensemble import (
    EnsembleResult,
    check_members,
    rank_histogram_figure,
    score_ensemble,
)
from conv2dlstm.evaluation.inference import Horizon
from conv2dlstm.evaluation.scores import mlflow_metrics
from conv2dlstm.fsutil import atomic_output, discard_partials

log = logging.getLogger(__name__)

SPLIT = "test"
COMMIT_MARKER = "metrics.csv"
OUTPUT_FILES: tuple[str, ...] = ("rank_histogram.csv", "rank_histogram.png", COMMIT_MARKER)
"""The outputs, in the order they are written (``metrics.csv`` last)."""
RUN_ID_FILE = "mlflow_run_id.txt"
ARTIFACT_DIR = "ensemble"
MLFLOW_STEP = 0


def open_members(
    spec: Ensemble, predictions: Sequence[Path], stack: contextlib.ExitStack
) -> tuple[dict[str, xr.Dataset], dict[str, Path]]:
    """The members' forecasts, run name -> ``predictions.nc`` opened (closed with ``stack``), and run
    name -> its file, in the order of ``spec.members``; :class:`DataError` unless ``predictions`` are
    exactly one file per member (the run named by its attribute ``run``)."""
    by_run: dict[str, xr.Dataset] = {}
    paths: dict[str, Path] = {}
    for path in map(Path, predictions):
        ds = stack.enter_context(predictions_file.open(path))
        run = str(ds.attrs.get("run", ""))
        if run in by_run:
            raise DataError(f"ensemble {spec.name}: {path} holds the forecasts of run {run!r}, as {paths[run]} does")
        by_run[run], paths[run] = ds, path
    if set(by_run) != set(spec.members):
        raise DataError(
            f"ensemble {spec.name}: the predictions given are those of the run(s) {sorted(by_run)}, its members are "
            f"{list(spec.members)} (runs that differ only in train.seed); give each member's "
            "<outdir>/evaluate/<run>/predictions.nc once"
        )
    return {run: by_run[run] for run in spec.members}, {run: paths[run] for run in spec.members}


def _open_store(cfg: Mapping[str, Any], windows: Path) -> Any:
    """The windows store, read to ``evaluate.max_lead`` as the evaluate step reads it."""
    from conv2dlstm.artifacts.windows_store import WindowsStore

    store: Any = WindowsStore(windows)
    leads = max_lead(cfg)
    if leads > store.lead_steps:
        store = Horizon(store, SPLIT, lead_steps=leads)
    if store.starts(SPLIT).size == 0:
        raise DataError(f"the windows store {windows} has no test window reaching lead {leads}; lengthen splits.test")
    return store


def write_outputs(result: EnsembleResult, out_dir: Path, *, title: str, lead_step: Any) -> None:
    """``rank_histogram.csv``, ``rank_histogram.png``, then ``metrics.csv`` (the old one removed first),
    each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMMIT_MARKER).unlink(missing_ok=True)
    with atomic_output(out_dir / "rank_histogram.csv") as tmp:
        result.rank_histogram.to_csv(tmp, index=False)
    rank_histogram_figure(result.rank_histogram, out_dir / "rank_histogram.png", title=title, lead_step=lead_step)
    with atomic_output(out_dir / COMMIT_MARKER) as tmp:
        result.metrics.to_csv(tmp, index=False)


def metrics_to_log(values: Mapping[str, float], logged: Mapping[str, float]) -> dict[str, float]:
    """The metrics of ``values`` whose latest logged value (``logged``) is absent or different."""
    return {
        k: v for k, v in values.items() if k not in logged or not math.isclose(logged[k], v, rel_tol=1e-12, abs_tol=0.0)
    }


def log_ensemble(
    cfg: dict[str, Any], spec: Ensemble, run_ids: Mapping[str, str], out_dir: Path, values: Mapping[str, float]
) -> tuple[str, int]:
    """Log ``values`` and the outputs into the ensemble's MLflow run (module docstring), created on the
    first call and reopened by the id in ``mlflow_run_id.txt`` afterwards. Returns its id and the number
    of metrics logged."""
    from conv2dlstm.config.keys import sweep_tags
    from conv2dlstm.config.validate import run_config
    from conv2dlstm.tracking import store as tracking

    params = run_config(cfg, spec.members[0])
    params["train"].pop("seed", None)
    id_file = out_dir / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.is_file() else ""
    tags = {
        "ensemble": spec.name,
        "ensemble.members": ",".join(spec.members),
        "ensemble.seeds": ",".join(map(str, spec.seeds)),
        "ensemble.member_run_ids": ",".join(run_ids[run] for run in spec.members),
        **{f"ensemble.member.{run}": run_ids[run] for run in spec.members},
        **sweep_tags(cfg),
    }
    with tracking.start_run(params, spec.name, run_id=previous or None, tags=tags) as tracker:
        with atomic_output(id_file) as tmp:
            tmp.write_text(tracker.run_id + "\n")
        new = metrics_to_log(values, tracker.client.get_run(tracker.run_id).data.metrics)
        names = sorted(new)
        for i in range(0, len(names), 500):  # MLflow caps the metrics of one batch request
            tracker.log_metrics({k: new[k] for k in names[i : i + 500]}, step=MLFLOW_STEP)
        for name in OUTPUT_FILES:
            tracker.log_artifact(out_dir / name, artifact_path=ARTIFACT_DIR)
    return tracker.run_id, len(names)


def main(
    cfg: dict[str, Any], *, name: str, predictions: Sequence[Path], windows: Path, stats: Path, out_dir: Path
) -> None:
    """Check the members and inputs, score the ensemble ``name``, write its outputs, then log them."""
    from conv2dlstm.tracking import store as tracking

    windows, stats, out_dir = Path(windows), Path(stats), Path(out_dir)
    for stray in discard_partials(out_dir):
        log.info("ensemble: discarded %s left by an interrupted run", stray)
    spec = ensemble(cfg, name)
    uri = tracking.resolve_tracking_uri(cfg)
    tracking.check_tracking(uri)  # an unusable store fails before the work, not after the outputs
    store = _open_store(cfg, windows)
    targets = [str(v) for v in store.target_variables]
    with contextlib.ExitStack() as stack:
        members, paths = open_members(spec, predictions, stack)
        stats_ds = stack.enter_context(stats_file.open_lazy(stats, targets))
        stats_file.check_grid(stats_ds, store.lat, store.lon, stats_path=stats, data=f"windows store {windows}")
        run_ids = check_members(
            members,
            store,
            variables=targets,
            windows_digest=provenance.from_attrs(store.attrs, where=f"windows store {windows}", step="windows")[
                "digest"
            ],
            stats_digest=provenance.from_attrs(stats_ds.attrs, where=f"statistics file {stats}", step="normalize")[
                "digest"
            ],
            paths=paths,
        )
        nonnegative = [v for v in cfg["variables"]["nonnegative"] if v in targets]
        result = score_ensemble(
            members,
            store,
            stats_ds,
            name=name,
            batch_size=int(cfg["evaluate"]["batch_size"]),
            nonnegative=nonnegative,
        )
        lead_step = plots.lead_step(next(iter(members.values()))["prediction_timedelta"].values)
    init = np.asarray(store.init_times(SPLIT), dtype="datetime64[D]")
    write_outputs(
        result,
        out_dir,
        title=f"seed ensemble {name} ({len(spec.members)} members: {', '.join(spec.members)}): rank of the truth among "
        f"the members over ocean cells, test initial times {init.min()}..{init.max()}",
        lead_step=lead_step,
    )
    log.info("wrote %s", ", ".join(str(out_dir / f) for f in OUTPUT_FILES))
    run_id, logged = log_ensemble(cfg, spec, run_ids, out_dir, mlflow_metrics(result.metrics, model_name=name))
    log.info("logged %d new metrics and the outputs into MLflow run %s (ensemble %s)", logged, run_id, name)
