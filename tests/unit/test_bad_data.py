"""Bad data never passes silently: one table of bad inputs, each run through the real CLI steps.

Every case writes a few tiny daily netCDF files (8 x 8 cells, 0.25 degree) in ``tmp_path``, runs
``python -m conv2dlstm fetch`` and ``regrid`` (and, for the cases about cells missing on some days,
``normalize``) in this process (:func:`conv2dlstm.cli.main`, the entry point of
``python -m conv2dlstm``) and checks:

- the exit status (2 for a refused input, 0 for one that is handled: converted, resolved, reported);
- the words of the message: what is wrong, where (file, time, URL or config key) and the fix;
- that a refused step leaves nothing a later step could pick up: no ``manifest.json`` after a failed
  fetch, no regridded store after a failed regrid, no statistics after a failed normalize, and no
  ``*.partial`` temporary in any of these places;
- for a handled input, what the store (or the statistics) holds (converted values, the kept
  duplicate, gap attributes, gaps filled).

The regrid step's Dask work runs on one in-process scheduler shared by the module
(``DASK_SCHEDULER_ADDRESS``), so no case starts a cluster of its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm import cli
from conv2dlstm.fsutil import sha256_file
from tests.support.servers import FileServer

START, END = "2020-01-01", "2020-01-06"
DAYS = [f"{d:%Y-%m-%d}" for d in pd.date_range(START, END)]
LAT = np.arange(30.125, 32.0, 0.25)  # 8 cells: two 1-degree target rows
LON = np.arange(290.125, 292.0, 0.25)  # 0..360 like OISST: -69.875..-68.125 after harmonizing
GRID = {"lat": {"start": 30.5, "stop": 31.5, "step": 1.0}, "lon": {"start": -69.5, "stop": -68.5, "step": 1.0}}


@pytest.fixture(scope="module", autouse=True)
def shared_scheduler() -> Iterator[None]:
    """One in-process Dask scheduler (1 thread) for every regrid of the module."""
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
        yield
    cluster.close()


# ------------------------------------------------------------------------------------------ data


def file_name(day: str) -> str:
    return f"sst.{day.replace('-', '')}.nc"


def write_file(
    path: Path,
    days: list[str],
    *,
    var: str = "sst",
    units: str | None = "degC",
    value: float | list[float] = 20.0,
    spike: tuple[int, float] | None = None,
    lat: np.ndarray = LAT,
    lon: np.ndarray = LON,
    north_to_south: bool = False,
    by_latitude: bool = False,
    hole: bool = False,
    blank: bool = False,
    time_units: bool = True,
) -> Path:
    """A netCDF file of ``days`` (noon stamps, in the order given) holding ``var`` = ``value`` (one per
    day, or the same for all) on the 8 x 8 grid (or ``lat``, ``lon``); ``spike`` ``(day index,
    value)`` sets one cell. ``by_latitude`` adds the cell's latitude - 30 to the values,
    ``north_to_south`` stores the rows from north to south (the same field), ``hole`` leaves out the
    north-east quarter (one target cell), ``blank`` every value (fill values only), and
    ``time_units=False`` writes the time as plain numbers."""
    values = np.ones((len(days), lat.size, lon.size), np.float32)
    values *= np.asarray(value, np.float32).reshape(-1, 1, 1) if isinstance(value, list) else np.float32(value)
    if by_latitude:
        values += (lat - 30.0).astype(np.float32)[None, :, None]
    values[:, :2, :2] = np.nan  # a little land
    if spike is not None:
        values[spike[0], 4, 5] = spike[1]
    if hole:
        values[:, 4:, 4:] = np.nan
    if blank:
        values[:] = np.nan
    if north_to_south:
        values, lat = values[:, ::-1], lat[::-1]
    attrs = {} if units is None else {"units": units}
    times = pd.DatetimeIndex(days) + pd.Timedelta(hours=12)
    ds = xr.Dataset({var: (("time", "lat", "lon"), values, attrs)}, coords={"time": times, "lat": lat, "lon": lon})
    encoding = {}
    if not time_units:  # plain numbers, as from a writer that forgot the CF units
        ds = ds.assign_coords(time=np.arange(len(days), dtype=np.float64) + 3.5)
        encoding = {"time": {"dtype": "float64"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, encoding=encoding)
    return path


def daily(data: Path, days: list[str] = DAYS, **kwargs: Any) -> list[Path]:
    """One file per day, ``sst.YYYYMMDD.nc``; ``kwargs`` as :func:`write_file` (a list value: one per day)."""
    out = []
    for i, day in enumerate(days):
        one = {k: (v[i] if isinstance(v, list) else v) for k, v in kwargs.items()}
        out.append(write_file(data / file_name(day), [day], **one))
    return out


def file_url(data: Path) -> str:
    return f"file://{data}/sst.{{date:%Y%m%d}}.nc"


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and v else v
    return out


# ------------------------------------------------------------------------------------------ cases


@dataclass
class Ctx:
    """What a case's setup gets: the data folder, the work folder, a way to serve the data over HTTP."""

    data: Path
    work: Path
    stack: ExitStack
    server: FileServer | None = None

    def serve(self) -> FileServer:
        if self.server is None:
            self.server = self.stack.enter_context(FileServer(self.data))
        return self.server

    @property
    def raw(self) -> Path:
        return self.work / "raw"

    @property
    def store(self) -> Path:
        return self.work / "results" / "regrid" / "bad.zarr"

    @property
    def stats(self) -> Path:
        return self.work / "results" / "normalize" / "bad.nc"


