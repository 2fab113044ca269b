"""Short gaps in time filled by linear interpolation, cell by cell (config ``harmonize.fill_max_days``).

A *gap* of a cell is a run of consecutive time steps where its value is missing (NaN) between two
steps where it has one. :func:`fill_gaps` replaces the values of every gap that spans at most
``max_days`` days by linear interpolation in time between the values before and after it (weights
from the time coordinate, so a day absent from the time axis counts as a missing day of the gap
and is not filled: the time axis is not changed). Longer gaps, values before a cell's first value
or after its last, and cells without any value (land) stay NaN.

A gap "spans" the days from the step after its last value to the step before its next value: with
a nominal time step ``s`` (:func:`conv2dlstm.data.checks.nominal_step`), it is filled when its two
neighbouring values are at most ``max_days`` days ``+ s`` apart (daily data: at most ``max_days``
consecutive missing days).

The normalize and windows steps fill the regridded store as they read it, before the ocean mask
is computed and before the values are normalized, so that a cell missing on a few days stays
ocean; the regridded store itself keeps the values as regridded. The fill is lazy and streams
chunk by chunk (Dask ``map_overlap`` along time, each chunk widened by the few steps a gap of
``max_days`` days can reach): memory is bounded by a chunk and its halo, and a gap across a chunk
boundary is filled exactly as within one chunk.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import xarray as xr

from conv2dlstm.data.checks import nominal_step

T = TypeVar("T", xr.Dataset, xr.DataArray)
DAY = np.timedelta64(1, "D")


def max_span_days(times: np.ndarray, max_days: int) -> float | None:
    """The largest distance in days between the values either side of a gap that is filled: ``max_days``
    plus the nominal step of ``times``; None when there is no step (fewer than two times)."""
    step = nominal_step(np.asarray(times, dtype="datetime64[ns]"))
    if step is None or step <= np.timedelta64(0, "ns"):
        return None
    return float(max_days) + float(step / DAY)


def fill_block(block: np.ndarray, days: np.ndarray, max_span: float) -> np.ndarray:
    """``block`` ``(time, ...)`` with each gap (along axis 0) whose neighbouring values are at most
    ``max_span`` days apart filled linearly in time; ``days`` ``(time,)`` (or broadcastable to
    ``(time, 1, ...)``) are the steps' times in days. Pure numpy; the input is not modified."""
    n = block.shape[0]
    days = np.asarray(days, dtype=np.float64).reshape(n)
    if n < 3:
        return block
    flat = block.reshape(n, -1)
    valid = np.isfinite(flat)
    cols = np.flatnonzero(valid.any(axis=0) & ~valid.all(axis=0))  # cells with a value and a gap
    if cols.size == 0:
        return block
    sub = flat[:, cols].astype(np.float64)
    ok = valid[:, cols]
    index = np.arange(n, dtype=np.int64)[:, None]
    prev = np.maximum.accumulate(np.where(ok, index, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(ok, index, n)[::-1], axis=0)[::-1]
    gap = ~ok & (prev >= 0) & (nxt < n)
    rows, where = np.nonzero(gap)
    if rows.size == 0:
        return block
    p, q = prev[rows, where], nxt[rows, where]
    near = days[q] - days[p] <= max_span + 1e-9
    rows, where, p, q = rows[near], where[near], p[near], q[near]
    if rows.size == 0:
        return block
    weight = (days[rows] - days[p]) / (days[q] - days[p])
    sub[rows, where] = sub[p, where] + weight * (sub[q, where] - sub[p, where])
    out = flat.copy()
    out[:, cols] = sub.astype(block.dtype, copy=False)
    return out.reshape(block.shape)


def _halo_steps(times: np.ndarray, max_span: float) -> int:
    """Time steps either side of a chunk that hold every value a gap in it may be filled from."""
    diffs = np.diff(np.asarray(times, dtype="datetime64[ns]")) / DAY
    smallest = float(diffs[diffs > 0].min()) if np.any(diffs > 0) else 1.0
    return max(1, math.ceil(max_span / smallest) + 1)


def fill_array(arr: xr.DataArray, max_days: int) -> xr.DataArray:
    """:func:`fill_block` over ``arr`` (a ``time`` dimension, datetime coordinate), lazily when ``arr``
    is Dask-backed (``map_overlap`` along time; no rechunking of the other dimensions); ``arr``
    itself when ``max_days`` is 0 or it has fewer than three steps."""
    if max_days <= 0 or arr.sizes.get("time", 0) < 3:
        return arr
    times = arr["time"].values
    span = max_span_days(times, max_days)
    if span is None:
        return arr
    dims = arr.dims
    x = arr.transpose("time", ...)
    days = ((np.asarray(times, dtype="datetime64[ns]") - np.asarray(times, dtype="datetime64[ns]")[0]) / DAY).astype(
        np.float64
    )
    if x.chunks is None:
        values = fill_block(np.asarray(x.values), days, span)
    else:
        import dask.array as dask_array

        data = x.data
        halo = min(_halo_steps(times, span), data.shape[0])
        shape = (days.size,) + (1,) * (data.ndim - 1)
        t = dask_array.from_array(days.reshape(shape), chunks=(data.chunks[0],) + (1,) * (data.ndim - 1))
        depth = {0: halo, **{i: 0 for i in range(1, data.ndim)}}
        values = dask_array.map_overlap(
            lambda block, tb: fill_block(block, tb, span),
            data,
            t,
            depth=[depth, depth],
            boundary="none",
            align_arrays=True,
            dtype=data.dtype,
            meta=np.array((), dtype=data.dtype),
        )
        if values.chunks != data.chunks:  # chunks shorter than the halo were merged: back to the store's
            values = values.rechunk(data.chunks)
    out = x.copy(data=values)
    return out.transpose(*dims)


def fill_gaps(obj: T, max_days: int) -> T:
    """``obj`` with the gaps of at most ``max_days`` days of every variable on ``time`` filled
    (:func:`fill_array`; see the module docstring); unchanged for ``max_days`` 0."""
    if max_days <= 0:
        return obj
    if isinstance(obj, xr.DataArray):
        return fill_array(obj, max_days)
    filled = {name: fill_array(obj[name], max_days) for name in obj.data_vars if "time" in obj[name].dims}
    return obj.assign(filled)
