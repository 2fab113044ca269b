"""The epoch loop of training: the masked loss, one epoch over shuffled batches, validation, the
learning-rate schedule, early stopping, and the random state that makes a resumed run repeat an
uninterrupted one.

Nothing here writes files or talks to MLflow: :func:`fit` hands each finished epoch to the train
step (:mod:`conv2dlstm.steps.train`), which checkpoints and logs it. Under data-parallel training
(:mod:`conv2dlstm.training.distributed`) every rank runs the same loop on its share of each global batch
(:func:`share_loss`); validation sums are all-reduced, so schedule and early stopping agree on every
rank, and so is the stop flag of a signal (:mod:`conv2dlstm.training.preemption`) at every batch boundary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from conv2dlstm.artifacts.windows_store import WindowsStore
from conv2dlstm.errors import ConfigError
from conv2dlstm.training import distributed
from conv2dlstm.training.dataset import InMemoryWindows, WindowDataset, iter_batches, shard_batches, use_in_memory
from conv2dlstm.training.preemption import StopFlag, TrainingInterrupted

log = logging.getLogger(__name__)


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
    are excluded even when they hold NaN, from the loss and from its gradient (the error is masked
    before it is squared: ``where(mask, (p - t) ** 2, 0)`` would carry NaN into the gradient).
    """
    diff = torch.where(weights > 0, pred.float() - target.float(), 0.0)  # (B, T, C, H, W)
    sse = (diff.square() * weights).sum()
    n = pred.shape[0] * pred.shape[1] * pred.shape[2]
    return sse, weights.sum() * n


def masked_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean squared error over ocean cells (see :func:`masked_sse`)."""
    sse, total = masked_sse(pred, target, weights)
    return sse / total


def share_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    *,
    batch_size: int,
    world_size: int,
    has_share: bool = True,
) -> torch.Tensor:
    """Loss of one rank's share of a global batch, such that DDP's averaged gradient is the gradient
    of :func:`masked_mse` over the whole batch.

    One process minimises L = S / N: S the weighted sum of squared errors over the batch, N =
    weights.sum() * batch_size * T_out * C_out its total weight (every window has the same ocean cells,
    so N depends on the global batch size only and every rank knows it without an all-reduce).
    Rank r of W holds S_r, the errors of its share (S = sum_r S_r), and DDP averages the gradients,
    g = (1/W) sum_r grad(L_r). With L_r = W * S_r / N, g = grad(sum_r S_r / N) = grad(L): the
    single-process gradient, up to the order of float summation. A rank without a share of a short
    last batch runs a stand-in window with ``has_share=False``: L_r = 0 * S_r, a zero gradient.

    ``pred``, ``target``: ``(b, T_out, C_out, H, W)``, the share; ``weights``: ``(H, W)``.
    """
    sse, _ = masked_sse(pred, target, weights)
    total_weight = weights.sum() * (batch_size * pred.shape[1] * pred.shape[2])  # N of the global batch
    return sse * (world_size if has_share else 0.0) / total_weight


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
    # the legacy MT19937 tuple (np.random's default form; numpy's stub also allows its dict form)
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    _, keys, pos, has_gauss, gauss = state
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels where torch has them (warnings, not errors, elsewhere); restored after."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


# ----------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------


LR_SCHEDULES = ("cosine", "plateau", "constant")
"""The learning-rate schedules :func:`make_scheduler` builds (config key ``train.lr_schedule``)."""


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, *, epochs: int, patience: int) -> Any:
    """Per-epoch learning-rate schedule: cosine annealing to 0 over ``epochs``, halving on plateau, or constant."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=max(1, patience // 2)
        )
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise ConfigError(f"train.lr_schedule {name!r} is not one of {', '.join(LR_SCHEDULES)}")


def index_batches(order: torch.Tensor, batch_size: int, max_batches: int = 0) -> list[list[int]]:
    """Split a sample order into batches of ``batch_size`` (the last may be smaller).

    At most ``max_batches`` batches (0 = all).
    """
    idx = order.tolist()
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
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


def data_source(
    store: WindowsStore, split: str, mode: str, device: torch.device, processes: int = 1
) -> WindowDataset | InMemoryWindows:
    """In-memory windows when they fit (CPU processes share the host's memory), else streaming from Zarr."""
    fraction = 0.25 / processes if device.type == "cpu" else 0.25
    if use_in_memory(mode, store.cube_nbytes(split), device, fraction=fraction):
        return InMemoryWindows(store, split, device)
    return WindowDataset(store.path, split)


