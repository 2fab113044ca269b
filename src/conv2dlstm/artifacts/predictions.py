"""The test-period forecasts of the evaluate step, and the one reader of every forecast the pipeline writes.

``<outdir>/evaluate/<run>/predictions.nc`` (netCDF4, CF-1.8) and its Zarr copy ``predictions.zarr``
(Zarr v2, consolidated metadata, as the forecast step writes its Zarr) hold the forecasts of every
test initial time in WeatherBench 2's layout, the forecast step's layout too
(:mod:`conv2dlstm.steps.forecast`): one float32 variable per target variable, named as the target,
dims :data:`DIMS` ``(time, prediction_timedelta, latitude, longitude)``, physical units, NaN on land.
``time`` is the initial time (``forecast_reference_time``; WeatherBench 2's init-time convention),
``prediction_timedelta`` the lead as a timedelta (``forecast_period``), ``latitude`` ascending and
``longitude`` the grid's cell centres, and ``valid_time(time, prediction_timedelta)`` the time each
value is valid at. Per variable ``units``, ``long_name`` and, for the known variables,
``standard_name`` (:func:`variable_attrs`); global attributes ``Conventions``, ``title``,
``source``, ``history``, ``format_version`` (:data:`FORMAT_VERSION`) and those of the run (run,
model, checkpoint, MLflow run id, provenance).

Written batch by batch by the evaluate step (:class:`PredictionsWriter`: memory bounded by a
batch; netCDF zlib level 4, one chunk per map; Zarr one chunk per initial time). Read back with
:func:`open`, which opens any of the four outputs (the evaluate step's ``predictions.nc`` or
``predictions.zarr``, the forecast step's ``.nc`` or ``.zarr``), checks the format version and the
layout, and returns them alike. A problem is a :class:`~conv2dlstm.errors.DataError` naming the
file and the fix (re-run the step that wrote it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm import __version__
from conv2dlstm.errors import DataError

FILENAME = "predictions.nc"
"""The netCDF file's name in the evaluate step's output folder."""
ZARR_NAME = "predictions.zarr"
"""The name of its Zarr copy in the same folder."""
FORMAT_VERSION = 2
"""Global attribute ``format_version`` of the evaluate and forecast outputs; :func:`open` refuses any
other (1: the evaluate step's former ``(time, lead, lat, lon)`` layout)."""
WHAT = "the predictions file"
"""How messages name this artifact."""
FIX = "re-run the evaluate step"

DIMS = ("time", "prediction_timedelta", "latitude", "longitude")
"""Dims of every forecast variable, WeatherBench 2's: ``weatherbench2/schema.py`` (``mock_forecast_data``
adds ``prediction_timedelta``, timedeltas, to a truth of ``time``, ``latitude``, ``longitude``) and
``docs/source/init-vs-valid-time.md`` (``time`` is the initial time in the init-time convention, the
one of its official evaluation) of google-research/weatherbench2."""

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
    "time": {"standard_name": "forecast_reference_time", "long_name": "initial time of the forecast"},
    "prediction_timedelta": {"standard_name": "forecast_period", "long_name": "lead time after the initial time"},
    "valid_time": {"standard_name": "time", "long_name": "valid time of the forecast"},
    "latitude": {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"},
    "longitude": {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"},
}
"""CF attributes of the coordinates, in both steps' outputs."""
TIME_UNITS = "hours since 1970-01-01"
TIME_CALENDAR = "proleptic_gregorian"
LEAD_UNITS = "hours"
TIMEDELTA_DTYPE = "timedelta64[ns]"


def variable_attrs(variable: str, units: Mapping[str, str]) -> dict[str, str]:
    """Attributes of the forecast ``variable``: ``long_name``, ``units`` (``"1"`` when unknown), ``standard_name``."""
    attrs = {
        "long_name": f"forecast {LONG_NAMES.get(variable, variable)}",
        "units": units.get(variable, "1") or "1",
    }
    if variable in STANDARD_NAMES:
        attrs["standard_name"] = STANDARD_NAMES[variable]
    return attrs


def global_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Global attributes of the evaluate step's outputs: the conventions, ``attrs`` (the run's) and
    :data:`FORMAT_VERSION`."""
    return {
        "Conventions": "CF-1.8",
        "title": "Forecasts on the test period",
        "source": f"conv2dlstm {__version__}",
        "history": f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')} conv2dlstm evaluate",
        **(attrs or {}),
        "format_version": FORMAT_VERSION,
    }


def encoding(ds: xr.Dataset, *, netcdf: bool) -> dict[Hashable, dict[str, Any]]:
    """How the outputs encode ``ds`` (one of this layout): float32 variables NaN-filled (netCDF: zlib
    level 4), times as float64 hours since 1970, leads as float64 hours."""
    enc: dict[Hashable, dict[str, Any]] = {name: {"_FillValue": np.float32(np.nan)} for name in ds.data_vars}
    if netcdf:
        for name in ds.data_vars:
            enc[name] |= {"zlib": True, "complevel": 4}
    for name in ("time", "valid_time"):
        enc[name] = {"units": TIME_UNITS, "calendar": TIME_CALENDAR, "dtype": "float64"}
    enc["prediction_timedelta"] = {"units": LEAD_UNITS, "dtype": "float64"}
    return enc


def _hours(values: np.ndarray) -> np.ndarray:
    """datetime64 (since 1970-01-01) or timedelta64 values as float64 hours."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.datetime64):
        values = values.astype("datetime64[ns]") - np.datetime64("1970-01-01T00:00:00", "ns")
    return values.astype("timedelta64[ns]") / np.timedelta64(1, "h")


def lead_times(init_times: np.ndarray, valid_times: np.ndarray) -> np.ndarray:
    """``(T_out,)`` timedelta64[ns] leads of windows with ``(N,)`` initial and ``(N, T_out)`` valid times
    (those of the first window: every window's are the same on a regular time axis)."""
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    valid_times = np.asarray(valid_times, dtype="datetime64[ns]")
    if init_times.size == 0:
        return np.zeros(valid_times.shape[-1] if valid_times.ndim == 2 else 0, dtype=TIMEDELTA_DTYPE)
    return (valid_times[0] - init_times[0]).astype(TIMEDELTA_DTYPE)


def empty_dataset(
    *,
    init_times: np.ndarray,
    valid_times: np.ndarray,
    variables: Sequence[str],
    lat: np.ndarray,
    lon: np.ndarray,
    units: Mapping[str, str],
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    """The evaluate step's outputs before any batch: every coordinate, the global attributes ``attrs``
    (:func:`global_attrs`) and NaN variables that take no memory (one NaN broadcast to the shape) and
    that :class:`PredictionsWriter` fills batch by batch."""
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    valid_times = np.asarray(valid_times, dtype="datetime64[ns]").reshape(init_times.size, -1)
    leads = lead_times(init_times, valid_times)
    shape = (init_times.size, leads.size, len(lat), len(lon))
    data_vars = {
        str(v): xr.Variable(
            DIMS,
            np.broadcast_to(np.float32(np.nan), shape),
            attrs=variable_attrs(str(v), units),
        )
        for v in variables
    }
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": init_times,
            "prediction_timedelta": leads,
            "latitude": np.asarray(lat, dtype="float64"),
            "longitude": np.asarray(lon, dtype="float64"),
            "valid_time": (("time", "prediction_timedelta"), valid_times),
        },
        attrs=dict(attrs),
    )
    for name, coord_attrs in COORD_ATTRS.items():
        ds[name].attrs = dict(coord_attrs)
    return ds


