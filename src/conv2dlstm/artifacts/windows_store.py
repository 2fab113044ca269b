"""The windows store, ``<outdir>/windows/<name>.zarr`` (Zarr v3; layout in ``docs/architecture.md``).

Written by the windows step (:mod:`conv2dlstm.steps.windows`, which takes :data:`SPLITS`,
:data:`FORMAT_VERSION` and the names from here), read through :class:`WindowsStore` by training
(:mod:`conv2dlstm.training.dataset`), evaluation and forecasting. Opening checks the format version, the
required variables and attributes, the window indices, that every recorded chunk is there with its
size and every metadata file's digest; every chunk is checked against its recorded digest when it is
read, before it is decoded (:func:`conv2dlstm.zarrstore.open_store`). A problem is a
:class:`~conv2dlstm.errors.DataError` naming the store, the file and the windows step.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.errors import Conv2dLstmError, DataError

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
"""Attribute ``format_version`` of the store; :class:`WindowsStore` refuses any other."""
"""The chronological splits; each has a ``<split>_start`` variable (window start indices)."""
REQUIRED_VARS = ("data", "mask", *(f"{s}_start" for s in SPLITS))
REQUIRED_ATTRS = ("input_variables", "target_variables", "input_steps", "lead_steps")
WHAT = "windows store"
"""How messages name this artifact."""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")


class WindowsStore:
    """Lazy, read-only view of a windows store; only the small arrays (coordinates, mask, starts) are read eagerly."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"windows store {self.path} does not exist; run the windows step first")
        # The record, every recorded file's presence and size, the metadata's digests; then every
        # chunk read through `store` is checked against its digest before it is decoded.
        store = zarrstore.open_store(self.path, what=WHAT, step="windows")
        try:
            with warnings.catch_warnings():  # consolidated metadata is optional in Zarr v3
                warnings.filterwarnings("ignore", message=".*consolidated metadata", category=RuntimeWarning)
                ds = xr.open_zarr(store, chunks=None, consolidated=True, zarr_format=3)
        except Conv2dLstmError:
            raise
        except Exception as exc:
            raise DataError(f"windows store {self.path} cannot be opened as Zarr ({exc}); rebuild it") from exc
        missing = [v for v in REQUIRED_VARS if v not in ds.variables]
        missing += [a for a in REQUIRED_ATTRS if a not in ds.attrs]
        if missing:
            raise DataError(f"windows store {self.path} lacks {missing}; rebuild it with the windows step")
        version = int(ds.attrs.get("format_version", 0))
        if version != FORMAT_VERSION:
            raise DataError(
                f"windows store {self.path} has format_version {version}, expected {FORMAT_VERSION}; "
                "rebuild it with the windows step of this version"
            )
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
        check_split(split)
        return self._starts[split]

    def init_times(self, split: str) -> np.ndarray:
        """Initial time (last input step) of each window, ``(n,)``."""
        return self.time[self.starts(split) + self.input_steps - 1]

    def valid_times(self, split: str) -> np.ndarray:
        """Valid time of each lead (1-based ``k``: ``time[t0 + T_in - 1 + k]``), ``(n, T_out)``."""
        lead = np.arange(1, self.lead_steps + 1)
        return self.time[self.starts(split)[:, None] + self.input_steps - 1 + lead]

    def read_time_range(self, start: int, stop: int) -> np.ndarray:
        """``data[start:stop]`` as float32 numpy, ``(stop - start, V, H, W)``; a chunk whose bytes are
        not those recorded (checked before it is decoded), or that cannot be decoded, is a
        :class:`DataError` naming the store, the chunk and the windows step."""
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
        """Bytes of the cube slice that :class:`conv2dlstm.training.dataset.InMemoryWindows` would load for
        ``split``."""
        start, stop = self.time_range(split)
        h, w = self.shape
        return (stop - start) * len(self.variables) * h * w * 4
