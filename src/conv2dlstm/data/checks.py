"""Checks of a source's files, before and after they are merged (config ``harmonize.units`` and
``harmonize.duplicates``; :class:`SourceRules` holds them), each naming the file and what differs.

``harmonize.duplicates``; :class:`SourceRules` holds them):

- :func:`duplicate_steps` - a time stamp found in two files (or twice in one) is an error
  naming both files, unless ``harmonize.duplicates`` says to keep the first or the last one;
- :func:`unit_conversions` - each file's variables are converted, file by file
  (:func:`apply_unit_conversions`), to their canonical unit with pint (:func:`unit_conversion`); a
  unit that cannot be converted is an error naming the files and the units found;
- :func:`check_plausible` - after conversion, values outside a variable's plausible range stop the
  run (a streaming Dask reduction: memory is bounded by the chunks);
- :func:`time_gaps` - the gaps in the time axis, reported by the regrid step;
- :func:`all_fill_steps` - the time steps of a file where a checked variable holds no valid value
  (all fill values): missing days, tolerated with the days missing upstream up to
  ``source.max_missing`` (:func:`check_all_fill`).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from conv2dlstm.data.harmonize import DateLike, day_bounds
from conv2dlstm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("error", "first", "last")
"""``harmonize.duplicates``: refuse a repeated time stamp, or keep its first or last occurrence."""
MAX_LISTED = 3
"""Files named in full in a message before the rest are counted."""


@dataclass(frozen=True)
class UnitSpec:
    """Canonical unit and plausible range of one variable (config ``harmonize.units.<name>``).

    ``min`` and ``max`` are in ``unit``; None means no bound on that side.
    """

    unit: str
    min: float | None = None
    max: float | None = None

    def range_text(self) -> str:
        """The range as ``min..max unit`` (``-inf``/``inf`` for a missing bound)."""
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"{lo}..{hi} {self.unit}"


@dataclass(frozen=True)
class SourceRules:
    """What is checked in the source's files before they are merged (see the module docstring).

    ``units`` maps harmonized variable names to their :class:`UnitSpec`; ``rename`` is
    ``harmonize.rename`` (raw -> harmonized names); ``variables`` the harmonized names that are
    checked (empty: every variable with a ``units`` entry); ``duplicates`` one of
    :data:`DUPLICATE_POLICIES`.
    """

    units: Mapping[str, UnitSpec] = field(default_factory=dict)
    rename: Mapping[str, str] = field(default_factory=dict)
    variables: tuple[str, ...] = ()
    duplicates: str = "error"

    def __post_init__(self) -> None:
        if self.duplicates not in DUPLICATE_POLICIES:
            raise DataError(
                f"config key harmonize.duplicates: {self.duplicates!r} is not one of {list(DUPLICATE_POLICIES)}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SourceRules:
        """The rules of a validated configuration: ``harmonize.units``, ``harmonize.duplicates``,
        ``harmonize.rename`` and the variables ``variables.inputs`` + ``targets``."""
        h = cfg["harmonize"]
        units = {
            str(name): UnitSpec(str(spec["unit"]), _bound(spec.get("min")), _bound(spec.get("max")))
            for name, spec in h["units"].items()
        }
        for name, spec in units.items():
            check_unit_spec(name, spec)
        wanted = tuple(dict.fromkeys([*cfg["variables"]["inputs"], *cfg["variables"]["targets"]]))
        return cls(units=units, rename=dict(h["rename"]), variables=wanted, duplicates=str(h["duplicates"]))

    def standard_name(self, raw: str) -> str:
        """The harmonized name of a raw variable name (``harmonize.rename`` applied)."""
        return str(self.rename.get(raw, raw))

    def checks(self, name: str) -> bool:
        """Whether the harmonized variable ``name`` is checked (a wanted variable, or any with a
        ``units`` entry when no variables are given)."""
        return name in self.variables if self.variables else name in self.units


def check_unit_spec(name: str, spec: UnitSpec) -> None:
    """:class:`ConfigError` naming ``harmonize.units.<name>`` when its unit is not one pint can read or
    its ``min`` exceeds its ``max``."""
    try:
        parse_unit(spec.unit)
    except ValueError as exc:
        raise ConfigError(
            f"config key harmonize.units.{name}.unit: {exc}; write it as pint or CF/UDUNITS do (degC, K, psu, "
            "mmol m-3, mg/m3, umol/kg, ...)"
        ) from None
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise ConfigError(f"config key harmonize.units.{name}: min {spec.min:g} is above max {spec.max:g}; swap them")


def _bound(value: Any) -> float | None:
    return None if value is None else float(value)


def _files_text(paths: Sequence[str]) -> str:
    """``a.nc``, ``a.nc and b.nc``, or ``a.nc, b.nc, c.nc and 7 more files``."""
    paths = list(dict.fromkeys(paths))
    if len(paths) <= MAX_LISTED:
        return paths[0] if len(paths) == 1 else ", ".join(paths[:-1]) + f" and {paths[-1]}"
    return ", ".join(paths[:MAX_LISTED]) + f" and {len(paths) - MAX_LISTED} more files"


def stamp(value: Any) -> str:
    """A time stamp as text: ``2019-04-01 12:00:00`` for datetimes, ``str(value)`` otherwise."""
    try:
        return str(pd.Timestamp(value))
    except (TypeError, ValueError):
        return str(value)


def time_key(value: Any) -> Any:
    """A hashable key equal for equal time stamps (nanoseconds for datetimes)."""
    try:
        return pd.Timestamp(value).value
    except (TypeError, ValueError):
        return value


def time_keys(values: np.ndarray) -> list[Any]:
    """:func:`time_key` of every value of a time coordinate (vectorized for datetime64)."""
    values = np.atleast_1d(np.asarray(values))
    if np.issubdtype(values.dtype, np.datetime64):
        return values.astype("datetime64[ns]").view("int64").tolist()
    return [time_key(v) for v in values]


# ---- what every file must share ------------------------------------------------------------------


@dataclass(frozen=True)
class FileLayout:
    """What the files of one source must share: each horizontal axis (size, first and last value,
    a digest of the values) and the checked variables present."""

    lat: tuple[int, float, float, str] | None
    lon: tuple[int, float, float, str] | None
    variables: frozenset[str]


def _axis_layout(ds: xr.Dataset, role: str, rename: Mapping[str, str]) -> tuple[int, float, float, str] | None:
    """Size, first and last value and a digest of the axis ``role`` of ``ds``; latitudes in ascending
    order (each file's latitudes are put in ascending order before files are merged:
    :func:`ascending_latitude`)."""
    import hashlib

    from conv2dlstm.data.harmonize import find_axis

    name = find_axis(ds, role, rename=rename)
    if name is None:
        return None
    values = np.asarray(ds[name].values, dtype=np.float64)
    if role == "lat" and values.size > 1 and values[0] > values[-1]:
        values = values[::-1]
    digest = hashlib.sha256(np.round(values, 6).tobytes()).hexdigest()[:16]
    return (int(values.size), float(values[0]), float(values[-1]), digest) if values.size else (0, 0.0, 0.0, digest)


def ascending_latitude(ds: xr.Dataset, rename: Mapping[str, str]) -> xr.Dataset:
    """``ds`` (raw names) with its latitude axis in ascending order: a file stored north to south
    among files stored south to north is merged with them value for value (lazy: an index flip)."""
    from conv2dlstm.data.harmonize import find_axis

    name = find_axis(ds, "lat", rename=rename)
    if name is None or ds[name].size < 2:
        return ds
    values = np.asarray(ds[name].values)
    if values[0] > values[-1]:
        return ds.isel({ds[name].dims[0]: slice(None, None, -1)})
    return ds


def file_layout(ds: xr.Dataset, rules: SourceRules) -> FileLayout:
    """The :class:`FileLayout` of one opened file (raw names; ``harmonize.rename`` applied to find them)."""
    rename = dict(rules.rename)
    present = {rules.standard_name(str(v)) for v in ds.data_vars}
    wanted = set(rules.variables) if rules.variables else set(rules.units)
    return FileLayout(_axis_layout(ds, "lat", rename), _axis_layout(ds, "lon", rename), frozenset(present & wanted))


def _describe_axis(layout: tuple[int, float, float, str] | None) -> str:
    if layout is None:
        return "no such axis"
    size, first, last, _ = layout
    order = "descending" if last < first else "ascending"
    step = f", step {abs(last - first) / (size - 1):.4g}" if size > 1 else ""
    return f"{size} values {first:g}..{last:g} ({order}{step})"


AXIS_TOLERANCE = 1e-6
"""Degrees within which two axes' first or last values, or their steps, are the same."""