class PredictionsWriter:
    """``predictions.nc`` and, with ``zarr_path``, ``predictions.zarr`` written batch by batch; each decodes
    (xarray) exactly like the file that the tests' in-memory reference (``tests/support/reference.py``)
    writes with xarray.

    Both are created with every coordinate (small: ``N`` initial times, ``N x T_out`` valid times) and
    one empty float32 variable :data:`DIMS` per target (netCDF: zlib level 4, one chunk per map; Zarr
    v2 with consolidated metadata: one chunk per initial time; NaN fill); :meth:`write` fills the rows
    of one batch in both. Use as a context manager.
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
        zarr_path: str | os.PathLike | None = None,
    ) -> None:
        import netCDF4

        init_times = np.asarray(init_times, dtype="datetime64[ns]")
        valid_times = np.asarray(valid_times, dtype="datetime64[ns]")
        n, n_lead = valid_times.shape
        self.variables = [str(v) for v in variables]
        self.shape = (n, n_lead, len(self.variables), len(lat), len(lon))
        gattrs = global_attrs(attrs)
        self._zarr: dict[str, Any] = {}
        self._ds = netCDF4.Dataset(str(path), "w", format="NETCDF4")
        try:
            ds = self._ds
            ds.set_auto_mask(False)
            for dim, size in zip(DIMS, (n, n_lead, len(lat), len(lon)), strict=True):
                ds.createDimension(dim, size)
            time_enc = {"units": TIME_UNITS, "calendar": TIME_CALENDAR}
            coords: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, str]]] = {
                "time": (("time",), _hours(init_times), time_enc),
                "prediction_timedelta": (
                    ("prediction_timedelta",),
                    _hours(lead_times(init_times, valid_times)),
                    {"dtype": TIMEDELTA_DTYPE, "units": LEAD_UNITS},
                ),
                "latitude": (("latitude",), np.asarray(lat, dtype="float64"), {}),
                "longitude": (("longitude",), np.asarray(lon, dtype="float64"), {}),
                "valid_time": (("time", "prediction_timedelta"), _hours(valid_times), time_enc),
            }
            for name, (dims, values, encoding_attrs) in coords.items():
                var = ds.createVariable(name, "f8", dims)
                var.setncatts({**COORD_ATTRS[name], **encoding_attrs})
                var[...] = values
            self._vars = {}
            for variable in self.variables:
                var = ds.createVariable(
                    variable,
                    "f4",
                    DIMS,
                    zlib=True,
                    complevel=4,
                    shuffle=True,
                    chunksizes=(1, 1, len(lat), len(lon)),
                    fill_value=np.float32(np.nan),
                )
                var.setncatts({**variable_attrs(variable, units), "coordinates": "valid_time"})
                self._vars[variable] = var
            ds.setncatts(gattrs)
            if zarr_path is not None:
                self._zarr = _create_zarr(
                    Path(zarr_path),
                    empty_dataset(
                        init_times=init_times,
                        valid_times=valid_times,
                        variables=self.variables,
                        lat=lat,
                        lon=lon,
                        units=units,
                        attrs=gattrs,
                    ),
                )
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
            rows = np.asarray(values[:, :, c], dtype="float32")
            self._vars[variable][start : start + b] = rows
            if self._zarr:
                self._zarr[variable][start : start + b] = rows

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._ds.isopen():
            self._ds.close()

    def __enter__(self) -> PredictionsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_zarr(path: Path, template: xr.Dataset) -> dict[str, Any]:
    """Write ``template`` (:func:`empty_dataset`) as a Zarr v2 store with consolidated metadata, one
    chunk per initial time, and return its data arrays (zarr) to fill. Its coordinates and metadata
    only: a chunk of fill values is not stored (``write_empty_chunks`` off, whatever zarr's global
    configuration says), so the NaN variables write nothing; nor is Dask needed (its graph would
    import distributed: 0.6 s)."""
    import warnings

    import zarr

    enc = encoding(template, netcdf=False)
    for name, var in template.data_vars.items():
        enc[name]["chunks"] = (1, *var.shape[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Zarr format 2.*")
        template.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=enc, write_empty_chunks=False)
        group = zarr.open_group(str(path), mode="r+", zarr_format=2)
    return {str(name): group[str(name)] for name in template.data_vars}


def _step_of(attrs: Mapping[str, Any]) -> str:
    """The step that wrote a dataset of global ``attrs``: its provenance record's (forecast or evaluate)."""
    try:
        step = json.loads(str(attrs.get("provenance", "{}"))).get("step")
    except (ValueError, AttributeError):
        step = None
    return "forecast" if step == "forecast" else "evaluate"


