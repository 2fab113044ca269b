"""The embedded synthetic ocean, written in the file formats of the real products.

No network is needed to run the pipeline end to end: this module generates data that look, on
disk, like the real sources, so that every later step (fetch, harmonize, regrid, ...) runs the code
it runs on real data.

``oisst``
    NOAA OISST v2.1-like daily files ``{out_dir}/{YYYYMM}/oisst-avhrr-v02r01.{YYYYMMDD}.nc``
    (netCDF4; dimensions ``time(1), zlev(1), lat, lon``; ``sst, anom, err, ice`` packed as int16
    with ``scale_factor=0.01`` and ``_FillValue=-999``; longitudes 0..360). The sea-surface
    temperature is a meridional gradient plus a seasonal cycle (amplitude growing with latitude,
    peak in late August) plus anomalies that propagate westward and south-westward (Rossby-wave-like
    plane waves and drifting eddies, 0.3-0.8 degrees/day), plus small, spatially smooth noise that
    is white in time. The propagating anomalies make a few-day forecast beat persistence and
    climatology; the noise bounds how well any model can do.

``cmems_bgc``
    One CMEMS-BGC-like file ``{out_dir}/CROCO.nc`` with ``fe, po4, si, no3`` (float32, mmol m-3,
    NaN on land) on ``(time, depth, latitude, longitude)``. ``fe, po4, si`` are climatology + a
    monsoon-like seasonal cycle + smooth spatial modes with AR(1) coefficients + noise; ``no3``
    is driven by the modes of ``po4`` (lag 1 day), ``si`` (lag 2) and ``fe`` (lag 1), so next-day
    ``no3`` is predictable from the previous days of the three inputs.

Every random draw comes from ``numpy.random.default_rng`` seeded with ``seed`` and a fixed stream
label, so the output is a pure function of the configuration. OISST days are independent of the
requested period: the anomaly of a given date is the same whatever ``start`` and ``end`` are.
The land mask is defined in coordinates relative to the requested box (a coast along one side and
one or two islands), so any box gets a plausible 15-35 % of land.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from conv2dlstm.errors import ConfigError
from conv2dlstm.fsutil import atomic_output, discard_partials

log = logging.getLogger(__name__)

OISST_EPOCH = pd.Timestamp("1978-01-01")
OISST_TIME_UNITS = "days since 1978-01-01 12:00:00"
OISST_FILL = np.int16(-999)
OISST_SCALE = np.float32(0.01)
OISST_VARIABLES = ("sst", "anom", "err", "ice")
CMEMS_TIME_UNITS = "days since 1950-01-01"
CMEMS_DEPTHS = (0.494025, 9.822751, 29.44473)
CMEMS_FILE = "CROCO.nc"
BGC_INPUTS = ("fe", "po4", "si")
FREEZING_C = -1.8
_BLOCK_DAYS = 64  # days generated at once when writing OISST files (bounds memory)

# Per-variable packing attributes of the real OISST v2.1 files.
OISST_VAR_ATTRS: dict[str, dict[str, Any]] = {
    "sst": {"long_name": "Daily sea surface temperature", "units": "Celsius", "valid_min": -300, "valid_max": 4500},
    "anom": {
        "long_name": "Daily sea surface temperature anomalies",
        "units": "Celsius",
        "valid_min": -1200,
        "valid_max": 1200,
    },
    "err": {
        "long_name": "Estimated error standard deviation of analysed_sst",
        "units": "Celsius",
        "valid_min": 0,
        "valid_max": 1000,
    },
    "ice": {"long_name": "Sea ice concentration", "units": "%", "valid_min": 0, "valid_max": 100},
}

BGC_VAR_ATTRS: dict[str, dict[str, str]] = {
    "fe": {"standard_name": "mole_concentration_of_dissolved_iron_in_sea_water", "long_name": "Dissolved iron"},
    "po4": {"standard_name": "mole_concentration_of_phosphate_in_sea_water", "long_name": "Phosphate"},
    "si": {"standard_name": "mole_concentration_of_silicate_in_sea_water", "long_name": "Dissolved silicate"},
    "no3": {"standard_name": "mole_concentration_of_nitrate_in_sea_water", "long_name": "Nitrate"},
}


# --------------------------------------------------------------------------------------------------
# grid, time and land
# --------------------------------------------------------------------------------------------------


def axis_centres(lo: float, hi: float, resolution: float, *, name: str = "axis") -> np.ndarray:
    """Cell centres ``lo, lo+resolution, ..., hi`` (inclusive); ``hi - lo`` must be a multiple."""
    if hi < lo:
        raise ConfigError(f"config key synthetic.{name}: [{lo}, {hi}] must be [min, max]")
    steps = (hi - lo) / resolution
    n = int(round(steps))
    if abs(steps - n) > 1e-6:
        raise ConfigError(
            f"config key synthetic.{name}: the range [{lo}, {hi}] is not a whole number of "
            f"synthetic.resolution ({resolution}) steps; change the range or the resolution"
        )
    return np.round(lo + resolution * np.arange(n + 1), 9)


def days_since(times: pd.DatetimeIndex, epoch: pd.Timestamp = OISST_EPOCH) -> np.ndarray:
    """Whole days from ``epoch`` to each (floored) time, as float64."""
    return np.asarray((times.floor("D") - epoch) / pd.Timedelta(days=1), dtype=np.float64)


def _unit(values: np.ndarray) -> np.ndarray:
    """Map an axis onto [0, 1] (a single value maps to 0.5)."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    if span == 0:
        return np.full_like(values, 0.5)
    return (values - values.min()) / span


