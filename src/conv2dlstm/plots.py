"""Evaluation figures (PNG), drawn with matplotlib's object API on the Agg canvas.

No pyplot state is used: each function builds a :class:`matplotlib.figure.Figure`, saves it
atomically and drops it. Land (NaN) is drawn in grey.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from conv2dlstm.fsutil import atomic_output

LAND_COLOR = "0.8"
BASELINES: tuple[str, ...] = ("persistence", "climatology")
_BASELINE_STYLE = {"persistence": ("0.35", "--", "s"), "climatology": ("0.6", ":", "^")}


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _panels(n: int, *, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list]:
    fig = Figure(figsize=(max(width * n, 8.0), height), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


def _title(fig: Figure, title: str) -> None:
    """Figure title wrapped to the figure width."""
    chars = max(int(fig.get_figwidth() * 11), 40)
    fig.suptitle(textwrap.fill(title, chars))


def lines_vs_lead(
    scores: pd.DataFrame,
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str,
) -> None:
    """One panel per variable, one line per label: ``value`` against ``lead``.

    Args:
        scores: columns ``label``, ``variable``, ``lead``, ``value``. Labels named like a baseline
            (``persistence``, ``climatology``) are drawn grey and dashed, the others solid.
        path: PNG file to write.
        ylabel: axis label (metric and units).
        title: figure title.
    """
    variables = list(dict.fromkeys(scores["variable"]))
    fig, axes = _panels(max(len(variables), 1))
    models = ordered_labels(scores["label"])
    for ax, variable in zip(axes, variables, strict=False):
        sub = scores[scores["variable"] == variable]
        for label in models:
            line = sub[sub["label"] == label].sort_values("lead")
            if line.empty or line["value"].isna().all():
                continue
            if label in _BASELINE_STYLE:
                color, style, marker = _BASELINE_STYLE[label]
                ax.plot(line["lead"], line["value"], color=color, linestyle=style, marker=marker, label=label)
            else:
                ax.plot(line["lead"], line["value"], linestyle="-", marker="o", label=label)
        ax.set_title(str(variable))
        ax.set_xlabel("lead (steps after the initial time)")
        ax.set_ylabel(ylabel)
        leads = sorted(sub["lead"].unique())
        if leads:
            ax.set_xticks(leads)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _title(fig, title)
    _save(fig, path)


def _pcolor(fig: Figure, ax, field: xr.DataArray, *, cmap: str, vmin: float, vmax: float, label: str) -> None:
    values = np.ma.masked_invalid(np.asarray(field, dtype="float64"))
    ax.set_facecolor(LAND_COLOR)
    mesh = ax.pcolormesh(
        np.asarray(field["lon"]), np.asarray(field["lat"]), values, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest"
    )
    ax.set_xlabel("longitude (degrees east)")
    ax.set_ylabel("latitude (degrees north)")
    ax.set_aspect("equal", adjustable="box")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    fig.colorbar(mesh, ax=ax, label=label, shrink=0.85)


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
) -> None:
    """Truth, prediction and error (prediction - truth) maps, one row per variable.

    Args:
        truth, prediction: ``(variable, lat, lon)`` in physical units, NaN on land.
        path: PNG file to write.
        title: figure title (say which initial time and lead is shown).
        units: units per variable for the colour bars.
    """
    units = units or {}
    variables = [str(v) for v in truth["variable"].values]
    fig = Figure(figsize=(14, 3.8 * len(variables)), layout="constrained")
    axes = fig.subplots(len(variables), 3, squeeze=False)
    for row, variable in zip(axes, variables, strict=True):
        t = truth.sel(variable=variable)
        p = prediction.sel(variable=variable)
        unit = units.get(variable, "")
        vmin, vmax = _limits(t, p)
        _pcolor(fig, row[0], t, cmap="viridis", vmin=vmin, vmax=vmax, label=f"{variable} [{unit}]")
        row[0].set_title(f"{variable}: truth")
        _pcolor(fig, row[1], p, cmap="viridis", vmin=vmin, vmax=vmax, label=f"{variable} [{unit}]")
        row[1].set_title(f"{variable}: prediction")
        emin, emax = _limits(p - t, symmetric=True)
        _pcolor(fig, row[2], p - t, cmap="RdBu_r", vmin=emin, vmax=emax, label=f"error [{unit}]")
        row[2].set_title(f"{variable}: prediction - truth")
    _title(fig, title)
    _save(fig, path)


def field_maps(
    fields: xr.DataArray,
    path: str | os.PathLike,
    *,
    title: str,
    units: dict[str, str] | None = None,
    cmap: str = "magma_r",
) -> None:
    """One map per variable of a ``(variable, lat, lon)`` field (e.g. RMSE per grid cell)."""
    units = units or {}
    variables = [str(v) for v in fields["variable"].values]
    fig, axes = _panels(len(variables), width=5.2, height=4.2)
    for ax, variable in zip(axes, variables, strict=True):
        field = fields.sel(variable=variable)
        lo, hi = _limits(field)
        _pcolor(fig, ax, field, cmap=cmap, vmin=min(lo, 0.0), vmax=hi, label=f"[{units.get(variable, '')}]")
        ax.set_title(str(variable))
    _title(fig, title)
    _save(fig, path)


def ordered_labels(labels: Sequence[str]) -> list[str]:
    """Labels with the baselines last, in a fixed order."""
    labels = list(dict.fromkeys(labels))
    return [lab for lab in labels if lab not in BASELINES] + [lab for lab in BASELINES if lab in labels]