def layout_problems(ds: xr.Dataset) -> list[str]:
    """How ``ds`` departs from the layout (empty when it has none): a variable on other dims than
    :data:`DIMS`, ``time`` or ``valid_time`` not datetimes, ``prediction_timedelta`` not timedeltas,
    ``latitude`` not ascending (WeatherBench 2 flips a descending one: ``make_latitude_increasing`` in
    ``weatherbench2/evaluation.py``)."""
    problems = [
        f"variable {name} has dims {tuple(map(str, var.dims))}, not {DIMS}"
        for name, var in ds.data_vars.items()
        if tuple(var.dims) != DIMS
    ]
    if not problems and not ds.data_vars:
        problems.append("it holds no forecast variable")
    for name, kind in (("time", "M"), ("valid_time", "M"), ("prediction_timedelta", "m")):
        if name not in ds.coords:
            problems.append(f"it has no coordinate {name}")
        elif ds[name].dtype.kind != kind:
            problems.append(f"{name} is {ds[name].dtype}, not {'datetime64' if kind == 'M' else 'timedelta64'}")
    if "latitude" in ds.coords and (np.diff(np.asarray(ds["latitude"].values, dtype="float64")) <= 0).any():
        problems.append("latitude is not ascending")
    return problems


def open(path: str | os.PathLike) -> xr.Dataset:
    """The forecasts at ``path``, lazily (close it, or use it as a context manager), in the layout of the
    module docstring: the evaluate step's ``predictions.nc`` or ``predictions.zarr``, or the forecast
    step's netCDF or Zarr output. :class:`DataError` naming the file and the step to re-run when it is
    missing, unreadable, of another format version or another layout (:func:`layout_problems`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{WHAT} {path} does not exist; {FIX}")
    try:
        ds = xr.open_zarr(path) if path.is_dir() else xr.open_dataset(path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(f"{WHAT} {path} cannot be read ({type(exc).__name__}: {exc}); delete it and {FIX}") from exc
    fix = f"re-run the {_step_of(ds.attrs)} step"
    version = ds.attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        ds.close()
        raise DataError(
            f"{WHAT} {path} has format_version {version}, this version reads {FORMAT_VERSION}: it was written "
            f"by another version of the pipeline; {fix}"
        )
    problems = layout_problems(ds)
    if problems:
        ds.close()
        raise DataError(f"{WHAT} {path} is not in the forecasts' layout ({'; '.join(problems)}); {fix}")
    return ds