def land_mask(lat: np.ndarray, lon: np.ndarray, *, coast: Literal["west", "east"] = "west") -> np.ndarray:
    """Smooth synthetic land mask, ``(lat, lon)`` bool, True on land.

    Shapes are defined relative to the box spanned by ``lat`` and ``lon``. ``coast="west"``: a
    coastline along the western side running north-east (like the North American east coast)
    plus two islands, about 20 % land. ``coast="east"``: a peninsula on the eastern side ending
    in a cape in the south (like western India) plus an island near the south-east corner (like
    Sri Lanka), about 30 % land.
    """
    u, v = np.meshgrid(_unit(lon), _unit(lat))  # (lat, lon)
    if coast == "west":
        coastline = 0.06 + 0.28 * v + 0.035 * np.sin(2.5 * 2 * np.pi * v)
        land = u < coastline
        islands = [(0.58, 0.33, 0.07, 0.05), (0.80, 0.72, 0.045, 0.035)]
    elif coast == "east":
        coastline = 0.5 + 0.3 * (1 - v) + 0.02 * np.sin(3 * 2 * np.pi * v)
        coastline = coastline + 4.0 * np.clip(0.27 - v, 0, None)  # the cape: ocean south of it
        land = u > coastline
        islands = [(0.93, 0.07, 0.08, 0.075)]
    else:
        raise ValueError(f"coast must be 'west' or 'east', not {coast!r}")
    for ui, vi, ru, rv in islands:
        land |= ((u - ui) / ru) ** 2 + ((v - vi) / rv) ** 2 < 1
    return land


def _resolution_of(axis: np.ndarray) -> float:
    """Grid spacing of a regular axis (0.25 for a single cell)."""
    return float(np.median(np.diff(axis))) if len(axis) > 1 else 0.25


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, ``shape``."""
    white = rng.standard_normal(shape)
    if sigma_cells <= 0.5:
        return white
    delta = np.zeros((int(8 * sigma_cells) + 1,) * 2)
    delta[delta.shape[0] // 2, delta.shape[1] // 2] = 1.0
    norm = np.sqrt(np.sum(ndimage.gaussian_filter(delta, sigma_cells) ** 2))
    return ndimage.gaussian_filter(white, sigma_cells, mode="wrap") / norm


# --------------------------------------------------------------------------------------------------
# OISST-like sea-surface temperature
# --------------------------------------------------------------------------------------------------


def sst_climatology(times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Smooth climatological SST in degrees Celsius, ``(time, lat, lon)`` float64.

    Annual mean from ~28 degC at 20N to ~10 degC at 46N (logistic in |lat|); a seasonal cycle
    of amplitude 0.3 degC at 10N growing to 6.3 degC at 46N, peaking on day of year 240 (late
    August) in the northern hemisphere and half a year later in the southern.
    """
    alat = np.abs(np.asarray(lat, dtype=np.float64))
    mean = FREEZING_C + 31.3 / (1.0 + np.exp((alat - 42.0) / 7.0))  # (lat,)
    amp = 0.3 + 6.0 * np.clip((alat - 10.0) / 36.0, 0.0, 1.0) ** 1.2  # (lat,)
    amp = np.where(np.asarray(lat) >= 0, amp, -amp)
    phase = 2 * np.pi * (times.day_of_year.to_numpy() - 240.0) / 365.25  # (time,)
    clim = mean[None, :] + amp[None, :] * np.cos(phase)[:, None]  # (time, lat)
    return np.broadcast_to(clim[:, :, None], (len(times), len(lat), len(lon))).copy()


