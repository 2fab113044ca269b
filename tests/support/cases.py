"""Small forecast cubes on a 3 x 4 grid with land, for the tests of scores, inference, plots and the
evaluate step."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.evaluation import inference

LAT = np.array([20.0, 21.0, 22.0])


LON = np.array([-60.0, -59.0, -58.0, -57.0])


MASK = xr.DataArray(
    np.array([[True, True, True, False], [True, True, False, False], [True, True, True, True]]),
    dims=("lat", "lon"),
    coords={"lat": LAT, "lon": LON},
)


def forecast_cube(values: np.ndarray, variables=("sst",), n_lead: int = 2, start: str = "2021-07-01") -> xr.DataArray:
    n = values.shape[0]
    init = pd.date_range(start, periods=n, freq="D").values
    valid = init[:, None] + np.arange(1, n_lead + 1)[None, :] * np.timedelta64(1, "D")
    return inference.forecast_array(
        values, init_times=init, valid_times=valid, variables=list(variables), lat=LAT, lon=LON
    )


def cube_shape(n=5, n_lead=2, n_var=1):
    return (n, n_lead, n_var, LAT.size, LON.size)


def batch_slices(n: int, sizes: list[int]) -> list[slice]:
    out, i0 = [], 0
    for size in sizes:
        out.append(slice(i0, min(i0 + size, n)))
        i0 += size
    assert i0 >= n
    return out
