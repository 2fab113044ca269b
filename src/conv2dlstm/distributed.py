"""Data-parallel training over several processes (``torch.nn.parallel.DistributedDataParallel``).

``train.gpus > 1`` trains with one process per GPU. A plain ``python -m conv2dlstm train ...``
re-executes itself under torchrun (:func:`maybe_relaunch`)::

    python -m torch.distributed.run --standalone --nproc-per-node=<gpus> ... -m -- conv2dlstm <argv>

and each process torchrun starts (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in its environment, read
by :meth:`Context.from_env`) joins one process group (:func:`process_group`): NCCL on CUDA, one GPU
``cuda:LOCAL_RANK`` per process; gloo on the CPU, where ``train.gpus`` is simply the number of
processes (``train.device: cpu`` + ``train.gpus: 2`` trains with two CPU processes).

Signals: the launching process forwards SIGTERM, SIGUSR1 and SIGINT to torchrun, which forwards
them to every worker (``--signals-to-handle``) and gives them ``SHUTDOWN_TIMEOUT_S`` to exit; the
launcher then exits with 128 + the signal number, as a single training process does.

The collectives the training loop needs (:func:`all_reduce_sum`, :func:`agree_on_signal`,
:func:`barrier`) are no-ops in a single process, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from conv2dlstm.errors import ConfigError

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# torchrun's default set plus SIGUSR1 (SLURM's usual pre-emption warning); it passes them on to the workers
TORCHRUN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
SHUTDOWN_TIMEOUT_S = 120  # torchrun waits this long for workers to stop after a signal, then kills them
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # rank 0 alone logs to MLflow while the others wait


@dataclass(frozen=True)
class Context:
    """Position of this process in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs to MLflow and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Context:
        """``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` as torchrun sets them (defaults 0, 0, 1)."""
        env = os.environ if env is None else env
        try:
            values = {
                k: int(env.get(k, default)) for k, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"))
            }
        except ValueError as exc:
            raise ConfigError(
                f"RANK / LOCAL_RANK / WORLD_SIZE in the environment are not integers ({exc}); unset them, or "
                "start training through torchrun (train.gpus > 1 does that)"
            ) from exc
        ctx = cls(rank=values["RANK"], local_rank=values["LOCAL_RANK"], world_size=values["WORLD_SIZE"])
        if ctx.world_size < 1 or not 0 <= ctx.rank < ctx.world_size or ctx.local_rank < 0:
            raise ConfigError(
                f"RANK={ctx.rank}, LOCAL_RANK={ctx.local_rank}, WORLD_SIZE={ctx.world_size} in the environment "
                "are inconsistent; unset them, or start training through torchrun"
            )
        return ctx


def under_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher already set the rank variables (then this process is one worker)."""
    env = os.environ if env is None else env
    return any(k in env for k in TORCHRUN_ENV)


def torchrun_command(argv: Sequence[str], nprocs: int, *, python: str | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m -- conv2dlstm <argv>`` starting ``nprocs`` local workers."""
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nprocs}",
        f"--signals-to-handle={','.join(s.name for s in TORCHRUN_SIGNALS)}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        # "--": torchrun's parser would reject worker options that abbreviate two of its own
        # (``--run`` -> ``--run-path``, ``--run_path``); after it, nothing is parsed as torchrun's
        "-m",
        "--",
        "conv2dlstm",
        *argv,
    ]


def maybe_relaunch(argv: Sequence[str], nprocs: int, *, python: str | None = None) -> int | None:
    """Run ``python -m conv2dlstm <argv>`` as ``nprocs`` torchrun workers and return the exit status.

    Returns None, starting nothing, when ``nprocs <= 1`` or when this process is already a worker
    (:func:`under_torchrun`). Otherwise blocks until torchrun exits. torchrun runs in its own session,
    so a signal sent to this process's group (a terminal's Ctrl-C, ``kill -TERM -<pgid>``) reaches
    torchrun only through this process: the first SIGTERM, SIGUSR1 and SIGINT are forwarded (a
    repeated one would make torchrun abandon its workers' graceful stop). After a forwarded signal
    a failed run returns 128 + that signal's number (torchrun itself exits 1 when a worker fails).
    """
    if nprocs <= 1 or under_torchrun():
        return None
    cmd = torchrun_command(argv, nprocs, python=python)
    log.info("starting %d training processes: %s", nprocs, " ".join(cmd[: cmd.index("--") + 2] + ["..."]))
    received: list[int] = []
    started: list[subprocess.Popen] = []

    def forward(signum: int, frame: Any) -> None:
        if signum in received:  # torchrun would cut its workers' graceful shutdown short
            return
        received.append(signum)
        if started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started[0].pid, signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, start_new_session=True)
        started.append(proc)
        for signum in received:  # arrived while starting
            os.killpg(proc.pid, signum)
        try:
            code = proc.wait()
        except BaseException:  # not a forwarded signal: do not leave the workers behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if code < 0:  # torchrun itself killed by a signal
        code = 128 - code
    if code != 0 and received:
        code = 128 + received[0]
    return code


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def worker_device(ctx: Context, device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` on CUDA (made current), else ``device`` unchanged."""
    if device.type != "cuda" or not ctx.distributed:
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise ConfigError(
            f"process with LOCAL_RANK {ctx.local_rank} has no GPU: only {count} CUDA devices are visible; "
            f"set train.gpus to at most {count}"
        )
    torch.cuda.set_device(ctx.local_rank)
    return torch.device("cuda", ctx.local_rank)


@contextlib.contextmanager
def process_group(ctx: Context, device: torch.device) -> Iterator[None]:
    """Join the default process group for the block (nothing when not distributed); leave it after.

    The group rendezvous uses torchrun's ``MASTER_ADDR`` / ``MASTER_PORT`` (``env://``).
    """
    if not ctx.distributed:
        yield
        return
    dist.init_process_group(
        backend=backend_for(device),
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``.

    DDP broadcasts rank 0's parameters and buffers once, at construction, but not on every forward:
    the models' buffers are constants, and validation runs the unwrapped model on each rank's share
    of the windows (a different number of forwards per rank).
    """
    if not ctx.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,
    )


def all_reduce_sum(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (in place; the tensor itself when not distributed)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_on_signal(ctx: Context, signum: int | None, device: torch.device) -> int | None:
    """The stop signal if any rank received one (the largest number), else None; same on every rank.

    One tiny all-reduce: called at every batch boundary, so all ranks stop at the same step.
    """
    if not ctx.distributed:
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return value or None


def barrier(ctx: Context, device: torch.device) -> None:
    """Wait until every rank gets here (nothing when not distributed)."""
    if ctx.distributed:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