def _wave_params(seed: int, n_waves: int = 4) -> dict[str, np.ndarray]:
    """Westward / south-westward plane waves: wavelength 5-10 deg, speed 0.3-0.8 deg/day."""
    rng = np.random.default_rng([seed, 1])
    return {
        "wavelength": rng.uniform(5.0, 10.0, n_waves),
        "direction": np.deg2rad(rng.uniform(170.0, 225.0, n_waves)),
        "speed": rng.uniform(0.3, 0.8, n_waves),
        "amplitude": rng.uniform(0.55, 0.85, n_waves),
        "phase": rng.uniform(0, 2 * np.pi, n_waves),
        "mod_period": rng.uniform(120.0, 360.0, n_waves),
        "mod_phase": rng.uniform(0, 2 * np.pi, n_waves),
    }


def _plane_waves(t: np.ndarray, lat: np.ndarray, lon: np.ndarray, seed: int) -> np.ndarray:
    """Sum of propagating plane waves, ``(time, lat, lon)`` float64 (t in days since epoch)."""
    p = _wave_params(seed)
    out = np.zeros((len(t), len(lat), len(lon)))
    y, x = np.meshgrid(lat, lon, indexing="ij")  # (lat, lon), degrees
    for k in range(len(p["speed"])):
        kk = 2 * np.pi / p["wavelength"][k]
        dx, dy = np.cos(p["direction"][k]), np.sin(p["direction"][k])
        spatial = np.exp(1j * (kk * (dx * x + dy * y) + p["phase"][k]))  # (lat, lon)
        temporal = np.exp(-1j * kk * p["speed"][k] * t)  # (time,): moves along (dx, dy)
        envelope = p["amplitude"][k] * (0.65 + 0.35 * np.cos(2 * np.pi * t / p["mod_period"][k] + p["mod_phase"][k]))
        out += envelope[:, None, None] * np.real(temporal[:, None, None] * spatial[None])
    return out


_EDDY_BIN_DAYS = 32
_EDDY_MAX_LIFE = 90.0


def _eddies_born_in_bin(seed: int, b: int, lat: np.ndarray, lon: np.ndarray) -> list[dict[str, float]]:
    """Eddies born in absolute 32-day bin ``b`` (since 1978-01-01), a pure function of (seed, b, box)."""
    rng = np.random.default_rng([seed, 2, b])
    lat0, lat1 = float(lat.min()) - 2.0, float(lat.max()) + 10.0
    lon0, lon1 = float(lon.min()) - 2.0, float(lon.max()) + 20.0
    area = (lat1 - lat0) * (lon1 - lon0)
    # ~1 eddy alive per 50 square degrees of the birth region (mean lifetime 60 days).
    n = rng.poisson(area / 50.0 / 60.0 * _EDDY_BIN_DAYS)
    born = rng.uniform(0, _EDDY_BIN_DAYS, n) + b * _EDDY_BIN_DAYS
    direction = np.deg2rad(rng.uniform(180.0, 235.0, n))
    speed = rng.uniform(0.3, 0.8, n)
    return [
        {
            "born": float(born[i]),
            "life": float(life),
            "lat": float(la),
            "lon": float(lo),
            "u": float(speed[i] * np.cos(direction[i])),
            "v": float(speed[i] * np.sin(direction[i])),
            "radius": float(r),
            "amplitude": float(a),
        }
        for i, (life, la, lo, r, a) in enumerate(
            zip(
                rng.uniform(30.0, _EDDY_MAX_LIFE, n),
                rng.uniform(lat0, lat1, n),
                rng.uniform(lon0, lon1, n),
                rng.uniform(0.8, 1.8, n),
                rng.choice([-1.0, 1.0], n) * rng.uniform(1.0, 2.0, n),
            )
        )
    ]


