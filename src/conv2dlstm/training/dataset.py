"""Reading training windows from the windows store (layout in ``docs/architecture.md``).

The store holds the normalized cube ``data (time, variable, lat, lon)`` once plus the start index of
every window of each split. A sample is two slices of that cube:

- ``x = data[t0 : t0+T_in, input_channels]``            ``(T_in, C_in, H, W)``
- ``y = data[t0+T_in : t0+T_in+T_out, target_channels]`` ``(T_out, C_out, H, W)``

Two ways to make batches from the same indices, giving identical values:

- :class:`WindowDataset` streams samples from Zarr (a ``torch.utils.data.Dataset``; DataLoader
  worker processes each open the store lazily);
- :class:`InMemoryWindows` loads the cube slice that a split's windows span once onto the device
  and gathers batches there by index (used when it fits in device memory).

With data-parallel training each process reads only its share of every batch
(:func:`shard_batches`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from conv2dlstm.artifacts.windows_store import WindowsStore, check_split


class WindowDataset(torch.utils.data.Dataset):
    """Samples of one split streamed from the Zarr store, as float32 tensors ``(x, y)``.

    Picklable: each DataLoader worker opens its own lazy handle on first use.
    """

    def __init__(self, path: str | os.PathLike, split: str) -> None:
        check_split(split)
        self.path = Path(path)
        self.split = split
        self._store: WindowsStore | None = None
        self._len = int(self.store.starts(split).size)

    @property
    def store(self) -> WindowsStore:
        if self._store is None:
            self._store = WindowsStore(self.path)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # reopened lazily in the worker process
        return state

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.store.sample(self.split, int(i))
        return torch.from_numpy(x), torch.from_numpy(y)


class InMemoryWindows:
    """The cube slice spanned by one split's windows, loaded once onto ``device``; batches gathered by index."""

    def __init__(self, store: WindowsStore, split: str, device: str | torch.device = "cpu") -> None:
        check_split(split)
        self.split = split
        self.device = torch.device(device)
        start, stop = store.time_range(split)
        cube = torch.from_numpy(store.read_time_range(start, stop))  # (T_span, V, H, W)
        self.cube = cube.to(self.device)
        self.starts = torch.as_tensor(store.starts(split) - start, dtype=torch.long, device=self.device)  # (n,)
        self.input_offsets = torch.arange(store.input_steps, device=self.device)  # (T_in,)
        self.target_offsets = torch.arange(
            store.input_steps, store.input_steps + store.lead_steps, device=self.device
        )  # (T_out,)
        self.input_channels = torch.as_tensor(store.input_channels, device=self.device)  # (C_in,)
        self.target_channels = torch.as_tensor(store.target_channels, device=self.device)  # (C_out,)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, T_in, C_in, H, W)``, ``y (B, T_out, C_out, H, W)`` of the samples ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        t0 = self.starts[idx]  # (B,)
        t_in = (t0[:, None] + self.input_offsets)[:, :, None]  # (B, T_in, 1)
        t_out = (t0[:, None] + self.target_offsets)[:, :, None]  # (B, T_out, 1)
        x = self.cube[t_in, self.input_channels[None, None, :]]  # (B, T_in, C_in, H, W)
        y = self.cube[t_out, self.target_channels[None, None, :]]  # (B, T_out, C_out, H, W)
        return x, y


def _reopen_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: drop a store handle inherited through fork (reopened on first use)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, WindowDataset):
        info.dataset._store = None


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


DATA_ON_DEVICE = ("auto", "always", "never")
"""Values of config key ``train.data_on_device`` (see :func:`use_in_memory`)."""


def use_in_memory(mode: str, nbytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether to keep windows on the device: ``always``, ``never``, or ``auto`` (when ``nbytes`` is under
    ``fraction`` of the device's free memory)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if mode != "auto":
        raise ValueError(f"config key train.data_on_device: {mode!r} is not one of {list(DATA_ON_DEVICE)}")
    return nbytes <= fraction * available_memory_bytes(device)


def shard_batches(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """This process's share of each batch: the elements ``rank, rank + world_size, ...``.

    Over the ranks the shares of a batch are disjoint and their union is the batch, so one
    data-parallel step sees exactly the windows of one single-process step. Shares of a batch differ
    in size by at most one; a short last batch can leave a rank an empty share.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return [list(map(int, batch[rank::world_size])) for batch in batches]


def iter_batches(
    source: WindowDataset | InMemoryWindows,
    index_batches: Iterable[Sequence[int]],
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x, y)`` on ``device`` for each list of sample indices, in order.

    ``InMemoryWindows`` gathers on its device; ``WindowDataset`` goes through a DataLoader (worker
    processes, pinned memory, non-blocking copies).
    """
    device = torch.device(device)
    if isinstance(source, InMemoryWindows):
        for idx in index_batches:
            x, y = source.batch(idx)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(
        source,
        batch_sampler=[list(map(int, idx)) for idx in index_batches],
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_reopen_in_worker if num_workers > 0 else None,
    )
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
