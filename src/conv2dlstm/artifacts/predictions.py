"""The evaluate step's forecasts, ``<outdir>/evaluate/<run>/predictions.nc`` (netCDF4, CF-1.8).

One float32 variable per target variable, dims ``(time, lead, lat, lon)``, physical units, NaN on
land (zlib level 4, one chunk per map): ``time`` is the initial time
(``forecast_reference_time``), ``lead`` the step 1..T_out, with the coordinates ``lead_time(lead)``
(``forecast_period``) and ``valid_time(time, lead)``; ``units``, ``long_name`` and, for the known
variables, ``standard_name`` per variable (:data:`STANDARD_NAMES`, :data:`LONG_NAMES`); global
attributes ``Conventions``, ``title``, ``source``, ``history``, ``format_version``
(:data:`FORMAT_VERSION`) and those of the run (run, model, checkpoint, MLflow run id, provenance).

Written batch by batch by the evaluate step (:mod:`conv2dlstm.steps.evaluate`, :class:`PredictionsWriter`);
read back with :func:`open`, which checks the format version (the forecast step's test reads it to
check that forecasting a test day reproduces it bit for bit). A problem is a
:class:`~conv2dlstm.errors.DataError` naming the file and the fix (re-run the evaluate step).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm import __version__
from conv2dlstm.errors import DataError

FILENAME = "predictions.nc"
"""The file's name in the evaluate step's output folder."""
FORMAT_VERSION = 1
"""Global attribute ``format_version`` of the file; :func:`open` refuses any other."""
WHAT = "the predictions file"
"""How messages name this artifact."""
FIX = "re-run the evaluate step"

STANDARD_NAMES: dict[str, str] = {
    "sst": "sea_surface_temperature",
    "sss": "sea_surface_salinity",
    "no3": "mole_concentration_of_nitrate_in_sea_water",
    "po4": "mole_concentration_of_phosphate_in_sea_water",
    "si": "mole_concentration_of_silicate_in_sea_water",
    "fe": "mole_concentration_of_dissolved_iron_in_sea_water",
    "chl": "mass_concentration_of_chlorophyll_a_in_sea_water",
    "o2": "mole_concentration_of_dissolved_molecular_oxygen_in_sea_water",
}
LONG_NAMES: dict[str, str] = {
    "sst": "sea surface temperature",
    "sss": "sea surface salinity",
    "no3": "nitrate concentration",
    "po4": "phosphate concentration",
    "si": "silicate concentration",
    "fe": "dissolved iron concentration",
    "chl": "chlorophyll-a concentration",
    "o2": "dissolved oxygen concentration",
}
COORD_ATTRS: dict[str, dict[str, str]] = {
    "time": {"standard_name": "forecast_reference_time", "long_name": "forecast initial time"},
    "lead": {"long_name": "lead step after the initial time", "units": "1"},
    "lead_time": {"standard_name": "forecast_period", "long_name": "lead time"},
    "valid_time": {"standard_name": "time", "long_name": "valid time of the forecast"},
    "lat": {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"},
    "lon": {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"},
}
TIME_UNITS = "hours since 1970-01-01"
TIME_CALENDAR = "proleptic_gregorian"


def variable_attrs(variable: str, units: Mapping[str, str]) -> dict[str, str]:
    """Attributes of the predicted ``variable``: ``long_name``, ``units`` (``"1"`` when unknown), ``standard_name``."""
    attrs = {
        "long_name": f"predicted {LONG_NAMES.get(variable, variable)}",
        "units": units.get(variable, "1") or "1",
    }
    if variable in STANDARD_NAMES:
        attrs["standard_name"] = STANDARD_NAMES[variable]
    return attrs


def global_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Global attributes of the file: the conventions, ``attrs`` (the run's) and :data:`FORMAT_VERSION`."""
    return {
        "Conventions": "CF-1.8",
        "title": "Forecasts on the test period",
        "source": f"conv2dlstm {__version__}",
        "history": f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} conv2dlstm evaluate",
        **(attrs or {}),
        "format_version": FORMAT_VERSION,
    }