def _eddy_field(t: np.ndarray, lat: np.ndarray, lon: np.ndarray, seed: int) -> np.ndarray:
    """Gaussian eddies drifting west / south-west, ``(time, lat, lon)`` float64."""
    out = np.zeros((len(t), len(lat), len(lon)))
    if len(t) == 0:
        return out
    first = int(np.floor((t.min() - _EDDY_MAX_LIFE) / _EDDY_BIN_DAYS))
    last = int(np.floor(t.max() / _EDDY_BIN_DAYS))
    for b in range(first, last + 1):
        for e in _eddies_born_in_bin(seed, b, lat, lon):
            age = t - e["born"]
            alive = np.nonzero((age > 0) & (age < e["life"]))[0]
            if alive.size == 0:
                continue
            a = age[alive]
            amp = e["amplitude"] * np.sin(np.pi * a / e["life"])  # (alive,)
            cy = e["lat"] + e["v"] * a
            cx = e["lon"] + e["u"] * a
            gy = np.exp(-(((lat[None, :] - cy[:, None]) / e["radius"]) ** 2))  # (alive, lat)
            gx = np.exp(-(((lon[None, :] - cx[:, None]) / e["radius"]) ** 2))  # (alive, lon)
            out[alive] += amp[:, None, None] * gy[:, :, None] * gx[:, None, :]
    return out


def oisst_fields(times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Synthetic OISST variables ``sst, anom, err, ice``, each ``(time, lat, lon)`` float32, NaN on land.

    ``anom = sst - sst_climatology``. Each day depends only on its date, the grid and the seed.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    t = days_since(pd.DatetimeIndex(times))
    land = land_mask(lat, lon, coast="west")
    clim = sst_climatology(pd.DatetimeIndex(times), lat, lon)
    sigma_cells = 0.75 / _resolution_of(lat)  # noise correlated over ~0.75 degrees
    noise = np.zeros((len(t),) + land.shape)  # (time, lat, lon), unit variance, white in time
    for i, day in enumerate(t):
        noise[i] = _smooth_noise(np.random.default_rng([seed, 3, int(day)]), land.shape, sigma_cells)
    anom = _plane_waves(t, lat, lon, seed) + _eddy_field(t, lat, lon, seed) + 0.15 * noise
    sst = np.maximum(clim + anom, FREEZING_C)
    anom = sst - clim
    err = np.clip(0.12 + 0.1 * np.abs(noise), 0.05, 0.6)
    ice = np.zeros_like(sst)
    out = {}
    for name, values in (("sst", sst), ("anom", anom), ("err", err), ("ice", ice)):
        arr = values.astype(np.float32)
        arr[:, land] = np.nan
        out[name] = arr
    return out


def _oisst_global_attrs(seed: int, lat: np.ndarray, lon: np.ndarray, resolution: float) -> dict[str, Any]:
    return {
        "Conventions": "CF-1.6, ACDD-1.3",
        "title": (
            "NOAA/NCEI 1/4 Degree Daily Optimum Interpolation Sea Surface Temperature (OISST) "
            "Analysis, Version 2.1 - Final (SYNTHETIC stand-in)"
        ),
        "summary": (
            "Synthetic data in the layout of NOAA OISST v2.1 daily files, generated by "
            "conv2dlstm.steps.synthetic: meridional gradient, seasonal cycle, westward-propagating "
            "waves and eddies and small noise. Not an observation."
        ),
        "source": "conv2dlstm.steps.synthetic",
        "institution": (
            "conv2dlstm (synthetic data; layout of NOAA/National Centers for Environmental Information OISST)"
        ),
        "product_version": "Version v02r01",
        "processing_level": "NOAA Level 4",
        "naming_authority": "gov.noaa.ncei",
        "cdm_data_type": "Grid",
        "synthetic_seed": int(seed),
        "geospatial_lat_min": np.float32(lat.min() - resolution / 2),
        "geospatial_lat_max": np.float32(lat.max() + resolution / 2),
        "geospatial_lat_units": "degrees_north",
        "geospatial_lat_resolution": np.float32(resolution),
        "geospatial_lon_min": np.float32(lon.min() - resolution / 2),
        "geospatial_lon_max": np.float32(lon.max() + resolution / 2),
        "geospatial_lon_units": "degrees_east",
        "geospatial_lon_resolution": np.float32(resolution),
    }


def _coord_attrs(lat: np.ndarray, lon: np.ndarray, resolution: float) -> dict[str, dict[str, Any]]:
    return {
        "time": {"long_name": "Center time of the day", "standard_name": "time", "axis": "T"},
        "zlev": {
            "long_name": "Sea surface height",
            "units": "meters",
            "positive": "down",
            "actual_range": "0, 0",
            "axis": "Z",
        },
        "lat": {
            "long_name": "Latitude",
            "standard_name": "latitude",
            "units": "degrees_north",
            "axis": "Y",
            "grids": f"Uniform grid from {lat.min():g} to {lat.max():g} by {resolution:g}",
        },
        "lon": {
            "long_name": "Longitude",
            "standard_name": "longitude",
            "units": "degrees_east",
            "axis": "X",
            "grids": f"Uniform grid from {lon.min():g} to {lon.max():g} by {resolution:g}",
        },
    }


def oisst_dataset(times: pd.DatetimeIndex | list[Any], lat: np.ndarray, lon: np.ndarray, seed: int = 0) -> xr.Dataset:
    """In-memory synthetic OISST, decoded, dims ``(time, zlev, lat, lon)``.

    Variables are float32 with NaN on land; ``time`` is at 12:00 of each day like the real files.
    ``encoding`` carries the real on-disk packing (int16, scale_factor 0.01, _FillValue -999), so
    ``ds.to_netcdf(path)`` writes an OISST-like file.
    """
    times = pd.DatetimeIndex(times).floor("D")
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    resolution = _resolution_of(lat)
    fields = oisst_fields(times, lat, lon, seed)
    coord_attrs = _coord_attrs(lat, lon, resolution)
    dims = ("time", "zlev", "lat", "lon")
    data_vars = {}
    for name in OISST_VARIABLES:
        attrs = {"long_name": OISST_VAR_ATTRS[name]["long_name"], "units": OISST_VAR_ATTRS[name]["units"]}
        var = xr.Variable(dims, fields[name][:, None], attrs=attrs)
        var.encoding = {
            "dtype": "int16",
            "scale_factor": OISST_SCALE,
            "add_offset": np.float32(0.0),
            "_FillValue": OISST_FILL,
            "zlib": True,
            "complevel": 4,
        }
        data_vars[name] = var
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": ("time", (times + pd.Timedelta(hours=12)).to_numpy(), coord_attrs["time"]),
            "zlev": ("zlev", np.zeros(1, dtype=np.float32), coord_attrs["zlev"]),
            "lat": ("lat", lat.astype(np.float32), coord_attrs["lat"]),
            "lon": ("lon", lon.astype(np.float32), coord_attrs["lon"]),
        },
        attrs=_oisst_global_attrs(seed, lat, lon, resolution),
    )
    ds["time"].encoding = {"units": OISST_TIME_UNITS, "dtype": "float32"}
    for name in OISST_VARIABLES:
        ds[name].attrs.update({k: np.int16(OISST_VAR_ATTRS[name][k]) for k in ("valid_min", "valid_max")})
    return ds


