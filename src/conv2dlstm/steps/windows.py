"""Sample windows: the normalized cube stored once, plus the start index of every window of each split.

A window is ``input_steps + lead_steps`` consecutive time steps. It lies wholly inside its split's
period (whole days, both ends included: :func:`conv2dlstm.data.harmonize.day_bounds`) and spans no gap:
every step is the nominal time step after the previous one. Storage does not grow with the window
length: samples are slices of ``data``.

Store layout (Zarr v3, see docs/architecture.md): ``data (time, variable, lat, lon)`` float32
normalized (gaps of at most ``harmonize.fill_max_days`` days filled first, as the normalize step
filled them: :mod:`conv2dlstm.data.gapfill`) with land and missing values set to 0, chunked
``(time_chunk, all, all, all)``;
``mask (lat, lon)``; ``train_start``, ``val_start``, ``test_start`` int64 indices into ``time``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.artifacts import regridded
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.artifacts.windows_store import FORMAT_VERSION, SPLITS
from conv2dlstm.data import checks, gapfill
from conv2dlstm.data import harmonize as hz
from conv2dlstm.data.checks import nominal_step
from conv2dlstm.data.windowing import window_starts
from conv2dlstm.errors import DataError

log = logging.getLogger(__name__)


def _check_training_period(stats: xr.Dataset, cfg: Mapping[str, Any]) -> None:
    """:class:`DataError` unless the statistics record that they were fitted on ``splits.train``."""
    train = cfg["splits"]["train"]
    missing = [a for a in ("train_start", "train_end") if a not in stats.attrs]
    if missing:
        raise DataError(
            f"the statistics have no attribute(s) {missing}, so the period they were fitted on is unknown "
            f"(splits.train is {train['start']}..{train['end']}); re-run the normalize step with this configuration"
        )
    fitted = (str(stats.attrs["train_start"]), str(stats.attrs["train_end"]))
    if fitted != (train["start"], train["end"]):
        raise DataError(
            f"the statistics were fitted on {fitted[0]}..{fitted[1]} but splits.train is "
            f"{train['start']}..{train['end']}; re-run the normalize step with this configuration"
        )


def _check_fill(stats: xr.Dataset, cfg: Mapping[str, Any]) -> None:
    """:class:`DataError` unless the statistics were fitted with the gaps filled as ``harmonize.fill_max_days``
    fills them here (their mask depends on it)."""
    days = int(cfg["harmonize"]["fill_max_days"])
    fitted = int(stats.attrs.get("fill_max_days", 0))
    if fitted != days:
        raise DataError(
            f"the statistics were fitted with gaps of up to {fitted} day(s) filled but harmonize.fill_max_days is "
            f"{days}; re-run the normalize step with this configuration"
        )


def split_starts(times: np.ndarray, cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Window starts of each split of ``cfg['splits']``; :class:`DataError` when a split has none."""
    w = cfg["windows"]
    step = nominal_step(times)
    starts = {}
    for split in SPLITS:
        period = cfg["splits"][split]
        idx = window_starts(
            times,
            start=period["start"],
            end=period["end"],
            input_steps=w["input_steps"],
            lead_steps=w["lead_steps"],
            stride=w["stride"],
            step=step,
        )
        if idx.size == 0:
            span = f"{str(times[0])[:10]}..{str(times[-1])[:10]}" if len(times) else "no time steps"
            raise DataError(
                f"split {split} ({period['start']}..{period['end']}) has no window of "
                f"{w['input_steps']}+{w['lead_steps']} consecutive steps inside it (data covers {span}); "
                f"lengthen splits.{split}, fetch data covering it, or lower windows.input_steps/lead_steps"
            )
        starts[split] = idx
    return starts


def _plain(value: Any) -> Any:
    """A netCDF attribute (numpy scalar) as the plain Python value a Zarr (JSON) attribute holds."""
    return value.item() if isinstance(value, np.generic) else value


