"""Training step: fit one run's network on the windows store, resumable after preemption.

Loss: mean squared error over ocean cells only (the store's mask; land values cannot change it),
optionally weighted by cos(latitude). AdamW, a per-epoch learning-rate schedule, gradient clipping,
early stopping on the validation loss.

Outputs in ``out_dir`` (checkpoint layout in ``docs/architecture.md``):

- ``last.pt`` - the complete training state at the end of the last finished epoch (written before
  the first epoch too), so it is always the state at the start of the current epoch;
- ``best.pt`` - the checkpoint of the epoch with the lowest validation loss;
- ``history.csv`` - one row per epoch; ``mlflow_run_id.txt``; ``model_summary.txt``;
- ``model.pt`` - a copy of ``best.pt`` written last: the run is complete.

Preemption: SIGTERM or SIGUSR1 sets a flag; at the next batch boundary training stops and
:class:`TrainingInterrupted` (a ``SystemExit`` with status 128 + signal) ends the process. ``last.pt``
then holds the state at the start of the interrupted epoch, so calling :func:`main` again with the
same ``out_dir`` repeats that epoch with the same shuffled order and random state: on the CPU the
resumed run ends with exactly the weights of an uninterrupted one. A complete run returns at once.

The loop is written for one process; multi-GPU training (``train.gpus > 1``) would add a
``DistributedSampler``-style split of ``index_batches`` and rank-0-only logging and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from conv2dlstm import tracking
from conv2dlstm.data import InMemoryWindows, WindowDataset, WindowsStore, iter_batches, use_in_memory
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.fsutil import atomic_output, sha256_file
from conv2dlstm.models import build_model, count_parameters, load_model, model_kwargs_from_config

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "samples_per_s", "seconds")


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving its state; exit status 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def loss_weights(mask: np.ndarray, lat: np.ndarray, latitude_weighted: bool) -> torch.Tensor:
    """Per-cell loss weights ``(H, W)``: 0 on land, 1 (or cos(lat)) on ocean."""
    w = np.asarray(mask, dtype=np.float64)  # (H, W)
    if latitude_weighted:
        w = w * np.cos(np.deg2rad(np.asarray(lat, dtype=np.float64)))[:, None]
    return torch.as_tensor(w, dtype=torch.float32)


def masked_sse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of squared errors over cells with weight > 0, and the sum of the weights.

    ``pred``, ``target``: ``(B, T, C, H, W)``; ``weights``: ``(H, W)``. Cells of zero weight (land)
    are excluded even when they hold NaN.
    """
    sq = torch.where(weights > 0, (pred.float() - target.float()) ** 2, 0.0)  # (B, T, C, H, W)
    sse = (sq * weights).sum()
    n = pred.shape[0] * pred.shape[1] * pred.shape[2]
    return sse, weights.sum() * n


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error over ocean cells (see :func:`masked_sse`)."""
    sse, total = masked_sse(pred, target, weights)
    return sse / total


# ----------------------------------------------------------------------------------------------
# Reproducibility
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The global random states, in types that ``torch.load(weights_only=True)`` accepts."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels where torch has them (warnings, not errors, elsewhere); restored after."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


@dataclass
class StopFlag:
    """Set by the signal handler; the training loop acts on it at the next batch boundary."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> Iterator[StopFlag]:
    """Replace the handlers of ``signums`` by one that only records the signal (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available; set train.device to auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"train.device {name!r} is not one of auto, cpu, cuda")
    return torch.device(name)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, epochs: int, patience: int) -> Any:
    """Per-epoch learning-rate schedule: cosine annealing to 0 over ``epochs``, halving on plateau, or constant."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5,
                                                          patience=max(1, patience // 2))
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"train.lr_schedule {name!r} is not one of cosine, plateau, constant")


def index_batches(order: torch.Tensor, batch_size: int, max_batches: int = 0) -> list[list[int]]:
    """Split a sample order into batches of ``batch_size`` (the last may be smaller).

    At most ``max_batches`` batches (0 = all).
    """
    idx = order.tolist()
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return batches[:max_batches] if max_batches > 0 else batches


@dataclass
class Progress:
    """Training progress stored in every checkpoint."""

    epoch: int = 0  # completed epochs
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    finished: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


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


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(checkpoint, tmp)


def is_complete(out_dir: Path) -> bool:
    """A run is complete when ``model.pt`` exists and ``last.pt`` says finished."""
    last = out_dir / "last.pt"
    if not (out_dir / "model.pt").is_file() or not last.is_file():
        return False
    return bool(torch.load(last, map_location="cpu", weights_only=True).get("finished", False))