def oisst_file_name(day: pd.Timestamp) -> str:
    """Relative path of one day's file in the NCEI layout: ``YYYYMM/oisst-avhrr-v02r01.YYYYMMDD.nc``."""
    return f"{day:%Y%m}/oisst-avhrr-v02r01.{day:%Y%m%d}.nc"


def _pack(values: np.ndarray) -> np.ndarray:
    """float (NaN = missing) -> int16 with scale_factor 0.01 and _FillValue -999."""
    packed = np.round(np.nan_to_num(values, nan=0.0) / OISST_SCALE)
    packed = np.where(np.isnan(values), OISST_FILL, packed)
    return packed.astype(np.int16)


def write_oisst_day(
    path: Path,
    day: pd.Timestamp,
    lat: np.ndarray,
    lon: np.ndarray,
    fields: dict[str, np.ndarray],
    *,
    seed: int,
) -> None:
    """Write one day (``fields[name]`` of shape ``(lat, lon)``) as an OISST v2.1-like netCDF4 file."""
    import netCDF4

    resolution = _resolution_of(lat)
    coord_attrs = _coord_attrs(lat, lon, resolution)
    with netCDF4.Dataset(path, "w", format="NETCDF4") as nc:
        for dim, size in (("time", 1), ("zlev", 1), ("lat", len(lat)), ("lon", len(lon))):
            nc.createDimension(dim, size)
        values = {
            "time": np.array([days_since(pd.DatetimeIndex([day]))[0]], dtype=np.float32),
            "zlev": np.zeros(1, dtype=np.float32),
            "lat": np.asarray(lat, dtype=np.float32),
            "lon": np.asarray(lon, dtype=np.float32),
        }
        for name in ("time", "zlev", "lat", "lon"):
            var = nc.createVariable(name, "f4", (name,))
            attrs = dict(coord_attrs[name])
            if name == "time":
                attrs["units"] = OISST_TIME_UNITS
            var.setncatts(attrs)
            var[:] = values[name]
        for name in OISST_VARIABLES:
            var = nc.createVariable(
                name, "i2", ("time", "zlev", "lat", "lon"), fill_value=OISST_FILL, zlib=True, complevel=4
            )
            var.set_auto_maskandscale(False)  # values are packed by _pack
            spec = OISST_VAR_ATTRS[name]
            var.setncatts(
                {
                    "long_name": spec["long_name"],
                    "units": spec["units"],
                    "add_offset": np.float32(0.0),
                    "scale_factor": OISST_SCALE,
                    "valid_min": np.int16(spec["valid_min"]),
                    "valid_max": np.int16(spec["valid_max"]),
                }
            )
            var[:] = _pack(fields[name])[None, None]
        attrs = _oisst_global_attrs(seed, np.asarray(lat), np.asarray(lon), resolution)
        attrs["id"] = Path(path).name
        attrs["time_coverage_start"] = f"{day:%Y-%m-%d}T00:00:00Z"
        attrs["time_coverage_end"] = f"{day:%Y-%m-%d}T23:59:59Z"
        nc.setncatts(attrs)