def build_store(
    ds: xr.Dataset,
    stats: xr.Dataset,
    cfg: Mapping[str, Any],
    *,
    stats_sha256: str = "",
) -> xr.Dataset:
    """The windows store as a lazy Dataset (see the module docstring); nothing is computed."""
    inputs = list(cfg["variables"]["inputs"])
    targets = list(cfg["variables"]["targets"])
    variables = list(dict.fromkeys([*inputs, *targets]))
    stats_file.check_grid(
        stats,
        ds["lat"].values,
        ds["lon"].values,
        stats_path=stats.encoding.get("source", "(in memory)"),
        data=f"the regridded store {ds.encoding.get('source', '(in memory)')}",
    )
    _check_training_period(stats, cfg)
    _check_fill(stats, cfg)
    # gaps filled over the whole record, as normalize filled them, before the splits are cut
    ds = gapfill.fill_gaps(ds, int(cfg["harmonize"]["fill_max_days"]))
    first = min(pd.Timestamp(cfg["splits"][s]["start"]) for s in SPLITS)
    last = max(pd.Timestamp(cfg["splits"][s]["end"]) for s in SPLITS)
    keep = np.flatnonzero(hz.in_period(ds["time"].values, first, last))  # contiguous: times are sorted
    ds = ds.isel(time=slice(int(keep[0]), int(keep[-1]) + 1) if keep.size else slice(0, 0))
    times = ds["time"].values
    starts = split_starts(times, cfg)
    w = cfg["windows"]
    time_chunk = int(w["time_chunk"]) or int(w["input_steps"] + w["lead_steps"])
    data = stats_file.normalized_cube(ds, stats, variables).chunk(
        {"time": time_chunk, "variable": -1, "lat": -1, "lon": -1}
    )
    data.attrs = {"long_name": "normalized values; land and missing set to 0"}
    out = xr.Dataset(
        {
            "data": data,
            "mask": stats["mask"].astype(bool).reset_coords(drop=True),
            **{f"{s}_start": (f"{s}_sample", starts[s]) for s in SPLITS},
        },
        coords={
            "time": ds["time"],
            "variable": np.array(variables, dtype=object),
            "lat": ds["lat"],
            "lon": ds["lon"],
        },
        attrs={
            "input_variables": inputs,
            "target_variables": targets,
            "input_steps": int(w["input_steps"]),
            "lead_steps": int(w["lead_steps"]),
            "stride": int(w["stride"]),
            "time_chunk": time_chunk,
            "stats_sha256": stats_sha256,
            "format_version": FORMAT_VERSION,
            "source_gaps": {  # of the regridded period, and the cells its missing values made land (normalize)
                **{k: ds.attrs[k] for k in checks.GAP_ATTRS if k in ds.attrs},
                **{k: _plain(stats.attrs[k]) for k in stats_file.LAND_FROM_GAPS_ATTRS if k in stats.attrs},
            },
            **{f"{s}_period": f"{cfg['splits'][s]['start']}..{cfg['splits'][s]['end']}" for s in SPLITS},
        },
    )
    for name in out.variables:
        out[name].encoding = {}
    return out


def main(
    cfg: Mapping[str, Any],
    *,
    data: Path,
    stats: Path,
    out: Path,
    threads: int = 1,
    memory_mb: int | None = None,
) -> None:
    """Write the windows store ``out`` from the regridded store ``data`` and the statistics ``stats``.

    The store's attribute ``provenance`` records the result configuration and the provenance
    digests of the regridded store and the statistics (:mod:`conv2dlstm.artifacts.provenance`).
    """
    from conv2dlstm.artifacts import provenance
    from conv2dlstm.daskutil import dask_client
    from conv2dlstm.fsutil import discard_partials, sha256_file

    out = Path(out)
    for stray in discard_partials(out.parent, of=out.name):
        log.info("windows: discarded %s left by an interrupted run", stray)
    st = stats_file.load(Path(stats))
    ds = regridded.open(Path(data))
    try:
        _check_training_period(st, cfg)
        _check_fill(st, cfg)
    except DataError as exc:
        raise DataError(f"{stats}: {exc}") from exc
    inputs = {
        "regrid": provenance.from_attrs(ds.attrs, where=f"the regridded store {data}", step="regrid")["digest"],
        "stats": provenance.from_attrs(st.attrs, where=f"the statistics file {stats}", step="normalize")["digest"],
    }
    record = provenance.for_step(cfg, "windows", inputs)
    address = cfg["dask"]["scheduler_address"]
    with dask_client(threads=threads, memory_mb=memory_mb, address=address, data_bytes=ds.nbytes):
        store = build_store(ds, st, cfg, stats_sha256=sha256_file(stats))
        store.attrs.update(provenance.to_attrs(record))
        log.info(
            "windows: %s -> %s, %d steps x %d variables, windows train %d val %d test %d (provenance %s)",
            data,
            out,
            store.sizes["time"],
            store.sizes["variable"],
            store.sizes["train_sample"],
            store.sizes["val_sample"],
            store.sizes["test_sample"],
            record["digest"],
        )
        with zarrstore.read_errors(data, what=regridded.WHAT, step="regrid", codec_only=True):
            zarrstore.write_store(store, Path(out))
