"""The configuration of the score strata (``evaluate.regions``, ``evaluate.by_season``): its checks
and what the workflow derives from it.

- :func:`regions_problem`: why ``evaluate.regions`` cannot be scored, from the configuration alone
  (a name that is not one, a box upside down, off the globe or off the grid); called by
  :func:`conv2dlstm.config.validate.validate_config`, so that Snakemake stops before any job. That
  a region holds an ocean cell needs the land mask: the evaluate step checks it
  (:func:`conv2dlstm.evaluation.strata.region_masks`).
- :func:`region_mask_files`: the mask files of the regions, inputs of the evaluate rule (a changed
  mask reruns evaluate).
- :func:`stratified_plots`: the figures of the strata, outputs of the evaluate rule and of the step.

Only the standard library is imported (the Snakefile uses this module directly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from conv2dlstm.config.modelsize import axis_cells

REGION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
"""A region name: a letter, then letters, digits, ``_`` and ``-`` (a ``metrics.csv`` value and part
of MLflow metric names)."""
RESERVED_NAMES = frozenset({"all", "na", "nan", "null", "none", "n-a"})
"""Names a region cannot take (case-insensitive): ``all`` names the whole grid, and the others read
as a missing value in pandas and R."""
PLOT_BY_REGION = "skill_by_region.png"
PLOT_BY_SEASON = "skill_by_season.png"
_TOLERANCE = 1e-6


def _centres(axis: Mapping[str, Any]) -> list[float]:
    start, step = float(axis["start"]), float(axis["step"])
    return [start + i * step for i in range(axis_cells(axis["start"], axis["stop"], axis["step"]))]


def _lat_problem(key: str, lat: Any) -> str | None:
    south, north = float(lat[0]), float(lat[1])
    if not (-90.0 <= south <= 90.0 and -90.0 <= north <= 90.0):
        return f"{key}.lat: {list(lat)} lies outside -90..90 degrees north; write [south, north] in degrees"
    if not south < north:
        return f"{key}.lat: {list(lat)} is not [south, north] with south < north; swap or widen them"
    return None


def _lon_problem(key: str, lon: Any, convention: str) -> str | None:
    lo, hi = (-180.0, 180.0) if convention == "-180..180" else (0.0, 360.0)
    west, east = float(lon[0]), float(lon[1])
    if not (lo <= west <= hi and lo <= east <= hi):
        return (
            f"{key}.lon: {list(lon)} lies outside {convention}, the convention of harmonize.lon_convention "
            "(and of grid.lon); write the box in it"
        )
    if not west < east:
        seam = "antimeridian" if convention == "-180..180" else "prime meridian"
        return (
            f"{key}.lon: {list(lon)} is not [west, east] with west < east (a box across the {seam} needs the "
            "other harmonize.lon_convention); swap or widen them"
        )
    return None


def _off_grid_problem(key: str, axis: str, bounds: Any, cfg: Mapping[str, Any]) -> str | None:
    """Why the box's ``axis`` range misses the data: outside ``region.<axis>`` or between the grid's cell centres."""
    lo, hi = float(bounds[0]), float(bounds[1])
    cut = cfg["region"][axis]
    if cut is not None and (hi < float(cut[0]) - _TOLERANCE or lo > float(cut[1]) + _TOLERANCE):
        return f"{key}.{axis}: {list(bounds)} lies outside the data's region.{axis} {list(cut)}; move it inside"
    centres = _centres(cfg["grid"][axis])
    if not any(lo - _TOLERANCE <= c <= hi + _TOLERANCE for c in centres):
        return (
            f"{key}.{axis}: {list(bounds)} holds no cell centre of the grid (grid.{axis} {centres[0]:g}.."
            f"{centres[-1]:g} every {float(cfg['grid'][axis]['step']):g} degrees); move or widen it onto the grid"
        )
    return None


def _box_problem(name: str, spec: Mapping[str, Any], cfg: Mapping[str, Any]) -> str | None:
    key = f"config key evaluate.regions.{name}"
    lat, lon = spec.get("lat"), spec.get("lon")
    problems = [
        _lat_problem(key, lat) if lat is not None else None,
        _lon_problem(key, lon, cfg["harmonize"]["lon_convention"]) if lon is not None else None,
        *(_off_grid_problem(key, axis, b, cfg) for axis, b in (("lat", lat), ("lon", lon)) if b is not None),
    ]
    return next((p for p in problems if p), None)


def regions_problem(cfg: Mapping[str, Any]) -> str | None:
    """Why the validated configuration's ``evaluate.regions`` cannot be scored, or None.

    Each name is a :data:`REGION_NAME` and not a :data:`RESERVED_NAMES` one; each entry is either a
    box (``lat: [south, north]`` and/or ``lon: [west, east]``, an axis left out not being restricted)
    or a ``mask`` file, not both nor neither; a box has ``-90 <= south < north <= 90``, ``west < east``
    within ``harmonize.lon_convention``, overlaps ``region`` (where set) and holds a cell centre of
    the grid on each axis it restricts.
    """
    for name, spec in cfg["evaluate"]["regions"].items():
        key = f"config key evaluate.regions.{name}"
        if not REGION_NAME.match(name):
            return (
                f"config key evaluate.regions: {name!r} is not a region name; start it with a letter and use "
                "letters, digits, _ and - only"
            )
        if name.lower() in RESERVED_NAMES:
            return (
                f"config key evaluate.regions: {name!r} cannot name a region ('all' is the whole grid, and "
                f"{sorted(RESERVED_NAMES - {'all'})} read as missing values); rename it, e.g. {name}_box"
            )
        has_box = spec.get("lat") is not None or spec.get("lon") is not None
        if has_box == bool(spec.get("mask")):
            return (
                f"{key}: give either a box (lat: [south, north] and/or lon: [west, east]) or mask: <file>, "
                f"{'not both' if has_box else 'one of them'}"
            )
        if has_box:
            problem = _box_problem(name, spec, cfg)
            if problem:
                return problem
    return None


def region_mask_files(cfg: Mapping[str, Any]) -> list[str]:
    """The ``mask`` files of ``evaluate.regions``, in order, each once: inputs of the evaluate rule, so
    that a mask replaced by other content (or a new path) reruns evaluate."""
    files = [str(spec["mask"]) for spec in cfg["evaluate"]["regions"].values() if spec.get("mask")]
    return list(dict.fromkeys(files))


def stratified_plots(cfg: Mapping[str, Any]) -> list[str]:
    """The figures of the strata the evaluate step writes besides its others: ``skill_by_region.png``
    with ``evaluate.regions``, ``skill_by_season.png`` with ``evaluate.by_season`` other than ``none``."""
    evaluate = cfg["evaluate"]
    return [PLOT_BY_REGION] * bool(evaluate["regions"]) + [PLOT_BY_SEASON] * (evaluate["by_season"] != "none")