def write_oisst(out_dir: Path, times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray, seed: int) -> list[Path]:
    """Write one file per day under ``out_dir`` in the NCEI layout; returns the paths in time order."""
    paths = []
    times = pd.DatetimeIndex(times).floor("D")
    for i0 in range(0, len(times), _BLOCK_DAYS):
        block = times[i0 : i0 + _BLOCK_DAYS]
        fields = oisst_fields(block, lat, lon, seed)  # each (block, lat, lon)
        for j, day in enumerate(block):
            path = out_dir / oisst_file_name(day)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_oisst_day(path, day, lat, lon, {k: v[j] for k, v in fields.items()}, seed=seed)
            paths.append(path)
        log.info("synthetic oisst: wrote %d / %d days", min(i0 + _BLOCK_DAYS, len(times)), len(times))
    return paths


# --------------------------------------------------------------------------------------------------
# CMEMS-BGC-like nutrients
# --------------------------------------------------------------------------------------------------


def _circular_bump(doy: np.ndarray, centre: float, width: float) -> np.ndarray:
    d = (doy - centre + 182.625) % 365.25 - 182.625
    return np.exp(-((d / width) ** 2))


def bgc_modes(lat: np.ndarray, lon: np.ndarray, seed: int, n_modes: int = 6) -> np.ndarray:
    """Smooth spatial modes ``(mode, lat, lon)``, Gaussian blobs centred on ocean cells, max |mode| = 1."""
    rng = np.random.default_rng([seed, 10])
    land = land_mask(lat, lon, coast="east")
    u, v = np.meshgrid(_unit(lon), _unit(lat))
    ocean = np.argwhere(~land)
    picks = ocean[rng.choice(len(ocean), n_modes, replace=False)]
    modes = []
    for iy, ix in picks:
        wu, wv = rng.uniform(0.12, 0.3, 2)
        modes.append(np.exp(-0.5 * (((u - u[iy, ix]) / wu) ** 2 + ((v - v[iy, ix]) / wv) ** 2)))
    return np.stack(modes)


def _ar1(rng: np.random.Generator, n_time: int, phi: np.ndarray) -> np.ndarray:
    """AR(1) series with unit stationary variance, ``(time, len(phi))``."""
    out = np.empty((n_time, len(phi)))
    out[0] = rng.standard_normal(len(phi))
    innovations = rng.standard_normal((n_time, len(phi))) * np.sqrt(1 - phi**2)
    for i in range(1, n_time):
        out[i] = phi * out[i - 1] + innovations[i]
    return out


# surface climatology (base + coastal + northern), seasonal amplitude, anomaly scale, noise; mmol m-3
_BGC_SCALES: dict[str, dict[str, float]] = {
    "fe": {"base": 4e-4, "coastal": 6e-4, "north": 1e-4, "seasonal": 3e-4, "anomaly": 1.2e-4, "noise": 6e-6},
    "po4": {"base": 0.25, "coastal": 0.3, "north": 0.1, "seasonal": 0.25, "anomaly": 0.08, "noise": 0.004},
    "si": {"base": 2.0, "coastal": 2.5, "north": 1.0, "seasonal": 2.5, "anomaly": 0.7, "noise": 0.035},
    "no3": {"base": 0.8, "coastal": 2.0, "north": 1.0, "seasonal": 3.0, "anomaly": 0.9, "noise": 0.03},
}
# no3 driving: weights of the po4 (lag 1), si (lag 2) and fe (lag 1) mode coefficients
_NO3_DRIVERS = (("po4", 1, 0.6), ("si", 2, 0.45), ("fe", 1, 0.35))


