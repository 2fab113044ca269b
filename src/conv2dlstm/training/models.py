"""Forecast networks mapping ``x (B, T_in, C_in, H, W)`` to ``y (B, T_out, C_out, H, W)``.

Two architectures, built by name with :func:`build_model` from plain keyword arguments (the same
``model_kwargs`` are stored in every checkpoint, so :func:`rebuild_model`
rebuilds a model from its file alone):

- ``conv2d_lstm`` (:class:`Conv2dLSTM`): the original notebook network. Each input frame goes through
  ``Conv2D + ReLU + MaxPool(2)`` blocks, is flattened, an LSTM runs over time, and dense layers
  produce the whole output cube. Its flatten and output layers grow with the grid area ``H * W``;
  the parameter count is computed before any allocation (:mod:`conv2dlstm.config.modelsize`, which the
  config validation uses too) and a :class:`ConfigError` refuses a model above ``max_parameters``.
- ``convlstm`` (:class:`ConvLSTM`): an encoder-forecaster of stacked ConvLSTM cells (Shi et al.
  2015, https://arxiv.org/abs/1506.04214). Its size does not depend on the grid.

Both networks see land as 0 (normalized, set by the windows step); land is excluded in the loss.

Variables that cannot be negative (concentrations; config ``variables.nonnegative``): both networks
pass the output channels of such targets through :class:`OutputFloor`,
``y = floor + softplus(b * (raw - floor)) / b`` with ``floor = -mean / std`` the normalized value of
0 physical units (per variable, or per grid cell with per-pixel statistics) and sharpness
``b = FLOOR_SHARPNESS`` (10, in normalized units). ``y > floor`` always, so ``y * std + mean >= 0``
(up to float rounding, which evaluate and forecast remove by clipping at 0 after denormalizing),
and ``y`` equals ``raw`` to within ``4e-6`` std from one std above the floor on. With ``b = 1``
the output near the mean is shifted by up to 0.1 std and its gradient damped, and the seed
task's Conv2D-LSTM never left its initial plateau; from ``b = 5`` on it trains like the
unconstrained network. The floor is a buffer of the model: it is saved in the checkpoint's
``model_state`` and :func:`load_model` rebuilds the floored model from the file alone;
``model_kwargs`` carry which channels are floored, whether per cell and the sharpness
(``nonnegative_channels``, ``floor_per_cell``, ``floor_sharpness``). The train step sets the buffer
from the statistics with :meth:`OutputFloor.set_floor` (:func:`floor_from_stats`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from conv2dlstm.artifacts import checkpoint as checkpoint_file
from conv2dlstm.config.modelsize import (
    conv2d_lstm_grid_problem,
    conv2d_lstm_parameter_count,
    conv2d_lstm_size_problem,
    conv_stack_sizes,
)
from conv2dlstm.errors import ConfigError, DataError

FLOOR_SHARPNESS = 10.0
"""Sharpness ``b`` of the output floor, per normalized unit (module docstring)."""


# ----------------------------------------------------------------------------------------------
# Output floor for variables that cannot be negative
# ----------------------------------------------------------------------------------------------


class OutputFloor(nn.Module):
    """Floors some output channels smoothly at their normalized zero: ``floor + softplus(b (raw - floor)) / b``.

    Args:
        out_channels: ``C_out`` of the network.
        channels: indices of the floored channels (targets that cannot be negative).
        height, width: the grid, for a per-cell floor.
        per_cell: one floor per grid cell (per-pixel statistics) instead of one per channel.
        sharpness: ``b``, per normalized unit (:data:`FLOOR_SHARPNESS`).

    The buffer ``floor`` ``(C_out, H, W)`` (or ``(C_out, 1, 1)``) holds ``-mean / std`` on the
    floored channels; it starts as NaN there and must be set (:meth:`set_floor`, or loading a
    checkpoint) before the first forward pass, which otherwise raises ``RuntimeError``.
    """

    selected: torch.Tensor
    floor: torch.Tensor

    def __init__(
        self,
        out_channels: int,
        channels: Sequence[int],
        *,
        height: int,
        width: int,
        per_cell: bool = False,
        sharpness: float = FLOOR_SHARPNESS,
    ) -> None:
        super().__init__()
        if not sharpness > 0:
            raise ConfigError(f"floor_sharpness {sharpness} must be positive")
        self.sharpness = float(sharpness)
        channels = [int(c) for c in channels]
        bad = [c for c in channels if not 0 <= c < out_channels]
        if bad or len(set(channels)) != len(channels):
            raise ConfigError(
                f"nonnegative_channels {channels} must be distinct output channel indices (0..{out_channels - 1})"
            )
        self.channels = channels
        shape = (out_channels, height, width) if per_cell else (out_channels, 1, 1)
        selected = torch.zeros(out_channels, dtype=torch.bool)
        selected[channels] = True
        floor = torch.zeros(shape)
        floor[selected] = float("nan")
        self.register_buffer("selected", selected.view(-1, 1, 1), persistent=False)
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
        """``y`` ``(..., C_out, H, W)`` with the floored channels replaced by
        ``floor + softplus(b (y - floor)) / b``."""
        if not self._checked:
            if bool(torch.isnan(self.floor).any()):
                raise RuntimeError(
                    "the output floor of the nonnegative channels was never set: call set_floor (the train step "
                    "does, from the statistics) or load the model from its checkpoint (training.models.load_model)"
                )
            self._checked = True
        floor = self.floor.to(y.dtype)
        return torch.where(self.selected, floor + F.softplus(y - floor, beta=self.sharpness), y)


def floor_from_stats(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalized value of 0 physical units, ``-mean / std``, as float32 (any matching shapes)."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise DataError("the statistics have a non-finite mean or a std <= 0; re-run the normalize step")
    return (-mean / std).astype(np.float32)


def nonnegative_channels(target_variables: Sequence[str], nonnegative: Sequence[str]) -> list[int]:
    """Indices of the target variables named in ``nonnegative`` (config ``variables.nonnegative``)."""
    names = set(nonnegative)
    return [i for i, v in enumerate(target_variables) if v in names]


def _output_floor(
    out_channels: int, channels: Sequence[int] | None, height: int, width: int, per_cell: bool, sharpness: float
) -> OutputFloor | None:
    if not channels:
        return None
    return OutputFloor(out_channels, channels, height=height, width=width, per_cell=per_cell, sharpness=sharpness)


# ----------------------------------------------------------------------------------------------
# Conv2D-LSTM (the notebook network)
# ----------------------------------------------------------------------------------------------


class Conv2dLSTM(nn.Module):
    """The notebook network: per-frame CNN -> LSTM over time -> dense head producing the output cube.

    Per time step: ``[Conv2D(f, k, valid) -> ReLU -> MaxPool(2)] for f in filters -> Flatten``; an
    LSTM(lstm_units) over the ``T_in`` feature vectors; its last hidden state goes through
    ``Dense(dense_units, relu) -> Dense(T_out * C_out * H * W)``, reshaped to the output.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        input_steps: int,
        lead_steps: int,
        height: int,
        width: int,
        filters: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        lstm_units: int = 64,
        dense_units: int = 64,
        max_parameters: int = 20_000_000,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
        floor_sharpness: float = FLOOR_SHARPNESS,
    ) -> None:
        super().__init__()
        filters = [int(f) for f in filters]
        if not filters:
            raise ConfigError("model.conv2d_lstm.filters is empty; give at least one block, e.g. [32, 64]")
        problem = conv2d_lstm_grid_problem(height, width, filters, kernel_size)
        if problem:
            raise ConfigError(f"model conv2d_lstm: {problem}")
        n_params = conv2d_lstm_parameter_count(
            in_channels=in_channels,
            out_channels=out_channels,
            lead_steps=lead_steps,
            height=height,
            width=width,
            filters=filters,
            kernel_size=kernel_size,
            lstm_units=lstm_units,
            dense_units=dense_units,
        )
        problem = conv2d_lstm_size_problem(n_params, height, width, max_parameters)
        if problem:
            raise ConfigError(problem)
        sizes = conv_stack_sizes(height, width, len(filters), kernel_size)
        self.out_shape = (lead_steps, out_channels, height, width)
        self.input_steps = input_steps
        blocks: list[nn.Module] = []
        c_prev = in_channels
        for f in filters:
            blocks += [nn.Conv2d(c_prev, f, kernel_size), nn.ReLU(), nn.MaxPool2d(2)]
            c_prev = f
        self.encoder = nn.Sequential(*blocks, nn.Flatten())
        h, w = sizes[-1]
        self.lstm = nn.LSTM(c_prev * h * w, lstm_units, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(lstm_units, dense_units),
            nn.ReLU(),
            nn.Linear(dense_units, lead_steps * out_channels * height * width),
        )
        self.output_floor = _output_floor(
            out_channels, nonnegative_channels, height, width, floor_per_cell, floor_sharpness
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]  # x: (B, T_in, C_in, H, W)
        feats = self.encoder(x.flatten(0, 1))  # (B*T_in, F)
        feats = feats.unflatten(0, (b, t))  # (B, T_in, F)
        _, (h_n, _) = self.lstm(feats)  # h_n: (1, B, lstm_units)
        out = self.head(h_n[-1]).view(b, *self.out_shape)  # (B, T_out, C_out, H, W)
        return out if self.output_floor is None else self.output_floor(out)