@dataclass
class Case:
    """One bad input: ``setup`` writes the data and returns the config overrides; ``fails`` is the
    step that must refuse it (``fetch``, ``regrid``, ``normalize``) or ``None`` when every step must
    succeed; ``words`` are regular expressions that must all be in the error message (or, for a case
    that succeeds, in the log); ``check`` looks at the store (with ``normalize``: the statistics) of a
    case that succeeds. ``normalize`` runs the normalize step after regrid."""

    id: str
    setup: Callable[[Ctx], dict]
    fails: str | None
    words: list[str]
    check: Callable[[xr.Dataset], None] | None = None
    after_fetch: Callable[[Ctx], None] | None = None
    log_level: int = logging.WARNING
    marks: list[Any] = field(default_factory=list)
    normalize: bool = False


def url_source(ctx: Ctx, **more: Any) -> dict:
    return {"source": {"url": file_url(ctx.data), **more}}


def files_source(ctx: Ctx, pattern: str = "*.nc", **more: Any) -> dict:
    return {"source": {"kind": "files", "paths": [str(ctx.data / pattern)], **more}}


def values_are(expected: float | list[float], var: str = "sst") -> Callable[[xr.Dataset], None]:
    """The store's ocean values of ``var`` equal ``expected`` (one value, or one per day)."""

    def check(store: xr.Dataset) -> None:
        per_day = store[var].mean(("lat", "lon")).values
        want = np.broadcast_to(np.asarray(expected, dtype=np.float64), per_day.shape)
        np.testing.assert_allclose(per_day, want, atol=2e-3)

    return check


def attrs_are(**expected: Any) -> Callable[[xr.Dataset], None]:
    def check(store: xr.Dataset) -> None:
        for key, value in expected.items():
            assert store.attrs[key] == value, (key, store.attrs[key], value)

    return check


def both(*checks: Callable[[xr.Dataset], None]) -> Callable[[xr.Dataset], None]:
    def check(store: xr.Dataset) -> None:
        for c in checks:
            c(store)

    return check


# --- units ----------------------------------------------------------------------------------------


def mixed_celsius_kelvin(ctx: Ctx) -> dict:
    """Files switch from degC to K in the middle of the period (units K, values + 273.15)."""
    daily(ctx.data, DAYS[:3], units="degC", value=20.0)
    daily(ctx.data, DAYS[3:], units="K", value=293.15)
    return url_source(ctx)


def all_kelvin(ctx: Ctx) -> dict:
    daily(ctx.data, units="kelvin", value=[291.15, 292.15, 293.15, 294.15, 295.15, 296.15])
    return url_source(ctx)


def cf_celsius_spellings(ctx: Ctx) -> dict:
    daily(ctx.data, units=["Celsius", "degree_C", "degrees_Celsius", "deg_C", "degC", "°C"], value=20.0)
    return url_source(ctx)


def fahrenheit(ctx: Ctx) -> dict:
    daily(ctx.data, units="degF", value=68.0)
    return url_source(ctx)


def unconvertible_unit(ctx: Ctx) -> dict:
    daily(ctx.data, DAYS[:4], units="degC", value=20.0)
    daily(ctx.data, DAYS[4:], units="mmol m-3", value=20.0)
    return url_source(ctx)


def unreadable_unit(ctx: Ctx) -> dict:
    daily(ctx.data, units="furlongs per banana", value=20.0)
    return url_source(ctx)


def no_units_attribute(ctx: Ctx) -> dict:
    daily(ctx.data, units=None, value=20.0)
    return url_source(ctx)


def kelvin_labelled_celsius(ctx: Ctx) -> dict:
    """Values in kelvin from the fourth day on, still labelled degC."""
    daily(ctx.data, units="degC", value=[20.0, 20.0, 20.0, 293.15, 293.15, 293.15])
    return url_source(ctx)


def one_hot_spike(ctx: Ctx) -> dict:
    daily(ctx.data, units="degC", value=20.0, spike=[None, None, None, (0, 45.0), None, None])
    return url_source(ctx)


def undeclared_fill_value(ctx: Ctx) -> dict:
    daily(ctx.data, units="degC", value=20.0, spike=[None, (0, -999.0), None, None, None, None])
    return url_source(ctx)


def spike_with_relaxed_range(ctx: Ctx) -> dict:
    daily(ctx.data, units="degC", value=20.0, spike=[None, None, None, (0, 45.0), None, None])
    return {**url_source(ctx), "harmonize": {"units": {"sst": {"max": 50.0}}}}


def salinity_spellings(ctx: Ctx) -> dict:
    daily(ctx.data, var="sss", units=["1e-3", "1", "PSU", "psu", "0.001", "pss-78"], value=35.0)
    return {**url_source(ctx), "variables": {"inputs": ["sss"], "targets": ["sss"]}}


def nitrate_volume_units(ctx: Ctx) -> dict:
    daily(
        ctx.data,
        var="no3",
        units=["mmol m-3", "mmol/m3", "umol/l", "µmol L-1", "mol m-3", "mmol.m-3"],
        value=[5.0, 5.0, 5.0, 5.0, 0.005, 5.0],
    )
    return {**url_source(ctx), "variables": {"inputs": ["no3"], "targets": ["no3"]}}


