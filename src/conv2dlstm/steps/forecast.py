"""Forecast step: a trained model's forecast from the latest input days, as CF netCDF and Zarr.

``python -m conv2dlstm forecast`` (rule ``forecast`` / ``forecast_date``, :func:`main`):

1. The model (:func:`resolve_model`), in this order: a checkpoint file (``--checkpoint``); the
   checkpoint of an MLflow run (``--run-id``: its artifact ``checkpoints/best.pt``); else the
   experiment's registered best model, ``models:/<experiment>@champion`` (the checkpoint artifact
   of that version's run); when the experiment has no champion (e.g. ``mlflow.log_model: false``,
   which registers nothing), the ``model.pt`` of the configuration's only run, with a warning.
   Whichever it is, the network is rebuilt from that checkpoint through the project's weights-only
   loader (:func:`conv2dlstm.training.models.load_model`: ``torch.load(weights_only=True)``), never
   from MLflow's pickled model (``mlflow.pytorch.load_model``), whose unpickling runs whatever code
   the store holds.
2. Its inputs: the initial date is ``--init-date`` or ``source.end`` (the last day of the
   configured data: set it, or give the date, for an operational forecast). The days
   ``init - (input_steps - 1) .. init`` are fetched through the configured source kind
   (:func:`conv2dlstm.data.fetching.fetch_source` with ``source.start``/``end`` set to those days, into
   ``--work-dir``), opened with the same checks and unit conversions
   (:func:`conv2dlstm.data.sources.open_sources`), harmonized and regridded by the regrid step's code
   (:func:`conv2dlstm.data.regridding.regrid_dataset`), and normalized by the windows step's code
   (:func:`conv2dlstm.artifacts.stats.normalized_cube`) with the statistics file of the model's own run:
   the statistics given (``--stats``) must have the provenance digest recorded in the checkpoint,
   they are never refitted. The last ``input_steps`` time steps are the inputs; they must be
   equally spaced and the last one must fall on the initial date.
3. The prediction is made (one window, as the evaluate step does:
   :func:`conv2dlstm.evaluation.inference.predict_batch`), converted back to physical units and clipped at 0
   for the model's nonnegative targets exactly as in evaluate, so that forecasting an initial time
   of the test period reproduces the evaluate step's ``predictions.nc`` for it.

Refusals (:class:`conv2dlstm.errors.DataError`, nothing written), each naming what differs and the
fix: a model trained on other variables than ``variables.inputs``/``targets``; a model whose data
settings (the regrid step's keys but the period: ``harmonize.*``, ``region.*``, ``grid.*``,
``variables.*``) differ from the configuration's; statistics of another digest than the model's;
statistics, model or regridded inputs on another grid; missing input days.

Output (the layout WeatherBench 2 tools read, and the evaluate step's ``predictions.nc``: one
reader, :func:`conv2dlstm.artifacts.predictions.open`, opens both; CF-1.8): one float32 variable per
target, dims ``(time, prediction_timedelta, latitude, longitude)``, with ``time`` the initial time
(``forecast_reference_time``), ``prediction_timedelta`` the lead as a timedelta
(``forecast_period``), ``valid_time(time, prediction_timedelta)``, ``units``, ``standard_name`` and
``long_name`` per variable, and global attributes naming the model (``model_run_id``,
``model_name``, ``checkpoint``, ``checkpoint_digest``), the inputs (``stats_digest``,
``input_manifest_sha256``, ``input_period``), a ``provenance`` record (step ``forecast``, inputs
``checkpoint``, ``stats``, ``manifest``) and ``format_version``. Written atomically as netCDF
(``--out-nc``) and as a Zarr v2 store with consolidated metadata (``--out-zarr``), which
``xarray.open_zarr`` and the WeatherBench 2 evaluation read as a forecast dataset. Memory: the
``input_steps`` days of the inputs and one forecast.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm import __version__
from conv2dlstm.artifacts import digests, provenance
from conv2dlstm.artifacts import manifest as manifest_file
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.config import keys
from conv2dlstm.errors import DataError, TrackingError

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
"""Where the train step logs the best checkpoint in its MLflow run."""
DATA_STEPS = ("regrid",)
"""Steps whose configuration keys (but the period) must be those the model was trained with: how the
data are harmonized, cut and regridded. The fetch-only keys (URL, retries, ...) may differ: a model
trained on an archive can forecast from a near-real-time feed of the same data."""
PERIOD_KEYS = ("source.start", "source.end")


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: its checkpoint file, its MLflow run id (may be empty) and how it was chosen."""

    checkpoint: Path
    run_id: str
    how: str


