"""Normalization statistics and day-of-year climatology (training period only), and the ocean mask.

Layout of the statistics file (``<outdir>/normalize/<name>.nc``, see docs/architecture.md):

- ``mean``, ``std``: ``(variable)``, or ``(variable, lat, lon)`` when ``per_pixel``; training period,
  ocean cells only. Per-pixel standard deviations are floored at :data:`STD_FLOOR_FRACTION` times
  the pooled standard deviation of the variable (over all ocean cells and training steps), so that
  a nearly constant cell (SST clamped at -1.8 degC under sea ice) does not turn tiny deviations into
  huge z-scores. Per-pixel statistics of land cells are 0 and 1 (land is masked downstream), and a
  standard deviation of 0 (a variable constant over the training period) is replaced by 1.
- ``climatology``: ``(dayofyear, variable, lat, lon)``, dayofyear 1..366, physical units: the
  training-period mean of each day of the year, smoothed by a circular running mean of
  ``climatology_window`` days (days without data are skipped; days still without a value, such as day
  366 when no leap year is in the training period, are interpolated circularly between their nearest
  neighbours).
- ``mask``: ``(lat, lon)`` bool, the ocean: cells finite at every time of every variable, once
  gaps of at most ``harmonize.fill_max_days`` days are filled (:mod:`conv2dlstm.data.gapfill`).
- ``variable_units``: ``(variable)`` strings; each variable's units also in its attributes.

The mask is the one product that looks at every period (train, validation and test): it is a
static land-sea mask, geography (which cells have data at all), not a statistic, and it uses only
whether values are missing, never the values. Cells that have data at some steps but not at others
(land made from gaps) are counted and named; past ``harmonize.max_land_from_gaps`` (a fraction of
the cells with data) the step stops. Gaps of at most ``harmonize.fill_max_days`` days are filled by
linear interpolation in time first, as the windows step fills them when it reads the regridded
store, and the values filled are counted (attributes ``gap_filled_values``, ``gap_filled_cells``).
Mean, std and climatology are fitted on the training
period (``splits.train``, whole days, :func:`conv2dlstm.data.harmonize.day_bounds`) alone, over the
mask's cells: no value from validation or test enters them.

Only reductions run on the cube (Dask, chunk by chunk); the results are small.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm import zarrstore
from conv2dlstm.artifacts import regridded
from conv2dlstm.artifacts import stats as stats_file
from conv2dlstm.data import checks, gapfill
from conv2dlstm.data import harmonize as hz
from conv2dlstm.data.dayofyear import circular_running_mean
from conv2dlstm.errors import DataError

log = logging.getLogger(__name__)

DAYS = 366
MIN_STD = 1e-12
"""A standard deviation at or below this is 0: the variable is constant (its std becomes 1)."""
STD_FLOOR_FRACTION = 1e-3
"""Per-pixel std floor, as a fraction of the variable's pooled std over ocean training cells."""


MAX_LISTED_DAYS = 5
"""Days listed in the messages about cells missing at some time steps; more are counted."""
MAX_LISTED_CELLS = 3
"""Cells ``(lat, lon)`` named in the message about too many cells made land by gaps."""


