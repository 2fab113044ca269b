"""Network sizes from the configuration alone, by arithmetic: no torch, nothing allocated.

:mod:`conv2dlstm.training.models` builds the networks and guards them with these functions;
:mod:`conv2dlstm.config.validate` calls them while validating, so a ``conv2d_lstm`` that is too large for the
configured grid (or a grid too small for its Conv2D + MaxPool blocks) stops the workflow when
Snakemake parses it, before any job. Only the standard library is imported (the Snakefile imports
:mod:`conv2dlstm.config.validate`, which imports this module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

AXIS_TOLERANCE = 1e-6
"""Fraction of a step by which ``stop`` may fall short of the last cell centre (float coordinates)."""
GRID_CELLS = "lat x lon cells of grid.lat and grid.lon"
"""How messages describe a grid size: the cell counts of the configured target grid."""


def axis_cells(start: float, stop: float, step: float) -> int:
    """Number of cell centres ``start, start + step, ...`` up to ``stop`` inclusive.

    The same count as :func:`conv2dlstm.data.regridding.axis_centres` (which builds the target grid): a
    ``stop`` that is not a whole number of steps from ``start`` is not reached.
    """
    return int(math.floor((float(stop) - float(start)) / float(step) + AXIS_TOLERANCE)) + 1


def axis_problem(axis: str, ax: Mapping[str, Any]) -> str | None:
    """Why config ``grid.<axis>`` (``start``, ``stop``, ``step``) cannot be an axis of the target grid
    (fewer than 2 cells), or None."""
    cells = axis_cells(ax["start"], ax["stop"], ax["step"])
    if cells >= 2:
        return None
    return (
        f"config key grid.{axis}: start {ax['start']}, stop {ax['stop']}, step {ax['step']} give {cells} cell; "
        "the target grid needs at least 2 cells per axis (widen start..stop)"
    )


def grid_shape(grid_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """``(height, width)``: the lat and lon cell counts of config section ``grid``."""
    lat, lon = grid_cfg["lat"], grid_cfg["lon"]
    return (
        axis_cells(lat["start"], lat["stop"], lat["step"]),
        axis_cells(lon["start"], lon["stop"], lon["step"]),
    )


def conv_stack_sizes(height: int, width: int, n_blocks: int, kernel_size: int) -> list[tuple[int, int]]:
    """Spatial size after each ``Conv2D(kernel, valid) + MaxPool(2)`` block, starting with the input.

    A size below 1 means the grid is too small for the stack.
    """
    sizes = [(height, width)]
    h, w = height, width
    for _ in range(n_blocks):
        h, w = (h - kernel_size + 1) // 2, (w - kernel_size + 1) // 2
        sizes.append((h, w))
    return sizes


def conv2d_lstm_parameter_count(
    *,
    in_channels: int,
    out_channels: int,
    lead_steps: int,
    height: int,
    width: int,
    filters: Sequence[int],
    kernel_size: int,
    lstm_units: int,
    dense_units: int,
) -> int:
    """Number of trainable parameters of :class:`conv2dlstm.training.models.Conv2dLSTM`, without allocating it.

    Convolutions ``c_in * f * k * k + f`` each; the LSTM over the flattened last feature map
    ``4 * units * (flat + units + 2)`` (input and hidden weights, two biases); the hidden dense layer
    and the output layer of ``lead_steps * out_channels * height * width`` values. ``input_steps``
    does not enter: the LSTM shares its weights over time.
    """
    count = 0
    c_prev = in_channels
    for f in filters:  # Conv2d weight + bias
        count += c_prev * f * kernel_size * kernel_size + f
        c_prev = f
    h, w = conv_stack_sizes(height, width, len(filters), kernel_size)[-1]
    flat = c_prev * h * w
    count += 4 * lstm_units * (flat + lstm_units + 2)  # LSTM: W_ih, W_hh, b_ih, b_hh
    count += lstm_units * dense_units + dense_units  # Dense(dense_units)
    n_out = lead_steps * out_channels * height * width
    count += dense_units * n_out + n_out  # Dense(T_out * C_out * H * W)
    return count


def conv2d_lstm_grid_problem(height: int, width: int, filters: Sequence[int], kernel_size: int) -> str | None:
    """Why the ``height x width`` grid is too small for the Conv2D + MaxPool blocks; None when it fits."""
    sizes = conv_stack_sizes(height, width, len(filters), kernel_size)
    if min(min(s) for s in sizes) >= 1:
        return None
    return (
        f"the {height}x{width} grid ({GRID_CELLS}) is too small for the {len(filters)} Conv2D(kernel "
        f"{kernel_size}, valid) + MaxPool(2) blocks of model conv2d_lstm (sizes "
        f"{' -> '.join(f'{h}x{w}' for h, w in sizes)}); use fewer model.conv2d_lstm.filters, a smaller "
        "model.conv2d_lstm.kernel_size, a larger grid, or model.name: convlstm"
    )


def conv2d_lstm_size_problem(n_params: int, height: int, width: int, max_parameters: int) -> str | None:
    """Why ``n_params`` parameters on the ``height x width`` grid are refused; None within the limit."""
    if n_params <= max_parameters:
        return None
    return (
        f"model conv2d_lstm would have {n_params:,} parameters on the {height}x{width} grid ({GRID_CELLS}), "
        f"above model.conv2d_lstm.max_parameters = {max_parameters:,}: its flatten and output layers grow "
        "with the grid area. Use `model.name: convlstm` (size independent of the grid), a coarser grid "
        "(a larger grid.lat.step / grid.lon.step, or a smaller area), or raise "
        "model.conv2d_lstm.max_parameters"
    )