# --------------------------------------------------------------------------------------------------
# The model


def _download_checkpoint(uri: str, run_id: str, work_dir: Path) -> Path:
    """The checkpoint artifact of MLflow run ``run_id``, downloaded into ``work_dir/models/<run_id>/``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    dest = work_dir / "models" / run_id
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = MlflowClient(uri).download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(dest))
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"MLflow run {run_id} in {uri} has no artifact {CHECKPOINT_ARTIFACT} ({exc}); give a run trained by "
            "this pipeline (--run-id), or the checkpoint file itself (--checkpoint)"
        ) from exc
    return Path(path)


def champion_run(uri: str, experiment: str) -> str | None:
    """The run id of ``models:/<experiment>@champion``, or None when the experiment registered none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        version = MlflowClient(uri).get_model_version_by_alias(experiment, CHAMPION_ALIAS)
    except MlflowException:
        return None
    return str(version.run_id or "") or None


def _local_model(cfg: Mapping[str, Any]) -> Path | None:
    """``<outdir>/train/<run>/model.pt`` of the configuration's only run, when it exists."""
    from conv2dlstm.config.runs import run_names

    names = run_names(dict(cfg))
    if len(names) != 1:
        return None
    path = Path(cfg["outdir"]) / "train" / names[0] / "model.pt"
    return path if path.is_file() else None


def resolve_model(
    cfg: Mapping[str, Any], *, checkpoint: Path | None, run_id: str | None, work_dir: Path
) -> ModelSource:
    """The model to forecast with (module docstring, step 1)."""
    from conv2dlstm.tracking import store as tracking

    if checkpoint is not None:
        return ModelSource(Path(checkpoint), "", f"checkpoint {checkpoint}")
    uri = tracking.resolve_tracking_uri(dict(cfg))
    if run_id:
        return ModelSource(_download_checkpoint(uri, run_id, work_dir), run_id, f"MLflow run {run_id}")
    experiment = str(cfg["experiment"])
    champion = champion_run(uri, experiment)
    if champion:
        path = _download_checkpoint(uri, champion, work_dir)
        return ModelSource(path, champion, f"models:/{experiment}@{CHAMPION_ALIAS} (run {champion})")
    local = _local_model(cfg)
    if local is None:
        raise TrackingError(
            f"the experiment {experiment!r} in {uri} has no registered model with the alias {CHAMPION_ALIAS!r} "
            "(the compare step registers it when mlflow.log_model is true) and the configuration has no single "
            "trained run; give the model with --run-id <MLflow run id> or --checkpoint <model.pt>"
        )
    log.warning(
        "forecast: the experiment %r has no models:/%s@%s; using the configuration's run %s",
        experiment,
        experiment,
        CHAMPION_ALIAS,
        local,
    )
    return ModelSource(local, "", f"{local} (no champion registered)")


# --------------------------------------------------------------------------------------------------
# Checks: the model against the configuration and the statistics


def _flat_values(cfg: Mapping[str, Any], steps: Sequence[str]) -> dict[str, Any]:
    """``key -> value`` of the keys that determine ``steps`` under ``cfg``, but the period; a key the
    configuration lacks (an older version's) is ``"(absent)"``."""
    out: dict[str, Any] = {}
    for spec in keys.key_specs():
        if spec.name in PERIOD_KEYS or spec.output_path:
            continue
        try:
            if not any(spec.determines(step, dict(cfg)) for step in steps):
                continue
            out[spec.name] = keys.get(dict(cfg), spec.name)
        except KeyError:
            out[spec.name] = "(absent)"
    return out