def bgc_fields(
    times: pd.DatetimeIndex, lat: np.ndarray, lon: np.ndarray, seed: int, depths: tuple[float, ...] = CMEMS_DEPTHS
) -> dict[str, np.ndarray]:
    """Synthetic ``fe, po4, si, no3`` in mmol m-3, each ``(time, depth, lat, lon)`` float32, NaN on land.

    ``x = clim(depth, lat, lon) + seasonal(time, lat, lon) + anomaly_scale * decay(depth) *
    sum_k g_k mode_k(lat, lon) a_k(time) + noise`` for the inputs, with AR(1) coefficients
    ``a_k``; for ``no3`` the coefficients are ``beta_k (0.6 a_po4,k(t-1) + 0.45 a_si,k(t-2) +
    0.35 a_fe,k(t-1))``.
    """
    times = pd.DatetimeIndex(times)
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    depth = np.asarray(depths, dtype=np.float64)
    n_t, n_modes, lag = len(times), 6, 2
    land = land_mask(lat, lon, coast="east")
    modes = bgc_modes(lat, lon, seed, n_modes)  # (mode, lat, lon)
    resolution = _resolution_of(lat)
    dist = ndimage.distance_transform_edt(~land) * resolution if land.any() else np.full(land.shape, 10.0)
    coastal = np.exp(-dist / 1.0)  # (lat, lon), largest next to the coast, e-folding 1 degree
    _, north = np.meshgrid(_unit(lon), _unit(lat))  # (lat, lon), 0 south .. 1 north
    doy = times.day_of_year.to_numpy().astype(float)
    monsoon = (
        _circular_bump(doy, 215.0, 35.0)[:, None, None] * coastal[None]  # SW monsoon upwelling
        + 0.5 * _circular_bump(doy, 15.0, 30.0)[:, None, None] * north[None]  # NE monsoon mixing
    )  # (time, lat, lon)
    deepen = (1.0 + depth / 40.0)[:, None, None]  # (depth, 1, 1): nutricline
    decay = np.exp(-depth / 60.0)[None, :, None, None]  # (1, depth, 1, 1)

    rng = np.random.default_rng([seed, 11])
    coeffs: dict[str, np.ndarray] = {}
    gains: dict[str, np.ndarray] = {}
    for name in BGC_INPUTS:
        phi = rng.uniform(0.55, 0.8, n_modes)
        coeffs[name] = _ar1(rng, n_t + lag, phi)  # (lag + time, mode); row lag + i is time i
        gains[name] = rng.uniform(0.6, 1.0, n_modes)
    beta = rng.choice([-1.0, 1.0], n_modes) * rng.uniform(0.6, 1.0, n_modes)
    driven = sum(w * gains[name] * coeffs[name][lag - k : lag - k + n_t] for name, k, w in _NO3_DRIVERS)  # (time, mode)
    mode_coeffs = {name: gains[name] * coeffs[name][lag:] for name in BGC_INPUTS}
    mode_coeffs["no3"] = beta * driven

    out = {}
    for name in (*BGC_INPUTS, "no3"):
        s = _BGC_SCALES[name]
        clim = (s["base"] + s["coastal"] * coastal + s["north"] * north)[None] * deepen  # (depth, lat, lon)
        anomaly = np.einsum("tk,kyx->tyx", mode_coeffs[name], modes)[:, None] * decay  # (time, depth, lat, lon)
        noise = rng.standard_normal((n_t, len(depth), len(lat), len(lon)))
        values = clim[None] + s["seasonal"] * monsoon[:, None] + s["anomaly"] * anomaly + s["noise"] * noise
        values = np.maximum(values, 0.05 * s["base"]).astype(np.float32)
        values[:, :, land] = np.nan
        out[name] = values
    return out


