"""Reference forecasts every model must beat: persistence and day-of-year climatology.

Both work in physical units and return arrays shaped like the model's forecasts,
``(time, lead, variable, lat, lon)`` with ``time`` the forecast initial time, so that the same
metric code scores all three.

Persistence needs each *target* variable at the initial time. A target need not be a model input,
so its value is taken from the windows store's ``data`` cube, which holds the union of the input and
target variables at every time step: channel ``target_channels`` at time index
``start + input_steps - 1`` of each window (the last input step). The evaluate step reads it with
the window itself through the store (:func:`conv2dlstm.evaluate.read_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from conv2dlstm.errors import DataError


def persistence(x_last: xr.DataArray, lead_steps: int) -> xr.DataArray:
    """Persistence forecast: the state at the initial time repeated for every lead.

    Args:
        x_last: target variables at each initial time, physical units, dims ``(time, ..., lat, lon)``
            (typically ``(time, variable, lat, lon)``).
        lead_steps: number of leads.

    Returns:
        ``x_last`` with a ``lead`` dimension (coordinate ``1..lead_steps``) inserted after ``time``.
    """
    if lead_steps < 1:
        raise DataError(f"persistence: lead_steps must be at least 1, got {lead_steps}")
    if "time" not in x_last.dims:
        raise DataError(f"persistence: x_last has dimensions {x_last.dims}; it needs a time dimension (initial times)")
    axis = x_last.dims.index("time") + 1
    out = x_last.expand_dims(lead=np.arange(1, lead_steps + 1, dtype="int64"), axis=axis)
    out.name = x_last.name
    return out


def climatology(valid_times: xr.DataArray, stats: xr.Dataset, variables: Sequence[str] | None = None) -> xr.DataArray:
    """Climatology forecast: the training-period day-of-year mean at each valid time.

    Args:
        valid_times: datetime64 DataArray of any shape, typically ``(time, lead)``.
        stats: normalization statistics with ``climatology(dayofyear, variable, lat, lon)`` in
            physical units, ``dayofyear`` 1..366 (the calendar day of year, 366 only in leap years).
        variables: variables to keep, in this order (default: all of ``stats.variable``).

    Returns:
        ``(*valid_times.dims, variable, lat, lon)`` DataArray in physical units.
    """
    if "climatology" not in stats:
        raise DataError(
            "the statistics file has no 'climatology' variable; rebuild it with the normalize step"
        )
    clim = stats["climatology"]
    if variables is not None:
        missing = [v for v in variables if v not in clim["variable"].values]
        if missing:
            raise DataError(
                f"variables {missing} have no climatology in the statistics file (it has "
                f"{list(clim['variable'].values)}); rebuild the statistics with these variables"
            )
        clim = clim.sel(variable=list(variables))
    if not np.issubdtype(valid_times.dtype, np.datetime64):
        raise DataError(f"climatology: valid_times must be datetime64, got {valid_times.dtype}")
    doy = valid_times.dt.dayofyear
    available = set(np.asarray(clim["dayofyear"]).tolist())
    absent = sorted(set(np.unique(doy.values).tolist()) - available)
    if absent:
        raise DataError(
            f"the climatology lacks day(s) of year {absent[:10]}; it must cover days 1..366 "
            "(rebuild the statistics with the normalize step)"
        )
    out = clim.sel(dayofyear=doy).drop_vars("dayofyear")
    out = out.transpose(*valid_times.dims, "variable", ...)
    out.name = "climatology"
    return out