def _axis_difference(odd: tuple[int, float, float, str] | None, common: tuple[int, float, float, str] | None) -> str:
    """How the axis ``odd`` of a file differs from ``common``, that of the other files, in words: ``,
    another resolution``, ``, a smaller extent at the same step``, ``, shifted by +0.125``, ...; empty
    when one has no such axis or fewer than 2 values (the description says it all)."""
    if odd is None or common is None or odd[0] < 2 or common[0] < 2:
        return ""
    (n_odd, first_odd, last_odd, _), (n_common, first_common, last_common, _) = odd, common
    if (last_odd < first_odd) != (last_common < first_common):
        return ", in the other order"
    low_odd, high_odd = sorted((first_odd, last_odd))
    low_common, high_common = sorted((first_common, last_common))
    step_odd, step_common = (high_odd - low_odd) / (n_odd - 1), (high_common - low_common) / (n_common - 1)
    if abs(step_odd - step_common) > AXIS_TOLERANCE:
        return ", another resolution"
    inside = low_odd >= low_common - AXIS_TOLERANCE and high_odd <= high_common + AXIS_TOLERANCE
    around = low_odd <= low_common + AXIS_TOLERANCE and high_odd >= high_common - AXIS_TOLERANCE
    if n_odd < n_common and inside:
        return ", a smaller extent at the same step"
    if n_odd > n_common and around:
        return ", a larger extent at the same step"
    if n_odd == n_common and abs(low_odd - low_common) > AXIS_TOLERANCE:
        return f", shifted by {low_odd - low_common:+g}"
    if n_odd == n_common:
        return ", other values in the same range"
    return ", another extent at the same step"


