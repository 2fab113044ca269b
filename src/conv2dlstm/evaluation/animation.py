"""The test period as an animated GIF: truth, forecast and error at one lead, one frame per initial time.

``animation.gif`` of the evaluate step (config ``evaluate.animation_lead``, 0 = none;
``evaluate.animation_frames`` caps the frames, taken with an even stride over the test initial
times, :func:`frame_indices`). Each frame has one row per target variable of three maps, truth,
forecast and forecast - truth, a colour bar under each with its limits, the dates in the title, and a
legend of the cells without a value: land grey (:data:`conv2dlstm.evaluation.plots.LAND_COLOR`),
ocean cells without a finite value (no score) hatched, as in the PNG maps (:data:`LEGEND`).

The colour limits are fixed over all frames, so that a colour means one value in every frame: per
variable, the 2nd and 98th percentiles of the truth's ocean values over the frames drawn, and for the
error a symmetric range of +- the 98th percentile of its absolute value (:func:`colour_limits`).

Every frame is drawn with one fixed 256-colour palette (:func:`palette`: the colour maps sampled at
:data:`LEVELS` levels, the fixed colours of land, hatching and text), value by value, without
dithering or per-frame quantization: a cell of one value has the same colour in every frame. Text is
Pillow's bitmap font. Frames are small: a map is at most about :data:`PANEL_PX` pixels on its longer
side (larger grids are drawn every ``k``-th cell).

Streaming: the frames are read twice through ``frames`` (a function returning an iterator of one
``(truth, forecast)`` pair of ``(variable, lat, lon)`` arrays per frame): once for the colour limits
(a sample of about :data:`MAX_SAMPLES` values per variable is kept), once to draw. Memory holds the
maps of the frames being read (the evaluate step reads a batch at a time) and the drawn frames
(palette images), never the test period's maps.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from conv2dlstm.evaluation.plots import LAND_COLOR, NO_SCORE_HATCH_COLOR
from conv2dlstm.fsutil import atomic_output

if TYPE_CHECKING:
    from PIL.Image import Image

FILENAME = "animation.gif"
"""The animation's name in the evaluate step's output folder."""
PANEL_PX = 200
"""A map's longer side in pixels, about (a cell is a whole number of pixels, at most :data:`MAX_CELL_PX`)."""
MAX_CELL_PX = 12
MIN_SLOT_PX = 132
"""The narrowest panel (room for its label and colour bar)."""
MAX_SAMPLES = 200_000
"""Values per variable kept for the colour limits' percentiles."""
PERCENTILES = (2.0, 98.0)
FRAME_MS = 250
"""How long each frame is shown."""
LEVELS = 120
"""Colours of each colour map in the palette."""

WHITE, BLACK, LAND, HATCH = 0, 1, 2, 3
FIELD_BASE, ERROR_BASE = 8, 8 + LEVELS
FIELD_CMAP, ERROR_CMAP = "viridis", "RdBu_r"
PANELS = ("truth", "forecast", "error")
LEGEND = ("land", "no score (ocean, no value)", "error = forecast - truth")

_GAP, _LINE, _BAR = 6, 13, 8


def _rgb(color: str) -> tuple[int, int, int]:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return round(r * 255), round(g * 255), round(b * 255)


def palette() -> list[int]:
    """The 256-colour palette of every frame, flat ``[r, g, b, ...]``: white, black, land grey, the
    hatching colour, the field colour map at ``FIELD_BASE..`` and the error colour map at
    ``ERROR_BASE..`` (:data:`LEVELS` levels each)."""
    from matplotlib import colormaps

    colours = [(255, 255, 255), (0, 0, 0), _rgb(LAND_COLOR), _rgb(NO_SCORE_HATCH_COLOR)]
    colours += [(0, 0, 0)] * (FIELD_BASE - len(colours))
    for name in (FIELD_CMAP, ERROR_CMAP):
        for r, g, b, _ in colormaps[name](np.linspace(0.0, 1.0, LEVELS)):
            colours.append((round(r * 255), round(g * 255), round(b * 255)))
    colours += [(0, 0, 0)] * (256 - len(colours))
    return [c for rgb in colours for c in rgb]


