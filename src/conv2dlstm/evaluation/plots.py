"""Evaluation figures (PNG), drawn with matplotlib's object API on the Agg canvas.

No pyplot state is used: each function builds a :class:`matplotlib.figure.Figure`, saves it
atomically and returns it. Land (NaN) is drawn in grey. Given the ocean mask, a map tells land from
an ocean cell without a finite value (no score: e.g. missing in the data, or outside a region):
those are hatched (:data:`NO_SCORE_HATCH_COLOR` on white) and named in a legend under the figure
(:data:`NO_SCORE_LABEL`), in every panel, the error's included.

Axes name the quantity and its unit (:func:`quantity_label`: ``RMSE [degC]``, or ``(physical
units)`` where the unit is not known) and the lead in days when one step is one day, else in the
data's time step (:func:`lead_label`: ``lead (days)``, ``lead (6-hour steps)``).

``skill_vs_lead.png`` marks each line's skill horizon (the last lead up to which the skill's 95%
interval stays above 0, :func:`conv2dlstm.evaluation.scores.skill_horizon`) with a dashed vertical
line in the line's colour, named in the legend (:func:`horizon_label`).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from conv2dlstm.evaluation.baselines import BASELINE_NAMES, BASELINES
from conv2dlstm.evaluation.scores import lead_horizon
from conv2dlstm.fsutil import atomic_output

LAND_COLOR = "0.8"
NO_SCORE_FACE_COLOR = "white"
NO_SCORE_HATCH_COLOR = "0.35"
NO_SCORE_HATCH = "////"
NO_SCORE_LABEL = "no score (ocean without a finite value)"
_NOT_MEANINGFUL = "not meaningful: climatology unsupported by training days"
_STEP_UNITS = (
    ("day", pd.Timedelta(days=1)),
    ("hour", pd.Timedelta(hours=1)),
    ("minute", pd.Timedelta(minutes=1)),
    ("second", pd.Timedelta(seconds=1)),
)


def quantity_label(quantity: str, unit: str | None) -> str:
    """An axis or colour bar label: ``RMSE [degC]``, or ``RMSE (physical units)`` without a unit."""
    return f"{quantity} [{unit}]" if unit else f"{quantity} (physical units)"


def lead_step(lead_times: object) -> pd.Timedelta | None:
    """The time step of the leads, from their lead times: an array ``(..., lead)`` of timedeltas of
    leads 1..T (e.g. valid minus initial time of every window). None when lead ``k`` is not ``k``
    times one step throughout (e.g. calendar months) or there is none."""
    times = np.asarray(lead_times, dtype="timedelta64[ns]")
    if times.size == 0 or times.ndim == 0:
        return None
    step = times.reshape(-1, times.shape[-1])[0, 0]
    expected = step * np.arange(1, times.shape[-1] + 1)
    if step <= np.timedelta64(0, "ns") or not (times == expected).all():
        return None
    return pd.Timedelta(step)


def lead_label(step: pd.Timedelta | None) -> str:
    """The lead axis label: ``lead (days)`` when one step is one day (``hours``, ``minutes`` alike),
    ``lead (6-hour steps)`` for another whole number of a unit, ``lead (steps after the initial
    time)`` when the step is not known."""
    if step is None or step <= pd.Timedelta(0):
        return "lead (steps after the initial time)"
    for unit, size in _STEP_UNITS:
        if step % size == pd.Timedelta(0):
            n = step // size
            return f"lead ({unit}s)" if n == 1 else f"lead ({n}-{unit} steps)"
    return f"lead (steps of {step})"


def lead_duration(lead: int, step: pd.Timedelta | None) -> str | None:
    """How long ``lead`` steps of ``step`` are, in the largest unit that divides them (``18 hours``,
    ``3 days``); None when the step is not known (:func:`lead_step`)."""
    if step is None or step <= pd.Timedelta(0):
        return None
    total = step * lead
    for unit, size in _STEP_UNITS:
        if total % size == pd.Timedelta(0):
            n = total // size
            return f"{n} {unit}" + ("" if n == 1 else "s")
    return str(total)


def horizon_label(baseline: str, horizon: int, *, last_lead: int, step: pd.Timedelta | None = None) -> str:
    """The legend entry of a skill horizon (:func:`conv2dlstm.evaluation.scores.skill_horizon`, in lead steps):
    ``skill horizon vs persistence: lead 3 (18 hours)``, ``..., every lead`` when it reaches ``last_lead``
    (the last lead scored: the horizon may lie beyond it), ``...: none (no skill at lead 1)`` for 0."""
    name = f"skill horizon vs {baseline}"
    if horizon < 1:
        return f"{name}: none (no skill at lead 1)"
    duration = lead_duration(horizon, step)
    label = f"{name}: lead {horizon}" + (f" ({duration})" if duration else "")
    return label + (", every lead" if horizon >= last_lead else "")


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _panels(n: int, *, width: float = 4.6, height: float = 3.4, min_width: float = 8.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(max(width * n, min_width), height), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


MAP_HEIGHT = 3.0
"""Height of a map's axes in inches; its width follows the grid's aspect (:func:`map_width`)."""


def map_width(field: xr.DataArray, *, height: float = MAP_HEIGHT) -> float:
    """Width in inches of one map panel of ``field`` (``lat``, ``lon`` coordinates) drawn with equal
    aspect at ``height``: the map itself plus its axis labels and colour bar, so that a figure of such
    panels has no blank margin."""
    lat, lon = np.asarray(field["lat"], dtype="float64"), np.asarray(field["lon"], dtype="float64")
    dlat = np.ptp(lat) + (abs(lat[1] - lat[0]) if lat.size > 1 else 1.0)
    dlon = np.ptp(lon) + (abs(lon[1] - lon[0]) if lon.size > 1 else 1.0)
    return height * float(dlon / dlat) + 1.9


def _title(fig: Figure, title: str) -> None:
    """Figure title wrapped to the figure width."""
    chars = max(int(fig.get_figwidth() * 11), 40)
    fig.suptitle(textwrap.fill(title, chars))


def _baseline_of(row_label: str, model: str | None) -> str | None:
    """The baseline a line belongs to (by its ``model`` column, else its label), or None for a model."""
    for name in (model, row_label):
        if name in BASELINES:
            return name
    return None


def lines_vs_lead(
    scores: pd.DataFrame,
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str,
    units: Mapping[str, str] | None = None,
    lead_step: pd.Timedelta | None = None,
) -> Figure:
    """One panel per variable, one line per label: ``value`` against ``lead``.

    Args:
        scores: columns ``label``, ``variable``, ``lead``, ``value`` and optionally ``model``. Lines
            of a baseline (its ``model``, or a label named like one) are drawn grey in the
            baseline's style (:data:`conv2dlstm.evaluation.baselines.BASELINES`), the others solid.
        path: PNG file to write.
        ylabel: axis label: the quantity (e.g. ``area-weighted RMSE``), or quantity and unit.
        title: figure title.
        units: the unit per variable of a quantity that has one, appended to ``ylabel`` per panel
            (:func:`quantity_label`); None for a quantity without a unit (e.g. ACC).
        lead_step: the time step of one lead (:func:`lead_label`); None when not known.
    """
    variables = list(dict.fromkeys(scores["variable"]))
    fig, axes = _panels(max(len(variables), 1))
    _draw_lines(axes, variables, scores, ylabel, units=units, lead_step=lead_step)
    _title(fig, title)
    _save(fig, path)
    return fig


def _draw_lines(
    axes: Sequence,
    variables: Sequence[str],
    scores: pd.DataFrame,
    ylabel: str,
    *,
    units: Mapping[str, str] | None,
    lead_step: pd.Timedelta | None,
) -> None:
    models = scores.set_index("label")["model"].to_dict() if "model" in scores else {}
    labels = ordered_labels(scores["label"], models)
    for ax, variable in zip(axes, variables, strict=False):
        sub = scores[scores["variable"] == variable]
        for label in labels:
            line = sub[sub["label"] == label].sort_values("lead")
            if line.empty or line["value"].isna().all():
                continue
            baseline = _baseline_of(label, models.get(label))
            if baseline is not None:
                color, style, marker = BASELINES[baseline].style
                ax.plot(line["lead"], line["value"], color=color, linestyle=style, marker=marker, label=label)
            else:
                ax.plot(line["lead"], line["value"], linestyle="-", marker="o", label=label)
        ax.set_title(str(variable))
        ax.set_xlabel(lead_label(lead_step))
        ax.set_ylabel(ylabel if units is None else quantity_label(ylabel, units.get(str(variable))))
        leads = sorted(sub["lead"].unique())
        if leads:
            ax.set_xticks(leads)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _skill_axes(
    ax,
    rows: pd.DataFrame,
    *,
    group: str,
    lead_step: pd.Timedelta | None,
    color_of: dict[str, str] | None = None,
    horizons: bool = False,
) -> None:
    """Skill against lead with its interval shaded, one line per ``group`` value.

    ``rows``: columns ``group``, ``lead``, ``skill``, ``lower``, ``upper``, ``significant``,
    ``meaningful`` (and ``baseline``). Markers are filled where the interval excludes 0 (significant)
    and hollow elsewhere; leads whose skill is not meaningful are left out and named in the legend.
    With ``horizons``, each line's skill horizon is marked (:func:`_mark_horizon`).
    """
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    for i, (label, line) in enumerate(rows.groupby(group, sort=False)):
        line = line.sort_values("lead")
        ok = line[line["meaningful"].astype(bool) & line["skill"].notna()]
        color = (color_of or {}).get(label, f"C{i}")
        if ok.empty:
            ax.plot([], [], color=color, linestyle="none", marker="x", label=f"{label}: {_NOT_MEANINGFUL}")
            continue
        dropped = sorted(set(line["lead"]) - set(ok["lead"]))
        name = f"{label} (lead {', '.join(map(str, dropped))}: {_NOT_MEANINGFUL})" if dropped else str(label)
        ax.plot(ok["lead"], ok["skill"], color=color, linestyle="-", label=name)
        if ok["lower"].notna().any():
            ax.fill_between(ok["lead"], ok["lower"], ok["upper"], color=color, alpha=0.2, linewidth=0)
        sig = ok["significant"].astype(bool)
        ax.plot(ok["lead"][sig], ok["skill"][sig], color=color, linestyle="none", marker="o")
        ax.plot(ok["lead"][~sig], ok["skill"][~sig], color=color, linestyle="none", marker="o", markerfacecolor="white")
        if horizons:
            _mark_horizon(
                ax,
                line,
                baseline=str(line["baseline"].iloc[0]) if "baseline" in line else str(label),
                color=color,
                lead_step=lead_step,
            )
    if not rows.empty and not (rows["meaningful"].astype(bool) & rows["skill"].notna()).any():
        ax.text(0.5, 0.5, _NOT_MEANINGFUL, transform=ax.transAxes, ha="center", va="center", color="0.4")
    leads = sorted(rows["lead"].unique())
    if leads:
        ax.set_xticks(leads)
    ax.set_xlabel(lead_label(lead_step))
    ax.grid(alpha=0.3)
    if horizons:  # a line and its horizon per baseline: beside the axes, not over the curves
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize="small")


def _mark_horizon(ax, line: pd.DataFrame, *, baseline: str, color: str, lead_step: pd.Timedelta | None) -> None:
    """A dashed vertical line at the skill horizon of one line's rows
    (:func:`conv2dlstm.evaluation.scores.lead_horizon`), labelled :func:`horizon_label`; a horizon of 0
    is a legend entry only. Nothing without an interval."""
    if line["lower"].isna().all():
        return
    horizon = lead_horizon(line)
    label = horizon_label(baseline, horizon, last_lead=int(line["lead"].max()), step=lead_step)
    if horizon < 1:
        ax.plot([], [], color=color, linestyle="--", linewidth=1.0, label=label)
    else:
        ax.axvline(horizon, color=color, linestyle="--", linewidth=1.0, label=label)


def skill_vs_lead(
    skills: pd.DataFrame, path: str | os.PathLike, *, title: str, lead_step: pd.Timedelta | None = None
) -> Figure:
    """One panel per variable: skill ``1 - RMSE/RMSE(baseline)`` against lead, one line per ``label``,
    each line's skill horizon a dashed vertical line (``skill horizon vs <baseline>: lead k``, :func:`horizon_label`).

    Args:
        skills: columns ``label`` (e.g. ``vs persistence``), ``baseline``, ``variable``, ``lead``,
            ``skill``, ``lower``, ``upper`` (the 95% interval, shaded), ``significant`` (filled
            marker: the interval excludes 0) and ``meaningful`` (False: left out, named in the legend).
        path: PNG file to write.
        title: figure title.
        lead_step: the time step of one lead (:func:`lead_label`); None when not known.
    """
    variables = list(dict.fromkeys(skills["variable"])) or [""]
    fig, axes = _panels(len(variables), width=8.0, height=3.6)  # room for the legend beside each panel
    colors = {f"vs {b}": f"C{i}" for i, b in enumerate(BASELINE_NAMES)}  # the same colour per baseline in every panel
    for ax, variable in zip(axes, variables, strict=True):
        sub = skills[skills["variable"] == variable]
        _skill_axes(ax, sub, group="label", lead_step=lead_step, color_of=colors, horizons=True)
        ax.set_title(str(variable))
        ax.set_ylabel("RMSE skill vs baseline")
    _title(fig, title)
    _save(fig, path)
    return fig


def compare_figure(
    rmse: pd.DataFrame,
    skills: pd.DataFrame,
    path: str | os.PathLike,
    *,
    title: str,
    units: Mapping[str, str] | None = None,
    lead_step: pd.Timedelta | None = None,
) -> Figure:
    """RMSE against lead (first row) and, per baseline, each run's skill with its interval (one row each).

    Args:
        rmse: as for :func:`lines_vs_lead` (columns ``label``, ``variable``, ``lead``, ``value``, ``model``).
        skills: columns ``label`` (the run), ``baseline``, ``variable``, ``lead`` and the interval
            columns of :func:`skill_vs_lead`.
        path: PNG file to write.
        title: figure title.
        units: the RMSE's unit per variable (``area-weighted RMSE [degC]``); a variable without one
            says ``(physical units)``.
        lead_step: the time step of one lead (:func:`lead_label`); None when not known.
    """
    variables = list(dict.fromkeys(rmse["variable"])) or [""]
    present = [b for b in BASELINE_NAMES if b in set(skills["baseline"])]
    fig = Figure(figsize=(max(4.6 * len(variables), 8.0), 3.4 * (1 + len(present))), layout="constrained")
    grid = fig.subplots(1 + len(present), len(variables), squeeze=False)
    _draw_lines(grid[0], variables, rmse, "area-weighted RMSE", units=units or {}, lead_step=lead_step)
    for row, baseline in zip(grid[1:], present, strict=True):
        for ax, variable in zip(row, variables, strict=True):
            sub = skills[(skills["baseline"] == baseline) & (skills["variable"] == variable)]
            _skill_axes(ax, sub, group="label", lead_step=lead_step)
            ax.set_title(f"{variable}: skill vs {baseline} (filled: 95% interval excludes 0)")
            ax.set_ylabel("RMSE skill")
    _title(fig, title)
    _save(fig, path)
    return fig


def _pcolor(
    fig: Figure,
    ax,
    field: xr.DataArray,
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    label: str,
    ocean: xr.DataArray | None = None,
) -> bool:
    """Draw ``field`` (``lat``, ``lon``) on ``ax`` with its colour bar: NaN in grey (land), and with the
    ``ocean`` mask, NaN ocean cells hatched (no score). Returns whether a cell was hatched."""
    raw = np.asarray(field, dtype="float64")
    values = np.ma.masked_invalid(raw)
    lon, lat = np.asarray(field["lon"]), np.asarray(field["lat"])
    ax.set_facecolor(LAND_COLOR)
    mesh = ax.pcolormesh(lon, lat, values, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
    no_score = np.zeros(raw.shape, dtype=bool)
    if ocean is not None:
        no_score = np.asarray(ocean, dtype=bool) & ~np.isfinite(raw)
    if no_score.any():
        ax.pcolor(
            lon,
            lat,
            np.ma.masked_where(~no_score, np.zeros(raw.shape)),
            cmap=ListedColormap([NO_SCORE_FACE_COLOR]),
            shading="nearest",
            hatch=NO_SCORE_HATCH,
            edgecolor=NO_SCORE_HATCH_COLOR,
            linewidth=0,
        )
    ax.set_xlabel("longitude (degrees east)")
    ax.set_ylabel("latitude (degrees north)")
    ax.set_aspect("equal", adjustable="box")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    fig.colorbar(mesh, ax=ax, label=label, shrink=0.85)
    return bool(no_score.any())


def _no_score_legend(fig: Figure) -> None:
    """The legend under the figure naming the grey (land) and hatched (no score) cells."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=LAND_COLOR, label="land"),
        Patch(
            facecolor=NO_SCORE_FACE_COLOR, edgecolor=NO_SCORE_HATCH_COLOR, hatch=NO_SCORE_HATCH, label=NO_SCORE_LABEL
        ),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small", frameon=False)