def check_layouts(layouts: Sequence[FileLayout], names: Sequence[str]) -> None:
    """Every file on the grid of the majority, with its variables: else a :class:`DataError` naming
    the files that differ, what they hold and what the others hold, and how their axes differ (a
    shifted grid, another resolution, a smaller or larger extent) or which variable they lack.
    Latitudes are compared in ascending order: the order of a file's latitudes may differ
    (:func:`ascending_latitude`), that of its longitudes may not."""
    if len(layouts) < 2:
        return
    problems = []
    for part, label in (("lat", "latitude"), ("lon", "longitude")):
        values = [getattr(layout, part) for layout in layouts]
        common, _ = Counter(values).most_common(1)[0]
        odd = [i for i, v in enumerate(values) if v != common]
        if odd:
            problems.append(
                f"{len(odd)} file(s) have another {label} axis than the other {len(values) - len(odd)}: "
                + "; ".join(
                    f"{names[i]}: {_describe_axis(values[i])}{_axis_difference(values[i], common)}" for i in odd[:3]
                )
                + (" ..." if len(odd) > 3 else "")
                + f" (the others: {_describe_axis(common)})"
            )
    every = frozenset().union(*(layout.variables for layout in layouts))
    lacking = [(i, sorted(every - layout.variables)) for i, layout in enumerate(layouts) if layout.variables != every]
    if lacking:
        problems.append(
            f"{len(lacking)} file(s) lack variables the others have: "
            + "; ".join(f"{names[i]} lacks {missing}" for i, missing in lacking[:3])
            + (" ..." if len(lacking) > 3 else "")
        )
    if problems:
        raise DataError(
            "the source's files cannot be combined: "
            + "; ".join(problems)
            + ". Every file must share the lat/lon grid (and the order of its longitudes) and hold the same "
            "variables: fix or remove the files named"
        )


def check_time_has_units(ds: xr.Dataset, axis: str, name: str) -> None:
    """A :class:`DataError` naming file ``name`` when its time coordinate ``axis`` was not decoded to
    dates (numbers: no CF ``units`` such as ``days since 1970-01-01``)."""
    values = np.asarray(ds[axis].values)
    if values.dtype.kind in "iuf":
        raise DataError(
            f"{name}: its time coordinate {axis!r} holds plain numbers ({', '.join(map(str, values[:3]))}"
            f"{' ...' if values.size > 3 else ''}), not dates: it has no CF units attribute (e.g. 'days since "
            "1970-01-01'); fix the file's time units or remove it from the source"
        )


# ---- files without a valid value ------------------------------------------------------------------

ALL_FILL_BLOCK_BYTES = 64 * 1024 * 1024
"""Bytes of a variable read at a time by :func:`all_fill_steps` (whole time steps)."""


@dataclass(frozen=True)
class EmptyStep:
    """A time step of a source file where checked variables hold no valid value (all fill values)."""

    file: str
    time: Any  # its time key (:func:`time_key`)
    variables: tuple[str, ...]

    def date(self) -> str:
        """The step's day as ``YYYY-MM-DD`` (its time stamp when it is not a date)."""
        try:
            return f"{pd.Timestamp(self.time):%Y-%m-%d}"
        except (TypeError, ValueError):
            return stamp(self.time)

    def text(self) -> str:
        return f"{self.file} ({self.date()}: no valid value of {', '.join(map(repr, self.variables))})"