def model_problems(ckpt: Mapping[str, Any], cfg: Mapping[str, Any]) -> list[str]:
    """What makes the checkpoint's model unfit for the configuration's inputs (empty when it fits):
    other input or target variables, or other data settings (:data:`DATA_STEPS` keys, the period
    aside) than those it was trained with."""
    problems = []
    for key, wanted in (
        ("input_variables", cfg["variables"]["inputs"]),
        ("target_variables", cfg["variables"]["targets"]),
    ):
        trained = [str(v) for v in ckpt.get(key) or []]
        if trained != list(wanted):
            name = "variables.inputs" if key == "input_variables" else "variables.targets"
            problems.append(f"it was trained with {key} {trained} but {name} is {list(wanted)}")
    trained_cfg = ckpt.get("config")
    if isinstance(trained_cfg, Mapping):
        old, new = _flat_values(trained_cfg, DATA_STEPS), _flat_values(cfg, DATA_STEPS)
        changed = [
            f"{k}: {json.dumps(old.get(k, '(absent)'), default=str)} -> "
            f"{json.dumps(new.get(k, '(absent)'), default=str)}"
            for k in sorted(set(old) | set(new))
            if old.get(k, "(absent)") != new.get(k, "(absent)") and not k.startswith("variables.")
        ]
        if changed:
            problems.append("its data were harmonized or regridded with other settings (" + "; ".join(changed) + ")")
    return problems


