"""What every network shares: the skip from the last input frame and the output floor.

Every network maps ``x (B, T_in, C_in, H, W)`` to ``y (B, T_out, C_out, H, W)`` in normalized units,
land 0 (the windows step sets it; the loss and the scores exclude it), and takes, besides its
architecture arguments, the same keyword arguments (:mod:`conv2dlstm.config.networks` derives them
from the configuration):

- ``in_channels, out_channels, input_steps, lead_steps, height, width``: the data's shapes;
- ``residual_channels`` (length ``C_out``; an input-channel index or None per target channel, or
  None): :class:`LastFrameSkip` adds the last input frame of a target that is also an input to every
  lead, so that the network predicts the change from persistence. With every weight zero, a network
  predicts persistence on those channels and 0 elsewhere (a test of the contract checks it);
- ``nonnegative_channels``, ``floor_per_cell``: :class:`OutputFloor` on targets that cannot be
  negative (config ``variables.nonnegative``).

The output floor. Training sees the raw output: the floor is the identity in training mode, so the
loss and its gradient are the unconstrained network's. In evaluation mode (``model.eval()``, which
:func:`conv2dlstm.training.models.load_model`, the validation pass, evaluate and forecast use) the
floored channels are ``max(raw, floor)`` with ``floor = -mean / std``, the normalized value of 0
physical units (per variable, or per grid cell with per-pixel statistics). The truth of such a
variable is never below its floor, so at every cell ``|max(raw, floor) - truth| <= |raw - truth|``:
the floored prediction is never further from the truth than the unconstrained one, and equals it
wherever that is already at or above 0. (A smooth floor inside the network, ``floor +
softplus(b (raw - floor)) / b``, bent every prediction within about one standard deviation of 0, where
nutrients live outside blooms, and cost skill there.) The floor is a buffer of the model, saved in
the checkpoint's ``model_state``; the train step sets it from the statistics
(:meth:`OutputFloor.set_floor`, :func:`floor_from_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from conv2dlstm.errors import ConfigError, DataError


class OutputFloor(nn.Module):
    """Floors some output channels at their normalized zero in evaluation mode: ``max(raw, floor)``.

    Args:
        out_channels: ``C_out`` of the network.
        channels: indices of the floored channels (targets that cannot be negative).
        height, width: the grid, for a per-cell floor.
        per_cell: one floor per grid cell (per-pixel statistics) instead of one per channel.

    The buffer ``floor`` ``(C_out, H, W)`` (or ``(C_out, 1, 1)``) holds ``-mean / std`` on the
    floored channels; it starts as NaN there and must be set (:meth:`set_floor`, or loading a
    checkpoint) before the first forward pass in evaluation mode, which otherwise raises
    ``RuntimeError``. In training mode the floor is the identity (module docstring).
    """

    floor: torch.Tensor

    def __init__(
        self, out_channels: int, channels: Sequence[int], *, height: int, width: int, per_cell: bool = False
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        bad = [c for c in channels if not 0 <= c < out_channels]
        if bad or len(set(channels)) != len(channels):
            raise ConfigError(
                f"nonnegative_channels {channels} must be distinct output channel indices (0..{out_channels - 1})"
            )
        self.channels = channels
        shape = (out_channels, height, width) if per_cell else (out_channels, 1, 1)
        floor = torch.full(shape, float("-inf"))  # -inf: not floored
        floor[channels] = float("nan")  # set by set_floor or the checkpoint
        self.register_buffer("floor", floor)
        self._checked = False

    def set_floor(self, values: torch.Tensor | np.ndarray) -> None:
        """Set the floor of the floored channels from ``values`` ``(len(channels), H, W)`` or ``(len(channels),)``."""
        values = torch.as_tensor(np.asarray(values, dtype=np.float32))
        if values.ndim == 1:
            values = values.view(-1, 1, 1)
        expected = (len(self.channels), *self.floor.shape[1:])
        if tuple(values.shape) != expected or not bool(torch.isfinite(values).all()):
            raise DataError(
                f"output floor values of shape {tuple(values.shape)} (finite: {bool(torch.isfinite(values).all())}) "
                f"do not fit the floored channels {self.channels}: expected finite {expected}"
            )
        with torch.no_grad():
            self.floor[self.channels] = values.to(self.floor)
        self._checked = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._checked = False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` ``(..., C_out, H, W)``; in evaluation mode with the floored channels raised to their floor."""
        if self.training:
            return y
        if not self._checked:
            if bool(torch.isnan(self.floor).any()):
                raise RuntimeError(
                    "the output floor of the nonnegative channels was never set: call set_floor (the train step "
                    "does, from the statistics) or load the model from its checkpoint (training.models.load_model)"
                )
            self._checked = True
        return torch.maximum(y, self.floor.to(y.dtype))  # -inf on the channels that are not floored


def floor_from_stats(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalized value of 0 physical units, ``-mean / std``, as float32 (any matching shapes)."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise DataError("the statistics have a non-finite mean or a std <= 0; re-run the normalize step")
    return (-mean / std).astype(np.float32)


def output_floor(
    out_channels: int, channels: Sequence[int] | None, height: int, width: int, per_cell: bool
) -> OutputFloor | None:
    """The :class:`OutputFloor` of ``channels``, or None when no channel is floored."""
    if not channels:
        return None
    return OutputFloor(out_channels, channels, height=height, width=width, per_cell=per_cell)


class LastFrameSkip(nn.Module):
    """The skip every lead adds: the last input frame of the targets that are inputs, else zeros.

    ``residual_channels`` (length ``C_out``): per target channel, the index of the same variable
    among the inputs, or None; None altogether: no skip (the module returns zeros).
    """

    residual_index: torch.Tensor
    residual_keep: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, residual_channels: Sequence[int | None] | None) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.residual = None if residual_channels is None else list(residual_channels)
        if residual_channels is None:
            return
        if len(residual_channels) != out_channels:
            raise ConfigError(
                f"residual_channels {list(residual_channels)} must have one entry per output "
                f"channel ({out_channels}); use None for channels without a skip"
            )
        for r in residual_channels:
            if r is not None and not 0 <= r < in_channels:
                raise ConfigError(f"residual_channels entry {r} is not an input channel index (0..{in_channels - 1})")
        index = [r if r is not None else 0 for r in residual_channels]
        keep = [1.0 if r is not None else 0.0 for r in residual_channels]
        self.register_buffer("residual_index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.register_buffer("residual_keep", torch.tensor(keep).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape  # x: (B, T_in, C_in, H, W)
        if self.residual is None:
            return x.new_zeros(b, self.out_channels, h, w)  # (B, C_out, H, W)
        last = x[:, -1].index_select(1, self.residual_index)  # (B, C_out, H, W)
        return last * self.residual_keep.to(last.dtype)