def frame_indices(n: int, cap: int) -> np.ndarray:
    """Indices of the initial times drawn: all ``n``, or ``cap`` of them with an even stride, the first
    and the last included (``cap`` 0: all)."""
    if n <= 0:
        return np.zeros(0, dtype="int64")
    if cap <= 0 or cap >= n:
        return np.arange(n, dtype="int64")
    if cap == 1:
        return np.zeros(1, dtype="int64")
    return np.unique(np.round(np.linspace(0, n - 1, cap)).astype("int64"))


@dataclass(frozen=True)
class Limits:
    """Colour limits per variable: ``field[v] = (low, high)`` of truth and forecast, ``error[v]`` the
    error's symmetric bound."""

    field: dict[str, tuple[float, float]]
    error: dict[str, float]


def colour_limits(
    frames: Iterable[tuple[np.ndarray, np.ndarray]], variables: Sequence[str], ocean: np.ndarray, *, n_frames: int
) -> Limits:
    """The colour limits of the ``n_frames`` frames (module docstring), from the truth's ocean values: per
    variable its robust range (:data:`PERCENTILES`), and ``+-`` the 98th percentile of the absolute
    error; about :data:`MAX_SAMPLES` values per variable are kept, as many from every frame (a stride
    over its ocean cells when it has more)."""
    ocean = np.asarray(ocean, dtype=bool)
    per_frame = max(MAX_SAMPLES // max(n_frames, 1), 1)  # values kept per frame and variable
    truth_kept: list[list[np.ndarray]] = [[] for _ in variables]
    error_kept: list[list[np.ndarray]] = [[] for _ in variables]
    for truth, forecast in frames:
        for c in range(len(variables)):
            t = np.asarray(truth[c], dtype="float64")[ocean]
            e = np.abs(np.asarray(forecast[c], dtype="float64")[ocean] - t)
            step = max(1, math.ceil(t.size / per_frame))
            truth_kept[c].append(t[::step][np.isfinite(t[::step])])
            error_kept[c].append(e[::step][np.isfinite(e[::step])])
    field, error = {}, {}
    for c, variable in enumerate(variables):
        t = np.concatenate(truth_kept[c]) if truth_kept[c] else np.zeros(0)
        e = np.concatenate(error_kept[c]) if error_kept[c] else np.zeros(0)
        if t.size:
            lo, hi = (float(v) for v in np.percentile(t, PERCENTILES))
        else:
            lo, hi = 0.0, 1.0
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        top = float(np.percentile(e, PERCENTILES[1])) if e.size else 0.0
        field[variable] = (lo, hi)
        error[variable] = top if top > 0 else 1.0
    return Limits(field, error)


@dataclass(frozen=True)
class Layout:
    """Where everything of a frame is, in pixels: ``n_vars`` rows of three panels."""

    n_vars: int
    n_lat: int
    n_lon: int
    stride: int  # every stride-th cell is drawn
    cell: int  # pixels per cell drawn
    title_lines: int

    @property
    def map_h(self) -> int:
        return math.ceil(self.n_lat / self.stride) * self.cell

    @property
    def map_w(self) -> int:
        return math.ceil(self.n_lon / self.stride) * self.cell

    @property
    def slot_w(self) -> int:
        return max(self.map_w, MIN_SLOT_PX) + 2 * _GAP

    @property
    def row_h(self) -> int:
        return _LINE + self.map_h + _GAP + _BAR + _LINE + _GAP

    @property
    def top(self) -> int:
        return _GAP + self.title_lines * _LINE + _GAP

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of every frame."""
        return 3 * self.slot_w, self.top + self.n_vars * self.row_h + _LINE + _GAP

    def map_origin(self, row: int, panel: int) -> tuple[int, int]:
        """``(x, y)`` of the top-left pixel of the map of variable ``row``, panel ``panel`` (0 truth,
        1 forecast, 2 error)."""
        x = panel * self.slot_w + (self.slot_w - self.map_w) // 2
        return x, self.top + row * self.row_h + _LINE

    def cell_pixel(self, row: int, panel: int, i_lat: int, i_lon: int, *, ascending: bool = True) -> tuple[int, int]:
        """``(x, y)`` of the centre of grid cell ``(i_lat, i_lon)`` in a map (north up: with
        ``ascending`` latitudes the first row of the grid is the bottom one); the cell must be drawn
        (its indices multiples of :attr:`stride`)."""
        x0, y0 = self.map_origin(row, panel)
        i = i_lat // self.stride
        rows = math.ceil(self.n_lat / self.stride)
        if ascending:
            i = rows - 1 - i
        return x0 + (i_lon // self.stride) * self.cell + self.cell // 2, y0 + i * self.cell + self.cell // 2


def layout(n_vars: int, n_lat: int, n_lon: int, *, title_lines: int = 2) -> Layout:
    """The frame layout of ``n_vars`` variables on an ``n_lat x n_lon`` grid (module docstring)."""
    longer = max(n_lat, n_lon, 1)
    stride = max(1, math.ceil(longer / PANEL_PX))
    cell = max(1, min(MAX_CELL_PX, PANEL_PX // math.ceil(longer / stride)))
    return Layout(n_vars, n_lat, n_lon, stride, cell, title_lines)


def _indices(values: np.ndarray, low: float, high: float, base: int) -> np.ndarray:
    """Palette indices of ``values`` on a colour map at ``base`` spanning ``low..high`` (clipped)."""
    scaled = np.rint((values - low) / (high - low) * (LEVELS - 1))
    return (base + np.clip(np.nan_to_num(scaled, nan=0.0), 0, LEVELS - 1)).astype("uint8")


def _hatch(shape: tuple[int, int], x0: int = 0, y0: int = 0) -> np.ndarray:
    """Diagonal stripes, :data:`HATCH` on :data:`WHITE`, in frame coordinates (they line up across cells)."""
    y, x = np.mgrid[y0 : y0 + shape[0], x0 : x0 + shape[1]]
    return np.where(((x + y) // 2) % 3 == 0, HATCH, WHITE).astype("uint8")


def _map_pixels(
    values: np.ndarray, ocean: np.ndarray, lay: Layout, *, low: float, high: float, base: int, ascending: bool
) -> np.ndarray:
    """The ``(map_h, map_w)`` palette indices of one map: the colour map on finite values, land grey, an
    ocean cell without a finite value marked :data:`HATCH` (hatched when drawn)."""
    values = np.asarray(values, dtype="float64")[:: lay.stride, :: lay.stride]
    ocean = np.asarray(ocean, dtype=bool)[:: lay.stride, :: lay.stride]
    cells = _indices(values, low, high, base)
    cells[~np.isfinite(values)] = HATCH
    cells[~ocean] = LAND
    if ascending:
        cells = cells[::-1]
    return np.repeat(np.repeat(cells, lay.cell, axis=0), lay.cell, axis=1)


def _title_lines(title: str, lay: Layout) -> list[str]:
    """The title wrapped to the frame's width (the bitmap font is 6 pixels a character)."""
    return textwrap.wrap(title, max(lay.size[0] // 6 - 2, 20))


def _number(value: float) -> str:
    return f"{value:.3g}"


def render_frame(
    truth: np.ndarray,
    forecast: np.ndarray,
    *,
    ocean: np.ndarray,
    variables: Sequence[str],
    units: Mapping[str, str],
    limits: Limits,
    title: str,
    lay: Layout,
    ascending: bool = True,
) -> Image:
    """One frame, a palette image (:func:`palette`) of size :attr:`Layout.size`: per variable (a row)
    the truth, the forecast and the error maps of ``(variable, lat, lon)`` ``truth`` and ``forecast``,
    each with its colour bar and limits, the title on top and the legend of land and no score below."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()
    width, height = lay.size
    pixels = np.full((height, width), WHITE, dtype="uint8")
    bar = np.linspace(0.0, 1.0, max(lay.slot_w - 2 * _GAP, 2))
    labels: list[tuple[int, int, str, bool]] = []  # x, y, text, right-aligned at x
    for row, variable in enumerate(variables):
        t, f = np.asarray(truth[row], dtype="float64"), np.asarray(forecast[row], dtype="float64")
        lo, hi = limits.field[variable]
        bound = limits.error[variable]
        unit = units.get(variable)
        suffix = f" [{unit}]" if unit else ""
        for panel, (values, low, high, base) in enumerate(
            ((t, lo, hi, FIELD_BASE), (f, lo, hi, FIELD_BASE), (f - t, -bound, bound, ERROR_BASE))
        ):
            x0, y0 = lay.map_origin(row, panel)
            block = _map_pixels(values, ocean, lay, low=low, high=high, base=base, ascending=ascending)
            hatched = block == HATCH
            if hatched.any():
                block = np.where(hatched, _hatch(block.shape, x0, y0), block)
            pixels[y0 : y0 + lay.map_h, x0 : x0 + lay.map_w] = block
            bx, by = panel * lay.slot_w + _GAP, y0 + lay.map_h + _GAP
            pixels[by : by + _BAR, bx : bx + bar.size] = _indices(bar, 0.0, 1.0, base)[None, :]
            labels.append((panel * lay.slot_w + _GAP, y0 - _LINE, f"{variable} {PANELS[panel]}{suffix}", False))
            labels.append((bx, by + _BAR + 1, _number(low), False))
            labels.append((bx + bar.size, by + _BAR + 1, _number(high), True))
    legend_y = lay.top + lay.n_vars * lay.row_h
    pixels[legend_y + 2 : legend_y + 11, _GAP : _GAP + 12] = LAND
    pixels[legend_y + 2 : legend_y + 11, _GAP + 50 : _GAP + 62] = _hatch((9, 12), _GAP + 50, legend_y + 2)
    image = Image.fromarray(pixels, mode="P")
    image.putpalette(palette())
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(_title_lines(title, lay)[: lay.title_lines]):
        draw.text((_GAP, _GAP + i * _LINE), line, fill=BLACK, font=font)
    for x, y, text, right in labels:
        draw.text((x - int(draw.textlength(text, font=font)) if right else x, y), text, fill=BLACK, font=font)
    draw.text((_GAP + 16, legend_y + 1), LEGEND[0], fill=BLACK, font=font)
    draw.text((_GAP + 66, legend_y + 1), LEGEND[1], fill=BLACK, font=font)
    draw.text(
        (_GAP + 66 + int(draw.textlength(LEGEND[1], font=font)) + 12, legend_y + 1), LEGEND[2], fill=BLACK, font=font
    )
    return image


def write_animation(
    path: str | os.PathLike,
    frames: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    *,
    titles: Sequence[str],
    variables: Sequence[str],
    units: Mapping[str, str],
    ocean: np.ndarray,
    lat: np.ndarray,
) -> Limits:
    """Write the animated GIF ``path`` (atomically) of the frames that ``frames()`` yields, one
    ``(truth, forecast)`` pair of ``(variable, lat, lon)`` arrays per frame, titled ``titles``: the colour
    limits from a first pass (:func:`colour_limits`), the frames drawn in a second (:func:`render_frame`).
    Returns the limits."""
    ocean = np.asarray(ocean, dtype=bool)
    lat = np.asarray(lat, dtype="float64")
    ascending = bool(lat.size < 2 or lat[-1] > lat[0])
    limits = colour_limits(frames(), variables, ocean, n_frames=len(titles))
    lay = layout(len(variables), *ocean.shape, title_lines=1)
    lines = max((len(_title_lines(t, lay)) for t in titles), default=1)
    lay = layout(len(variables), *ocean.shape, title_lines=min(lines, 3))
    images = [
        render_frame(
            truth,
            forecast,
            ocean=ocean,
            variables=variables,
            units=units,
            limits=limits,
            title=title,
            lay=lay,
            ascending=ascending,
        )
        for (truth, forecast), title in zip(frames(), titles, strict=True)
    ]
    if not images:
        raise ValueError("write_animation: no frame to draw")
    with atomic_output(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=FRAME_MS, loop=0, optimize=False
        )
    return limits