def _data_source(store: WindowsStore, split: str, mode: str, device: torch.device) -> WindowDataset | InMemoryWindows:
    if use_in_memory(mode, store.cube_nbytes(split), device):
        return InMemoryWindows(store, split, device)
    return WindowDataset(store.path, split)


@dataclass
class Loop:
    """Everything one epoch needs."""

    model: nn.Module  # the module whose state is saved
    net: nn.Module  # what is called (possibly compiled)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    train_source: WindowDataset | InMemoryWindows
    val_source: WindowDataset | InMemoryWindows
    weights: torch.Tensor  # (H, W) on device
    device: torch.device
    batch_size: int
    max_batches: int
    grad_clip: float
    bf16: bool
    num_workers: int
    stop: StopFlag

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.bf16 and self.device.type == "cuda")

    def _batches(
        self, source: WindowDataset | InMemoryWindows, order: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter_batches(source, index_batches(order, self.batch_size, self.max_batches), device=self.device,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")

    def train_epoch(self, desc: str) -> tuple[float, int]:
        """One pass over the shuffled training windows; returns (mean loss, samples seen)."""
        from tqdm.auto import tqdm

        self.model.train()
        order = torch.randperm(len(self.train_source), generator=self.generator)  # (n_train,)
        n_batches = len(index_batches(order, self.batch_size, self.max_batches))
        total = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        with tqdm(total=n_batches, desc=desc, unit="batch", leave=False, file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            for x, y in self._batches(self.train_source, order):  # x (B, T_in, C_in, H, W), y (B, T_out, C_out, H, W)
                if self.stop.signum is not None:
                    raise TrainingInterrupted(self.stop.signum)
                with self._autocast():
                    pred = self.net(x)  # (B, T_out, C_out, H, W)
                loss = masked_mse(pred, y, self.weights)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
                total += loss.detach() * x.shape[0]
                seen += x.shape[0]
                bar.update(1)
                if not bar.disable and (bar.n % 10 == 0 or bar.n == n_batches):
                    bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - start):.0f}")
        if self.stop.signum is not None:
            raise TrainingInterrupted(self.stop.signum)
        return float(total) / max(seen, 1), seen

    @torch.no_grad()
    def val_loss(self) -> float:
        """Masked MSE over all validation windows (in order)."""
        self.model.eval()
        sse = torch.zeros((), device=self.device)
        weight = torch.zeros((), device=self.device)
        for x, y in self._batches(self.val_source, torch.arange(len(self.val_source))):
            with self._autocast():
                pred = self.net(x)
            s, w = masked_sse(pred, y, self.weights)
            sse += s
            weight += w
        return float(sse / weight)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _checkpoint(loop: Loop, progress: Progress, *, model_name: str, model_kwargs: dict[str, Any],
                cfg: dict[str, Any], store: WindowsStore, run_id: str, run: str) -> dict[str, Any]:
    return {
        "format_version": CHECKPOINT_VERSION,
        "run": run,
        "model_name": model_name,
        "model_kwargs": model_kwargs,
        "model_state": {k: v.detach().cpu().clone() for k, v in loop.model.state_dict().items()},
        "optimizer_state": loop.optimizer.state_dict(),
        "scheduler_state": loop.scheduler.state_dict(),
        "rng_state": rng_state(),
        "generator_state": loop.generator.get_state(),
        "epoch": progress.epoch,
        "best_val_loss": progress.best_val_loss,
        "best_epoch": progress.best_epoch,
        "epochs_since_best": progress.epochs_since_best,
        "finished": progress.finished,
        "history": list(progress.history),
        "config": cfg,
        "input_variables": list(store.input_variables),
        "target_variables": list(store.target_variables),
        "mlflow_run_id": run_id,
    }


def _check_resumable(ckpt: dict[str, Any], path: Path, model_name: str, model_kwargs: dict[str, Any],
                     cfg: dict[str, Any]) -> None:
    if ckpt.get("format_version") != CHECKPOINT_VERSION or ckpt["model_name"] != model_name \
            or ckpt["model_kwargs"] != model_kwargs:
        raise ConfigError(
            f"{path} holds a {ckpt.get('model_name')} model {ckpt.get('model_kwargs')}, but the configuration "
            f"asks for {model_name} {model_kwargs}; delete {path.parent} to train this run from scratch"
        )
    if ckpt["config"] != cfg:
        log.warning("%s was written with a different configuration; resuming with the current one", path)


def main(cfg: dict[str, Any], *, run: str, windows: Path, stats: Path, out_dir: Path) -> None:
    """Train run ``run`` (``cfg`` is that run's full config) on the windows store; outputs in ``out_dir``.

    Resumes from ``out_dir/last.pt`` when present; returns at once when the run is complete.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir):
        log.info("run %s is complete in %s; nothing to do", run, out_dir)
        return
    tcfg = cfg["train"]
    if tcfg["gpus"] > 1:
        raise ConfigError(
            f"train.gpus = {tcfg['gpus']}: multi-GPU (DistributedDataParallel) training is not implemented "
            "yet; set train.gpus: 1"
        )
    device = resolve_device(tcfg["device"])
    if device.type == "cuda":  # deterministic cuBLAS; read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    uri = tracking.resolve_tracking_uri(cfg)
    tracking.check_tracking(uri)
    store = WindowsStore(windows)
    stats = Path(stats)
    if not stats.is_file():
        raise DataError(f"normalization statistics {stats} do not exist; run the normalize step first")
    for split in ("train", "val"):
        if store.starts(split).size == 0:
            raise DataError(
                f"windows store {store.path} has no {split} windows; lengthen splits.{split} or shorten "
                "windows.input_steps + windows.lead_steps"
            )
    stats_sha = sha256_file(stats)
    if store.attrs.get("stats_sha256") not in (None, stats_sha):
        log.warning("windows store %s was built from other statistics than %s", store.path, stats)

    model_name = cfg["model"]["name"]
    h, w = store.shape
    model_kwargs = model_kwargs_from_config(
        cfg["model"], input_variables=store.input_variables, target_variables=store.target_variables,
        input_steps=store.input_steps, lead_steps=store.lead_steps, height=h, width=w,
    )
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    resume = torch.load(last_path, map_location="cpu", weights_only=True) if last_path.is_file() else None
    if resume is not None:
        _check_resumable(resume, last_path, model_name, model_kwargs, cfg)

    with deterministic(), stop_on_signals() as stop:
        seed_everything(tcfg["seed"])
        model = build_model(model_name, **model_kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["learning_rate"], weight_decay=tcfg["weight_decay"])
        scheduler = make_scheduler(tcfg["lr_schedule"], optimizer, epochs=tcfg["epochs"], patience=tcfg["patience"])
        generator = torch.Generator().manual_seed(tcfg["seed"])
        progress = Progress()
        if resume is not None:
            model.load_state_dict(resume["model_state"])
            optimizer.load_state_dict(resume["optimizer_state"])
            scheduler.load_state_dict(resume["scheduler_state"])
            generator.set_state(resume["generator_state"])
            set_rng_state(resume["rng_state"])
            progress = Progress(epoch=resume["epoch"], best_val_loss=resume["best_val_loss"],
                                best_epoch=resume["best_epoch"], epochs_since_best=resume["epochs_since_best"],
                                history=list(resume["history"]))
            log.info("resuming run %s after epoch %d from %s", run, progress.epoch, last_path)
        mode = tcfg["data_on_device"]
        loop = Loop(
            model=model,
            net=torch.compile(model) if tcfg["compile"] else model,
            optimizer=optimizer, scheduler=scheduler, generator=generator,
            train_source=_data_source(store, "train", mode, device),
            val_source=_data_source(store, "val", mode, device),
            weights=loss_weights(store.mask, store.lat, tcfg["latitude_weighted_loss"]).to(device),
            device=device, batch_size=tcfg["batch_size"], max_batches=tcfg["max_batches_per_epoch"],
            grad_clip=tcfg["grad_clip"], bf16=tcfg["bf16"], num_workers=tcfg["num_workers"], stop=stop,
        )
        run_id_file = out_dir / "mlflow_run_id.txt"
        previous_run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
        tags = {
            "run": run,
            "model_name": model_name,
            "n_parameters": count_parameters(model),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "data.stats_sha256": store.attrs.get("stats_sha256", "unknown"),
            "stats_sha256": stats_sha,
            "windows_store": str(store.path),
            "data_on_device": isinstance(loop.train_source, InMemoryWindows),
        }
        with tracking.start_run(cfg, run, run_id=previous_run_id, tags=tags, tracking_uri=uri) as tracker:
            out_dir.mkdir(parents=True, exist_ok=True)
            if tracker.run_id != previous_run_id:
                write_text(run_id_file, tracker.run_id + "\n")
            summary_path = out_dir / "model_summary.txt"
            write_text(summary_path, model_summary(model, model_name, model_kwargs, store))

            def checkpoint() -> dict[str, Any]:
                return _checkpoint(loop, progress, model_name=model_name, model_kwargs=model_kwargs, cfg=cfg,
                                   store=store, run_id=tracker.run_id, run=run)

            if resume is None:
                save_checkpoint(last_path, checkpoint())  # the state at the start of epoch 1
            _fit(loop, progress, tcfg, tracker, checkpoint, last_path, best_path, out_dir)
            _finish(progress, tracker, checkpoint, store, out_dir, log_model=cfg["mlflow"]["log_model"])


def _fit(loop: Loop, progress: Progress, tcfg: dict[str, Any], tracker: tracking.Tracker,
         checkpoint: Callable[[], dict[str, Any]], last_path: Path, best_path: Path, out_dir: Path) -> None:
    """Epochs until ``train.epochs`` or early stopping; checkpoints and logs after each."""
    epochs = tcfg["epochs"]
    while progress.epoch < epochs and progress.epochs_since_best < tcfg["patience"]:
        epoch = progress.epoch + 1
        lr = loop.optimizer.param_groups[0]["lr"]
        if loop.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loop.device)
        start = time.perf_counter()
        train_loss, seen = loop.train_epoch(f"epoch {epoch}/{epochs}")
        train_seconds = time.perf_counter() - start
        val_loss = loop.val_loss()
        seconds = time.perf_counter() - start
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise ConfigError(
                f"training diverged in epoch {epoch} (train loss {train_loss}, validation loss {val_loss}); "
                f"lower train.learning_rate (now {tcfg['learning_rate']}) or set train.grad_clip"
            )
        if tcfg["lr_schedule"] == "plateau":
            loop.scheduler.step(val_loss)
        else:
            loop.scheduler.step()
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
               "samples_per_s": seen / train_seconds, "seconds": seconds}
        progress.epoch = epoch
        progress.history.append(row)
        improved = val_loss < progress.best_val_loss
        if improved:
            progress.best_val_loss, progress.best_epoch, progress.epochs_since_best = val_loss, epoch, 0
        else:
            progress.epochs_since_best += 1
        metrics = {k: row[k] for k in ("train_loss", "val_loss", "lr", "samples_per_s")}
        if loop.device.type == "cuda":
            metrics["gpu_mem_mb"] = torch.cuda.max_memory_allocated(loop.device) / 2**20
        tracker.log_metrics(metrics, step=epoch)
        log.info("epoch %d/%d train_loss %.5f val_loss %.5f%s lr %.3g %.0f samples/s %.1f s", epoch, epochs,
                 train_loss, val_loss, " (best)" if improved else "", lr, row["samples_per_s"], seconds)
        ckpt = checkpoint()
        if improved:
            save_checkpoint(best_path, ckpt)
        write_history(out_dir / "history.csv", progress.history)
        save_checkpoint(last_path, ckpt)
        if loop.stop.signum is not None:
            raise TrainingInterrupted(loop.stop.signum)
    if progress.epochs_since_best >= tcfg["patience"]:
        log.info("early stopping after epoch %d: no improvement for %d epochs (best epoch %d)", progress.epoch,
                 progress.epochs_since_best, progress.best_epoch)


def _finish(progress: Progress, tracker: tracking.Tracker, checkpoint: Callable[[], dict[str, Any]],
            store: WindowsStore, out_dir: Path, *, log_model: bool) -> None:
    """Log the best model and artifacts, mark ``last.pt`` finished, write ``model.pt`` last."""
    best_path = out_dir / "best.pt"
    tracker.log_metrics({"best_val_loss": progress.best_val_loss, "best_epoch": progress.best_epoch})
    if log_model:
        best_model, _ = load_model(best_path)
        n = min(2, store.starts("val").size)
        example = np.stack([store.sample("val", i)[0] for i in range(n)])  # (n, T_in, C_in, H, W)
        tracker.log_model(best_model, example)
    tracker.log_artifact(best_path, "checkpoints")
    for name in ("model_summary.txt", "history.csv"):
        tracker.log_artifact(out_dir / name)
    progress.finished = True
    save_checkpoint(out_dir / "last.pt", checkpoint())
    with atomic_output(out_dir / "model.pt") as tmp:
        shutil.copyfile(best_path, tmp)
    log.info("run complete: best epoch %d, validation loss %.5f; %s", progress.best_epoch, progress.best_val_loss,
             out_dir / "model.pt")
