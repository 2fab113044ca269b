"""dask_client: a real local cluster sized from threads/memory, or a real scheduler started separately."""

from __future__ import annotations

import functools

import dask.array as da
import distributed
import numpy as np
import pytest

from conv2dlstm.daskutil import ADDRESS_ENV, compute_errors, dask_client
from conv2dlstm.data import sources
from conv2dlstm.errors import ConfigError, Conv2dLstmError


def test_local_cluster_is_sized_and_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    with dask_client(threads=2, memory_mb=512) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 1
        (worker,) = workers.values()
        assert worker["nthreads"] == 2
        assert worker["memory_limit"] == 384 * 1024 * 1024  # 3/4 of the step's memory
        # The worker is a separate process, and dask uses the client by default.
        assert client.run(lambda: __import__("os").getpid()) != {}
        x = da.arange(1000, chunks=100).sum()
        assert x.compute() == 499500
        cluster = client.cluster
    assert client.status == "closed"
    assert cluster.status.name == "closed"


def test_existing_scheduler_by_address_is_used_and_left_running(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        with dask_client(threads=1, memory_mb=None, address=cluster.scheduler_address) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.cluster is None  # connected, not started here
            assert float(da.ones((10, 10), chunks=5).sum().compute()) == 100.0
        # The external scheduler still serves clients after the block.
        monkeypatch.setenv(ADDRESS_ENV, cluster.scheduler_address)
        with dask_client(threads=1, memory_mb=None) as client:
            assert client.scheduler.address == cluster.scheduler_address
            assert client.submit(np.add, 2, 3).result() == 5


def test_unreachable_scheduler_names_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("conv2dlstm.daskutil.CONNECT_TIMEOUT_S", 1)
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:9.*scheduler_address"):
        with dask_client(threads=1, memory_mb=None, address="tcp://127.0.0.1:9"):
            pass


def test_bad_resources_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="threads"):
        with dask_client(threads=0, memory_mb=None):
            pass
    with pytest.raises(ConfigError, match="memory"):
        with dask_client(threads=1, memory_mb=10):
            pass


def _hog_memory(mb: int) -> int:
    """Allocate and touch ``mb`` MiB in steps, slowly enough for the nanny to notice."""
    import time

    blocks = []
    for _ in range(mb // 64):
        blocks.append(np.ones(64 * 1024 * 1024 // 8))
        time.sleep(0.05)
    return len(blocks)


def test_worker_over_its_memory_limit_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    with dask_client(threads=1, memory_mb=500) as client:
        with pytest.raises(Conv2dLstmError, match="memory limit.*mem_mb"):
            with compute_errors("test step"):
                client.submit(_hog_memory, 4000, pure=False).result(timeout=60)


def test_small_data_is_computed_in_this_process_and_large_data_on_a_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import os
    import threading

    import dask

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    limit = 384 * 1024 * 1024  # the worker limit of a 512 MB step
    seen: set[tuple[int, int]] = set()

    def where(block: np.ndarray) -> np.ndarray:
        seen.add((os.getpid(), threading.get_ident()))
        return block

    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        with dask_client(threads=2, memory_mb=512, data_bytes=limit // 8) as client:
            assert client is None and dask.config.get("scheduler") == "threads"
            with pytest.raises(ValueError):
                distributed.get_client()  # no cluster was started
            blocks = da.ones(400, chunks=10).map_blocks(where, meta=np.array((), dtype=float))
            assert float(blocks.sum().compute()) == 400.0
    assert {pid for pid, _ in seen} == {os.getpid()} and len(seen) <= 2  # here, on at most 2 threads
    assert "2 threads in this process" in caplog.text
    with dask_client(threads=1, memory_mb=512, data_bytes=limit // 8 + 1) as client:
        assert client is not None and len(client.scheduler_info()["workers"]) == 1
        assert client.run(os.getpid) != {os.getpid()}  # a worker process


def _netcdf_chunk_caches(client: distributed.Client) -> list[int]:
    """netCDF-C's default chunk cache (bytes) in each worker process of ``client``."""
    return sorted(size for size, _, _ in client.run(lambda: __import__("netCDF4").get_chunk_cache()).values())


def test_worker_setup_runs_in_every_worker_process_restarted_ones_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    setup = functools.partial(sources.set_netcdf_chunk_cache, 12345)
    with dask_client(threads=1, memory_mb=512, worker_setup=setup) as client:
        assert _netcdf_chunk_caches(client) == [12345]
        client.restart()  # a new worker process (the nanny's restart after a worker dies)
        assert _netcdf_chunk_caches(client) == [12345]
    with dask_client(threads=1, memory_mb=512) as client:  # nothing set without it
        assert _netcdf_chunk_caches(client) != [12345]


def test_worker_setup_reaches_the_workers_of_an_existing_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for size in (4096, 2048):  # a later step's setup of the same function replaces the earlier one
            setup = functools.partial(sources.set_netcdf_chunk_cache, size)
            with dask_client(
                threads=1, memory_mb=None, address=cluster.scheduler_address, worker_setup=setup
            ) as client:
                assert _netcdf_chunk_caches(client) == [size, size]
                plugins = client.run(lambda dask_worker: [n for n in dask_worker.plugins if "conv2dlstm" in n])
                assert [len(names) for names in plugins.values()] == [1, 1], plugins
