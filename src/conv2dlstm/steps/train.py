"""Training step: fit one run's network on the windows store, resumable after preemption.

This module is the step: its inputs, a fresh start or a resume, the files of an earlier training,
MLflow, and :func:`main`. The epoch loop is :mod:`conv2dlstm.training.loop` (loss: mean squared error over
ocean cells only, the store's mask, optionally weighted by cos(latitude); AdamW, a per-epoch
learning-rate schedule, gradient clipping, early stopping on the validation loss); stopping on a
signal or at the job's deadline is :mod:`conv2dlstm.training.preemption`; the checkpoint files are
:mod:`conv2dlstm.artifacts.checkpoint`.

Outputs in ``out_dir`` (checkpoint layout in ``docs/architecture.md``):

- ``last.pt`` - the complete training state at the end of the last finished epoch (written before
  the first epoch too), so it is always the state at the start of the current epoch;
- ``best.pt`` - the checkpoint of the epoch with the lowest validation loss;
- ``history.csv`` - one row per epoch; ``mlflow_run_id.txt``; ``model_summary.txt``;
- ``model.pt`` - a copy of ``best.pt`` written last: the run is complete.

Provenance: every checkpoint records the provenance of the run (:mod:`conv2dlstm.artifacts.provenance`: the
result configuration of the train step and the provenance digests of the windows store and the
statistics) and the result configuration itself. :func:`main` resumes only from a ``last.pt`` whose
provenance digest is the one the current configuration and inputs give; otherwise it logs a warning
naming what differs (changed config keys with old -> new values, changed inputs), moves the stale
files (:data:`RUN_FILES`) into ``out_dir/stale/<UTC timestamp>/`` and trains from scratch in a new
MLflow run, tagging the old one ``superseded=true``, ``superseded_by=<new run id>``.

Preemption: SIGTERM or SIGUSR1 sets a flag; at the next batch boundary training stops and
:class:`TrainingInterrupted` (a ``SystemExit`` with status 128 + signal) ends the process, after a
warning naming the signal (or the job's time limit) and the epoch a rerun resumes after. ``last.pt``
then holds the state at the start of the interrupted epoch, so calling :func:`main` again with the
same ``out_dir`` repeats that epoch with the same shuffled order and random state: on the CPU the
resumed run ends with exactly the weights of an uninterrupted one. A complete run (``model.pt`` and
a finished ``last.pt`` of the same provenance digest) returns at once.

Tracking: one MLflow run per training (:mod:`conv2dlstm.tracking.store`), tagged with the run name, the
provenance digests, the git commit, the SLURM job and the sweep. A tracking store that fails during
training never stops it: an epoch's metrics that cannot be sent are kept and sent with the next
epoch's (``history.csv`` and every checkpoint hold them too). At the end the pending metrics, the
model, ``best.pt``, ``history.csv`` and ``model_summary.txt`` must reach the store, each retried for
the wait budget (``CONV2DLSTM_MLFLOW_WAIT_S``); if they cannot, :class:`TrackingError` ends the step
before ``model.pt`` is written, and a rerun resumes after the last epoch, trains no further, logs the
epochs the run lacks (:meth:`conv2dlstm.tracking.store.Tracker.backfill`) and the rest.

Data-parallel training (``train.gpus > 1``, see :mod:`conv2dlstm.training.distributed`): the train rule
starts ``python -m conv2dlstm train`` as ``train.gpus`` torchrun workers, one per GPU (on the CPU:
that many gloo processes); started outside torchrun, :func:`main` stops at once naming the torchrun
command. Every worker draws the same seeded shuffled order
and takes its share of each global batch (:func:`conv2dlstm.training.dataset.shard_batches`), so a step sees the
windows of one single-process step and, with the loss scaled as in :func:`conv2dlstm.training.loop.share_loss`, applies
the same gradient up to float rounding. Validation sums are all-reduced, so learning-rate schedule
and early stopping agree on every rank. Rank 0 alone logs to MLflow and writes files; the stop
flag of a signal is all-reduced at every batch boundary, so all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from conv2dlstm import openmp_waiting
from conv2dlstm.artifacts import checkpoint, provenance
from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.config import keys
from conv2dlstm.config.runs import flatten
from conv2dlstm.errors import ConfigError, DataError, TrackingError
from conv2dlstm.fsutil import atomic_output, discard_partials, sha256_file
from conv2dlstm.tracking import store as tracking
from conv2dlstm.training import distributed, models
from conv2dlstm.training.dataset import InMemoryWindows
from conv2dlstm.training.devices import resolve_device
from conv2dlstm.training.hostmemory import retain_freed_memory
from conv2dlstm.training.loop import (
    Loop,
    Progress,
    data_source,
    deterministic,
    fit,
    loss_weights,
    make_scheduler,
    rng_state,
    seed_everything,
    set_rng_state,
)
from conv2dlstm.training.models import OutputFloor, build_model, count_parameters, model_kwargs_from_config
from conv2dlstm.training.preemption import (
    StopFlag,
    TrainingInterrupted,
    arm_deadline,
    ignore_stop_signals,
    stop_on_signals,
)

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "samples_per_s", "seconds")
RUN_FILES = (*checkpoint.NAMES, "history.csv", "mlflow_run_id.txt", "model_summary.txt")
"""The files of a run in ``out_dir``; a fresh start moves those present into :data:`STALE_DIR`."""
EPOCH_METRICS = ("train_loss", "val_loss", "lr", "samples_per_s")
"""The per-epoch MLflow metrics (step = epoch); ``history.csv`` and every checkpoint hold them too."""
STALE_DIR = "stale"
"""Folder of ``out_dir`` that keeps the files of superseded trainings, one ``<UTC timestamp>`` folder each."""
RUN_ID_FILE = "mlflow_run_id.txt"


# ----------------------------------------------------------------------------------------------
# Pieces of the step
# ----------------------------------------------------------------------------------------------


def model_summary(model: nn.Module, name: str, kwargs: dict[str, Any], store: WindowsStore) -> str:
    """Readable description: architecture, shapes, parameter counts per module."""
    h, w = store.shape
    lines = [
        f"model: {name}",
        f"model_kwargs: {json.dumps(kwargs, sort_keys=True)}",
        f"parameters: {count_parameters(model):,}",
        f"input  x: (batch, {store.input_steps}, {len(store.input_variables)}, {h}, {w})"
        f"  (batch, time, channel, lat, lon) variables {store.input_variables}",
        f"output y: (batch, {store.lead_steps}, {len(store.target_variables)}, {h}, {w})"
        f"  variables {store.target_variables}",
        "",
        "parameters per module:",
    ]
    for mod_name, module in model.named_children():
        lines.append(f"  {mod_name}: {count_parameters(module):,}")
    lines += ["", repr(model), ""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """``history.csv``: one row per epoch with :data:`HISTORY_COLUMNS`."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


