"""The training checkpoints, ``<outdir>/train/<run>/{last,best,model}.pt`` (``torch.save`` of a dict).

- ``last.pt``: the complete training state at the end of the last finished epoch (before the
  first epoch: its start), what a rerun resumes from;
- ``best.pt``: the checkpoint of the epoch with the lowest validation loss;
- ``model.pt``: a copy of ``best.pt``, written last: the run is complete.

Written by the train step (:func:`build`, :func:`save`), read by the train step (resume: :func:`load`,
:func:`restore`), by evaluate and forecast (:func:`conv2dlstm.training.models.load_model`, the model alone, as
:func:`conv2dlstm.training.models.rebuild_model` builds it from the file, nanoGPT style) and for its provenance record
(:func:`read_provenance`). The entries are :data:`KEYS`, one list for the writer and the reader; every reader checks
:data:`FORMAT_VERSION`. A problem is a :class:`~conv2dlstm.errors.DataError` naming the file and the fix (re-run the
train step)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conv2dlstm.artifacts import provenance
from conv2dlstm.errors import DataError
from conv2dlstm.fsutil import atomic_output

FORMAT_VERSION = 1
"""Entry ``format_version`` of every checkpoint; a reader refuses any other."""
LAST, BEST, MODEL = "last.pt", "best.pt", "model.pt"
NAMES = (LAST, BEST, MODEL)
"""The checkpoint files of a run's output folder."""
MODEL_KEYS = ("model_name", "model_kwargs", "model_state")
"""What :func:`conv2dlstm.training.models.rebuild_model` needs: the network's registry name, its
keyword arguments, its weights."""
PROGRESS_KEYS = ("epoch", "best_val_loss", "best_epoch", "epochs_since_best", "history")
"""The training progress a resumed run continues from (``epoch``: completed epochs)."""
KEYS = (
    "format_version",
    "run",
    *MODEL_KEYS,
    "optimizer_state",
    "scheduler_state",
    "rng_state",
    "generator_state",
    "epoch",
    "best_val_loss",
    "best_epoch",
    "epochs_since_best",
    "finished",
    "history",
    "config",
    "input_variables",
    "target_variables",
    "mlflow_run_id",
    provenance.ATTR,
    provenance.RESULT_CONFIG_KEY,
)
"""Every entry :func:`build` writes and :func:`load` requires."""
FIX = (
    "re-run the train step to write a checkpoint of this version (remove the run's train output folder to "
    "start it afresh)"
)


class IncompatibleCheckpoint(DataError):
    """A readable checkpoint of another format version, or one that lacks entries: :attr:`problems`
    says why (one phrase each), :attr:`checkpoint` holds what was read."""

    def __init__(self, message: str, problems: Sequence[str], checkpoint: dict[str, Any]) -> None:
        super().__init__(message)
        self.problems = tuple(problems)
        self.checkpoint = checkpoint


def error(path: str | os.PathLike, problem: str) -> DataError:
    """A :class:`DataError` naming the checkpoint ``path``, its ``problem`` and the fix."""
    return DataError(f"checkpoint {path} {problem}; {FIX}")


def version_problem(ckpt: Mapping[str, Any]) -> str | None:
    """Why ``ckpt`` is not of :data:`FORMAT_VERSION` (a phrase, e.g. ``has checkpoint format 0, this
    version reads 1``), or None."""
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        return f"has checkpoint format {version}, this version reads {FORMAT_VERSION}"
    return None


def build(
    *,
    run: str,
    model_name: str,
    model_kwargs: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    rng_state: dict[str, Any],
    progress: Mapping[str, Any],
    finished: bool,
    config: dict[str, Any],
    input_variables: Sequence[str],
    target_variables: Sequence[str],
    mlflow_run_id: str,
    record: dict[str, Any],
    result_config: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict (:data:`KEYS`): ``model``'s weights (copied to the CPU), the optimizer,
    scheduler, shuffling ``generator`` and global random states, the ``progress`` (:data:`PROGRESS_KEYS`),
    the configuration, the MLflow run and the provenance ``record`` with its ``result_config``."""
    return {
        "format_version": FORMAT_VERSION,
        "run": run,
        "model_name": model_name,
        "model_kwargs": model_kwargs,
        "model_state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "rng_state": rng_state,
        "generator_state": generator.get_state(),
        "epoch": progress["epoch"],
        "best_val_loss": progress["best_val_loss"],
        "best_epoch": progress["best_epoch"],
        "epochs_since_best": progress["epochs_since_best"],
        "finished": finished,
        "history": list(progress["history"]),
        "config": config,
        "input_variables": list(input_variables),
        "target_variables": list(target_variables),
        "mlflow_run_id": mlflow_run_id,
        provenance.ATTR: record,
        provenance.RESULT_CONFIG_KEY: result_config,
    }


def save(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` to ``path`` atomically (no partial file under that name, ever)."""
    with atomic_output(Path(path)) as tmp:
        torch.save(ckpt, tmp)


def _read(path: Path, *, mmap: bool) -> dict[str, Any]:
    if not path.is_file():
        raise error(path, "does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise error(path, f"cannot be read as a PyTorch checkpoint (a truncated or foreign file: {exc})") from exc
    if not isinstance(ckpt, dict):
        raise error(path, f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def load(path: str | os.PathLike, *, required: Sequence[str] = KEYS, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint ``path``, on the CPU, checked: of :data:`FORMAT_VERSION`, with the entries ``required``.

    A missing or unreadable file is a :class:`DataError`; a readable one of another version, or
    lacking entries, an :class:`IncompatibleCheckpoint` (its ``problems``: one phrase each). Both
    name ``path`` and the fix. ``mmap``: tensors stay on disk until used (for reading a few small
    entries of a large file).
    """
    path = Path(path)
    ckpt = _read(path, mmap=mmap)
    problems = []
    if problem := version_problem(ckpt):
        problems.append(problem)
    missing = [key for key in required if key not in ckpt]
    if missing:
        problems.append(f"lacks {missing} (an old or foreign checkpoint)")
    if problems:
        raise IncompatibleCheckpoint(f"checkpoint {path} {'; '.join(problems)}; {FIX}", problems, ckpt)
    return ckpt


def digest(ckpt: Mapping[str, Any]) -> str | None:
    """The provenance digest a checkpoint records (None when it records none)."""
    record = ckpt.get(provenance.ATTR)
    return str(record.get("digest")) if isinstance(record, dict) and record.get("digest") else None


def restore(
    ckpt: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the training state of ``ckpt`` (from :func:`load`) into ``model``, ``optimizer``,
    ``scheduler`` and ``generator``; returns the global random states (for
    :func:`conv2dlstm.training.loop.set_rng_state`) and the progress (:data:`PROGRESS_KEYS`)."""
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    scheduler.load_state_dict(ckpt["scheduler_state"])
    generator.set_state(ckpt["generator_state"])
    progress = {key: ckpt[key] for key in PROGRESS_KEYS}
    progress["history"] = list(progress["history"])
    return ckpt["rng_state"], progress


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of the checkpoint file ``path`` (memory-mapped: the weights are not
    read; its format version checked)."""
    path = Path(path)
    return provenance.from_checkpoint(load(path, required=(), mmap=True), where=f"checkpoint {path}")