def check_stats(ckpt: Mapping[str, Any], stats: Path, *, checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's provenance record, after checking that ``stats`` is its run's statistics file."""
    record = provenance.from_checkpoint(ckpt, where=f"checkpoint {checkpoint}")
    given = digests.digest_of(stats)
    trained = record["inputs"].get("stats")
    if given != trained:
        raise DataError(
            f"the statistics {stats} (provenance digest {given}) are not those the model of {checkpoint} was "
            f"normalized with (digest {trained}); give the statistics file of the model's own run with --stats "
            "(its normalize output), never refitted ones"
        )
    return record


def _axis(values: np.ndarray) -> str:
    values = np.asarray(values, dtype="float64")
    return f"{values.size} cells {values.min():g}..{values.max():g}" if values.size else "no cells"


def check_grid(what: str, lat: np.ndarray, lon: np.ndarray, stats: xr.Dataset, *, stats_path: Path) -> None:
    """:class:`DataError` naming both grids unless ``lat``/``lon`` are the statistics' (the model's) grid."""
    for name, values in (("lat", lat), ("lon", lon)):
        ref = np.asarray(stats[name].values, dtype="float64")
        values = np.asarray(values, dtype="float64")
        if values.shape != ref.shape or not np.allclose(values, ref, rtol=0, atol=stats_file.GRID_ATOL):
            raise DataError(
                f"{what} has {name} {_axis(values)} but the model's grid (statistics {stats_path}) has {_axis(ref)}; "
                f"forecast on the grid the model was trained on (config grid.{name})"
            )


# --------------------------------------------------------------------------------------------------
# The inputs


def initial_date(value: str | None, cfg: Mapping[str, Any]) -> pd.Timestamp:
    """The initial date: ``--init-date`` (YYYY-MM-DD) or ``source.end``."""
    text = value or str(cfg["source"]["end"])
    try:
        return pd.Timestamp(text).normalize()
    except (ValueError, TypeError) as exc:
        raise DataError(f"--init-date {text!r} is not a date; write it as YYYY-MM-DD") from exc


def period_config(cfg: Mapping[str, Any], start: pd.Timestamp, end: pd.Timestamp) -> dict[str, Any]:
    """``cfg`` with ``source.start``/``end`` set to the days ``start..end`` (the forecast's inputs)."""
    out = copy.deepcopy(dict(cfg))
    out["source"]["start"], out["source"]["end"] = f"{start:%Y-%m-%d}", f"{end:%Y-%m-%d}"
    return out


def regridded_inputs(cfg: Mapping[str, Any], raw_dir: Path) -> tuple[xr.Dataset, Path]:
    """Fetch ``cfg``'s source period into ``raw_dir`` and regrid it as the regrid step does; loaded."""
    from conv2dlstm.data import checks, fetching, regridding
    from conv2dlstm.data.sources import open_sources

    manifest = fetching.fetch_source(dict(cfg), out_dir=raw_dir)
    sources = open_sources(manifest, rules=checks.SourceRules.from_config(cfg))
    ds = regridding.regrid_dataset(sources.dataset, cfg).load()
    return ds, manifest


def last_steps(ds: xr.Dataset, n: int, init: pd.Timestamp) -> xr.Dataset:
    """The last ``n`` time steps of ``ds``, equally spaced, the last on the day ``init``; else :class:`DataError`."""
    times = pd.DatetimeIndex(ds["time"].values)
    if times.size < n or times[-1].normalize() != init:
        have = ", ".join(f"{t:%Y-%m-%d}" for t in times) or "none"
        raise DataError(
            f"the forecast needs {n} time steps ending on {init:%Y-%m-%d} (windows.input_steps of the model); the "
            f"source has {times.size} in those days ({have}); give an --init-date with data (or fix source.end)"
        )
    out = ds.isel(time=slice(times.size - n, times.size))
    steps = np.unique(np.diff(out["time"].values))
    if steps.size > 1:
        raise DataError(
            f"the input time steps {[str(t)[:16] for t in out['time'].values]} are not equally spaced (a gap in the "
            "source); give an --init-date whose input days are complete"
        )
    return out


# --------------------------------------------------------------------------------------------------
# The output


def forecast_dataset(forecast: xr.DataArray, *, units: Mapping[str, str], attrs: Mapping[str, Any]) -> xr.Dataset:
    """The WeatherBench 2 / CF layout of a ``(time, lead, variable, lat, lon)`` forecast (module docstring),
    the evaluate step's (:mod:`conv2dlstm.artifacts.predictions`): the same dims, coordinates, attributes
    and ``format_version``."""
    from conv2dlstm.artifacts import predictions

    lead_time = np.asarray(forecast["lead_time"].values, dtype="timedelta64[ns]")
    data_vars = {}
    for variable in map(str, forecast["variable"].values):
        da = forecast.sel(variable=variable, drop=True).astype("float32")
        da = da.drop_vars([c for c in da.coords if c not in ("time", "lat", "lon")])
        da = da.rename(lead="prediction_timedelta", lat="latitude", lon="longitude")
        da.attrs = predictions.variable_attrs(variable, units)
        data_vars[variable] = da
    ds = xr.Dataset(data_vars).assign_coords(prediction_timedelta=lead_time)
    ds = ds.assign_coords(valid_time=ds["time"] + ds["prediction_timedelta"])
    for name, coord_attrs in predictions.COORD_ATTRS.items():
        ds[name].attrs = dict(coord_attrs)
    ds.attrs = {
        "Conventions": "CF-1.8",
        "title": "conv2dlstm forecast",
        "source": f"conv2dlstm {__version__}",
        "history": f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} conv2dlstm forecast",
        **attrs,
        "format_version": predictions.FORMAT_VERSION,
    }
    return ds


def write_outputs(ds: xr.Dataset, *, out_nc: Path, out_zarr: Path) -> None:
    """Write ``ds`` as netCDF4 and as a Zarr v2 store (consolidated metadata), each atomically, encoded
    as the evaluate step's outputs (:func:`conv2dlstm.artifacts.predictions.encoding`)."""
    import warnings

    from conv2dlstm.artifacts.predictions import encoding
    from conv2dlstm.fsutil import atomic_output

    with atomic_output(out_nc) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding(ds, netcdf=True))
    with atomic_output(out_zarr) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Zarr format 2.*")
        ds.to_zarr(tmp, mode="w", zarr_format=2, consolidated=True, encoding=encoding(ds, netcdf=False))