def oxygen_per_mass(ctx: Ctx) -> dict:
    daily(ctx.data, var="o2", units="umol/kg", value=250.0)
    return {**url_source(ctx), "variables": {"inputs": ["o2"], "targets": ["o2"]}}


def oxygen_per_mass_declared(ctx: Ctx) -> dict:
    daily(ctx.data, var="o2", units="umol kg-1", value=250.0)
    return {
        **url_source(ctx),
        "variables": {"inputs": ["o2"], "targets": ["o2"]},
        "harmonize": {"units": {"o2": {"unit": "umol/kg", "min": 0.0, "max": 500.0}}},
    }


def chlorophyll_mass_units(ctx: Ctx) -> dict:
    daily(ctx.data, var="chl", units=["mg m-3", "ug/l", "milligram m-3", "mg/m3", "ug L-1", "mg m-3"], value=0.4)
    return {**url_source(ctx), "variables": {"inputs": ["chl"], "targets": ["chl"]}}


def undeclared_variable_mixed_units(ctx: Ctx) -> dict:
    daily(ctx.data, var="ssh", units=["m", "m", "m", "cm", "cm", "cm"], value=[0.5, 0.5, 0.5, 50.0, 50.0, 50.0])
    return {**url_source(ctx), "variables": {"inputs": ["ssh"], "targets": ["ssh"]}}


def undeclared_variable_declared(ctx: Ctx) -> dict:
    daily(ctx.data, var="ssh", units=["m", "m", "m", "cm", "cm", "cm"], value=[0.5, 0.5, 0.5, 50.0, 50.0, 50.0])
    return {
        **url_source(ctx),
        "variables": {"inputs": ["ssh"], "targets": ["ssh"]},
        "harmonize": {"units": {"ssh": {"unit": "m", "min": -5.0, "max": 5.0}}},
    }


def renamed_variable_in_kelvin(ctx: Ctx) -> dict:
    daily(ctx.data, var="analysed_sst", units="K", value=293.15)
    return {**url_source(ctx), "harmonize": {"rename": {"analysed_sst": "sst"}}}


def bad_canonical_unit(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "harmonize": {"units": {"sst": {"unit": "bananas"}}}}


def range_min_above_max(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "harmonize": {"units": {"sst": {"min": 30.0, "max": 10.0}}}}


# --- duplicate time stamps ------------------------------------------------------------------------


def duplicate_day(ctx: Ctx, policy: str | None = None) -> dict:
    """Two files for 2020-01-03, the second one 5 degC warmer."""
    daily(ctx.data, value=20.0)
    write_file(ctx.data / "sst.20200103b.nc", ["2020-01-03"], value=25.0)
    over = files_source(ctx)
    if policy is not None:
        over["harmonize"] = {"duplicates": policy}
    return over


def duplicate_within_one_file(ctx: Ctx) -> dict:
    write_file(ctx.data / "all.nc", [*DAYS[:3], DAYS[2], *DAYS[3:]], value=20.0)
    return files_source(ctx)


def overlapping_files(ctx: Ctx) -> dict:
    write_file(ctx.data / "part1.nc", DAYS[:4], value=20.0)
    write_file(ctx.data / "part2.nc", DAYS[2:], value=21.0)
    return files_source(ctx)


def overlapping_files_last(ctx: Ctx) -> dict:
    return {**overlapping_files(ctx), "harmonize": {"duplicates": "last"}}


# --- gaps and missing dates -----------------------------------------------------------------------


def gap_inside(ctx: Ctx) -> dict:
    daily(ctx.data, [DAYS[0], DAYS[1], DAYS[4], DAYS[5]], value=20.0)
    return files_source(ctx)


def gaps_at_both_ends(ctx: Ctx) -> dict:
    daily(ctx.data, DAYS[1:5], value=20.0)
    return files_source(ctx, start="2020-01-01", end="2020-01-08")


