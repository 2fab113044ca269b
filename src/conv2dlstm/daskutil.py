"""The Dask cluster of a preprocessing step: a local one sized from the rule's resources, or an existing one.

Every step that touches a data cube runs inside :func:`dask_client`. A local cluster has one worker
process with ``threads`` threads and a hard memory limit, so a step's memory is bounded by its chunk
sizes and the limit, never by the size of the data. Data far smaller than the limit (the step says
how large, :data:`IN_PROCESS_FACTOR`) is computed in the step's own process instead, with as many
threads and without a worker process to start. When a chunk does not fit, the worker spills to
disk, pauses, and is finally restarted by its nanny; :func:`compute_errors` turns that into an error
that says what to change.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator

import dask
import distributed

from conv2dlstm.errors import ConfigError, Conv2dLstmError

log = logging.getLogger(__name__)

ADDRESS_ENV = "DASK_SCHEDULER_ADDRESS"
DEFAULT_MEMORY_MB = 4096
"""Memory of a step when the rule gives none (enough for the default chunks, safe on a laptop)."""
WORKER_MEMORY_FRACTION = 0.75
"""Share of the step's memory given to the worker; the rest is for this process and the scheduler."""

CONNECT_TIMEOUT_S = 10


def worker_memory_limit(memory_mb: int | None) -> int:
    """Worker memory limit in bytes: :data:`WORKER_MEMORY_FRACTION` of the step's ``memory_mb`` MiB."""
    mb = DEFAULT_MEMORY_MB if memory_mb is None else int(memory_mb)
    if mb < 400:
        raise ConfigError(
            f"step memory {mb} MB is too small (the Dask worker and this process need at least 400 MB); "
            "raise the rule's mem_mb resource or --memory-mb"
        )
    return int(mb * WORKER_MEMORY_FRACTION) * 1024 * 1024


@contextlib.contextmanager
def _quiet(logger_name: str, level: int) -> Iterator[None]:
    """Raise the level of one logger for the duration of the block (the step's log stays readable)."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)


IN_PROCESS_FACTOR = 8
"""Data that fits this many times into the worker's memory limit is computed in the step's own
process (Dask's threaded scheduler): even held whole, with working copies, it cannot reach the
limit, so the worker process and its start-up (about 1.5 s of CPU per step) are not needed."""


@contextlib.contextmanager
def dask_client(
    *,
    threads: int,
    memory_mb: int | None,
    address: str = "",
    data_bytes: int | None = None,
    worker_setup: Callable[[], object] | None = None,
) -> Iterator[distributed.Client | None]:
    """The scheduler of every Dask computation inside the block: a ``distributed.Client``, or None
    for Dask's threaded scheduler in this process.

    ``address`` (else the ``DASK_SCHEDULER_ADDRESS`` environment variable) connects to an existing
    scheduler, which is left running on exit. Without an address, ``data_bytes`` (the most the
    block's computations can hold at once were nothing streamed: the whole input, or one slab of
    it) decides: data that fits :data:`IN_PROCESS_FACTOR` times into the worker's memory limit is
    computed here with ``threads`` threads; larger data, or ``data_bytes`` None, gets a
    ``LocalCluster`` with one worker process of ``threads`` threads and no dashboard, closed on
    exit. ``memory_mb`` (default :data:`DEFAULT_MEMORY_MB`) is the whole step's memory: the worker's
    limit is :data:`WORKER_MEMORY_FRACTION` of it, so the worker spills, pauses and is stopped
    before the job as a whole exceeds its allocation.

    ``worker_setup`` (a picklable function of no argument) runs on every worker process of the
    client, those that join later or are restarted included (a ``WorkerPlugin``): the per-process
    settings that the step makes for itself in its own process. On an existing scheduler it stays
    registered after the block, and a later step's plugin of the same function replaces it.
    """
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}; give the rule one or more threads")
    address = address or os.environ.get(ADDRESS_ENV, "")
    if address:
        with _connected(address) as client:
            _register(client, worker_setup)
            yield client
        return

    limit = worker_memory_limit(memory_mb)
    if data_bytes is not None and data_bytes * IN_PROCESS_FACTOR <= limit:
        log.info(
            "Dask: %d threads in this process (the data, %.0f MB, is far below the worker memory limit of %d MB)",
            threads,
            data_bytes / 1e6,
            limit // (1024 * 1024),
        )
        with dask.config.set(scheduler="threads", num_workers=threads):
            yield None
        return
    with _local_cluster(threads, limit) as client:
        _register(client, worker_setup)
        yield client


class _WorkerSetup(distributed.WorkerPlugin):
    """Runs ``fn`` in every worker process (:func:`dask_client`'s ``worker_setup``)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        # named by the function (a partial's too, whatever its arguments): registering it again replaces it
        base = fn.func if isinstance(fn, functools.partial) else fn
        self.name = f"conv2dlstm-setup-{getattr(base, '__module__', '')}.{getattr(base, '__qualname__', repr(base))}"

    def setup(self, worker: distributed.Worker) -> None:
        self.fn()


def _register(client: distributed.Client, worker_setup: Callable[[], object] | None) -> None:
    """Register ``worker_setup`` on every worker of ``client`` (nothing when it is None)."""
    if worker_setup is not None:
        plugin = _WorkerSetup(worker_setup)
        client.register_plugin(plugin, name=plugin.name)


@contextlib.contextmanager
def _connected(address: str) -> Iterator[distributed.Client]:
    """A client of the existing scheduler at ``address``, closed on exit (the scheduler keeps running)."""
    try:
        with _quiet("distributed", logging.WARNING):
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=True)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(
            f"cannot connect to the Dask scheduler at {address!r} (config dask.scheduler_address or "
            f"${ADDRESS_ENV}): {exc}; start the scheduler or clear the setting to use a local cluster"
        ) from exc
    n_workers = len(client.scheduler_info()["workers"])
    log.info("Dask: connected to the scheduler at %s (%d workers)", address, n_workers)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _local_cluster(threads: int, limit: int) -> Iterator[distributed.Client]:
    """A client of a new ``LocalCluster``: one worker process of ``threads`` threads with the memory
    limit ``limit`` (bytes), no dashboard; both closed on exit."""
    # allowed-failures 0: a task that kills its worker (out of memory) fails at once instead of
    # being retried. No dashboard; the scheduler's plain HTTP endpoint takes a free port, so that
    # concurrent jobs on one node do not clash.
    with _quiet("distributed", logging.WARNING), dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=threads,
            processes=True,
            memory_limit=limit,
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"},
            silence_logs=logging.WARNING,
        )
        try:
            client = distributed.Client(cluster, set_as_default=True)
            log.info(
                "Dask: local cluster %s, 1 worker process, %d threads, worker memory limit %d MB",
                cluster.scheduler_address,
                threads,
                limit // (1024 * 1024),
            )
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()


@contextlib.contextmanager
def compute_errors(what: str) -> Iterator[None]:
    """Turn a worker killed by its memory limit during ``what`` into an error that names the fix."""
    try:
        yield
    except distributed.KilledWorker as exc:
        raise Conv2dLstmError(
            f"{what}: a Dask worker died, most likely by exceeding its memory limit ({exc}); give the "
            "rule more memory (resources mem_mb / --memory-mb) or fewer threads"
        ) from exc