def forecast_digest(record_inputs: Mapping[str, str], data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The forecast's provenance record: step ``forecast``, the digest of its data configuration
    (the fetch and regrid keys with the forecast's period) and its inputs' digests."""
    config_digest = hashlib.sha256(json.dumps(data_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    inputs = {name: str(record_inputs[name]) for name in sorted(record_inputs)}
    return {
        "step": "forecast",
        "config_digest": config_digest,
        "inputs": inputs,
        "digest": provenance.record_digest("forecast", config_digest, inputs),
    }


# --------------------------------------------------------------------------------------------------
# Entry point


def default_work_dir(cfg: Mapping[str, Any]) -> Path:
    """``<resources_dir>/forecast/<name>``: the forecast's fetched inputs and downloaded checkpoints."""
    return Path(cfg["resources_dir"]) / "forecast" / str(cfg["name"])


@dataclass(frozen=True)
class _Model:
    """A forecast's model, checked against the configuration and the statistics (:func:`_checked_model`)."""

    net: Any  # the torch module, in eval mode on the CPU (conv2dlstm.training.models.load_model)
    ckpt: dict[str, Any]  # its checkpoint
    source: ModelSource
    record: dict[str, Any]  # the checkpoint's provenance record

    @property
    def inputs(self) -> list[str]:
        return [str(v) for v in self.ckpt["input_variables"]]

    @property
    def targets(self) -> list[str]:
        return [str(v) for v in self.ckpt["target_variables"]]

    @property
    def input_steps(self) -> int:
        return int(self.ckpt["model_kwargs"]["input_steps"])

    @property
    def lead_steps(self) -> int:
        return int(self.ckpt["model_kwargs"]["lead_steps"])

    @property
    def run_id(self) -> str:
        """Its MLflow run: the source's, else the one the checkpoint records (may be empty)."""
        return self.source.run_id or str(self.ckpt.get("mlflow_run_id") or "")


def main(
    cfg: dict[str, Any],
    *,
    stats: Path,
    out_nc: Path,
    out_zarr: Path,
    work_dir: Path | None = None,
    checkpoint: Path | None = None,
    run_id: str | None = None,
    init_date: str | None = None,
) -> xr.Dataset:
    """Forecast from the days ending on ``init_date`` (default ``source.end``) and write ``out_nc`` and ``out_zarr``.

    ``work_dir`` (default ``<resources_dir>/forecast/<name>``) holds the fetched input files and
    downloaded checkpoints. Returns the dataset written.
    """
    from conv2dlstm.fsutil import discard_partials

    stats, out_nc, out_zarr = Path(stats), Path(out_nc), Path(out_zarr)
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(cfg)
    for output in (out_nc, out_zarr):
        for stray in discard_partials(output.parent, of=output.name):
            log.info("forecast: discarded %s left by an interrupted run", stray)
    init = initial_date(init_date, cfg)
    model = _checked_model(cfg, stats=stats, checkpoint=checkpoint, run_id=run_id, work_dir=work_dir)
    stats64 = stats_file.load(stats)
    _check_model_grid(cfg, model, stats64, stats_path=stats)

    period, ds, manifest = _inputs(cfg, model, init, stats64, stats_path=stats, work_dir=work_dir)
    pred = _predict(cfg, model, ds, stats64)
    manifest_digest = manifest_file.read_digest(manifest)
    record_out = forecast_digest(
        {"checkpoint": model.record["digest"], "stats": model.record["inputs"]["stats"], "manifest": manifest_digest},
        {step_: keys.result_config(period, step_) for step_ in ("fetch", "regrid")},
    )
    physical, units = _physical(pred, model, ds, stats64, stats_path=stats)
    out = forecast_dataset(physical, units=units, attrs=_attrs(model, ds, manifest_digest, record_out))
    write_outputs(out, out_nc=out_nc, out_zarr=out_zarr)
    log.info(
        "forecast: %s initialized %s, leads %s -> %s, %s (provenance %s)",
        ", ".join(model.targets),
        out.attrs["initial_time"],
        ", ".join(str(pd.Timedelta(t)) for t in out["prediction_timedelta"].values),
        out_nc,
        out_zarr,
        record_out["digest"],
    )
    return out


def _checked_model(
    cfg: Mapping[str, Any], *, stats: Path, checkpoint: Path | None, run_id: str | None, work_dir: Path
) -> _Model:
    """The model to forecast with (:func:`resolve_model`), loaded, once it fits the configuration's
    inputs (:func:`model_problems`) and ``stats`` are its run's statistics (:func:`check_stats`); else
    :class:`DataError`."""
    from conv2dlstm.training import models

    source = resolve_model(cfg, checkpoint=checkpoint, run_id=run_id, work_dir=work_dir)
    net, ckpt = models.load_model(source.checkpoint)
    problems = model_problems(ckpt, cfg)
    if problems:
        raise DataError(
            f"the model of {source.how} does not fit this configuration's inputs: {'; '.join(problems)}; forecast "
            "with the configuration it was trained with, or choose another model (--run-id, --checkpoint)"
        )
    record = check_stats(ckpt, stats, checkpoint=source.checkpoint)
    return _Model(net, ckpt, source, record)


def _check_model_grid(cfg: Mapping[str, Any], model: _Model, stats64: xr.Dataset, *, stats_path: Path) -> None:
    """:class:`DataError` unless the model's grid size is that of its statistics ``stats64`` and the
    configured grid is theirs."""
    from conv2dlstm.data.regridding import target_grid

    kwargs = model.ckpt["model_kwargs"]
    if (int(kwargs["height"]), int(kwargs["width"])) != (stats64.sizes["lat"], stats64.sizes["lon"]):
        raise DataError(
            f"the model of {model.source.how} predicts a {kwargs['height']}x{kwargs['width']} grid but its statistics "
            f"{stats_path} are on {stats64.sizes['lat']}x{stats64.sizes['lon']}; give the statistics of its run"
        )
    grid = target_grid(cfg["grid"])
    check_grid(
        "the configured grid (grid.lat, grid.lon)",
        grid["lat"].values,
        grid["lon"].values,
        stats64,
        stats_path=stats_path,
    )


def _inputs(
    cfg: Mapping[str, Any], model: _Model, init: pd.Timestamp, stats64: xr.Dataset, *, stats_path: Path, work_dir: Path
) -> tuple[dict[str, Any], xr.Dataset, Path]:
    """The forecast's inputs: the configuration of their period (the model's ``input_steps`` days ending
    on ``init``), its last ``input_steps`` time steps, fetched into ``work_dir/<init>`` and regridded
    (:func:`regridded_inputs`, :func:`last_steps`) on the statistics' grid, and their manifest."""
    n_in = model.input_steps
    start = init - pd.Timedelta(days=n_in - 1)
    period = period_config(cfg, start, init)
    raw_dir = work_dir / f"{init:%Y-%m-%d}"
    log.info(
        "forecast: model %s; inputs %s..%s (%d steps) fetched into %s",
        model.source.how,
        f"{start:%Y-%m-%d}",
        f"{init:%Y-%m-%d}",
        n_in,
        raw_dir,
    )
    from conv2dlstm.data.download import MissingUpstreamError
    from conv2dlstm.errors import DownloadError
    from conv2dlstm.fsutil import exception_chain

    try:
        ds, manifest = regridded_inputs(period, raw_dir)
    except DownloadError as exc:
        missing = next((e for e in exception_chain(exc) if isinstance(e, MissingUpstreamError)), None)
        if missing is None:
            raise
        what = str(missing).split("; ")[0]  # the file and why, without the advice meant for the fetch step
        raise DataError(
            f"the forecast initialized {init:%Y-%m-%d} needs the {n_in} input days {start:%Y-%m-%d}..{init:%Y-%m-%d} "
            f"(the model's windows.input_steps), and the source lacks one of them ({what}); give an --init-date "
            "whose input days all exist upstream"
        ) from exc
    check_grid("the regridded input", ds["lat"].values, ds["lon"].values, stats64, stats_path=stats_path)
    return period, last_steps(ds, n_in, init), manifest


def _predict(cfg: Mapping[str, Any], model: _Model, ds: xr.Dataset, stats64: xr.Dataset) -> np.ndarray:
    """The model's normalized prediction ``(1, leads, C_out, H, W)`` from the inputs ``ds``, normalized
    with the statistics ``stats64`` (a missing ocean value enters as 0, with a warning), on
    ``train.device``; ``leads`` is ``evaluate.max_lead`` (0: the network's own leads), reached by
    rolling the network out on its own outputs as the evaluate step does
    (:func:`conv2dlstm.evaluation.inference.predict_batch`)."""
    from conv2dlstm.evaluation import inference
    from conv2dlstm.training.devices import resolve_device

    inputs = model.inputs
    x = stats_file.normalized_cube(ds, stats64, inputs).values  # (T_in, C_in, H, W) float32, land 0
    missing = int((ds[inputs].to_dataarray("variable").isnull() & stats64["mask"]).sum())
    if missing:
        log.warning(
            "forecast: %d ocean values of the inputs are missing; they enter the model as the training "
            "mean (0 normalized)",
            missing,
        )
    device = resolve_device(cfg["train"]["device"])
    leads = int(cfg["evaluate"]["max_lead"]) or model.lead_steps  # evaluate's horizon (config evaluate.max_lead)
    feedback = inference.feedback_channels(inputs, model.targets) if leads > model.lead_steps else None
    ocean = np.asarray(stats64["mask"].values, dtype=bool)
    return inference.predict_batch(  # (1, leads, C_out, H, W), rolled out past the trained leads as evaluate does
        model.net.to(device).eval(), x[None], device=device, leads=leads, feedback=feedback, ocean=ocean
    )


def _initial_time(ds: xr.Dataset) -> np.ndarray:
    """The forecast's initial time, the last time step of its inputs ``ds``, as a ``(1,)`` datetime64[ns] array."""
    return np.asarray(ds["time"].values[-1:], dtype="datetime64[ns]")


def _physical(
    pred: np.ndarray, model: _Model, ds: xr.Dataset, stats64: xr.Dataset, *, stats_path: Path
) -> tuple[xr.DataArray, Mapping[str, str]]:
    """The prediction ``pred`` of the inputs ``ds`` in physical units, ``(time, lead, variable, lat, lon)``
    (leads at the inputs' time step, NaN on land, the model's nonnegative targets clipped at 0), and the
    targets' units."""
    from conv2dlstm.evaluation import inference

    targets = model.targets
    init_time = _initial_time(ds)
    step = (np.diff(ds["time"].values)[0] if model.input_steps > 1 else np.timedelta64(1, "D")).astype(
        "timedelta64[ns]"
    )
    valid = init_time[:, None] + step * np.arange(1, pred.shape[1] + 1)[None, :]  # (1, leads)
    mask = xr.DataArray(
        np.asarray(stats64["mask"].values, dtype=bool),
        dims=("lat", "lon"),
        coords={"lat": stats64["lat"].values, "lon": stats64["lon"].values},
    )
    with stats_file.open_lazy(stats_path, targets) as stats32:
        physical = inference.physical(
            inference.forecast_array(
                pred,
                init_times=init_time,
                valid_times=valid,
                variables=targets,
                lat=mask["lat"].values,
                lon=mask["lon"].values,
                name="forecast",
            ),
            stats32,
            mask,
        )
        physical = inference.clip_nonnegative(physical, inference.nonnegative_targets(model.ckpt))
        units = stats_file.units(stats32)
    return physical, units


def _attrs(model: _Model, ds: xr.Dataset, manifest_digest: str, record: dict[str, Any]) -> dict[str, Any]:
    """The forecast's global attributes but the CF ones (module docstring); ``record`` its provenance."""
    init_time = _initial_time(ds)
    return {
        "model_name": str(model.ckpt.get("model_name", "")),
        "model_run_id": model.run_id,
        "model_source": model.source.how,
        "checkpoint": model.source.checkpoint.name,
        "checkpoint_digest": model.record["digest"],
        "stats_digest": model.record["inputs"]["stats"],
        "input_manifest_sha256": manifest_digest,
        "input_period": f"{pd.Timestamp(ds['time'].values[0]):%Y-%m-%dT%H:%M}.."
        f"{pd.Timestamp(init_time[0]):%Y-%m-%dT%H:%M}",
        "initial_time": f"{pd.Timestamp(init_time[0]):%Y-%m-%dT%H:%M:%S}",
        **provenance.to_attrs(record),
    }