@dataclass
class Loop:
    """Everything one epoch needs."""

    model: nn.Module  # the module whose state is saved (never wrapped)
    net: Callable[[torch.Tensor], torch.Tensor]  # what training calls (the model, DDP-wrapped and/or compiled)
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
    ctx: distributed.Context = field(default_factory=distributed.Context)
    # what validation calls when not ``net`` (the unwrapped model under DDP, compiled or not)
    eval_net: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.device.type == "cuda"
        )

    def _iterate(
        self, source: WindowDataset | InMemoryWindows, batches: list[list[int]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter_batches(
            source, batches, device=self.device, num_workers=self.num_workers, pin_memory=self.device.type == "cuda"
        )

    def stop_signal(self) -> int | None:
        """The signal to stop on, agreed by all ranks (an all-reduce under DDP), or None."""
        return distributed.agree_on_signal(self.ctx, self.stop.signum, self.device)

    def step_loss(self, pred: torch.Tensor, target: torch.Tensor, batch_size: int, has_share: bool) -> torch.Tensor:
        """The loss this process backpropagates for one step of a global batch of ``batch_size`` windows:
        :func:`masked_mse` in one process, :func:`share_loss` under DDP."""
        if not self.ctx.distributed:
            return masked_mse(pred, target, self.weights)
        return share_loss(
            pred, target, self.weights, batch_size=batch_size, world_size=self.ctx.world_size, has_share=has_share
        )

    def train_epoch(self, desc: str) -> tuple[float, int]:
        """One pass over the shuffled training windows; returns (mean loss, samples seen), over all ranks."""
        from tqdm.auto import tqdm

        self.model.train()
        order = torch.randperm(len(self.train_source), generator=self.generator)  # (n_train,), same on every rank
        batches = index_batches(order, self.batch_size, self.max_batches)  # the global batches
        shares = shard_batches(batches, self.ctx.rank, self.ctx.world_size)  # this rank's part of each
        # Every rank takes part in every step (DDP all-reduces the gradients): an empty share of a short
        # last batch runs the batch's first window with loss weight 0 instead.
        inputs = [share or batch[:1] for share, batch in zip(shares, batches)]
        n_batches = len(batches)
        total = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        with tqdm(
            total=n_batches,
            desc=desc,
            unit="batch",
            leave=False,
            file=sys.stderr,
            disable=not sys.stderr.isatty() or not self.ctx.is_main,
        ) as bar:
            # x (b, T_in, C_in, H, W), y (b, T_out, C_out, H, W); b = B / W under DDP
            for (x, y), batch, share in zip(self._iterate(self.train_source, inputs), batches, shares):
                if (signum := self.stop_signal()) is not None:
                    raise TrainingInterrupted(signum)
                with self._autocast():
                    pred = self.net(x)  # (b, T_out, C_out, H, W)
                loss = self.step_loss(pred, y, len(batch), bool(share))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                self.optimizer.step()
                total += loss.detach() * len(batch)  # summed over ranks: W * (batch loss) * B
                seen += len(batch)
                bar.update(1)
                if not bar.disable and (bar.n % 10 == 0 or bar.n == n_batches):
                    bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - start):.0f}")
        if (signum := self.stop_signal()) is not None:
            raise TrainingInterrupted(signum)
        total = distributed.all_reduce_sum(self.ctx, total)
        return float(total) / (max(seen, 1) * self.ctx.world_size), seen

    @torch.no_grad()
    def val_loss(self) -> float:
        """Masked MSE over all validation windows (in order); under DDP each rank scores its share and
        the sums are all-reduced, so every rank returns the same value."""
        self.model.eval()
        net = self.net if self.eval_net is None else self.eval_net
        batches = index_batches(torch.arange(len(self.val_source)), self.batch_size, self.max_batches)
        shares = [s for s in shard_batches(batches, self.ctx.rank, self.ctx.world_size) if s]
        sse = torch.zeros((), device=self.device)
        weight = torch.zeros((), device=self.device)
        for x, y in self._iterate(self.val_source, shares):
            with self._autocast():
                pred = net(x)
            s, w = masked_sse(pred, y, self.weights)
            sse += s
            weight += w
        if self.ctx.distributed:
            sse, weight = distributed.all_reduce_sum(self.ctx, torch.stack([sse, weight]))
        return float(sse / weight)


# ----------------------------------------------------------------------------------------------
# Epochs
# ----------------------------------------------------------------------------------------------


def fit(
    loop: Loop,
    progress: Progress,
    *,
    epochs: int,
    patience: int,
    lr_schedule: str,
    learning_rate: float,
    end_of_epoch: Callable[[dict[str, float], bool], None],
) -> None:
    """Epochs until ``epochs`` or early stopping (``patience`` epochs without a lower validation loss).

    After each epoch, ``progress`` holds it and ``end_of_epoch(row, improved)`` (the train step:
    logs, checkpoints) gets its row of ``history.csv`` and whether the validation loss improved;
    then a stop signal agreed by all ranks raises :class:`TrainingInterrupted`. A non-finite loss
    is a :class:`ConfigError` naming ``learning_rate``.
    """
    while progress.epoch < epochs and progress.epochs_since_best < patience:
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
                f"lower train.learning_rate (now {learning_rate}) or set train.grad_clip"
            )
        if lr_schedule == "plateau":
            loop.scheduler.step(val_loss)
        else:
            loop.scheduler.step()
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": lr,
            "samples_per_s": seen / train_seconds,
            "seconds": seconds,
        }
        progress.epoch = epoch
        progress.history.append(row)
        improved = val_loss < progress.best_val_loss
        if improved:
            progress.best_val_loss, progress.best_epoch, progress.epochs_since_best = val_loss, epoch, 0
        else:
            progress.epochs_since_best += 1
        end_of_epoch(row, improved)
        if (signum := loop.stop_signal()) is not None:
            raise TrainingInterrupted(signum)
    if progress.epochs_since_best >= patience and loop.ctx.is_main:
        log.info(
            "early stopping after epoch %d: no improvement for %d epochs (best epoch %d)",
            progress.epoch,
            progress.epochs_since_best,
            progress.best_epoch,
        )