def _limits(*fields: xr.DataArray, symmetric: bool = False) -> tuple[float, float]:
    values = np.concatenate([np.asarray(f, dtype="float64").ravel() for f in fields])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (-1.0, 1.0) if symmetric else (0.0, 1.0)
    if symmetric:
        top = float(np.max(np.abs(values))) or 1.0
        return -top, top
    lo, hi = float(values.min()), float(values.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def forecast_maps(
    truth: xr.DataArray,
    prediction: xr.DataArray,
    path: str | os.PathLike,
    *,
    title: str,
    units: dict[str, str] | None = None,
    ocean: xr.DataArray | None = None,
) -> Figure:
    """Truth, prediction and error (prediction - truth) maps, one row per variable.

    Args:
        truth, prediction: ``(variable, lat, lon)`` in physical units, NaN on land.
        path: PNG file to write.
        title: figure title (say which initial time and lead is shown).
        units: units per variable for the colour bars.
        ocean: ``(lat, lon)`` ocean mask: a NaN ocean cell is hatched (no score), named in a legend;
            without it every NaN is drawn grey as land.
    """
    units = units or {}
    variables = [str(v) for v in truth["variable"].values]
    fig = Figure(figsize=(3 * map_width(truth), (MAP_HEIGHT + 0.9) * len(variables)), layout="constrained")
    axes = fig.subplots(len(variables), 3, squeeze=False)
    hatched = False
    for row, variable in zip(axes, variables, strict=True):
        t = truth.sel(variable=variable)
        p = prediction.sel(variable=variable)
        unit = units.get(variable)
        vmin, vmax = _limits(t, p)
        label = quantity_label(variable, unit)
        hatched |= _pcolor(fig, row[0], t, cmap="viridis", vmin=vmin, vmax=vmax, label=label, ocean=ocean)
        row[0].set_title(f"{variable}: truth")
        hatched |= _pcolor(fig, row[1], p, cmap="viridis", vmin=vmin, vmax=vmax, label=label, ocean=ocean)
        row[1].set_title(f"{variable}: prediction")
        emin, emax = _limits(p - t, symmetric=True)
        error_label = quantity_label("error", unit)
        hatched |= _pcolor(fig, row[2], p - t, cmap="RdBu_r", vmin=emin, vmax=emax, label=error_label, ocean=ocean)
        row[2].set_title(f"{variable}: prediction - truth")
    if hatched:
        _no_score_legend(fig)
    _title(fig, title)
    _save(fig, path)
    return fig


def field_maps(
    fields: xr.DataArray,
    path: str | os.PathLike,
    *,
    title: str,
    quantity: str,
    units: dict[str, str] | None = None,
    cmap: str = "magma_r",
    ocean: xr.DataArray | None = None,
) -> Figure:
    """One map per variable of a ``(variable, lat, lon)`` field (e.g. RMSE per grid cell), its colour
    bar labelled with ``quantity`` and the variable's unit (``RMSE [degC]``). With the ``(lat, lon)``
    ``ocean`` mask, a NaN ocean cell (no score) is hatched and named in a legend; without it every NaN
    is drawn grey as land."""
    units = units or {}
    variables = [str(v) for v in fields["variable"].values]
    fig, axes = _panels(len(variables), width=map_width(fields), height=MAP_HEIGHT + 1.0, min_width=0.0)
    hatched = False
    for ax, variable in zip(axes, variables, strict=True):
        field = fields.sel(variable=variable)
        lo, hi = _limits(field)
        label = quantity_label(quantity, units.get(variable))
        hatched |= _pcolor(fig, ax, field, cmap=cmap, vmin=min(lo, 0.0), vmax=hi, label=label, ocean=ocean)
        ax.set_title(str(variable))
    if hatched:
        _no_score_legend(fig)
    _title(fig, title)
    _save(fig, path)
    return fig


def ordered_labels(labels: Sequence[str], models: dict[str, str] | None = None) -> list[str]:
    """Labels with the baselines last, in the order of :data:`conv2dlstm.evaluation.baselines.BASELINE_NAMES`.

    ``models`` maps a label to its model name when labels are not the names themselves.
    """
    labels = list(dict.fromkeys(labels))
    rank = {name: i for i, name in enumerate(BASELINE_NAMES)}

    def baseline(label: str) -> str | None:
        return _baseline_of(label, (models or {}).get(label))

    def baseline_rank(label: str) -> int:
        name = baseline(label)
        if name is None:
            raise ValueError(f"label {label!r} is not a baseline")
        return rank[name]

    models_first = [lab for lab in labels if baseline(lab) is None]
    return models_first + sorted((lab for lab in labels if baseline(lab) is not None), key=baseline_rank)


def skill_by_stratum(
    skills: pd.DataFrame,
    path: str | os.PathLike,
    *,
    by: str,
    title: str,
    lead_step: pd.Timedelta | None = None,
    headline: str = "all",
) -> Figure:
    """Skill ``1 - RMSE/RMSE(baseline)`` per stratum at each lead, with its 95% interval as a bar: one
    row of panels per baseline, one panel per variable, one marker per value of column ``by`` (a
    region or a season) side by side at each lead, the ``headline`` stratum (the whole grid or period)
    first, in black.

    Args:
        skills: the run's rows of :func:`conv2dlstm.evaluation.scores.skill_intervals` of one stratum
            column: columns ``by``, ``baseline``, ``variable``, ``lead``, ``skill``, ``lower``, ``upper``,
            ``significant`` (filled marker: the interval excludes 0) and ``meaningful`` (False: left
            out, named in the legend).
        path: PNG file to write.
        by: the stratum column, ``region`` or ``season``.
        title: figure title.
        lead_step: the time step of one lead (:func:`lead_label`); None when not known.
        headline: the value of ``by`` of the headline scores.
    """
    variables = list(dict.fromkeys(skills["variable"])) or [""]
    present = [b for b in BASELINE_NAMES if b in set(skills["baseline"])] or [""]
    groups = list(dict.fromkeys([headline, *skills[by].astype(str)]))
    groups = [g for g in groups if g in set(skills[by].astype(str))] or [headline]
    colors = {g: ("black" if g == headline else f"C{i}") for i, g in enumerate(groups)}
    width = 0.8 / max(len(groups), 1)
    fig = Figure(figsize=(max(7.5 * len(variables), 10.0), 3.4 * len(present)), layout="constrained")
    grid = fig.subplots(len(present), len(variables), squeeze=False)  # room for the legend beside each panel
    for row, baseline in zip(grid, present, strict=True):
        for ax, variable in zip(row, variables, strict=True):
            sub = skills[(skills["baseline"] == baseline) & (skills["variable"] == variable)]
            ax.axhline(0.0, color="0.3", linewidth=0.8)
            for i, group in enumerate(groups):
                rows = sub[sub[by].astype(str) == group].sort_values("lead")
                ok = rows[rows["meaningful"].astype(bool) & rows["skill"].notna()]
                x = ok["lead"].to_numpy(dtype="float64") + (i - (len(groups) - 1) / 2) * width
                color = colors[group]
                dropped = sorted(set(rows["lead"]) - set(ok["lead"]))
                label = f"{group} (lead {', '.join(map(str, dropped))}: {_NOT_MEANINGFUL})" if dropped else group
                if ok.empty:
                    ax.plot([], [], color=color, linestyle="none", marker="x", label=f"{group}: {_NOT_MEANINGFUL}")
                    continue
                skill = ok["skill"].to_numpy(dtype="float64")
                below = np.where(ok["lower"].notna(), skill - ok["lower"].to_numpy(dtype="float64"), 0.0)
                above = np.where(ok["upper"].notna(), ok["upper"].to_numpy(dtype="float64") - skill, 0.0)
                ax.errorbar(x, skill, yerr=[below, above], color=color, linestyle="none", capsize=2, label=label)
                sig = ok["significant"].to_numpy(dtype=bool)
                ax.plot(x[sig], skill[sig], color=color, linestyle="none", marker="o")
                ax.plot(x[~sig], skill[~sig], color=color, linestyle="none", marker="o", markerfacecolor="white")
            if not sub.empty and not (sub["meaningful"].astype(bool) & sub["skill"].notna()).any():
                ax.text(0.5, 0.5, _NOT_MEANINGFUL, transform=ax.transAxes, ha="center", va="center", color="0.4")
            leads = sorted(sub["lead"].unique())
            if leads:
                ax.set_xticks(leads)
            ax.set_xlabel(lead_label(lead_step))
            ax.set_ylabel(f"RMSE skill vs {baseline}")
            ax.set_title(f"{variable}: skill vs {baseline}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    _title(fig, title)
    _save(fig, path)
    return fig