def all_fill_steps(ds: xr.Dataset, axis: str, rules: SourceRules) -> dict[int, tuple[str, ...]]:
    """The positions along the time coordinate ``axis`` of a raw file ``ds`` (values decoded: fill
    values are NaN) where a checked variable (:meth:`SourceRules.checks`) holds no finite value,
    with those variables (harmonized names). A reduction over the file, read whole time steps at a
    time (about :data:`ALL_FILL_BLOCK_BYTES`), so memory does not grow with the file."""
    dim = ds[axis].dims[0]
    out: dict[int, list[str]] = {}
    for raw in ds.data_vars:
        name = rules.standard_name(str(raw))
        var = ds[raw]
        if not rules.checks(name) or dim not in var.dims or var.dtype.kind not in "fc":
            continue
        var = var.transpose(dim, ...)
        cells = max(1, int(np.prod([var.sizes[d] for d in var.dims[1:]])))
        steps = max(1, ALL_FILL_BLOCK_BYTES // (8 * cells))
        for lo in range(0, var.sizes[dim], steps):
            block = np.asarray(var.isel({dim: slice(lo, lo + steps)}).values).reshape(-1, cells)
            for pos in np.flatnonzero(~np.isfinite(block).any(axis=1)):
                out.setdefault(lo + int(pos), []).append(name)
    return {pos: tuple(names) for pos, names in sorted(out.items())}


def check_all_fill(
    empty: Sequence[EmptyStep], *, upstream_missing: int, max_missing: int, start: DateLike, end: DateLike
) -> list[EmptyStep]:
    """The steps of ``empty`` (files, or time steps of files, without a valid value) within the whole
    days ``start..end``, each a missing day: with the ``upstream_missing`` dates that had no file
    upstream, tolerated up to ``max_missing`` (config ``source.max_missing``; a WARNING names each file
    and date), else :class:`DataError` naming the files, the dates and the fix."""
    lo, hi = day_bounds(start, end)
    kept = []
    for step in empty:
        try:
            t = np.datetime64(pd.Timestamp(step.time).to_datetime64(), "ns")
        except (TypeError, ValueError):
            kept.append(step)
            continue
        if lo <= t < hi:
            kept.append(step)
    if not kept:
        return []
    total = len(kept) + upstream_missing
    upstream = f" and {upstream_missing} date(s) without a file upstream" if upstream_missing else ""
    if total > max_missing:
        listed = "; ".join(step.text() for step in kept[:MAX_LISTED])
        more = f"; and {len(kept) - MAX_LISTED} more" if len(kept) > MAX_LISTED else ""
        raise DataError(
            f"{len(kept)} source file(s) (or time steps) hold no valid value, only fill values: {listed}{more}. "
            f"Each is a missing day: {len(kept)} such day(s){upstream} make {total} missing, more than "
            f"source.max_missing = {max_missing}. Fetch those files again or fix them at the source, remove them, "
            "or raise source.max_missing to accept them as gaps in the time axis"
        )
    for step in kept:
        log.warning(
            "%s: no valid value of %s on %s (all fill values); dropped, a missing day: a gap in the time axis "
            "(%d missing day(s)%s, at most source.max_missing = %d)",
            step.file,
            ", ".join(map(repr, step.variables)),
            step.date(),
            total,
            f", {upstream_missing} of them without a file upstream" if upstream_missing else "",
            max_missing,
        )
    return kept


# ---- duplicate time stamps ------------------------------------------------------------------------


def duplicate_steps(
    keys: Sequence[Sequence[Any] | np.ndarray | None], paths: Sequence[str], policy: str = "error"
) -> dict[int, list[int]]:
    """Time stamps that occur more than once across files (or within one), before anything is merged.

    ``keys[i]`` are the :func:`time_keys` of file ``i``'s time axis (None: the file has none and is
    left alone), ``paths[i]`` its path as shown in messages. ``policy`` ``error`` raises
    :class:`DataError` naming the first repeated time and both files; ``first`` keeps the occurrence
    in the earliest file (manifest order) and ``last`` the one in the latest, and the others are
    returned, ``{file index: positions along its time axis}``, with a WARNING naming them.
    """
    if policy not in DUPLICATE_POLICIES:
        raise DataError(f"config key harmonize.duplicates: {policy!r} is not one of {list(DUPLICATE_POLICIES)}")
    flat, owners = _flat_keys(keys)
    if not flat:
        return {}
    index = pd.Index(flat)
    repeated = index.duplicated(keep=False)
    if not repeated.any():
        return {}
    groups: dict[Any, list[tuple[int, int]]] = {}
    for key, owner, rep in zip(flat, owners, repeated):
        if rep:
            groups.setdefault(key, []).append(owner)
    if policy == "error":
        raise _duplicates_error(groups, paths)
    return _drop_duplicates(index, owners, groups, paths, policy)


def _flat_keys(keys: Sequence[Sequence[Any] | np.ndarray | None]) -> tuple[list[Any], list[tuple[int, int]]]:
    """The time keys of all files with one (``keys[i]`` not None) in order, and the owner of each:
    ``(file index, position along its time axis)``."""
    flat: list[Any] = []
    owners: list[tuple[int, int]] = []
    for i, found in enumerate(keys):
        if found is None:
            continue
        flat.extend(found)
        owners.extend((i, pos) for pos in range(len(found)))
    return flat, owners


def _first_duplicate(groups: Mapping[Any, list[tuple[int, int]]], paths: Sequence[str]) -> tuple[str, list[str], str]:
    """The first repeated time stamp of ``groups`` (the owners of each repeated key) as shown, the path
    of each of its occurrences, and where they are (``twice in <path>``, ``in both <path> and <path>``)."""
    first_key = min(groups)
    where = [paths[i] for i, _ in groups[first_key]]
    place = f"twice in {where[0]}" if len(set(where)) == 1 else f"in both {where[0]} and {where[1]}"
    return stamp(first_key), where, place


def _duplicates_error(groups: Mapping[Any, list[tuple[int, int]]], paths: Sequence[str]) -> DataError:
    """The error of policy ``error``: the first repeated time and its files, how many repeat, and the fix."""
    shown, where, place = _first_duplicate(groups, paths)
    inside = len(set(where)) == 1
    involved = sorted({paths[i] for owner_list in groups.values() for i, _ in owner_list})
    more = f" ({len(groups)} time stamps repeat, in {_files_text(involved)})" if len(groups) > 1 else ""
    choices = (
        f"first (keep the earlier step in {where[0]}) or last (the later one)"
        if inside
        else f"first (keep the one in {where[0]}, the earlier in the manifest) or last (keep the one in {where[-1]})"
    )
    return DataError(
        f"time {shown} appears {place}{more}: two files (or steps) for the same time; the source "
        f"files are not merged. Remove the wrong file (or step), or set harmonize.duplicates to {choices}"
    )


def _drop_duplicates(
    index: pd.Index,
    owners: Sequence[tuple[int, int]],
    groups: Mapping[Any, list[tuple[int, int]]],
    paths: Sequence[str],
    policy: str,
) -> dict[int, list[int]]:
    """Policy ``first`` or ``last``: the occurrences it drops, ``{file index: positions}``, logged in a WARNING."""
    drop = index.duplicated(keep=policy)
    dropped: dict[int, list[int]] = {}
    for owner, d in zip(owners, drop):
        if d:
            dropped.setdefault(owner[0], []).append(owner[1])
    shown, _, place = _first_duplicate(groups, paths)
    kept_file = paths[groups[min(groups)][0 if policy == "first" else -1][0]]
    log.warning(
        "harmonize.duplicates %s: %d time stamp(s) repeat, e.g. %s %s; kept the %s occurrence (%s) and "
        "dropped %d step(s) from %s",
        policy,
        len(groups),
        shown,
        place,
        policy,
        kept_file,
        int(drop.sum()),
        _files_text([paths[i] for i in sorted(dropped)]),
    )
    return dropped


# ---- units ----------------------------------------------------------------------------------------

UNIT_ALIASES: dict[str, str] = {
    **dict.fromkeys(
        ("celsius", "degree_celsius", "degrees_celsius", "degree_c", "degrees_c", "deg_c", "degc", "°c"), "degC"
    ),
    **dict.fromkeys(("kelvin", "degree_kelvin", "degrees_kelvin", "degree_k", "degrees_k", "deg_k", "degk", "k"), "K"),
    **dict.fromkeys(
        ("fahrenheit", "degree_fahrenheit", "degrees_fahrenheit", "degree_f", "degrees_f", "deg_f", "degf"), "degF"
    ),
    **dict.fromkeys(("psu", "pss", "pss-78", "pss78", "practical_salinity_unit", "practical_salinity_units"), "psu"),
}
"""CF / UDUNITS spellings that pint does not read as meant (lower case, blanks as ``_``) -> pint."""
SALINITY_NUMBERS = (1.0, 1e-3)
"""Dimensionless units that CF files give practical salinity ("1", older "1e-3"; values near 35):
read as PSU when the other side of a conversion is PSU."""
_UNITLESS = ("", "unknown", "none")


@functools.cache
def unit_registry() -> Any:
    """The pint unit registry (one per process), with ``psu`` (practical salinity) added as its own
    dimension: it converts to nothing but itself and the :data:`SALINITY_NUMBERS` spellings."""
    import pint

    registry: pint.UnitRegistry[Any] = pint.UnitRegistry()
    registry.define("practical_salinity_unit = [practical_salinity] = psu")
    return registry


def cf_to_pint(text: str) -> str:
    """A CF/UDUNITS unit string in pint's syntax.

    Whole-string aliases first (:data:`UNIT_ALIASES`: ``Celsius``, ``degree_C``, ``kelvin``,
    ``PSU``, ...); otherwise UDUNITS products and powers: ``mmol m-3`` -> ``mmol m**-3``,
    ``mg/m3`` -> ``mg/m**3``, ``m.s-1`` -> ``m s**-1``, ``m^2`` -> ``m**2``; micro signs become ``u``.
    Numbers such as ``1e-3`` are left alone.
    """
    text = text.strip().replace("µ", "u").replace("μ", "u")
    alias = UNIT_ALIASES.get(re.sub(r"\s+", "_", text.lower()))
    if alias is not None:
        return alias
    text = re.sub(r"(?<=[A-Za-z0-9])\.(?=[A-Za-z])", " ", text)
    return re.sub(r"\b([A-Za-z_]+)\^?(-?\d+)\b", r"\1**\2", text)


def parse_unit(text: str) -> Any:
    """The pint ``Quantity`` that a unit string means (magnitude 1e-3 for ``1e-3``); ``ValueError``
    naming ``text`` when pint cannot read it."""
    registry = unit_registry()
    try:
        quantity = registry.parse_expression(cf_to_pint(text))
    except Exception as exc:
        raise ValueError(f"{text!r} is not a unit pint can read ({type(exc).__name__}: {exc})") from None
    return quantity if isinstance(quantity, registry.Quantity) else registry.Quantity(quantity)


def _salinity_pair(src: Any, dst: Any) -> tuple[Any, Any]:
    """Read a dimensionless ``1`` or ``1e-3`` as PSU when the other side is PSU (see :data:`SALINITY_NUMBERS`)."""
    registry = unit_registry()
    psu = registry.Quantity(1.0, "psu")

    def as_psu(q: Any, other: Any) -> Any:
        if other.dimensionality == psu.dimensionality and q.dimensionless:
            if any(math.isclose(float(q.to("").magnitude), s, rel_tol=1e-9) for s in SALINITY_NUMBERS):
                return psu
        return q

    return as_psu(src, dst), as_psu(dst, src)


@dataclass(frozen=True)
class Affine:
    """A unit conversion ``x -> scale * x + offset`` (every conversion between two units pint
    understands is affine; temperatures have an offset)."""

    scale: float
    offset: float

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0

    def apply(self, values: xr.DataArray) -> xr.DataArray:
        """``values`` converted (lazy for Dask-backed values; the dtype of float values is kept)."""
        if self.identity:
            return values
        out = values * self.scale + self.offset if self.offset else values * self.scale
        out.attrs = dict(values.attrs)
        out.encoding = dict(values.encoding)
        return out

    def text(self) -> str:
        if not self.offset:
            return f"x * {self.scale:.10g}"
        return f"x * {self.scale:.10g} {'-' if self.offset < 0 else '+'} {abs(self.offset):.10g}"


def unit_conversion(source: str, canonical: str) -> Affine:
    """The conversion of values in unit ``source`` to unit ``canonical``, computed by pint.

    Both strings go through :func:`cf_to_pint`; the affine map is pint's conversion of 0 and 1 (and
    checked on 2). ``ValueError`` naming both units and their dimensions when pint cannot convert one
    into the other (``K`` to ``mmol m-3``, ``umol/kg`` to ``mmol m-3``: per mass is not per volume).
    """
    src, dst = _salinity_pair(parse_unit(source), parse_unit(canonical))
    registry = unit_registry()

    def convert(x: float) -> float:
        return float(registry.Quantity(x * src.magnitude, src.units).to(dst.units).magnitude / dst.magnitude)

    try:
        offset = convert(0.0)
        scale = convert(1.0) - offset
        check = convert(2.0)
    except Exception as exc:
        raise ValueError(
            f"{source!r} ({src.dimensionality}) cannot be converted to {canonical!r} ({dst.dimensionality})"
        ) from exc
    if not math.isclose(check, 2.0 * scale + offset, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"{source!r} -> {canonical!r} is not a linear conversion")
    if math.isclose(scale, 1.0, rel_tol=1e-12) and abs(offset) < 1e-12:
        return Affine(1.0, 0.0)
    return Affine(scale, offset)


_STALE_ATTRS = ("valid_min", "valid_max", "valid_range", "actual_range", "actual_min", "actual_max")
"""Attributes in the source's unit, dropped from a converted variable."""


def _units_found(by_unit: Mapping[str, Sequence[str]]) -> str:
    return "; ".join(f"{unit or '(no units attribute)'!r} in {_files_text(paths)}" for unit, paths in by_unit.items())


UnitsFound = dict[str, dict[str, list[str]]]
"""Variable (standard name) -> its ``units`` attribute as found -> the files with that unit."""
Conversions = dict[str, dict[str, Affine]]
"""Variable (standard name) -> unit found -> its conversion to the canonical unit."""


def add_units(found: UnitsFound, path: str, ds: xr.Dataset, rules: SourceRules) -> None:
    """Record in ``found`` the ``units`` attribute of each checked variable of file ``path``."""
    for raw in ds.data_vars:
        name = rules.standard_name(str(raw))
        if rules.checks(name):
            unit = str(ds[raw].attrs.get("units", "")).strip()
            found.setdefault(name, {}).setdefault(unit, []).append(path)


def unit_conversions(found: UnitsFound, rules: SourceRules) -> Conversions:
    """The conversion of every unit ``found`` (over all files, :func:`add_units`) to its variable's
    canonical unit, before the files are merged; :func:`apply_unit_conversions` applies them file by file.

    For a variable with a ``harmonize.units`` entry, every unit found (the ``units`` attribute, per
    file) is converted with :func:`unit_conversion`. A unit that cannot be converted raises
    :class:`DataError` naming the files, the units found and the fix. A variable without a ``units``
    attribute is taken to be in the canonical unit (a WARNING names the files; the plausible range
    still applies). A checked variable without an entry keeps its unit, which must be the same in
    every file (else :class:`DataError`). One log line per unit converted or assumed.
    """
    conversions: Conversions = {}
    for name, by_unit in found.items():
        spec = rules.units.get(name)
        if spec is None:
            _keep_unit(name, by_unit)
            continue
        conversions[name] = {}
        for unit in by_unit:
            conversions[name][unit] = _canonical_conversion(name, unit, by_unit, spec)
    return conversions


def _keep_unit(name: str, by_unit: dict[str, list[str]]) -> None:
    """Log that variable ``name``, without a ``harmonize.units`` entry, keeps its unit; :class:`DataError`
    when its files have different units (``by_unit``: unit found -> files)."""
    if len(by_unit) > 1:
        raise DataError(
            f"variable {name!r} has different units in different files: {_units_found(by_unit)}; it "
            f"has no harmonize.units entry, so it is not converted: add harmonize.units.{name} with "
            "its canonical unit and plausible min and max, or fix the files"
        )
    log.info(
        "harmonize: %r has no harmonize.units entry: kept in %r, range not checked",
        name,
        next(iter(by_unit)) or "(no units)",
    )


def _canonical_conversion(name: str, unit: str, by_unit: dict[str, list[str]], spec: UnitSpec) -> Affine:
    """The conversion of variable ``name`` from ``unit`` (one of ``by_unit``: unit found -> files) to its
    canonical unit ``spec.unit``, logged unless it is the identity; no units attribute is taken to be
    the canonical unit (with a WARNING); :class:`DataError` when ``unit`` cannot be converted."""
    paths = by_unit[unit]
    if unit.lower() in _UNITLESS:
        log.warning(
            "harmonize: %r has no units attribute in %s; taken to be in its canonical unit %r "
            "(harmonize.units.%s); its plausible range %s is still checked",
            name,
            _files_text(paths),
            spec.unit,
            name,
            spec.range_text(),
        )
        return Affine(1.0, 0.0)
    try:
        conv = unit_conversion(unit, spec.unit)
    except ValueError as exc:
        raise DataError(
            f"variable {name!r} in {_files_text(paths)} has units {unit!r}, which cannot be converted "
            f"to its canonical unit {spec.unit!r} (harmonize.units.{name}.unit): {exc}. Units found: "
            f"{_units_found(by_unit)}. Fix the files' units attribute, or set "
            f"harmonize.units.{name}.unit (and min, max) to a unit these files can be converted to"
        ) from None
    if not conv.identity:
        level = logging.WARNING if len(by_unit) > 1 else logging.INFO
        log.log(
            level,
            "harmonize: %r converted from %r to %r (%s) in %s%s",
            name,
            unit,
            spec.unit,
            conv.text(),
            _files_text(paths),
            "; the files mix units" if len(by_unit) > 1 else "",
        )
    return conv


def apply_unit_conversions(ds: xr.Dataset, conversions: Conversions, rules: SourceRules) -> xr.Dataset:
    """One file's variables converted by ``conversions`` (from :func:`unit_conversions` over files that
    include this one) and labelled with their canonical unit; lazy."""
    for raw in list(ds.data_vars):
        name = rules.standard_name(str(raw))
        if name not in conversions:
            continue
        unit = str(ds[raw].attrs.get("units", "")).strip()
        conv = conversions[name][unit]
        var = conv.apply(ds[raw])
        attrs = {k: v for k, v in var.attrs.items() if conv.identity or k not in _STALE_ATTRS}
        attrs["units"] = rules.units[name].unit
        var.attrs = attrs
        ds = ds.assign({raw: var})
    return ds


# ---- plausible values ------------------------------------------------------------------------------


CHECK_CHUNK_BYTES = 16 * 1024 * 1024
"""Target size (float64 working copy) of one time chunk of the plausibility check."""
MAX_CHECK_TIME_CHUNK = 256


def _block_stats(block: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(3, time)`` for a ``(time, ...)`` block: count of values outside ``lo..hi``, then the finite
    minimum and maximum per time step (inf / -inf where a step has no finite value)."""
    flat = block.reshape(block.shape[0], -1)
    out = np.empty((3, block.shape[0]), np.float64)
    with np.errstate(invalid="ignore"):
        out[0] = ((flat < lo) | (flat > hi)).sum(axis=1)
        finite = np.isfinite(flat)
        out[1] = np.where(finite, flat, np.inf).min(axis=1, initial=np.inf)
        out[2] = np.where(finite, flat, -np.inf).max(axis=1, initial=-np.inf)
    return out


def range_summary(ds: xr.Dataset, units: Mapping[str, UnitSpec]) -> xr.Dataset:
    """Per time step, for each variable of a harmonized ``ds`` with a bounded range in ``units``:
    ``<name>.count`` of values outside it, ``<name>.min`` and ``<name>.max`` (NaN is not counted).

    Lazy for Dask-backed variables: one small task per time chunk (chunks of about
    :data:`CHECK_CHUNK_BYTES`, whole grid), so memory is bounded by a chunk.
    """
    import dask.array as dask_array

    out: dict[str, xr.DataArray] = {}
    for name in ds.data_vars:
        spec = units.get(str(name))
        if spec is None or (spec.min is None and spec.max is None):
            continue
        x = ds[name].transpose("time", ...)
        lo = -np.inf if spec.min is None else float(spec.min)
        hi = np.inf if spec.max is None else float(spec.max)
        if x.chunks is None:
            stats: Any = _block_stats(np.asarray(x.values), lo, hi)
        else:
            cells = max(1, int(np.prod([x.sizes[d] for d in x.dims[1:]])))
            tc = int(max(1, min(MAX_CHECK_TIME_CHUNK, CHECK_CHUNK_BYTES // (8 * cells))))
            data = x.data.rechunk({0: tc, **{i: -1 for i in range(1, x.ndim)}})
            stats = dask_array.map_blocks(
                _block_stats,
                data,
                lo,
                hi,
                drop_axis=list(range(1, x.ndim)),
                new_axis=0,
                chunks=((3,), data.chunks[0]),
                dtype=np.float64,
            )
        for i, what in enumerate(("count", "min", "max")):
            out[f"{name}.{what}"] = xr.DataArray(stats[i], dims=("time",), coords={"time": x["time"]})
    return xr.Dataset(out)


def check_plausible(
    ds: xr.Dataset, units: Mapping[str, UnitSpec], *, file_of: Callable[[Any], str | None] | None = None
) -> None:
    """Raise :class:`DataError` when a variable of the harmonized ``ds`` has values outside its range.

    The reduction (:func:`range_summary`) streams chunk by chunk on the current Dask scheduler. The
    message gives, per offending variable, the number of values outside the range, the lowest and
    highest value seen, the first time step with one and its file (``file_of(time)``), and the
    config keys that relax the range.
    """
    summary = range_summary(ds, units)
    if summary.data_vars:
        raise_implausible(summary.compute(), ds["time"].values, units, file_of=file_of)


def raise_implausible(
    summary: xr.Dataset,
    times: np.ndarray,
    units: Mapping[str, UnitSpec],
    *,
    file_of: Callable[[Any], str | None] | None = None,
) -> None:
    """The verdict of :func:`check_plausible` on a computed :func:`range_summary` of the data whose
    time axis is ``times`` (so that the summary can be computed together with other work)."""
    problems: list[str] = []
    names: list[str] = []
    for key in summary.data_vars:
        name = str(key)
        if not name.endswith(".count"):
            continue
        name = name[: -len(".count")]
        counts = summary[f"{name}.count"].values
        total = int(counts.sum())
        if total == 0:
            continue
        spec = units[str(name)]
        first = int(np.argmax(counts > 0))
        t = times[first]
        source = file_of(t) if file_of is not None else None
        where = f" in {source}" if source else ""
        lo, hi = float(summary[f"{name}.min"].min()), float(summary[f"{name}.max"].max())
        names.append(str(name))
        problems.append(
            f"{total} value(s) of {name!r} lie outside its plausible range {spec.range_text()} "
            f"(harmonize.units.{name}), at {int((counts > 0).sum())} of {counts.size} time steps; values "
            f"seen after unit conversion range from {lo:g} to {hi:g}; the first is at {stamp(t)}{where}"
        )
    if problems:
        keys = ", ".join(f"harmonize.units.{n}.min/max" for n in names)
        raise DataError(
            "; ".join(problems) + ". Check those files' values and units attribute (a wrong unit label, a "
            f"fill value not declared as _FillValue, a corrupt file); if the values are real, widen {keys}"
        )


# ---- gaps in the time axis -------------------------------------------------------------------------

GAP_ATTRS = ("time_gaps", "missing_steps", "longest_gap_days", "missing_dates")
"""Gap attributes of the regridded store that the windows store carries on and training tags."""
GAP_FACTOR = 1.5
"""Consecutive times further apart than this many nominal steps enclose a gap."""
MAX_LISTED_GAPS = 100
"""Gaps listed in the ``missing_dates`` attribute; more are counted."""


def nominal_step(times: np.ndarray) -> np.timedelta64 | None:
    """The most common difference between consecutive (sorted) times, the smallest on ties; None for
    fewer than two times."""
    times = np.asarray(times, dtype="datetime64[ns]")
    if times.size < 2:
        return None
    diffs, counts = np.unique(np.diff(times), return_counts=True)
    return diffs[np.argmax(counts)]


def step_text(step: np.timedelta64 | None) -> str:
    """A time step as text: ``1 day``, ``2 days``, ``6:00:00`` (sub-daily), ``unknown``."""
    if step is None:
        return "unknown"
    delta = pd.Timedelta(step)
    if delta % pd.Timedelta(days=1) == pd.Timedelta(0):
        return f"{delta.days} day{'s' if delta.days != 1 else ''}"
    return str(delta)


@dataclass(frozen=True)
class TimeGaps:
    """The gaps of a time axis: each gap as ``(first missing time, last missing time, missing steps)``."""

    step: np.timedelta64 | None
    gaps: tuple[tuple[np.datetime64, np.datetime64, int], ...]

    @property
    def missing_steps(self) -> int:
        return sum(n for _, _, n in self.gaps)

    @property
    def longest_days(self) -> float:
        """Length of the longest gap in days (its missing steps times the nominal step)."""
        if not self.gaps or self.step is None:
            return 0.0
        return max(n for _, _, n in self.gaps) * float(self.step / np.timedelta64(1, "D"))

    def _text(self, t: np.datetime64) -> str:
        ts = pd.Timestamp(t)
        daily = self.step is not None and self.step >= np.timedelta64(1, "D")
        return f"{ts:%Y-%m-%d}" if daily else ts.isoformat()

    def ranges(self) -> list[str]:
        """Each gap as ``YYYY-MM-DD`` (one missing step) or ``YYYY-MM-DD..YYYY-MM-DD`` (ISO times for
        sub-daily steps)."""
        out = []
        for lo, hi, n in self.gaps:
            out.append(self._text(lo) if n == 1 else f"{self._text(lo)}..{self._text(hi)}")
        return out

    def attrs(self) -> dict[str, Any]:
        """Store attributes: ``time_gaps``, ``missing_steps``, ``longest_gap_days``, ``missing_dates``
        (at most :data:`MAX_LISTED_GAPS` ranges, then ``... and N more gaps``), ``time_step``."""
        listed = self.ranges()
        if len(listed) > MAX_LISTED_GAPS:
            listed = [*listed[:MAX_LISTED_GAPS], f"... and {len(listed) - MAX_LISTED_GAPS} more gaps"]
        return {
            "time_gaps": len(self.gaps),
            "missing_steps": self.missing_steps,
            "longest_gap_days": self.longest_days,
            "missing_dates": listed,
            "time_step": step_text(self.step),
        }

    def describe(self) -> str:
        """One line for the log."""
        if not self.gaps:
            return "no gap in the time axis"
        shown = self.ranges()
        more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
        return (
            f"{len(self.gaps)} gap(s) in the time axis, {self.missing_steps} missing step(s) of "
            f"{step_text(self.step)}, the longest {self.longest_days:g} day(s): {', '.join(shown[:10])}{more}"
        )


def time_gaps(times: np.ndarray, start: DateLike | None = None, end: DateLike | None = None) -> TimeGaps:
    """The gaps of sorted datetime ``times`` at their nominal step (:func:`nominal_step`).

    A gap lies between consecutive times more than :data:`GAP_FACTOR` steps apart; with ``start``
    and ``end`` (the period's whole days, :func:`day_bounds`) the steps missing before the first and
    after the last time count too. Each gap's missing times are those one step after the previous.
    """
    t = np.asarray(times, dtype="datetime64[ns]")
    step = nominal_step(t)
    if step is None or step <= np.timedelta64(0, "ns"):
        return TimeGaps(step, ())
    gaps: list[tuple[np.datetime64, np.datetime64, int]] = []
    if start is not None:
        lo, _ = day_bounds(start, start)
        n = int((t[0] - lo) // step)
        if n > 0:
            gaps.append((t[0] - n * step, t[0] - step, n))
    diffs = np.diff(t)
    for i in np.flatnonzero(diffs > GAP_FACTOR * step):
        n = int(round(float(diffs[i] / step))) - 1
        if n > 0:
            gaps.append((t[i] + step, t[i] + n * step, n))
    if end is not None:
        _, hi = day_bounds(end, end)
        n = int(-(-(hi - t[-1]) // step)) - 1  # steps k >= 1 with t[-1] + k * step < hi
        if n > 0:
            gaps.append((t[-1] + step, t[-1] + n * step, n))
    return TimeGaps(step, tuple(gaps))
