"""Tiny windows stores (layout of docs/architecture.md) and matching normalization stats for tests.

``make_windows_store(path)`` writes a seeded synthetic cube, normalized with statistics fitted on its
training period, as a Zarr v3 windows store, plus the stats netCDF next to it. The default field is
a pattern moving east by one cell per time step (learnable: the future is the past shifted), with
land in the westernmost columns, where the pattern enters the grid.

Both carry provenance records (:mod:`conv2dlstm.artifacts.provenance`) as the normalize and windows steps
write them: their "regrid" input is a digest of the cube's values and mask, their configuration
digest one of the fixture's arguments, so the same arguments give the same digests wherever the
store is written, and other data give others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.artifacts import provenance
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.fsutil import sha256_file


@dataclass
class WindowsFixture:
    store: Path
    stats: Path
    physical: np.ndarray  # (time, variable, lat, lon), NaN on land
    normalized: np.ndarray  # (time, variable, lat, lon), the store's `data` (land = 0)
    mask: np.ndarray  # (lat, lon) bool, True = ocean
    time: pd.DatetimeIndex
    lat: np.ndarray
    lon: np.ndarray
    variables: list[str]
    input_variables: list[str]
    target_variables: list[str]
    input_steps: int
    lead_steps: int
    starts: dict[str, np.ndarray]
    mean: np.ndarray  # (variable,)
    std: np.ndarray  # (variable,)
    windows_digest: str  # provenance digest of the store
    stats_digest: str  # provenance digest of the statistics


def _digest(*parts: object) -> str:
    """16 hex digits of SHA-256 over ``parts`` (arrays by their bytes, anything else as JSON)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def moving_waves(n_time: int, n_var: int, height: int, width: int, *, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """``(time, variable, lat, lon)``: a sum of sinusoids in ``lon - time`` (one cell per step eastward)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_time)[:, None, None]
    i = np.arange(height)[None, :, None]
    j = np.arange(width)[None, None, :]
    out = np.empty((n_time, n_var, height, width), dtype=np.float64)
    for v in range(n_var):
        field = np.zeros((n_time, height, width))
        for _ in range(3):
            wavelength = rng.uniform(5.0, 11.0)
            phase = rng.uniform(0, 2 * np.pi)
            lat_mod = 1.0 + 0.5 * np.cos(2 * np.pi * i / rng.uniform(6.0, 14.0) + rng.uniform(0, 2 * np.pi))
            field = field + lat_mod * np.sin(2 * np.pi * (j - t) / wavelength + phase)
        out[:, v] = 15.0 + 3.0 * v + 2.0 * field + noise * rng.standard_normal(field.shape)
    return out.astype(np.float32)


def default_mask(height: int, width: int, land_columns: int = 2) -> np.ndarray:
    """Ocean everywhere except the ``land_columns`` westernmost columns and one 2x2 island."""
    mask = np.ones((height, width), dtype=bool)
    mask[:, :land_columns] = False
    if height >= 6 and width >= 6:
        mask[height // 2 : height // 2 + 2, width // 2 : width // 2 + 2] = False
    return mask


def split_starts(bounds: dict[str, tuple[int, int]], span: int, stride: int) -> dict[str, np.ndarray]:
    """Window starts wholly inside each ``[lo, hi)`` split."""
    return {s: np.arange(lo, hi - span + 1, stride, dtype=np.int64) for s, (lo, hi) in bounds.items()}


def make_windows_store(
    path: str | Path,
    *,
    stats_path: str | Path | None = None,
    n_time: int = 40,
    height: int = 10,
    width: int = 12,
    variables: tuple[str, ...] = ("sst",),
    input_variables: list[str] | None = None,
    target_variables: list[str] | None = None,
    input_steps: int = 3,
    lead_steps: int = 2,
    stride: int = 1,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    values: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    noise: float = 0.0,
    seed: int = 0,
    time_chunk: int = 0,
    start: str = "2020-01-01",
) -> WindowsFixture:
    """Write a windows store at ``path`` and its stats netCDF (default ``<path>.stats.nc``)."""
    path = Path(path)
    stats_path = Path(stats_path) if stats_path is not None else path.with_suffix(".stats.nc")
    variables = list(variables)
    input_variables = list(input_variables or variables)
    target_variables = list(target_variables or variables)
    if values is None:
        values = moving_waves(n_time, len(variables), height, width, seed=seed, noise=noise)
    values = np.asarray(values, dtype=np.float32)
    n_time, n_var, height, width = values.shape
    mask = default_mask(height, width) if mask is None else np.asarray(mask, dtype=bool)
    time = pd.date_range(start, periods=n_time, freq="D")
    lat = np.linspace(20.5, 20.5 + height - 1, height)
    lon = np.linspace(-70.5, -70.5 + width - 1, width)

    n_train = int(round(split_fractions[0] * n_time))
    n_val = int(round(split_fractions[1] * n_time))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n_time)}
    starts = split_starts(bounds, input_steps + lead_steps, stride)

    physical = np.where(mask, values, np.nan).astype(np.float32)  # (time, variable, lat, lon)
    train = physical[:n_train]
    mean = np.nanmean(train, axis=(0, 2, 3)).astype(np.float32)  # (variable,)
    std = np.nanstd(train, axis=(0, 2, 3)).astype(np.float32)
    normalized = (physical - mean[None, :, None, None]) / std[None, :, None, None]
    normalized = np.where(mask, normalized, 0.0).astype(np.float32)

    # Stats: day-of-year means of the training period in physical units (unsmoothed here).
    doy = np.asarray(time[:n_train].day_of_year)
    clim = np.empty((366, n_var, height, width), dtype=np.float32)
    clim[:] = mean[None, :, None, None]
    for d in np.unique(doy):
        clim[d - 1] = train[doy == d].mean(axis=0)  # NaN on land
    clim = np.where(mask, clim, np.nan)
    regrid_digest = _digest(physical, mask, variables, str(time[0]))
    settings = {
        "input_variables": input_variables,
        "target_variables": target_variables,
        "input_steps": input_steps,
        "lead_steps": lead_steps,
        "stride": stride,
        "split_fractions": list(split_fractions),
    }
    stats_record = provenance.make_record("normalize", _digest(variables, n_train), {"regrid": regrid_digest})
    windows_record = provenance.make_record(
        "windows", _digest(settings), {"regrid": regrid_digest, "stats": stats_record["digest"]}
    )
    stats = xr.Dataset(
        {
            "mean": ("variable", mean),
            "std": ("variable", std),
            "climatology": (("dayofyear", "variable", "lat", "lon"), clim),
            "mask": (("lat", "lon"), mask),
            "variable_units": ("variable", np.array(["degC"] * n_var, dtype=object)),
        },
        coords={"dayofyear": np.arange(1, 367), "variable": np.array(variables, dtype=object), "lat": lat, "lon": lon},
        attrs={
            "train_start": str(time[0].date()),
            "train_end": str(time[n_train - 1].date()),
            "per_pixel": 0,
            "climatology_window": 31,
            "format_version": stats_file.FORMAT_VERSION,
            **provenance.to_attrs(stats_record),
        },
    )
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats.to_netcdf(stats_path)

    ds = xr.Dataset(
        {
            "data": (("time", "variable", "lat", "lon"), normalized),
            "mask": (("lat", "lon"), mask),
            **{f"{s}_start": (f"{s}_sample", starts[s]) for s in starts},
        },
        coords={"time": time, "variable": np.array(variables, dtype=object), "lat": lat, "lon": lon},
        attrs={
            "input_variables": input_variables,
            "target_variables": target_variables,
            "input_steps": input_steps,
            "lead_steps": lead_steps,
            "stats_sha256": sha256_file(stats_path),
            "format_version": 1,
            **{f"{s}_period": f"{time[a].date()}..{time[b - 1].date()}" for s, (a, b) in bounds.items() if b > a},
            **provenance.to_attrs(windows_record),
        },
    )
    chunk = time_chunk or (input_steps + lead_steps)
    zarrstore.write_store(ds.chunk({"time": chunk}), path)  # as the windows step writes it
    return WindowsFixture(
        store=path,
        stats=stats_path,
        physical=physical,
        normalized=normalized,
        mask=mask,
        time=time,
        lat=lat,
        lon=lon,
        variables=variables,
        input_variables=input_variables,
        target_variables=target_variables,
        input_steps=input_steps,
        lead_steps=lead_steps,
        starts=starts,
        mean=mean,
        std=std,
        windows_digest=windows_record["digest"],
        stats_digest=stats_record["digest"],
    )