def cmems_bgc_dataset(
    times: pd.DatetimeIndex | list[Any], lat: np.ndarray, lon: np.ndarray, seed: int = 0
) -> xr.Dataset:
    """In-memory CMEMS-BGC-like dataset, dims ``(time, depth, latitude, longitude)``, NaN on land."""
    times = pd.DatetimeIndex(times).floor("D")
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    fields = bgc_fields(times, lat, lon, seed)
    dims = ("time", "depth", "latitude", "longitude")
    data_vars = {
        name: xr.Variable(
            dims,
            fields[name],
            attrs={**BGC_VAR_ATTRS[name], "units": "mmol m-3", "valid_min": np.float32(0.0)},
            encoding={"dtype": "float32", "_FillValue": np.float32(np.nan), "zlib": True, "complevel": 4},
        )
        for name in (*BGC_INPUTS, "no3")
    }
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": ("time", times.to_numpy(), {"standard_name": "time", "long_name": "Time", "axis": "T"}),
            "depth": (
                "depth",
                np.asarray(CMEMS_DEPTHS, dtype=np.float32),
                {"standard_name": "depth", "long_name": "Depth", "units": "m", "positive": "down", "axis": "Z"},
            ),
            "latitude": (
                "latitude",
                lat.astype(np.float32),
                {"standard_name": "latitude", "long_name": "Latitude", "units": "degrees_north", "axis": "Y"},
            ),
            "longitude": (
                "longitude",
                lon.astype(np.float32),
                {"standard_name": "longitude", "long_name": "Longitude", "units": "degrees_east", "axis": "X"},
            ),
        },
        attrs={
            "Conventions": "CF-1.8",
            "title": "Daily mean biogeochemistry fields (SYNTHETIC stand-in for a CMEMS BGC product)",
            "source": "conv2dlstm.steps.synthetic",
            "institution": "conv2dlstm (synthetic data; layout of Copernicus Marine Service BGC products)",
            "comment": (
                "Synthetic data: climatology + monsoon-like seasonal cycle + smooth modes with AR(1) "
                "coefficients; no3 is driven by the po4 (lag 1 day), si (lag 2) and fe (lag 1) modes. "
                "Not a model output or an observation."
            ),
            "synthetic_seed": int(seed),
        },
    )
    ds["time"].encoding = {"units": CMEMS_TIME_UNITS, "calendar": "standard", "dtype": "float64", "_FillValue": None}
    for c in ("depth", "latitude", "longitude"):
        ds[c].encoding = {"dtype": "float32", "_FillValue": None}
    return ds


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def _grid(syn: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    for key in ("lat", "lon"):
        if syn[key] is None:
            raise ConfigError(
                f"config key synthetic.{key}: null; the synthetic ocean needs an explicit [min, max] range"
            )
    (lat_lo, lat_hi), (lon_lo, lon_hi) = syn["lat"], syn["lon"]
    lat = axis_centres(lat_lo, lat_hi, syn["resolution"], name="lat")
    lon = axis_centres(lon_lo, lon_hi, syn["resolution"], name="lon")
    if lat.min() < -90 or lat.max() > 90:
        raise ConfigError(f"config key synthetic.lat: {syn['lat']} is outside -90..90")
    return lat, lon


def _times(syn: dict[str, Any]) -> pd.DatetimeIndex:
    start, end = pd.Timestamp(syn["start"]), pd.Timestamp(syn["end"])
    if end < start:
        raise ConfigError(f"config key synthetic.end: {syn['end']} is before synthetic.start {syn['start']}; swap them")
    return pd.date_range(start, end, freq="D")


KINDS = ("none", "oisst", "cmems_bgc")
"""Values of config key ``synthetic.kind``: nothing, daily OISST files, or one CMEMS-like BGC file."""


def main(cfg: dict[str, Any], *, out_dir: Path) -> None:
    """Generate the synthetic ocean of ``cfg["synthetic"]`` into ``out_dir`` (replaced atomically)."""
    syn = cfg["synthetic"]
    kind = syn["kind"]
    if kind == "none":
        raise ConfigError(
            "config key synthetic.kind: 'none' generates nothing; set it to oisst or cmems_bgc, or do "
            "not run the synth step"
        )
    if kind not in KINDS:
        raise ConfigError(f"config key synthetic.kind: {kind!r} is not one of {list(KINDS)}")
    lat, lon = _grid(syn)
    times = _times(syn)
    seed = int(syn["seed"])
    out_dir = Path(out_dir)
    for stray in discard_partials(out_dir.parent, of=out_dir.name):
        log.info("synth: discarded %s left by an interrupted run", stray)
    log.info(
        "synthetic %s: %d days %s..%s on %d x %d cells (seed %d) -> %s",
        kind,
        len(times),
        syn["start"],
        syn["end"],
        len(lat),
        len(lon),
        seed,
        out_dir,
    )
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if kind == "oisst":
            write_oisst(tmp, times, lat, lon, seed)
        else:
            ds = cmems_bgc_dataset(times, lat, lon, seed)
            chunks = (min(64, len(times)), 1, len(lat), len(lon))
            encoding = {name: {**ds[name].encoding, "chunksizes": chunks} for name in ds.data_vars}
            ds.to_netcdf(tmp / CMEMS_FILE, engine="netcdf4", format="NETCDF4", encoding=encoding)