def ocean_mask(arr: xr.DataArray, *, unfilled: xr.DataArray | None = None) -> tuple[xr.DataArray, str]:
    """``(lat, lon)`` bool: finite at every time of every variable of ``arr`` ``(time, variable, lat, lon)``;
    and, when cells with data at some time steps are missing at others (they become land for the
    whole record), a phrase saying how many and on which days; empty otherwise. One pass over ``arr``.

    The mask's attributes say which cells gaps made land (``land_from_gaps_cells``, ``_days``,
    ``_fraction`` of the cells with data, ``_where``: a few ``(lat, lon)``) and, when ``arr`` is
    ``unfilled`` with its gaps filled (:mod:`conv2dlstm.data.gapfill`), how many values were filled
    in how many cells (``gap_filled_values``, ``gap_filled_cells``), counted in the same pass."""
    import dask

    present = arr.notnull()
    # per cell, the steps x variables with data; per step, the cells missing a variable: O(T + H W) memory
    lazy = [present.sum(("time", "variable")), (~present).any("variable").sum(("lat", "lon"))]
    if unfilled is not None:
        lazy.append((present & unfilled.isnull()).sum(("time", "variable")))
    count, missing_per_step, *filled = dask.compute(*lazy)
    total = arr.sizes["time"] * arr.sizes["variable"]
    mask = (count == total).rename("mask")
    mask.attrs = {}
    if filled:
        mask.attrs.update(gap_filled_values=int(filled[0].sum()), gap_filled_cells=int((filled[0] > 0).sum()))
    partial = (count > 0) & (count < total)  # data at some steps, missing at others
    if not bool(partial.any()):
        return mask, ""
    never = int((count == 0).sum())  # land: missing at every step
    days = pd.DatetimeIndex(arr["time"].values[missing_per_step.values > never])
    listed = ", ".join(f"{d:%Y-%m-%d}" for d in days[:MAX_LISTED_DAYS])
    more = f" and {days.size - MAX_LISTED_DAYS} more" if days.size > MAX_LISTED_DAYS else ""
    phrase = (
        f"{int(partial.sum())} grid cells with data at other time steps are missing on {days.size} of "
        f"{arr.sizes['time']} steps ({listed}{more})"
    )
    where = np.argwhere(partial.transpose("lat", "lon").values)[:MAX_LISTED_CELLS]
    mask.attrs.update(
        land_from_gaps_cells=int(partial.sum()),
        land_from_gaps_days=", ".join(f"{d:%Y-%m-%d}" for d in days[: checks.MAX_LISTED_GAPS])
        + (f" and {days.size - checks.MAX_LISTED_GAPS} more" if days.size > checks.MAX_LISTED_GAPS else ""),
        land_from_gaps_fraction=float(partial.sum()) / float((count > 0).sum()),
        land_from_gaps_where=", ".join(
            f"({float(arr['lat'].values[i]):g}, {float(arr['lon'].values[j]):g})" for i, j in where
        )
        + (" ..." if int(partial.sum()) > MAX_LISTED_CELLS else ""),
    )
    return mask, phrase


def training_slice(ds: hz.T, start: str, end: str) -> hz.T:
    """Time steps of days ``start`` to ``end`` inclusive (:func:`conv2dlstm.data.harmonize.select_period`).

    :class:`DataError` when there are none.
    """
    return hz.select_period(
        ds,
        start,
        end,
        what="the training period (splits.train)",
        fix="move splits.train inside the data or fetch that period (source.start/end)",
    )


def circular_smooth(clim: np.ndarray, window: int) -> np.ndarray:
    """:func:`~conv2dlstm.data.dayofyear.circular_running_mean` of ``window`` days along axis 0
    (366 days), gaps interpolated: days with no available value in their window are interpolated
    linearly between the nearest available days before and after (circularly)."""
    n = clim.shape[0]
    smooth = circular_running_mean(clim, window)
    gaps = ~np.isfinite(smooth)
    if gaps.any():
        flat = smooth.reshape(n, -1)
        for j in np.flatnonzero(gaps.reshape(n, -1).any(axis=0)):
            col = flat[:, j]
            ok = np.flatnonzero(np.isfinite(col))
            if ok.size == 0:
                continue  # never observed (land): stays NaN
            days = np.arange(n)
            xp = np.concatenate([ok - n, ok, ok + n])
            fp = np.tile(col[ok], 3)
            flat[:, j] = np.interp(days, xp, fp)
        smooth = flat.reshape(clim.shape)
    return smooth