def _hours(values: np.ndarray) -> np.ndarray:
    """datetime64 (since 1970-01-01) or timedelta64 values as float64 hours."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.datetime64):
        values = values.astype("datetime64[ns]") - np.datetime64("1970-01-01T00:00:00", "ns")
    return values.astype("timedelta64[ns]") / np.timedelta64(1, "h")


class PredictionsWriter:
    """``predictions.nc`` written batch by batch; decodes (xarray) exactly like the file that the tests'
    in-memory reference (``tests/support/reference.py``) writes with xarray.

    The file is created with every coordinate (small: ``N`` initial times, ``N x T_out`` valid times)
    and one empty float32 variable ``(time, lead, lat, lon)`` per target (zlib level 4, one chunk
    per map, NaN fill); :meth:`write` fills the rows of one batch. Use as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        init_times: np.ndarray,
        valid_times: np.ndarray,
        variables: Sequence[str],
        lat: np.ndarray,
        lon: np.ndarray,
        units: Mapping[str, str],
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        import netCDF4

        init_times = np.asarray(init_times, dtype="datetime64[ns]")
        valid_times = np.asarray(valid_times, dtype="datetime64[ns]")
        n, n_lead = valid_times.shape
        self.variables = [str(v) for v in variables]
        self.shape = (n, n_lead, len(self.variables), len(lat), len(lon))
        self._ds = netCDF4.Dataset(str(path), "w", format="NETCDF4")
        try:
            ds = self._ds
            ds.set_auto_mask(False)
            for dim, size in (("time", n), ("lead", n_lead), ("lat", len(lat)), ("lon", len(lon))):
                ds.createDimension(dim, size)
            lead_time = (valid_times[0] - init_times[0]) if n else np.zeros(n_lead, dtype="timedelta64[ns]")
            coords: dict[str, tuple[tuple[str, ...], str, np.ndarray, dict[str, str]]] = {
                "time": (("time",), "f8", _hours(init_times), {"units": TIME_UNITS, "calendar": TIME_CALENDAR}),
                "lead": (("lead",), "i8", np.arange(1, n_lead + 1, dtype="int64"), {}),
                "lead_time": (("lead",), "f8", _hours(lead_time), {"dtype": "timedelta64[ns]", "units": "hours"}),
                "valid_time": (
                    ("time", "lead"),
                    "f8",
                    _hours(valid_times),
                    {"units": TIME_UNITS, "calendar": TIME_CALENDAR},
                ),
                "lat": (("lat",), "f8", np.asarray(lat, dtype="float64"), {}),
                "lon": (("lon",), "f8", np.asarray(lon, dtype="float64"), {}),
            }
            for name, (dims, dtype, values, encoding_attrs) in coords.items():
                var = ds.createVariable(name, dtype, dims)
                var.setncatts({**COORD_ATTRS[name], **encoding_attrs})
                var[...] = values
            self._vars = {}
            for variable in self.variables:
                var = ds.createVariable(
                    variable,
                    "f4",
                    ("time", "lead", "lat", "lon"),
                    zlib=True,
                    complevel=4,
                    shuffle=True,
                    chunksizes=(1, 1, len(lat), len(lon)),
                    fill_value=np.float32(np.nan),
                )
                var.setncatts({**variable_attrs(variable, units), "coordinates": "lead_time valid_time"})
                self._vars[variable] = var
            ds.setncatts(global_attrs(attrs))
        except BaseException:
            self._ds.close()
            raise

    def write(self, start: int, values: np.ndarray) -> None:
        """Write ``(B, T_out, C_out, lat, lon)`` physical values (NaN on land) as rows ``start:start+B``."""
        b = values.shape[0]
        if values.shape[1:] != self.shape[1:] or not 0 <= start <= self.shape[0] - b:
            raise DataError(
                f"predictions of shape {values.shape} at row {start} do not fit predictions.nc of shape {self.shape}"
            )
        for c, variable in enumerate(self.variables):
            self._vars[variable][start : start + b] = np.asarray(values[:, :, c], dtype="float32")

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._ds.isopen():
            self._ds.close()

    def __enter__(self) -> PredictionsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: str | os.PathLike) -> xr.Dataset:
    """The predictions file ``path``, lazily (close it, or use it as a context manager);
    :class:`DataError` naming it and the evaluate step when it is missing, unreadable or of another
    format version."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{WHAT} {path} does not exist; {FIX}")
    try:
        ds = xr.open_dataset(path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(f"{WHAT} {path} cannot be read ({type(exc).__name__}: {exc}); delete it and {FIX}") from exc
    version = ds.attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        ds.close()
        raise DataError(
            f"{WHAT} {path} has format_version {version}, this version reads {FORMAT_VERSION}: it was written "
            f"by another version of the evaluate step; {FIX}"
        )
    return ds