# ----------------------------------------------------------------------------------------------
# ConvLSTM encoder-forecaster
# ----------------------------------------------------------------------------------------------


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell: the four gates from one 'same'-padded convolution over ``[x, h]``."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2)
        bias = self.conv.bias
        if bias is None:  # nn.Conv2d has a bias unless bias=False
            raise RuntimeError("the ConvLSTM cell's convolution has no bias")
        with torch.no_grad():  # forget-gate bias 1: remember by default at the start of training
            bias[hidden_channels : 2 * hidden_channels].fill_(1.0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state  # x: (B, C_x, H, W); h, c: (B, C_h, H, W)
        i, f, o, g = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)  # each (B, C_h, H, W)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTM(nn.Module):
    """ConvLSTM encoder-forecaster (Shi et al. 2015).

    The encoder (stacked cells, ``hidden_channels[l]`` each) reads the ``T_in`` input frames. The
    forecaster (its own stacked cells) starts from the encoder's final states and unrolls
    ``lead_steps`` steps; its input at each step is the previous prediction (at the first step: the
    last input frame of the ``residual_channels``, else zeros). A 1x1 convolution maps the
    concatenated forecaster hidden states to ``C_out`` channels.

    ``residual_channels`` (length ``C_out``; an input-channel index or None per target channel) adds
    a skip from the last input frame, so that those channels predict the change from persistence.
    ``nonnegative_channels`` are floored (:class:`OutputFloor`) at every lead, before the prediction
    is fed back to the forecaster.
    """

    residual_index: torch.Tensor
    residual_keep: torch.Tensor

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        input_steps: int,
        lead_steps: int,
        height: int,
        width: int,
        hidden_channels: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        residual_channels: Sequence[int | None] | None = None,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
        floor_sharpness: float = FLOOR_SHARPNESS,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden_channels]
        if not hidden:
            raise ConfigError("model.convlstm.hidden_channels is empty; give at least one layer, e.g. [32, 32]")
        if kernel_size % 2 != 1:
            raise ConfigError(
                f"model.convlstm.kernel_size = {kernel_size} must be odd ('same' padding keeps the "
                "grid size only for odd kernels); use 3 or 5"
            )
        self.lead_steps = lead_steps
        self.out_channels = out_channels
        self.encoder = nn.ModuleList(
            ConvLSTMCell(c_in, c_h, kernel_size) for c_in, c_h in zip([in_channels, *hidden[:-1]], hidden)
        )
        self.forecaster = nn.ModuleList(
            ConvLSTMCell(c_in, c_h, kernel_size) for c_in, c_h in zip([out_channels, *hidden[:-1]], hidden)
        )
        self.head = nn.Conv2d(sum(hidden), out_channels, kernel_size=1)
        self.output_floor = _output_floor(
            out_channels, nonnegative_channels, height, width, floor_per_cell, floor_sharpness
        )
        if residual_channels is None:
            self.residual = None
        else:
            if len(residual_channels) != out_channels:
                raise ConfigError(
                    f"residual_channels {list(residual_channels)} must have one entry per output "
                    f"channel ({out_channels}); use None for channels without a skip"
                )
            for r in residual_channels:
                if r is not None and not 0 <= r < in_channels:
                    raise ConfigError(
                        f"residual_channels entry {r} is not an input channel index (0..{in_channels - 1})"
                    )
            index = [r if r is not None else 0 for r in residual_channels]
            keep = [1.0 if r is not None else 0.0 for r in residual_channels]
            self.register_buffer("residual_index", torch.tensor(index, dtype=torch.long), persistent=False)
            self.register_buffer("residual_keep", torch.tensor(keep).view(1, -1, 1, 1), persistent=False)
            self.residual = list(residual_channels)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The skip added to every lead: last input frame of the residual channels, else zeros."""
        b, _, _, h, w = x.shape
        if self.residual is None:
            return x.new_zeros(b, self.out_channels, h, w)  # (B, C_out, H, W)
        last = x[:, -1].index_select(1, self.residual_index)  # (B, C_out, H, W)
        return last * self.residual_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t_in, _, h, w = x.shape  # x: (B, T_in, C_in, H, W)
        states = [
            (x.new_zeros(b, cell.hidden_channels, h, w), x.new_zeros(b, cell.hidden_channels, h, w))
            for cell in cast(Sequence[ConvLSTMCell], self.encoder)  # nn.ModuleList is not generic
        ]
        for t in range(t_in):
            inp = x[:, t]  # (B, C_in, H, W)
            for layer, cell in enumerate(self.encoder):
                states[layer] = cell(inp, states[layer])
                inp = states[layer][0]  # (B, C_h[layer], H, W)
        base = self._base(x)  # (B, C_out, H, W)
        prev = base
        outputs = []
        for _ in range(self.lead_steps):
            inp = prev
            for layer, cell in enumerate(self.forecaster):
                states[layer] = cell(inp, states[layer])
                inp = states[layer][0]
            hidden = torch.cat([s[0] for s in states], dim=1)  # (B, sum(C_h), H, W)
            prev = self.head(hidden) + base  # (B, C_out, H, W)
            if self.output_floor is not None:
                prev = self.output_floor(prev)
            outputs.append(prev)
        return torch.stack(outputs, dim=1)  # (B, T_out, C_out, H, W)


# ----------------------------------------------------------------------------------------------
# Construction and loading
# ----------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[nn.Module]] = {"convlstm": ConvLSTM, "conv2d_lstm": Conv2dLSTM}
MODEL_NAMES = tuple(_REGISTRY)
"""The networks :func:`build_model` builds (config key ``model.name``)."""


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network ``name`` (``convlstm`` or ``conv2d_lstm``) from keyword arguments.

    Every model takes ``in_channels, out_channels, input_steps, lead_steps, height, width`` plus its
    architecture arguments (see :func:`model_kwargs_from_config`).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"model.name {name!r} is not one of {list(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def residual_channels_for(input_variables: Sequence[str], target_variables: Sequence[str]) -> list[int | None] | None:
    """Input-channel index of each target variable (None where it is not an input); None if no overlap."""
    index = [list(input_variables).index(v) if v in input_variables else None for v in target_variables]
    return index if any(i is not None for i in index) else None


def model_kwargs_from_config(
    model_cfg: dict[str, Any],
    *,
    input_variables: Sequence[str],
    target_variables: Sequence[str],
    input_steps: int,
    lead_steps: int,
    height: int,
    width: int,
    nonnegative: Sequence[str] = (),
    floor_per_cell: bool = False,
) -> dict[str, Any]:
    """``build_model`` keyword arguments for the ``model`` config section and the data's shapes.

    ConvLSTM gets a residual skip for target variables that are also inputs. Target variables named
    in ``nonnegative`` (config ``variables.nonnegative``) get an output floor (:class:`OutputFloor`,
    per cell when ``floor_per_cell``, i.e. with per-pixel statistics): the kwargs then hold
    ``nonnegative_channels``, ``floor_per_cell`` and ``floor_sharpness`` (absent when no target is floored).
    """
    name = model_cfg["name"]
    kwargs: dict[str, Any] = {
        "in_channels": len(input_variables),
        "out_channels": len(target_variables),
        "input_steps": int(input_steps),
        "lead_steps": int(lead_steps),
        "height": int(height),
        "width": int(width),
    }
    if name == "conv2d_lstm":
        c = model_cfg["conv2d_lstm"]
        kwargs |= {
            "filters": list(c["filters"]),
            "kernel_size": c["kernel_size"],
            "lstm_units": c["lstm_units"],
            "dense_units": c["dense_units"],
            "max_parameters": c["max_parameters"],
        }
    elif name == "convlstm":
        c = model_cfg["convlstm"]
        kwargs |= {
            "hidden_channels": list(c["hidden_channels"]),
            "kernel_size": c["kernel_size"],
            "residual_channels": residual_channels_for(input_variables, target_variables),
        }
    else:
        raise ConfigError(f"model.name {name!r} is not one of {list(_REGISTRY)}")
    floored = nonnegative_channels(target_variables, nonnegative)
    if floored:
        kwargs |= {
            "nonnegative_channels": floored,
            "floor_per_cell": bool(floor_per_cell),
            "floor_sharpness": FLOOR_SHARPNESS,
        }
    return kwargs


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_counts(cfg: Mapping[str, Any]) -> dict[str, int | str]:
    """Per registered network (:data:`MODEL_NAMES`), its trainable parameters for the configuration
    ``cfg``: its section of ``model``, the variables, windows and grid; built on torch's ``meta``
    device, so nothing is allocated whatever the grid. A network the configuration refuses (e.g. a
    ``conv2d_lstm`` above its ``max_parameters``) gives the reason instead."""
    from conv2dlstm.config.modelsize import grid_shape

    height, width = grid_shape(cfg["grid"])
    out: dict[str, int | str] = {}
    for name in MODEL_NAMES:
        kwargs = model_kwargs_from_config(
            {**cfg["model"], "name": name},
            input_variables=cfg["variables"]["inputs"],
            target_variables=cfg["variables"]["targets"],
            input_steps=cfg["windows"]["input_steps"],
            lead_steps=cfg["windows"]["lead_steps"],
            height=height,
            width=width,
            nonnegative=cfg["variables"]["nonnegative"],
        )
        try:
            with torch.device("meta"):
                out[name] = count_parameters(build_model(name, **kwargs))
        except ConfigError as exc:
            out[name] = f"refused: {exc}"
    return out


def rebuild_model(ckpt: Mapping[str, Any], *, path: str | os.PathLike = "") -> nn.Module:
    """The network of ``ckpt`` built from the checkpoint alone (its
    :data:`~conv2dlstm.artifacts.checkpoint.MODEL_KEYS`), with its weights, in eval mode on the CPU. ``path`` names
    the file in the :class:`DataError` of a checkpoint whose entries do not build a model of this version."""
    where = path or "(in memory)"
    name, kwargs = ckpt["model_name"], ckpt["model_kwargs"]
    if name not in MODEL_NAMES:
        raise checkpoint_file.error(where, f"names the model {name!r}, which is not one of {list(MODEL_NAMES)}")
    if not isinstance(kwargs, dict):
        raise checkpoint_file.error(where, f"has model_kwargs of type {type(kwargs).__name__}, not a dict")
    try:
        model = build_model(name, **kwargs)
    except (TypeError, ValueError, ConfigError) as exc:
        raise checkpoint_file.error(where, f"has model_kwargs that do not build a {name} model ({exc})") from exc
    try:
        model.load_state_dict(ckpt["model_state"])
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        raise checkpoint_file.error(where, f"has weights that do not fit its {name} model ({exc})") from exc
    return model.eval()


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint file alone; returns ``(model, checkpoint)``, model in eval mode on the CPU.

    Needs only :data:`~conv2dlstm.artifacts.checkpoint.MODEL_KEYS`, and accepts a file without ``format_version``
    (model-only checkpoints written by hand); a file of another version, missing, truncated or not a checkpoint of
    this package (or weights that do not fit the rebuilt network) raises a :class:`DataError` naming ``path`` and the
    fix."""
    ckpt = checkpoint_file.load(path, required=checkpoint_file.MODEL_KEYS)
    return rebuild_model(ckpt, path=path), ckpt
