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
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.errors import DataError

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
_REQUIRED_VARS = ("data", "mask", *(f"{s}_start" for s in SPLITS))
_REQUIRED_ATTRS = ("input_variables", "target_variables", "input_steps", "lead_steps")
WHAT = "windows store"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


class WindowsStore:
    """Lazy, read-only view of a windows store; only the small arrays (coordinates, mask, starts) are read eagerly."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"windows store {self.path} does not exist; run the windows step first")
        try:
            with warnings.catch_warnings():  # consolidated metadata is optional in Zarr v3
                warnings.filterwarnings("ignore", message=".*consolidated metadata", category=RuntimeWarning)
                ds = xr.open_zarr(self.path, chunks=None, consolidated=None)
        except Exception as exc:
            raise DataError(f"windows store {self.path} cannot be opened as Zarr ({exc}); rebuild it") from exc
        missing = [v for v in _REQUIRED_VARS if v not in ds.variables]
        missing += [a for a in _REQUIRED_ATTRS if a not in ds.attrs]
        if missing:
            raise DataError(f"windows store {self.path} lacks {missing}; rebuild it with the windows step")
        version = int(ds.attrs.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise DataError(
                f"windows store {self.path} has format_version {version}, expected {FORMAT_VERSION}; "
                "rebuild it with the windows step of this version"
            )
        zarrstore.check_chunks(self.path, what=WHAT, step="windows")  # a deleted chunk is not NaN
        self._ds = ds
        self._data = ds["data"].variable  # lazily indexed (time, variable, lat, lon), no Dask
        variables = [str(v) for v in ds["variable"].values]
        self.variables = variables
        self.input_variables = [str(v) for v in np.atleast_1d(ds.attrs["input_variables"])]
        self.target_variables = [str(v) for v in np.atleast_1d(ds.attrs["target_variables"])]
        unknown = sorted(set(self.input_variables + self.target_variables) - set(variables))
        if unknown:
            raise DataError(
                f"windows store {self.path}: variables {unknown} are not in its variable coordinate {variables}; "
                "rebuild it with the windows step"
            )
        self.input_channels = [variables.index(v) for v in self.input_variables]
        self.target_channels = [variables.index(v) for v in self.target_variables]
        self.input_steps = int(ds.attrs["input_steps"])
        self.lead_steps = int(ds.attrs["lead_steps"])
        self.attrs: dict[str, Any] = dict(ds.attrs)
        self.time = ds["time"].values
        self.lat = ds["lat"].values
        self.lon = ds["lon"].values
        self.mask = np.asarray(ds["mask"].values, dtype=bool)  # (lat, lon), True = ocean
        self._starts = {s: np.asarray(ds[f"{s}_start"].values, dtype=np.int64) for s in SPLITS}
        span = self.input_steps + self.lead_steps
        for s, st in self._starts.items():
            if st.size and (st.min() < 0 or st.max() + span > self.time.size):
                raise DataError(f"windows store {self.path}: {s}_start indexes windows outside the time axis")

    def gap_tags(self) -> dict[str, str]:
        """``data.<name>`` MLflow tags of the gaps in the source data (the windows step copies the
        regridded store's gap attributes into ``source_gaps``), within MLflow's tag length limit."""
        out = {}
        for key, value in dict(self.attrs.get("source_gaps") or {}).items():
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            out[f"data.{key}"] = text if len(text) <= 5000 else text[:4990] + " ..."
        return out

    @property
    def shape(self) -> tuple[int, int]:
        """Grid size ``(H, W)`` = ``(lat, lon)``."""
        return int(self.lat.size), int(self.lon.size)

    def starts(self, split: str) -> np.ndarray:
        """Index into ``time`` of the first input step of each window of ``split``, ``(n,)`` int64."""
        _check_split(split)
        return self._starts[split]

    def init_times(self, split: str) -> np.ndarray:
        """Initial time (last input step) of each window, ``(n,)``."""
        return self.time[self.starts(split) + self.input_steps - 1]

    def valid_times(self, split: str) -> np.ndarray:
        """Valid time of each lead (1-based ``k``: ``time[t0 + T_in - 1 + k]``), ``(n, T_out)``."""
        lead = np.arange(1, self.lead_steps + 1)
        return self.time[self.starts(split)[:, None] + self.input_steps - 1 + lead]

    def read_time_range(self, start: int, stop: int) -> np.ndarray:
        """``data[start:stop]`` as float32 numpy, ``(stop - start, V, H, W)``; a chunk that cannot be
        decoded is a :class:`DataError` naming the store and the windows step."""
        with zarrstore.read_errors(self.path, what=WHAT, step="windows", detail=f"array 'data', time {start}..{stop}"):
            return np.asarray(self._data[start:stop].values, dtype=np.float32)

    def sample(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i`` of ``split``: ``x (T_in, C_in, H, W)``, ``y (T_out, C_out, H, W)``, float32."""
        starts = self.starts(split)
        if not -starts.size <= i < starts.size:
            raise IndexError(f"sample {i} out of range for the {starts.size} {split} windows")
        t0 = int(starts[i])
        tin = self.input_steps
        window = self.read_time_range(t0, t0 + tin + self.lead_steps)  # (T_in+T_out, V, H, W)
        x = np.ascontiguousarray(window[:tin, self.input_channels])
        y = np.ascontiguousarray(window[tin:, self.target_channels])
        return x, y

    def time_range(self, split: str) -> tuple[int, int]:
        """``[start, stop)`` of the time indices that the windows of ``split`` span."""
        starts = self.starts(split)
        if not starts.size:
            return 0, 0
        return int(starts.min()), int(starts.max()) + self.input_steps + self.lead_steps

    def cube_nbytes(self, split: str) -> int:
        """Bytes of the cube slice that :class:`InMemoryWindows` would load for ``split``."""
        start, stop = self.time_range(split)
        h, w = self.shape
        return (stop - start) * len(self.variables) * h * w * 4


class WindowDataset(torch.utils.data.Dataset):
    """Samples of one split streamed from the Zarr store, as float32 tensors ``(x, y)``.

    Picklable: each DataLoader worker opens its own lazy handle on first use.
    """

    def __init__(self, path: str | os.PathLike, split: str) -> None:
        _check_split(split)
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
        _check_split(split)
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