def fit_stats(
    ds: xr.Dataset,
    *,
    train_start: str,
    train_end: str,
    variables: Sequence[str],
    per_pixel: bool = False,
    climatology_window: int = 31,
    fill_max_days: int = 0,
    max_land_from_gaps: float | None = None,
) -> xr.Dataset:
    """Fit mean, std and climatology on ``train_start..train_end`` (whole days) and the ocean mask.

    ``ds`` is a regridded dataset ``(time, lat, lon)`` (lazy). Gaps of at most ``fill_max_days`` days
    are filled first (:func:`conv2dlstm.data.gapfill.fill_gaps`, as the windows step does). No value
    outside the training period enters mean, std or climatology. The mask is geography and uses
    every time step (a cell that is ever missing is not ocean); statistics are taken over its cells
    only. When cells with data at some steps are missing at others (land made from gaps), more than
    ``max_land_from_gaps`` of the cells with data (None: no limit), :class:`DataError` names how many,
    where, on which days and the fix; fewer are a WARNING.
    """
    variables = list(dict.fromkeys(variables))
    raw = stats_file.stack_variables(ds, variables)  # (time, variable, lat, lon)
    arr = gapfill.fill_gaps(raw, int(fill_max_days))
    mask, partly_missing = ocean_mask(arr, unfilled=raw if fill_max_days > 0 else None)
    found, mask.attrs = dict(mask.attrs), {}
    land_from_gaps = {k: found[k] for k in stats_file.LAND_FROM_GAPS_ATTRS if k in found}
    if fill_max_days > 0:
        log.info(
            "normalize: filled %d missing value(s) in %d grid cell(s) by linear interpolation in time (gaps of at "
            "most %d day(s): harmonize.fill_max_days)",
            found["gap_filled_values"],
            found["gap_filled_cells"],
            fill_max_days,
        )
    if not bool(mask.any()):
        raise DataError(
            f"no ocean cell: every cell of {variables} is missing at some time step"
            + (f" ({partly_missing}: a file of those days holds no data?)" if partly_missing else "")
            + "; check the source files of those days and the regridded data (grid.min_ocean_fraction, region, "
            "variables)"
        )
    if partly_missing:
        _check_land_from_gaps(found, partly_missing, fill_max_days=int(fill_max_days), limit=max_land_from_gaps)
        log.warning(
            "normalize: %s, cells at lat, lon %s; the ocean mask is 'data at every time step', so these cells are "
            "land for the whole record and excluded from training and scores. If they are ocean, fill the source's "
            "gaps (harmonize.fill_max_days interpolates gaps of up to that many days; now %d) or drop the days with "
            "missing data from the source period",
            partly_missing,
            found["land_from_gaps_where"],
            int(fill_max_days),
        )
    train = training_slice(arr, train_start, train_end).astype(np.float64)
    mean, std, clim = _moments(train, mask, per_pixel=per_pixel)
    std = _checked_std(mean, std, train_start=train_start, train_end=train_end)
    shape = (len(variables), ds.sizes["lat"], ds.sizes["lon"])
    smooth = _smoothed_climatology(clim, mask, shape=shape, window=int(climatology_window))

    units = [str(ds[v].attrs.get("units", "unknown")) for v in variables]
    coords = {"variable": np.array(variables, dtype=object), "lat": ds["lat"], "lon": ds["lon"]}
    out = xr.Dataset(
        {
            "mean": mean.astype(np.float64).drop_vars([c for c in mean.coords if c not in coords]),
            "std": std.astype(np.float64).drop_vars([c for c in std.coords if c not in coords]),
            "climatology": (
                ("dayofyear", "variable", "lat", "lon"),
                smooth.astype(np.float32),
                {"long_name": "training-period day-of-year mean", "window_days": int(climatology_window)},
            ),
            "mask": mask.drop_vars([c for c in mask.coords if c not in coords]),
            "variable_units": ("variable", np.array(units, dtype=object), dict(zip(variables, units, strict=True))),
        },
        coords={**coords, "dayofyear": np.arange(1, DAYS + 1)},
        attrs={
            "train_start": str(train_start),
            "train_end": str(train_end),
            "per_pixel": int(bool(per_pixel)),
            "climatology_window": int(climatology_window),
            "train_steps": int(train.sizes["time"]),
            "format_version": stats_file.FORMAT_VERSION,
            "fill_max_days": int(fill_max_days),
            **land_from_gaps,
        },
    )
    out["mask"].attrs["long_name"] = "ocean: finite at every time of every variable"
    return out


