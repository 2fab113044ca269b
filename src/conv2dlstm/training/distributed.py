"""Data-parallel training over several processes (``torch.nn.parallel.DistributedDataParallel``).

``train.gpus > 1`` trains with one process per GPU, started by torchrun: the train rule runs
(:func:`launch_command`, its ``launcher`` resource, chosen per run by :func:`rule_launcher`)::

    torchrun --standalone --nproc-per-node=<gpus> --signals-to-handle=... --shutdown-timeout=120 \\
        -m -- conv2dlstm train ...

and ``python -m conv2dlstm train ...`` when ``train.gpus`` is 1. Each process torchrun starts
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in its environment, read by :meth:`Context.from_env`) joins
one process group (:func:`process_group`): NCCL on CUDA, one GPU ``cuda:LOCAL_RANK`` per process;
gloo on the CPU, where ``train.gpus`` is simply the number of processes (``train.device: cpu`` +
``train.gpus: 2`` trains with two CPU processes). A run with ``train.gpus > 1`` started as a plain
process, outside torchrun, stops at once naming the torchrun command (:func:`require_torchrun`).

Signals: torchrun passes SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 on to every worker
(``--signals-to-handle``; its default set lacks SIGUSR1) and gives them ``SHUTDOWN_TIMEOUT_S`` to
exit. The workers stop at the same batch boundary and exit with 128 + the signal number, as a
single training process does; torchrun itself then exits with status 1 (after a signal, and when a
worker fails). A second signal to torchrun cuts the workers' graceful stop short.

The collectives the training loop needs (:func:`all_reduce_sum`, :func:`agree_on_signal`,
:func:`barrier`) are no-ops in a single process, so the loop has one code path. This module imports
torch only inside the functions that need it: the Snakefile imports it (:func:`rule_launcher`) in an
environment without torch.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import shlex
import signal
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conv2dlstm.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
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
                "start training through torchrun (the train rule does when train.gpus > 1)"
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


def train_processes(config: dict[str, Any], run: str) -> int:
    """Training processes of ``run``: its ``train.gpus`` (GPUs, or CPU processes with ``train.device: cpu``)."""
    from conv2dlstm.config.validate import run_config

    return int(run_config(config, run)["train"]["gpus"])


def launch_command(nprocs: int) -> list[str]:
    """The command, followed by the step and its arguments, that runs ``python -m conv2dlstm`` as
    ``nprocs`` training processes: that itself for one, else ``torchrun ... -m -- conv2dlstm``
    starting ``nprocs`` local workers.

    ``--``: torchrun's parser would reject worker options that abbreviate two of its own
    (``--run`` -> ``--run-path``, ``--run_path``); after it, nothing is parsed as torchrun's.
    """
    if nprocs <= 1:
        return ["python", "-m", "conv2dlstm"]
    return [
        "torchrun",
        "--standalone",
        f"--nproc-per-node={nprocs}",
        f"--signals-to-handle={','.join(s.name for s in TORCHRUN_SIGNALS)}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        "-m",
        "--",
        "conv2dlstm",
    ]


def rule_launcher(config: dict[str, Any], run: str) -> str:
    """The train rule's launcher of ``run`` as a shell command (:func:`launch_command`).

    The rule declares it as a resource, not a param: ``train.gpus`` determines no result, so a
    changed value must not rerun the step (params are Snakemake's rerun trigger, :mod:`conv2dlstm.config.keys`).
    """
    return shlex.join(launch_command(train_processes(config, run)))


def require_torchrun(gpus: int, run: str, env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` when ``gpus > 1`` processes are asked for but this process was
    not started by torchrun (:func:`under_torchrun`): it names the command to start it with."""
    if gpus <= 1 or under_torchrun(env):
        return
    command = shlex.join([*launch_command(gpus), "train"])
    raise ConfigError(
        f"train.gpus = {gpus} (run {run}) trains with {gpus} processes started by torchrun, but this is a "
        f"plain process; start it as `{command} <the same arguments>` (what the Snakemake rule train "
        "runs), or set train.gpus to 1"
    )


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def worker_device(ctx: Context, device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` on CUDA (made current), else ``device`` unchanged."""
    if device.type != "cuda" or not ctx.distributed:
        return device
    import torch

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

    The group rendezvous uses torchrun's ``MASTER_ADDR`` / ``MASTER_PORT`` (``env://``). The DDP
    models of the block (:func:`wrap_model`) must be gone before the group is destroyed: create
    them in a function the block calls. When the block raises, the locals of its finished frames,
    which the exception's traceback keeps, are freed first (:func:`release_frames`).
    """
    if not ctx.distributed:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group(
        backend=backend_for(device),
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    except BaseException as exc:
        release_frames(exc)
        raise
    finally:
        dist.destroy_process_group()


def release_frames(exc: BaseException) -> None:
    """Free the locals of the finished frames that ``exc`` (and the exceptions it chains) keeps alive,
    and collect: a DDP model among them must not outlive its process group.

    A DDP model's C++ reducer holds a reference to the process group. Were it the last one, the
    group would be destroyed with the reducer, with the GIL held, waiting for its gloo threads; a
    thread finishing its last work may need the GIL to free a Python object, and the process hangs
    (pytorch/pytorch#56297; seen in this project's DDP test). Freed first, the reducer leaves the
    group to ``destroy_process_group``, which releases the GIL while it waits. The traceback's text
    (files, lines, functions) is kept; only the frames' local variables go.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # frames still running (the callers) are skipped
        pending += [current.__cause__, current.__context__]
    gc.collect()  # the model, the optimizer and their closures refer to each other


def wrap_model(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model``.

    DDP broadcasts rank 0's parameters and buffers once, at construction, but not on every forward:
    the models' buffers are constants, and validation runs the unwrapped model on each rank's share
    of the windows (a different number of forwards per rank).
    """
    if not ctx.distributed:
        return model
    from torch import nn

    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,
    )


def all_reduce_sum(ctx: Context, tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (in place; the tensor itself when not distributed)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_on_signal(ctx: Context, signum: int | None, device: torch.device) -> int | None:
    """The stop signal if any rank received one (the largest number), else None; same on every rank.

    One tiny all-reduce: called at every batch boundary, so all ranks stop at the same step.
    """
    if not ctx.distributed:
        return signum
    import torch
    import torch.distributed as dist

    flag = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return value or None


def barrier(ctx: Context, device: torch.device) -> None:
    """Wait until every rank gets here (nothing when not distributed)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