def train_record(
    cfg: dict[str, Any], windows: Path, stats: Path, *, windows_attrs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The provenance record of training with ``cfg`` on the windows store ``windows`` (whose
    attributes may be given when already open) and the statistics ``stats``."""
    windows = Path(windows)
    if windows_attrs is None:
        store_record = provenance.read_zarr(windows, step="windows")
    else:
        store_record = provenance.from_attrs(windows_attrs, where=f"windows store {windows}", step="windows")
    inputs = {"windows": store_record["digest"], "stats": provenance.read_netcdf(stats, step="normalize")["digest"]}
    return provenance.for_step(cfg, "train", inputs)


def is_complete(out_dir: Path, digest: str) -> bool:
    """A run is complete when ``last.pt`` says finished and ``last.pt`` and ``model.pt`` both record
    the provenance ``digest`` (that of the current configuration and inputs)."""
    last, model = out_dir / checkpoint.LAST, out_dir / checkpoint.MODEL
    if not (model.is_file() and last.is_file()):
        return False
    try:
        state = checkpoint.load(last, mmap=True)
        if not state["finished"] or checkpoint.digest(state) != digest:
            return False
        return checkpoint.digest(checkpoint.load(model, mmap=True)) == digest
    except checkpoint.IncompatibleCheckpoint:
        return False


def resume_problems(
    ckpt: dict[str, Any],
    expected: dict[str, Any],
    *,
    result_config: dict[str, Any],
    model_name: str,
    model_kwargs: dict[str, Any],
) -> list[str]:
    """Why training cannot resume from the checkpoint ``ckpt`` (the content of ``last.pt``) for the
    provenance record ``expected``: one phrase per difference, empty when it can.

    Changed result config keys are named with their old and new values (from the result
    configuration the checkpoint stores), changed inputs by name with both digests.
    """
    if problem := checkpoint.version_problem(ckpt):
        return [f"it {problem}"]
    try:
        old = provenance.from_checkpoint(ckpt, where="it")
    except DataError as exc:
        return [str(exc).split(";")[0]]
    problems = provenance.differences(
        old, expected, old_config=ckpt.get(provenance.RESULT_CONFIG_KEY), new_config=result_config
    )
    if not problems and (ckpt.get("model_name") != model_name or ckpt.get("model_kwargs") != model_kwargs):
        problems.append(
            f"it holds a {ckpt.get('model_name')} model {ckpt.get('model_kwargs')}, the configuration "
            f"builds {model_name} {model_kwargs}"
        )
    return problems


def stale_folder(out_dir: Path, now: dt.datetime) -> Path:
    """A new folder ``out_dir/stale/<UTC timestamp>`` (``-2``, ``-3``, ... appended when taken)."""
    base = out_dir / STALE_DIR / now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")


def retire_files(out_dir: Path, names: tuple[str, ...] = RUN_FILES, *, now: dt.datetime | None = None) -> Path | None:
    """Move the files ``names`` present in ``out_dir`` into a new :func:`stale_folder`; returns it
    (None when none is present). Nothing is deleted."""
    present = [name for name in names if (out_dir / name).is_file()]
    if not present:
        return None
    folder = stale_folder(out_dir, now or dt.datetime.now(dt.UTC))
    for name in present:
        os.replace(out_dir / name, folder / name)
    return folder


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def check_world_size(tcfg: dict[str, Any], world_size: int, device: torch.device) -> None:
    """Raise :class:`ConfigError` when ``world_size`` processes cannot share ``tcfg`` on ``device``."""
    if world_size <= 1:
        return
    batch = tcfg["batch_size"]
    if batch % world_size:
        nearest = world_size * max(1, round(batch / world_size))
        raise ConfigError(
            f"train.batch_size = {batch} (the global batch) is not divisible by the {world_size} training "
            f"processes (train.gpus = {tcfg['gpus']}); each process takes batch_size / {world_size} windows per "
            f"step: set train.batch_size to a multiple of {world_size}, e.g. {nearest}"
        )
    if device.type == "cuda" and world_size > torch.cuda.device_count():
        raise ConfigError(
            f"train.gpus = {world_size} but only {torch.cuda.device_count()} CUDA devices are visible; set "
            "train.gpus to at most that (and request as many GPUs from the scheduler)"
        )


@dataclass(frozen=True)
class Stale:
    """Files of an earlier training in ``out_dir`` that this one does not continue."""

    reasons: tuple[str, ...]  # what differs, one phrase each
    files: tuple[str, ...]  # the names of RUN_FILES present
    run_id: str | None  # the earlier training's MLflow run


@dataclass
class _Inputs:
    """The checked inputs of a run."""

    store: WindowsStore
    stats_sha: str
    model_name: str
    model_kwargs: dict[str, Any]
    record: dict[str, Any]  # the provenance record of this training
    result_config: dict[str, Any]  # keys.result_config(cfg, "train")
    resume: dict[str, Any] | None  # the content of last.pt, when it can be resumed
    stale: Stale | None  # the files of an earlier training that is not resumed
    output_floor: np.ndarray | None = None  # normalized 0 of the nonnegative targets (models.OutputFloor)


def _read_run_id(out_dir: Path) -> str | None:
    path = out_dir / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def _resume_or_stale(
    out_dir: Path, record: dict[str, Any], result_config: dict[str, Any], model_name: str, model_kwargs: dict[str, Any]
) -> tuple[dict[str, Any] | None, Stale | None]:
    """``(last.pt, None)`` when training resumes from it; ``(None, Stale)`` when files of another
    training are in ``out_dir``; ``(None, None)`` when there are none."""
    last_path = out_dir / checkpoint.LAST
    last: dict[str, Any] | None = None
    if not last_path.is_file():
        reasons = ["there is no last.pt"]
    else:
        try:
            last = checkpoint.load(last_path)
        except checkpoint.IncompatibleCheckpoint as exc:
            last, reasons = exc.checkpoint, [f"it {problem}" for problem in exc.problems]
        except DataError as exc:  # truncated or damaged (a full disk, a kill mid-write): set aside, not fatal
            reasons = [f"it cannot be read ({str(exc).split('; ')[0]})"]
        else:
            reasons = resume_problems(
                last, record, result_config=result_config, model_name=model_name, model_kwargs=model_kwargs
            )
            if not reasons:
                return last, None
    files = tuple(name for name in RUN_FILES if (out_dir / name).is_file())
    if not files:
        return None, None
    recorded = str(last.get("mlflow_run_id") or "") if last is not None else ""
    return None, Stale(tuple(reasons), files, _read_run_id(out_dir) or recorded or None)


def _open_store(windows: Path, stats: Path) -> WindowsStore:
    """The windows store, checked to hold train and val windows, once ``stats`` is known to exist."""
    store = WindowsStore(windows)
    if not Path(stats).is_file():
        raise DataError(f"normalization statistics {stats} do not exist; run the normalize step first")
    for split in ("train", "val"):
        if store.starts(split).size == 0:
            raise DataError(
                f"windows store {store.path} has no {split} windows; lengthen splits.{split} or shorten "
                "windows.input_steps + windows.lead_steps"
            )
    return store


def _open_inputs(cfg: dict[str, Any], *, windows: Path, stats: Path, out_dir: Path) -> _Inputs:
    store = _open_store(windows, stats)
    stats = Path(stats)
    stats_sha = sha256_file(stats)
    if store.attrs.get("stats_sha256") not in (None, stats_sha):
        log.warning("windows store %s was built from other statistics than %s", store.path, stats)
    record = train_record(cfg, store.path, stats, windows_attrs=store.attrs)
    result_config = keys.result_config(cfg, "train")

    model_name = cfg["model"]["name"]
    h, w = store.shape
    model_kwargs = model_kwargs_from_config(
        cfg["model"],
        input_variables=store.input_variables,
        target_variables=store.target_variables,
        input_steps=store.input_steps,
        lead_steps=store.lead_steps,
        height=h,
        width=w,
        nonnegative=cfg["variables"]["nonnegative"],
        floor_per_cell=bool(cfg["normalize"]["per_pixel"]),
    )
    resume, stale = _resume_or_stale(out_dir, record, result_config, model_name, model_kwargs)
    floor = output_floor(stats, store.target_variables, model_kwargs)
    return _Inputs(store, stats_sha, model_name, model_kwargs, record, result_config, resume, stale, floor)


def output_floor(stats: Path, target_variables: list[str], model_kwargs: dict[str, Any]) -> np.ndarray | None:
    """``-mean / std`` of the floored targets (``model_kwargs["nonnegative_channels"]``), ``(K,)`` or
    ``(K, H, W)`` with per-pixel statistics; None when no target is floored."""
    from conv2dlstm.artifacts.stats import load as load_stats
    from conv2dlstm.training.models import floor_from_stats

    channels = model_kwargs.get("nonnegative_channels") or []
    if not channels:
        return None
    names = [target_variables[c] for c in channels]
    st = load_stats(stats)
    mean, std = st["mean"].sel(variable=names), st["std"].sel(variable=names)
    if model_kwargs.get("floor_per_cell") != ("lat" in mean.dims):
        raise DataError(
            f"the statistics {stats} are {'per pixel' if 'lat' in mean.dims else 'per variable'} but "
            "normalize.per_pixel says otherwise; re-run the normalize step with this configuration"
        )
    return floor_from_stats(mean.values, std.values)


def main(
    cfg: dict[str, Any], *, run: str, windows: Path, stats: Path, out_dir: Path, sweep: Mapping[str, str] | None = None
) -> None:
    """Train run ``run`` (``cfg`` is that run's full config) on the windows store; outputs in ``out_dir``.

    ``sweep``: MLflow tags grouping the runs of the whole configuration (:func:`conv2dlstm.config.keys.sweep_tags`),
    set on the run with the provenance tags.

    Resumes from ``out_dir/last.pt`` when it records the provenance digest of this configuration and
    these inputs; otherwise moves the files of the earlier training to ``out_dir/stale/<UTC timestamp>/``
    and starts afresh (module docstring). Returns at once when the run is complete (:func:`is_complete`).

    ``train.gpus > 1`` (data-parallel; :mod:`conv2dlstm.training.distributed`): ``main`` runs in each of the
    ``train.gpus`` processes torchrun starts (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) and trains
    as one rank, on ``cuda:LOCAL_RANK`` or, with ``train.device: cpu`` (or no GPU), as one of
    ``train.gpus`` CPU processes. The global ``train.batch_size`` must be divisible by the number of
    processes. In a plain process it stops at once, before anything is written: after the checks
    of what torchrun would not fix (batch size, devices, that the inputs exist) it raises
    :class:`ConfigError` naming the torchrun command (:func:`conv2dlstm.training.distributed.require_torchrun`).
    """
    tcfg = cfg["train"]
    if tcfg["gpus"] > 1 and not distributed.under_torchrun():
        check_world_size(tcfg, tcfg["gpus"], resolve_device(tcfg["device"]))
        _open_store(windows, stats)
        distributed.require_torchrun(tcfg["gpus"], run)
    out_dir = Path(out_dir)
    if (out_dir / "model.pt").is_file() and is_complete(out_dir, train_record(cfg, windows, stats)["digest"]):
        log.info("run %s is complete in %s; nothing to do", run, out_dir)
        return
    ctx = distributed.Context.from_env()
    if ctx.distributed and tcfg["gpus"] != ctx.world_size:
        log.warning(
            "train.gpus = %d, but torchrun started %d processes; training with %d",
            tcfg["gpus"],
            ctx.world_size,
            ctx.world_size,
        )
    device = resolve_device(tcfg["device"])
    check_world_size(tcfg, ctx.world_size, device)
    if device.type == "cuda":  # deterministic cuBLAS; read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    log.info("host: %d torch thread(s), %s, %s", torch.get_num_threads(), openmp_waiting(), retain_freed_memory())
    uri = None
    if ctx.is_main:  # rank 0 (or the only process); the other ranks never touch MLflow
        uri = tracking.resolve_tracking_uri(cfg)
        tracking.check_tracking(uri)
    inputs = _open_inputs(cfg, windows=windows, stats=stats, out_dir=out_dir)
    if ctx.is_main:
        for stray in discard_partials(out_dir):
            log.info("train: discarded %s left by an interrupted run", stray)
    device = distributed.worker_device(ctx, device)
    with distributed.process_group(ctx, device):
        try:
            _train(cfg, run=run, inputs=inputs, ctx=ctx, device=device, uri=uri, out_dir=out_dir, sweep=sweep)
        except TrainingInterrupted:
            if ctx.distributed:
                # Every rank stopped at the same step. Already stopping, a rank ignores further stop
                # signals (torchrun sends one to the others when the first rank exits), and all leave
                # together once rank 0 has closed its MLflow run.
                ignore_stop_signals()
                distributed.barrier(ctx, device)
            raise


def _train(
    cfg: dict[str, Any],
    *,
    run: str,
    inputs: _Inputs,
    ctx: distributed.Context,
    device: torch.device,
    uri: str | None,
    out_dir: Path,
    sweep: Mapping[str, str] | None = None,
) -> None:
    """The training of :func:`main` in one process (one rank of ``ctx``)."""
    tcfg = cfg["train"]
    last_path = out_dir / checkpoint.LAST
    distributed.barrier(ctx, device)  # every rank has read last.pt before rank 0 writes it again
    if ctx.is_main and inputs.stale is not None:
        _retire(inputs.stale, run=run, out_dir=out_dir)

    with deterministic(), stop_on_signals() as stop:
        left = arm_deadline()
        if left is not None and ctx.is_main:
            log.info("will checkpoint and stop in %.0f s (the job's time limit, less a margin)", left)
        loop, progress = _set_up(tcfg, inputs, run=run, ctx=ctx, device=device, stop=stop, last_path=last_path)
        previous_run_id = _previous_run_id(inputs.resume, out_dir) if ctx.is_main else None
        tracker_cm = _start_tracking(
            cfg, run=run, inputs=inputs, loop=loop, ctx=ctx, device=device, uri=uri, sweep=sweep, run_id=previous_run_id
        )
        with tracker_cm as tracker:
            if ctx.is_main:
                _open_run(
                    cfg,
                    tracker,
                    inputs=inputs,
                    loop=loop,
                    progress=progress,
                    uri=uri,
                    out_dir=out_dir,
                    previous_run_id=previous_run_id,
                )
            state = _state(cfg, run=run, inputs=inputs, loop=loop, progress=progress, tracker=tracker)
            end_of_epoch = _end_of_epoch(
                tcfg["epochs"], ctx=ctx, device=device, tracker=tracker, state=state, progress=progress, out_dir=out_dir
            )
            if inputs.resume is None and ctx.is_main:
                checkpoint.save(last_path, state())  # the state at the start of epoch 1
            _fit(loop, progress, tcfg, end_of_epoch=end_of_epoch, run=run, ctx=ctx, last_path=last_path)
            if ctx.is_main:
                _finish(progress, tracker, state, inputs.store, out_dir, log_model=cfg["mlflow"]["log_model"], run=run)
        distributed.barrier(ctx, device)  # the other ranks wait for rank 0's files and MLflow run


def _set_up(
    tcfg: dict[str, Any],
    inputs: _Inputs,
    *,
    run: str,
    ctx: distributed.Context,
    device: torch.device,
    stop: StopFlag,
    last_path: Path,
) -> tuple[Loop, Progress]:
    """The epoch loop of the run and its progress: the seeded model (its output floor set), AdamW, the
    learning-rate schedule, the shuffling generator and the train and val data, fresh or as ``last.pt``
    left them (:func:`_resume_or_fresh`)."""
    seed_everything(tcfg["seed"])
    model = build_model(inputs.model_name, **inputs.model_kwargs)
    if inputs.output_floor is not None:  # nonnegative targets (overwritten by a resumed model_state)
        cast(OutputFloor, model.output_floor).set_floor(inputs.output_floor)  # built for nonnegative targets
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["learning_rate"], weight_decay=tcfg["weight_decay"])
    scheduler = make_scheduler(tcfg["lr_schedule"], optimizer, epochs=tcfg["epochs"], patience=tcfg["patience"])
    generator = torch.Generator().manual_seed(tcfg["seed"])
    progress = _resume_or_fresh(
        inputs.resume,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        run=run,
        ctx=ctx,
        last_path=last_path,
    )
    mode, store = tcfg["data_on_device"], inputs.store
    wrapped = distributed.wrap_model(model, ctx, device)  # after loading: DDP broadcasts rank 0's weights
    loop = Loop(
        model=model,
        net=torch.compile(wrapped) if tcfg["compile"] else wrapped,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        train_source=data_source(store, "train", mode, device, ctx.world_size),
        val_source=data_source(store, "val", mode, device, ctx.world_size),
        weights=loss_weights(store.mask, store.lat, tcfg["latitude_weighted_loss"]).to(device),
        device=device,
        batch_size=tcfg["batch_size"],
        max_batches=tcfg["max_batches_per_epoch"],
        grad_clip=tcfg["grad_clip"],
        bf16=tcfg["bf16"],
        num_workers=tcfg["num_workers"],
        stop=stop,
        ctx=ctx,
        eval_net=(torch.compile(model) if tcfg["compile"] else model) if ctx.distributed else None,
    )
    return loop, progress


def _resume_or_fresh(
    resume: dict[str, Any] | None,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    run: str,
    ctx: distributed.Context,
    last_path: Path,
) -> Progress:
    """A fresh start's progress when ``resume`` is None; else the progress of ``resume`` (the content of
    ``last.pt``), with the model, optimizer, schedule, generator and random state restored from it."""
    if resume is None:
        return Progress()
    saved_rng, saved_progress = checkpoint.restore(
        resume, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator
    )
    set_rng_state(saved_rng)
    progress = Progress(**saved_progress)
    if ctx.is_main:
        log.info("resuming run %s after epoch %d from %s", run, progress.epoch, last_path)
    return progress


def _previous_run_id(resume: dict[str, Any] | None, out_dir: Path) -> str | None:
    """The MLflow run a resumed training continues (``mlflow_run_id.txt``, else the one ``last.pt``
    records). A fresh start (``resume`` None) never reopens an MLflow run: its params would describe
    another model."""
    if resume is None:
        return None
    return _read_run_id(out_dir) or str(resume.get("mlflow_run_id") or "") or None


def _start_tracking(
    cfg: dict[str, Any],
    *,
    run: str,
    inputs: _Inputs,
    loop: Loop,
    ctx: distributed.Context,
    device: torch.device,
    uri: str | None,
    sweep: Mapping[str, str] | None,
    run_id: str | None,
) -> contextlib.AbstractContextManager[Any]:
    """On rank 0, the MLflow run of the training (:func:`conv2dlstm.tracking.store.start_run`: the run
    ``run_id``, or a new one when None) with its tags, yielding its :class:`~conv2dlstm.tracking.store.Tracker`;
    on the other ranks, which never touch MLflow, a context yielding None."""
    if not ctx.is_main:
        return contextlib.nullcontext()
    store = inputs.store
    tags = {
        "run": run,
        "model_name": inputs.model_name,
        "n_parameters": count_parameters(loop.model),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": ctx.world_size,
        "data.stats_sha256": store.attrs.get("stats_sha256", "unknown"),
        "stats_sha256": inputs.stats_sha,
        "windows_store": str(store.path),
        "data_on_device": isinstance(loop.train_source, InMemoryWindows),
        **provenance.mlflow_tags(inputs.record),
        **store.gap_tags(),  # data.time_gaps, data.longest_gap_days, ...
        **(sweep or {}),
    }
    superseded = inputs.stale.run_id if inputs.stale is not None else None
    if superseded:
        tags["supersedes"] = superseded
    return tracking.start_run(
        cfg, run, run_id=run_id, tags=tags, tracking_uri=uri, fixed_params=tuple(flatten(inputs.result_config))
    )


def _open_run(
    cfg: dict[str, Any],
    tracker: tracking.Tracker,
    *,
    inputs: _Inputs,
    loop: Loop,
    progress: Progress,
    uri: str | None,
    out_dir: Path,
    previous_run_id: str | None,
) -> None:
    """Rank 0, once the MLflow run is open: tag the run of the stale training it supersedes, write
    ``mlflow_run_id.txt`` for a new run or log the epochs an earlier process could not send for a
    resumed one, and write ``model_summary.txt``."""
    superseded = inputs.stale.run_id if inputs.stale is not None else None
    if superseded and superseded != tracker.run_id:
        tracking.mark_superseded(uri or tracking.resolve_tracking_uri(cfg), superseded, tracker.run_id)
        log.info("MLflow run %s supersedes run %s (tagged superseded)", tracker.run_id, superseded)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tracker.run_id != previous_run_id:
        write_text(out_dir / RUN_ID_FILE, tracker.run_id + "\n")
    else:  # a resumed run: log the epochs an earlier process could not send
        tracker.backfill(progress.history, EPOCH_METRICS)
    summary_path = out_dir / "model_summary.txt"
    write_text(summary_path, model_summary(loop.model, inputs.model_name, inputs.model_kwargs, inputs.store))


def _state(
    cfg: dict[str, Any], *, run: str, inputs: _Inputs, loop: Loop, progress: Progress, tracker: tracking.Tracker
) -> Callable[[], dict[str, Any]]:
    """The function that builds the checkpoint of the training's current state (rank 0 calls it for
    every checkpoint it saves)."""

    def state() -> dict[str, Any]:
        return checkpoint.build(
            run=run,
            model_name=inputs.model_name,
            model_kwargs=inputs.model_kwargs,
            model=loop.model,
            optimizer=loop.optimizer,
            scheduler=loop.scheduler,
            generator=loop.generator,
            rng_state=rng_state(),
            progress=vars(progress),
            finished=progress.finished,
            config=cfg,
            input_variables=inputs.store.input_variables,
            target_variables=inputs.store.target_variables,
            mlflow_run_id=tracker.run_id,
            record=inputs.record,
            result_config=inputs.result_config,
        )

    return state


def _end_of_epoch(
    epochs: int,
    *,
    ctx: distributed.Context,
    device: torch.device,
    tracker: tracking.Tracker,
    state: Callable[[], dict[str, Any]],
    progress: Progress,
    out_dir: Path,
) -> Callable[[dict[str, float], bool], None]:
    """What :func:`conv2dlstm.training.loop.fit` calls after each epoch: :func:`_record_epoch` on rank 0,
    which alone logs and writes files; nothing on the other ranks."""

    def end_of_epoch(row: dict[str, float], improved: bool) -> None:
        if ctx.is_main:  # rank 0 alone logs and writes files
            _record_epoch(
                row,
                improved,
                epochs=epochs,
                device=device,
                tracker=tracker,
                state=state,
                history=progress.history,
                out_dir=out_dir,
            )

    return end_of_epoch


def _fit(
    loop: Loop,
    progress: Progress,
    tcfg: dict[str, Any],
    *,
    end_of_epoch: Callable[[dict[str, float], bool], None],
    run: str,
    ctx: distributed.Context,
    last_path: Path,
) -> None:
    """The epoch loop (:func:`conv2dlstm.training.loop.fit`). When it stops at a signal or the job's
    deadline, rank 0 warns naming the cause and the epoch a rerun resumes after, and
    :class:`TrainingInterrupted` propagates."""
    try:
        fit(
            loop,
            progress,
            epochs=tcfg["epochs"],
            patience=tcfg["patience"],
            lr_schedule=tcfg["lr_schedule"],
            learning_rate=tcfg["learning_rate"],
            end_of_epoch=end_of_epoch,
        )
    except TrainingInterrupted as stop_:
        if ctx.is_main:
            log.warning(
                "run %s stopped on %s; a rerun resumes from %s after epoch %d%s",
                run,
                stop_.reason,
                last_path,
                progress.epoch,
                " (at the start of epoch 1)" if progress.epoch == 0 else "",
            )
        raise


def _retire(stale: Stale, *, run: str, out_dir: Path) -> None:
    """Move the files of the earlier training ``stale`` out of ``out_dir``, with a warning saying why."""
    folder = retire_files(out_dir, stale.files)
    log.warning(
        "run %s: starting fresh, in a new MLflow run: the training in %s differs from this one (%s); "
        "its files %s are moved to %s",
        run,
        out_dir,
        "; ".join(stale.reasons),
        list(stale.files),
        folder,
    )


def _record_epoch(
    row: dict[str, float],
    improved: bool,
    *,
    epochs: int,
    device: torch.device,
    tracker: tracking.Tracker,
    state: Callable[[], dict[str, Any]],
    history: list[dict[str, float]],
    out_dir: Path,
) -> None:
    """After each epoch (rank 0): its metrics to MLflow and the log, then ``best.pt`` when the
    validation loss improved, ``history.csv`` and ``last.pt``."""
    epoch = int(row["epoch"])
    metrics = {k: row[k] for k in EPOCH_METRICS}
    if device.type == "cuda":
        metrics["gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    tracker.log_metrics(metrics, step=epoch)  # never raises for a store that is down: the metrics wait
    log.info(
        "epoch %d/%d train_loss %.5f val_loss %.5f%s lr %.3g %.0f samples/s %.1f s",
        epoch,
        epochs,
        row["train_loss"],
        row["val_loss"],
        " (best)" if improved else "",
        row["lr"],
        row["samples_per_s"],
        row["seconds"],
    )
    ckpt = state()
    if improved:
        checkpoint.save(out_dir / checkpoint.BEST, ckpt)
    write_history(out_dir / "history.csv", history)
    checkpoint.save(out_dir / checkpoint.LAST, ckpt)


def _finish(
    progress: Progress,
    tracker: tracking.Tracker,
    state: Callable[[], dict[str, Any]],
    store: WindowsStore,
    out_dir: Path,
    *,
    log_model: bool,
    run: str = "",
) -> None:
    """Log the best model and artifacts, mark ``last.pt`` finished, write ``model.pt`` last.

    Everything must reach MLflow first (per-epoch metrics still pending included, each call retried
    for the wait budget of :mod:`conv2dlstm.tracking.store`); otherwise :class:`TrackingError` ends the
    step before ``model.pt``, and a rerun resumes after the last epoch and only logs.
    """
    best_path = out_dir / checkpoint.BEST
    try:
        tracker.log_metrics({"best_val_loss": progress.best_val_loss, "best_epoch": progress.best_epoch})
        if not tracker.flush():
            raise TrackingError(f"metrics of step(s) {[p.step for p in tracker.pending]} were not accepted")
        if log_model:
            best_model = models.rebuild_model(checkpoint.load(best_path), path=best_path)
            n = min(2, store.starts("val").size)
            example = np.stack([store.sample("val", i)[0] for i in range(n)])  # (n, T_in, C_in, H, W)
            tracker.log_model(best_model, example)
        tracker.log_artifact(best_path, "checkpoints")
        for name in ("model_summary.txt", "history.csv"):
            tracker.log_artifact(out_dir / name)
    except Exception as exc:
        if not (isinstance(exc, TrackingError) or tracking.transient(exc)):
            raise
        raise TrackingError(
            f"run {run}: training is complete ({out_dir / 'last.pt'}, best epoch {progress.best_epoch}) but the "
            f"MLflow store {tracker.uri} did not take its results ({exc}); rerun the train step once the store is "
            "back: it resumes after the last epoch, trains no further, and logs the metrics, model and files the "
            "MLflow run lacks"
        ) from exc
    progress.finished = True
    checkpoint.save(out_dir / checkpoint.LAST, state())
    with atomic_output(out_dir / checkpoint.MODEL) as tmp:
        shutil.copyfile(best_path, tmp)
    log.info(
        "run complete: best epoch %d, validation loss %.5f; %s",
        progress.best_epoch,
        progress.best_val_loss,
        out_dir / "model.pt",
    )