def no_gap(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return url_source(ctx)


def http_404(ctx: Ctx, max_missing: int = 0, absent: tuple[int, ...] = (2,)) -> dict:
    daily(ctx.data, value=20.0)
    server = ctx.serve()
    for i in absent:
        server.not_found.add(file_name(DAYS[i]))
    return {"source": {"url": server.url("sst.{date:%Y%m%d}.nc"), "max_missing": max_missing}}


def missing_file_url_tolerated(ctx: Ctx) -> dict:
    daily(ctx.data, [d for d in DAYS if d != DAYS[4]], value=20.0)
    return url_source(ctx, max_missing=1)


def every_date_missing(ctx: Ctx) -> dict:
    ctx.data.mkdir(parents=True, exist_ok=True)
    return url_source(ctx, max_missing=10)


# --- one odd file among daily files -----------------------------------------------------------------


def odd_file(ctx: Ctx, **odd: Any) -> dict:
    """Daily files of a field that varies with latitude, the fourth (2020-01-04) written with ``odd``."""
    daily(ctx.data, [d for d in DAYS if d != DAYS[3]], by_latitude=True)
    write_file(ctx.data / file_name(DAYS[3]), [DAYS[3]], by_latitude=True, **odd)
    return files_source(ctx)


def same_field_every_day(store: xr.Dataset) -> None:
    """The file stored north to south gives the field of the others, row for row (and it varies by row)."""
    sst = store["sst"].transpose("time", "lat", "lon").values
    assert store.sizes["time"] == 6 and np.ptp(sst[0, :, 1]) > 0.5
    np.testing.assert_allclose(sst, np.broadcast_to(sst[:1], sst.shape), atol=1e-5)


def all_fill_file(ctx: Ctx, max_missing: int = 0, kind: str = "files", absent: tuple[int, ...] = ()) -> dict:
    """Daily files, the one of 2020-01-03 of fill values only (its variable all NaN once decoded)."""
    daily(ctx.data, value=20.0, blank=[i == 2 for i in range(len(DAYS))])
    if kind == "files":
        return files_source(ctx, max_missing=max_missing)
    server = ctx.serve()
    for i in absent:
        server.not_found.add(file_name(DAYS[i]))
    return {"source": {"url": server.url("sst.{date:%Y%m%d}.nc"), "max_missing": max_missing}}


# --- cells missing on some days (the ocean mask, normalize) ---------------------------------------------

SHORT_SPLITS = {  # windows of 1 + 1 days: every split of the 6 days holds one
    "splits": {
        "train": {"start": DAYS[0], "end": DAYS[1]},
        "val": {"start": DAYS[2], "end": DAYS[3]},
        "test": {"start": DAYS[4], "end": DAYS[5]},
    },
    "windows": {"input_steps": 1, "lead_steps": 1},
    "normalize": {"climatology_window": 1},
}


def cell_missing(ctx: Ctx, days: tuple[int, ...] = (1,), **harmonize: Any) -> dict:
    """Daily files of 20, 21, ... 25; on ``days`` the north-east target cell (31.5, -68.5) has no value."""
    value = [20.0 + i for i in range(len(DAYS))]
    daily(ctx.data, value=value, hole=[i in days for i in range(len(DAYS))])
    return {**files_source(ctx), **SHORT_SPLITS, "harmonize": harmonize}


def gap_filled(stats: xr.Dataset) -> None:
    """The cell missing on 2020-01-02 stays ocean: its value that day interpolated (21, between 20 and 22)."""
    assert stats["mask"].values.all(), stats["mask"].values
    assert (stats.attrs["gap_filled_values"], stats.attrs["gap_filled_cells"], stats.attrs["fill_max_days"]) == (
        1,
        1,
        1,
    )
    assert "land_from_gaps_cells" not in stats.attrs
    day2 = stats["climatology"].sel(dayofyear=2, variable="sst")
    np.testing.assert_allclose(day2.sel(lat=31.5, lon=-68.5), 21.0, atol=1e-4)


def long_gap_stays_land(stats: xr.Dataset) -> None:
    """A gap of 2 days with fill_max_days 1 is not filled: its cell is land, counted."""
    assert not bool(stats["mask"].sel(lat=31.5, lon=-68.5)) and int(stats["mask"].sum()) == 3
    assert stats.attrs["land_from_gaps_cells"] == 1 and stats.attrs["gap_filled_values"] == 0


# --- what was already refused ---------------------------------------------------------------------


def misspelt_key(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {"source": {"ulr": file_url(ctx.data)}}


def misspelt_policy(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "harmonize": {"duplicates": "keep"}}


def truncated_download(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    server = ctx.serve()
    server.truncate[file_name(DAYS[1])] = 300
    return {"source": {"url": server.url("sst.{date:%Y%m%d}.nc")}}


def corrupt_download(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    server = ctx.serve()
    server.corrupt[file_name(DAYS[3])] = (ctx.data / file_name(DAYS[3])).stat().st_size // 2
    return {"source": {"url": server.url("sst.{date:%Y%m%d}.nc")}}


def checksum_mismatch(ctx: Ctx) -> dict:
    paths = daily(ctx.data, value=20.0)
    sums = {p.name: sha256_file(p) for p in paths}
    sums[file_name(DAYS[2])] = "0" * 64
    return url_source(ctx, checksums=sums)


def corrupt_local_file(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    (ctx.data / file_name(DAYS[1])).write_bytes(b"<html>503 Service Unavailable</html>")
    return files_source(ctx)


def glob_matches_nothing(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return files_source(ctx, pattern="oisst.*.nc")


def empty_period(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return files_source(ctx, start="2021-01-01", end="2021-01-31")


def grid_outside_data(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "grid": {"lat": {"start": 40.5, "stop": 41.5, "step": 1.0}}}


def wrong_variable_name(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "variables": {"inputs": ["sts"], "targets": ["sst"]}}


def delete_a_fetched_file(ctx: Ctx) -> None:
    (ctx.raw / file_name(DAYS[2])).unlink()


def delete_the_manifest(ctx: Ctx) -> None:
    (ctx.raw / "manifest.json").unlink()


def bad_method(ctx: Ctx) -> dict:
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "grid": {"method": "bilinear"}}


def one_cell_axis(ctx: Ctx) -> dict:
    """A target latitude axis of one cell (start = stop): no grid the networks can convolve."""
    daily(ctx.data, value=20.0)
    return {**url_source(ctx), "grid": {"lat": {"start": 30.5, "stop": 30.5, "step": 1.0}}}


RAW = r"raw/"  # fetched (url) files live in the work folder's raw/
CASES = [
    # units: converted when recognisable, refused when not
    Case(
        "mixed-degC-K-converted",
        mixed_celsius_kelvin,
        None,
        [r"'sst' converted from 'K' to 'degC' \(x \* 1 - 273\.15\)", r"the files mix units"],
        both(values_are(20.0), lambda s: s["sst"].attrs["units"] == "degC" or pytest.fail("units")),
    ),
    Case(
        "all-kelvin-converted",
        all_kelvin,
        None,
        [],
        values_are([18.0, 19.0, 20.0, 21.0, 22.0, 23.0]),
        log_level=logging.INFO,
    ),
    Case("cf-celsius-spellings", cf_celsius_spellings, None, [], values_are(20.0)),
    Case("fahrenheit-converted", fahrenheit, None, [], values_are(20.0)),
    Case(
        "unit-not-convertible",
        unconvertible_unit,
        "regrid",
        [
            r"variable 'sst' in .*sst\.20200105\.nc and .*sst\.20200106\.nc has units 'mmol m-3'",
            r"cannot be converted to its canonical unit 'degC' \(harmonize\.units\.sst\.unit\)",
            r"Units found: 'degC' in .*sst\.20200101\.nc.*'mmol m-3' in",
            r"Fix the files' units attribute, or set harmonize\.units\.sst\.unit",
        ],
    ),
    Case(
        "unit-unreadable",
        unreadable_unit,
        "regrid",
        [r"has units 'furlongs per banana'", r"not a unit pint can read", r"harmonize\.units\.sst\.unit"],
    ),
    Case(
        "no-units-attribute-assumed-canonical",
        no_units_attribute,
        None,
        [
            r"'sst' has no units attribute in .*sst\.20200101\.nc.* and 3 more files",
            r"taken to be in its canonical unit 'degC'",
            r"range -3\.\.40 degC is still checked",
        ],
        values_are(20.0),
    ),
    Case(
        "kelvin-labelled-celsius-out-of-range",
        kelvin_labelled_celsius,
        "regrid",
        [
            r"180 value\(s\) of 'sst' lie outside its plausible range -3\.\.40 degC \(harmonize\.units\.sst\)",
            r"at 3 of 6 time steps",
            r"range from 20 to 293\.15",
            r"the first is at 2020-01-04 12:00:00 in \S*sst\.20200104\.nc",
            r"units attribute",
            r"widen harmonize\.units\.sst\.min/max",
        ],
    ),
    Case(
        "one-spike-out-of-range",
        one_hot_spike,
        "regrid",
        [
            r"1 value\(s\) of 'sst' lie outside",
            r"at 1 of 6 time steps",
            r"range from 20 to 45",
            r"first is at 2020-01-04 12:00:00 in \S*sst\.20200104\.nc",
            r"harmonize\.units\.sst\.min/max",
        ],
    ),
    Case(
        "undeclared-fill-value-below-min",
        undeclared_fill_value,
        "regrid",
        [
            r"1 value\(s\) of 'sst' lie outside",
            r"range from -999 to 20",
            r"first is at 2020-01-02 12:00:00 in \S*sst\.20200102\.nc",
            r"_FillValue",
        ],
    ),
    Case("spike-accepted-by-relaxed-range", spike_with_relaxed_range, None, []),
    Case(
        "salinity-cf-spellings",
        salinity_spellings,
        None,
        [],
        both(values_are(35.0, "sss"), lambda s: s["sss"].attrs["units"] == "psu" or pytest.fail("units")),
    ),
    Case(
        "nitrate-volume-units",
        nitrate_volume_units,
        None,
        [r"'no3' converted from 'mol m-3' to 'mmol m-3'"],
        values_are(5.0, "no3"),
    ),
    Case(
        "oxygen-per-mass-refused",
        oxygen_per_mass,
        "regrid",
        [
            r"'o2' in .* has units 'umol/kg'",
            r"\[substance\] / \[mass\]",
            r"\[substance\] / \[length\] \*\* 3",
            r"harmonize\.units\.o2\.unit",
        ],
    ),
    Case("oxygen-per-mass-declared", oxygen_per_mass_declared, None, [], values_are(250.0, "o2")),
    Case("chlorophyll-mass-units", chlorophyll_mass_units, None, [], values_are(0.4, "chl")),
    Case(
        "undeclared-variable-mixed-units",
        undeclared_variable_mixed_units,
        "regrid",
        [
            r"variable 'ssh' has different units in different files: 'm' in .*; 'cm' in",
            r"no harmonize\.units entry",
            r"add harmonize\.units\.ssh",
        ],
    ),
    Case("undeclared-variable-given-an-entry", undeclared_variable_declared, None, [], values_are(0.5, "ssh")),
    Case("renamed-variable-in-kelvin", renamed_variable_in_kelvin, None, [], values_are(20.0)),
    Case(
        "canonical-unit-unreadable",
        bad_canonical_unit,
        "regrid",
        [r"config key harmonize\.units\.sst\.unit: 'bananas' is not a unit pint can read"],
    ),
    Case(
        "range-min-above-max",
        range_min_above_max,
        "fetch",  # the config alone decides: before any step
        [r"config key harmonize\.units\.sst: min 30 is above max 10; swap them"],
    ),
    # duplicate time stamps: named, refused, or resolved on request
    Case(
        "duplicate-day-refused",
        duplicate_day,
        "regrid",
        [
            r"time 2020-01-03 12:00:00 appears in both \S*sst\.20200103\.nc and \S*sst\.20200103b\.nc",
            r"not merged",
            r"harmonize\.duplicates to first .*or last",
        ],
    ),
    Case(
        "duplicate-day-keep-first",
        lambda ctx: duplicate_day(ctx, "first"),
        None,
        [r"harmonize\.duplicates first: 1 time stamp\(s\) repeat", r"dropped 1 step\(s\) from \S*sst\.20200103b\.nc"],
        values_are(20.0),
    ),
    Case(
        "duplicate-day-keep-last",
        lambda ctx: duplicate_day(ctx, "last"),
        None,
        [r"harmonize\.duplicates last", r"dropped 1 step\(s\) from \S*sst\.20200103\.nc"],
        values_are([20.0, 20.0, 25.0, 20.0, 20.0, 20.0]),
    ),
    Case(
        "duplicate-within-one-file",
        duplicate_within_one_file,
        "regrid",
        [r"time 2020-01-03 12:00:00 appears twice in \S*all\.nc", r"harmonize\.duplicates"],
    ),
    Case(
        "overlapping-files-refused",
        overlapping_files,
        "regrid",
        [r"appears in both \S*part1\.nc and \S*part2\.nc \(2 time stamps repeat"],
    ),
    Case(
        "overlapping-files-keep-last",
        overlapping_files_last,
        None,
        [],
        values_are([20.0, 20.0, 21.0, 21.0, 21.0, 21.0]),
    ),
    # gaps: reported in the log and the store's attributes
    Case(
        "gap-reported",
        gap_inside,
        None,
        [
            r"regrid: 1 gap\(s\) in the time axis, 2 missing step\(s\) of 1 day, the longest 2 day\(s\): "
            r"2020-01-03\.\.2020-01-04"
        ],
        attrs_are(time_gaps=1, missing_steps=2, longest_gap_days=2.0, missing_dates=["2020-01-03..2020-01-04"]),
    ),
    Case(
        "gaps-at-both-ends-reported",
        gaps_at_both_ends,
        None,
        [r"2 gap\(s\)"],
        attrs_are(time_gaps=2, missing_steps=4, missing_dates=["2020-01-01", "2020-01-06..2020-01-08"]),
    ),
    Case(
        "no-gap",
        no_gap,
        None,
        [r"no gap in the time axis"],
        attrs_are(time_gaps=0, missing_steps=0, longest_gap_days=0.0, missing_dates=[]),
        log_level=logging.INFO,
    ),
    # missing dates upstream: refused, or tolerated up to source.max_missing and reported
    Case(
        "http-404-refused",
        http_404,
        "fetch",
        [r"sst\.20200103\.nc: HTTP 404", r"source\.url", r"source\.start", r"source\.max_missing tolerates"],
    ),
    Case(
        "http-404-tolerated",
        lambda ctx: http_404(ctx, max_missing=1),
        None,
        [r"no file upstream for 2020-01-03", r"tolerated as a gap", r"1 gap\(s\)", r"1 date\(s\) had no file upstream"],
        attrs_are(time_gaps=1, missing_dates=["2020-01-03"], missing_upstream=["2020-01-03"]),
    ),
    Case(
        "http-404-too-many",
        lambda ctx: http_404(ctx, max_missing=1, absent=(1, 3)),
        "fetch",
        [
            r"at least 2 dates of source\.start\.\.source\.end \(2020-01-01\.\.2020-01-06\) have no file upstream",
            r"more than source\.max_missing = 1",
            r"2020-01-02 \(http://\S+/sst\.20200102\.nc\)",
            r"raise source\.max_missing",
        ],
    ),
    Case(
        "file-url-missing-date-tolerated",
        missing_file_url_tolerated,
        None,
        [r"no file upstream for 2020-01-05"],
        attrs_are(missing_dates=["2020-01-05"]),
    ),
    Case(
        "every-date-missing",
        every_date_missing,
        "fetch",
        [r"no date of source\.start\.\.source\.end \(2020-01-01\.\.2020-01-06\) has a file upstream"],
    ),
    # one odd file among daily files: named, or (latitudes stored north to south) merged value for value
    Case(
        "one-file-on-a-shifted-grid",
        lambda ctx: odd_file(ctx, lat=LAT + 0.125),
        "regrid",
        [
            r"1 file\(s\) have another latitude axis than the other 5: \S*sst\.20200104\.nc: 8 values 30\.25\.\.32",
            r"\(ascending, step 0\.25\), shifted by \+0\.125 \(the others",
            r"the others: 8 values 30\.125\.\.31\.875",
            r"fix or remove the files named",
        ],
    ),
    Case(
        "one-file-at-another-resolution",
        lambda ctx: odd_file(ctx, lon=np.arange(290.25, 292.0, 0.5)),
        "regrid",
        [
            r"another longitude axis than the other 5: \S*sst\.20200104\.nc: 4 values .*step 0\.5\), another "
            r"resolution",
            r"fix or remove",
        ],
    ),
    Case(
        "one-file-of-a-smaller-extent",
        lambda ctx: odd_file(ctx, lat=LAT[:6], lon=LON[2:]),  # same 0.25 degree cells, 6 x 6 of the 8 x 8
        "regrid",
        [
            r"1 file\(s\) have another latitude axis than the other 5: \S*sst\.20200104\.nc: 6 values "
            r"30\.125\.\.31\.375 \(ascending, step 0\.25\), a smaller extent at the same step \(the others: 8 "
            r"values 30\.125\.\.31\.875",
            r"1 file\(s\) have another longitude axis than the other 5: \S*sst\.20200104\.nc: 6 values "
            r"290\.625\.\.291\.875 \(ascending, step 0\.25\), a smaller extent at the same step",
            r"fix or remove the files named",
        ],
    ),
    Case(
        "one-file-missing-the-variable",
        lambda ctx: odd_file(ctx, var="analysed_sst"),
        "regrid",
        [r"1 file\(s\) lack variables the others have: \S*sst\.20200104\.nc lacks \['sst'\]", r"fix or remove"],
    ),
    Case("one-file-north-to-south", lambda ctx: odd_file(ctx, north_to_south=True), None, [], same_field_every_day),
    Case(
        "one-file-time-without-units",
        lambda ctx: odd_file(ctx, time_units=False),
        "regrid",
        [r"\S*sst\.20200104\.nc: its time coordinate 'time' holds plain numbers \(3\.5\)", r"no CF units"],
    ),
    # a file of fill values only: a missing day, tolerated up to source.max_missing with those missing upstream
    Case(
        "all-fill-file-refused",
        all_fill_file,
        "regrid",
        [
            r"1 source file\(s\) \(or time steps\) hold no valid value, only fill values: \S*sst\.20200103\.nc "
            r"\(2020-01-03: no valid value of 'sst'\)",
            r"more than source\.max_missing = 0",
            r"Fetch those files again or fix them at the source, remove them, or raise source\.max_missing",
        ],
    ),
    Case(
        "all-fill-file-tolerated",
        lambda ctx: all_fill_file(ctx, max_missing=1),
        None,
        [
            r"\S*sst\.20200103\.nc: no valid value of 'sst' on 2020-01-03 \(all fill values\); dropped",
            r"1 gap\(s\) in the time axis.*: 2020-01-03 \(1 file\(s\) held fill values only",
        ],
        both(
            attrs_are(time_gaps=1, missing_dates=["2020-01-03"], missing_upstream=[]),
            lambda s: (
                re.fullmatch(r"2020-01-03 \S*sst\.20200103\.nc", *s.attrs["all_fill_days"]) or pytest.fail("attr")
            ),
            values_are(20.0),
        ),
    ),
    Case(
        "all-fill-file-and-404-too-many",
        lambda ctx: all_fill_file(ctx, max_missing=1, kind="url", absent=(4,)),
        "regrid",
        [
            r"\S*sst\.20200103\.nc \(2020-01-03",
            r"1 such day\(s\) and 1 date\(s\) without a file upstream make 2 missing",
            r"more than source\.max_missing = 1",
        ],
    ),
    # cells missing on some days: filled (harmonize.fill_max_days), or land, up to harmonize.max_land_from_gaps
    Case(
        "cell-gap-filled",
        lambda ctx: cell_missing(ctx, fill_max_days=1),
        None,
        [r"normalize: filled 1 missing value\(s\) in 1 grid cell\(s\) by linear interpolation in time"],
        gap_filled,
        log_level=logging.INFO,
        normalize=True,
    ),
    Case(
        "cells-made-land-past-the-threshold",
        cell_missing,
        "normalize",
        [
            r"1 grid cells with data at other time steps are missing on 1 of 6 steps \(2020-01-02\)",
            r"25\.0% of the grid cells with data, more than harmonize\.max_land_from_gaps = 0\.05",
            r"cells at lat, lon \(31\.5, -68\.5\)",
            r"harmonize\.fill_max_days \(now 0",
            r"fix or re-fetch the source data",
            r"raise harmonize\.max_land_from_gaps",
        ],
        normalize=True,
    ),
    Case(
        "cell-long-gap-stays-land",
        lambda ctx: cell_missing(ctx, (1, 2), fill_max_days=1, max_land_from_gaps=0.5),
        None,
        [r"1 grid cells with data at other time steps are missing on 2 of 6 steps", r"land for the whole record"],
        long_gap_stays_land,
        normalize=True,
    ),
    # refused before this issue, and still refused with a clear message
    Case("misspelt-key", misspelt_key, "fetch", [r"config key source: unknown key\(s\) 'ulr'", r"check the spelling"]),
    Case(
        "misspelt-duplicates-policy",
        misspelt_policy,
        "fetch",
        [r"config key harmonize\.duplicates: 'keep' is not one of \['error', 'first', 'last'\]"],
    ),
    Case("truncated-download", truncated_download, "fetch", [r"sst\.20200102\.nc", r"truncated"]),
    Case(
        "corrupt-download",
        corrupt_download,
        "fetch",
        [r"sst\.20200104\.nc: the downloaded file is not a readable netCDF file"],
    ),
    Case(
        "checksum-mismatch",
        checksum_mismatch,
        "fetch",
        [r"sst\.20200103\.nc: SHA-256 [0-9a-f]{64} does not match source\.checksums\['sst\.20200103\.nc'\]"],
    ),
    Case(
        "corrupt-local-file",
        corrupt_local_file,
        "fetch",
        [r"source\.paths: \S*sst\.20200102\.nc is not a readable netCDF file"],
    ),
    Case(
        "glob-matches-nothing",
        glob_matches_nothing,
        "fetch",
        [r"config key source\.paths: '\S*oisst\.\*\.nc' matches no file", r"fix the path"],
    ),
    Case(
        "empty-period",
        empty_period,
        "regrid",
        [
            r"2021-01-01\.\.2021-01-31 contains no time step of the data, which covers 2020-01-01\.\.2020-01-06",
            r"source\.start/end",
        ],
    ),
    Case(
        "grid-outside-data",
        grid_outside_data,
        "regrid",
        [r"target grid lat .* is outside the source coverage", r"shrink config grid\.lat"],
    ),
    Case(
        "wrong-variable-name",
        wrong_variable_name,
        "regrid",
        [
            r"variables \['sts'\] \(config variables\.inputs/targets\) are not in the harmonized source",
            r"available variables are \['sst'\]",
            r"harmonize\.rename",
        ],
    ),
    Case(
        "fetched-file-deleted",
        no_gap,
        "regrid",
        [r"1 listed file\(s\) are missing \(first: \S*sst\.20200103\.nc\)", r"run the fetch step again"],
        after_fetch=delete_a_fetched_file,
    ),
    Case(
        "manifest-missing",
        no_gap,
        "regrid",
        [r"manifest \S*manifest\.json does not exist; run the fetch step"],
        after_fetch=delete_the_manifest,
    ),
    Case("bad-regrid-method", bad_method, "fetch", [r"config key grid\.method: 'bilinear' is not one of"]),
    Case(
        "one-cell-grid-axis",
        one_cell_axis,
        "fetch",
        [
            r"config key grid\.lat: start 30\.5, stop 30\.5, step 1\.0 give 1 cell",
            r"the target grid needs at least 2 cells per axis \(widen start\.\.stop\)",
        ],
    ),
]


def run_step(step: str, cfg: dict, ctx: Ctx, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run one CLI step as ``python -m conv2dlstm <step>`` does; return its exit status and stderr."""
    args = {
        "fetch": ["--out-dir", str(ctx.raw)],
        "regrid": [
            "--manifest",
            str(ctx.raw / "manifest.json"),
            "--out",
            str(ctx.store),
            "--threads",
            "1",
            "--memory-mb",
            "1024",
        ],
        "normalize": [
            "--data",
            str(ctx.store),
            "--out",
            str(ctx.stats),
            "--threads",
            "1",
            "--memory-mb",
            "1024",
        ],
    }[step]
    capsys.readouterr()
    rc = cli.main(["--log-level", "WARNING", step, "--config-json", json.dumps(cfg), *args])
    return rc, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*partial*")) if folder.exists() else []


def assert_words(text: str, words: list[str], case: str) -> None:
    missing = [w for w in words if not re.search(w, text)]
    assert not missing, f"{case}: {missing} not in:\n{text}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data(
    case: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(case.log_level, logger="conv2dlstm")
    with ExitStack() as stack:
        ctx = Ctx(tmp_path / "data", tmp_path / "work", stack)
        over = case.setup(ctx)
        base = {
            "name": "bad",
            "synthetic": {"kind": "none"},
            "source": {
                "kind": "url",
                "start": START,
                "end": END,
                "retries": 0,
                "backoff_s": 0.0,
                "timeout_s": 10,
                "parallel": 2,
            },
            "grid": GRID,
        }
        cfg = merge(base, over)
        rc, err = run_step("fetch", cfg, ctx, capsys)
        if case.fails == "fetch":
            assert rc == 2, err
            assert err.startswith("error: ")
            assert_words(err, case.words, case.id)
            assert not (ctx.raw / "manifest.json").exists()
            assert leftovers(ctx.raw) == []
            return
        assert rc == 0, err
        if case.after_fetch is not None:
            case.after_fetch(ctx)
        rc, err = run_step("regrid", cfg, ctx, capsys)
        if case.fails == "regrid":
            assert rc == 2, err
            assert err.startswith("error: ")
            assert_words(err, case.words, case.id)
            assert not ctx.store.exists()
            assert leftovers(ctx.store.parent) == []
            return
        assert rc == 0, err
        if case.normalize:
            rc, err = run_step("normalize", cfg, ctx, capsys)
    if case.fails == "normalize":
        assert rc == 2, err
        assert err.startswith("error: ")
        assert_words(err, case.words, case.id)
        assert not ctx.stats.exists() and leftovers(ctx.stats.parent) == []
        return
    assert rc == 0, err
    assert_words(caplog.text, case.words, case.id)
    if case.normalize:
        with xr.open_dataset(ctx.stats) as stats:
            assert leftovers(ctx.stats.parent) == []
            if case.check is not None:
                case.check(stats.load())
        return
    with xr.open_zarr(ctx.store) as store:
        assert store.sizes["time"] >= 1 and leftovers(ctx.store.parent) == []
        if case.check is not None:
            case.check(store)


def test_the_table_covers_every_kind_of_bad_data() -> None:
    ids = {c.id for c in CASES}
    assert len(CASES) >= 30 and len(ids) == len(CASES)
    refused = {c.fails for c in CASES}
    assert refused == {None, "fetch", "regrid", "normalize"}
    assert all(c.normalize for c in CASES if c.fails == "normalize")