def _check_land_from_gaps(found: Mapping[str, Any], phrase: str, *, fill_max_days: int, limit: float | None) -> None:
    """:class:`DataError` when the cells made land by gaps (the mask's attributes ``found``, described by
    ``phrase``) are more than ``limit`` of the cells with data (``harmonize.max_land_from_gaps``)."""
    fraction = float(found["land_from_gaps_fraction"])
    if limit is None or fraction <= limit:
        return
    raise DataError(
        f"{phrase}: {fraction:.1%} of the grid cells with data, more than harmonize.max_land_from_gaps = {limit:g}; "
        f"the ocean mask ('data at every time step') would make them land for the whole record (cells at lat, "
        f"lon {found['land_from_gaps_where']}). Fill short gaps with harmonize.fill_max_days (now {fill_max_days}: "
        "gaps of at most that many days are interpolated in time), fix or re-fetch the source data of those days, "
        "or raise harmonize.max_land_from_gaps to accept these cells as land"
    )


def _moments(
    train: xr.DataArray, mask: xr.DataArray, *, per_pixel: bool
) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Mean and std of the training data ``train`` ``(time, variable, lat, lon)`` over the ocean cells
    of ``mask``, per variable or, with ``per_pixel``, per cell (std floored by :func:`floor_std`; land
    0 and 1), and its day-of-year mean ``(dayofyear, variable, lat, lon)``; computed together."""
    ocean = train.where(mask)
    if per_pixel:
        # Ocean cells are finite at every step; land is set to 0 (not NaN) so that no cell reduces an
        # empty set, and gets neutral statistics below.
        filled = train.where(mask, 0.0)
        mean_l, std_l = filled.mean("time"), filled.std("time")  # (variable, lat, lon)
        pooled_l = ocean.std(("time", "lat", "lon"))  # (variable,)
    else:
        mean_l = ocean.mean(("time", "lat", "lon"))  # (variable,)
        std_l = pooled_l = ocean.std(("time", "lat", "lon"))
    clim_l = train.groupby("time.dayofyear").mean("time")  # (dayofyear, variable, lat, lon)
    mean, std, pooled, clim = dask.compute(mean_l, std_l, pooled_l, clim_l)

    if per_pixel:
        std = floor_std(std, pooled, mask)
        mean = mean.where(mask, 0.0)
        std = std.where(mask, 1.0)
    return mean, std, clim


def _checked_std(mean: xr.DataArray, std: xr.DataArray, *, train_start: str, train_end: str) -> xr.DataArray:
    """``std`` with 1 where it is not above :data:`MIN_STD` (a WARNING names those variables), once
    every value of ``mean`` is finite (else :class:`DataError`)."""
    if not bool(np.isfinite(mean).all()):
        bad = [str(v) for v in mean["variable"].values if not np.isfinite(mean.sel(variable=v)).all()]
        raise DataError(f"the training period {train_start}..{train_end} has no finite ocean value of {bad}")
    small = ~(std > MIN_STD)
    if bool(small.any()):
        flat = small.any([d for d in small.dims if d != "variable"]) if small.ndim > 1 else small
        names = [str(v) for v in flat["variable"].values[flat.values]]
        log.warning("normalize: standard deviation 0 for %s (constant in the training period); using 1", names)
        std = std.where(~small, 1.0)
    return std


def _smoothed_climatology(
    clim: xr.DataArray, mask: xr.DataArray, *, shape: tuple[int, int, int], window: int
) -> np.ndarray:
    """The day-of-year means ``clim`` on all :data:`DAYS` days, ``(DAYS, *shape)`` with ``shape``
    ``(variable, lat, lon)``, smoothed by :func:`circular_smooth` over ``window`` days; NaN on land."""
    full = np.full((DAYS, *shape), np.nan)
    full[clim["dayofyear"].values - 1] = clim.transpose("dayofyear", "variable", "lat", "lon").values
    smooth = circular_smooth(full, window)
    return np.where(mask.values[None, None], smooth, np.nan)


def floor_std(std: xr.DataArray, pooled: xr.DataArray, mask: xr.DataArray) -> xr.DataArray:
    """Per-pixel ``std`` ``(variable, lat, lon)`` raised to at least :data:`STD_FLOOR_FRACTION` x ``pooled``.

    ``pooled`` ``(variable)`` is each variable's standard deviation over all ocean cells and
    training steps; only cells of ``mask`` ``(lat, lon)`` are counted in the log message.
    """
    floor = STD_FLOOR_FRACTION * pooled
    low = std < floor
    counted = (low & mask).sum(("lat", "lon"))
    for name, n in zip(counted["variable"].values, counted.values, strict=True):
        if n:
            log.warning(
                "normalize: %d ocean cell(s) of %s vary less than %g x its pooled std %g in the training "
                "period; their std is raised to %g",
                int(n),
                name,
                STD_FLOOR_FRACTION,
                float(pooled.sel(variable=name)),
                float(floor.sel(variable=name)),
            )
    return xr.where(low, floor, std).transpose(*std.dims)


def main(
    cfg: Mapping[str, Any],
    *,
    data: Path,
    out: Path,
    threads: int = 1,
    memory_mb: int | None = None,
) -> None:
    """Fit the statistics of the regridded store ``data`` on ``splits.train`` and write ``out`` (netCDF).

    The global attribute ``provenance`` records the result configuration and the regrid store's
    provenance digest (:mod:`conv2dlstm.artifacts.provenance`).
    """
    from conv2dlstm.artifacts import provenance
    from conv2dlstm.daskutil import compute_errors, dask_client
    from conv2dlstm.fsutil import discard_partials

    out = Path(out)
    for stray in discard_partials(out.parent, of=out.name):
        log.info("normalize: discarded %s left by an interrupted run", stray)
    variables = list(dict.fromkeys([*cfg["variables"]["inputs"], *cfg["variables"]["targets"]]))
    train = cfg["splits"]["train"]
    ds = regridded.open(Path(data))  # metadata only: a missing store fails before the cluster starts
    upstream = provenance.from_attrs(ds.attrs, where=f"the regridded store {data}", step="regrid")
    record = provenance.for_step(cfg, "normalize", {"regrid": upstream["digest"]})
    address = cfg["dask"]["scheduler_address"]
    with (
        dask_client(threads=threads, memory_mb=memory_mb, address=address, data_bytes=ds.nbytes),
        compute_errors(f"fitting statistics on {data}"),
        zarrstore.read_errors(data, what=regridded.WHAT, step="regrid", codec_only=True),
    ):
        stats = fit_stats(
            ds,
            train_start=train["start"],
            train_end=train["end"],
            variables=variables,
            per_pixel=cfg["normalize"]["per_pixel"],
            climatology_window=cfg["normalize"]["climatology_window"],
            fill_max_days=cfg["harmonize"]["fill_max_days"],
            max_land_from_gaps=cfg["harmonize"]["max_land_from_gaps"],
        )
    stats.attrs.update(provenance.to_attrs(record))
    log.info(
        "normalize: %s on %s..%s (%d steps), %d ocean cells of %d -> %s (provenance %s)",
        variables,
        train["start"],
        train["end"],
        stats.attrs["train_steps"],
        int(stats["mask"].sum()),
        stats["mask"].size,
        out,
        record["digest"],
    )
    stats_file.write(stats, out)
