"""The notebook network, ``conv2d_lstm``: per-frame Conv2D + MaxPool blocks, an LSTM over time, a dense map head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from conv2dlstm.config.modelsize import (
    conv2d_lstm_grid_problem,
    conv2d_lstm_parameter_count,
    conv2d_lstm_size_problem,
    conv_stack_sizes,
)
from conv2dlstm.errors import ConfigError
from conv2dlstm.training.networks.common import LastFrameSkip, output_floor


class Conv2dLSTM(nn.Module):
    """The notebook network: per-frame CNN -> LSTM over time -> dense head producing the output cube.

    Per time step: ``[Conv2D(f, k, valid) -> ReLU -> MaxPool(2)] for f in filters -> Flatten`` (computed
    as Conv2D -> MaxPool -> ReLU, the same values); an
    LSTM(lstm_units) over the ``T_in`` feature vectors; its last hidden state goes through
    ``Dense(dense_units, relu) -> Dense(T_out * C_out * H * W)``, reshaped to the output, plus the
    last input frame of targets that are inputs (:class:`~conv2dlstm.training.networks.common.LastFrameSkip`).
    Its flatten and output layers grow with the grid area ``H * W``; the parameter count is computed
    before any allocation (:mod:`conv2dlstm.config.modelsize`, which the configuration checks use
    too) and a :class:`ConfigError` refuses a model above ``max_parameters``.
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
        residual_channels: Sequence[int | None] | None = None,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
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
            # ReLU after the pooling: max-pooling and ReLU commute (ReLU never reorders values), so the
            # block is the notebook's Conv2D(relu) -> MaxPool, with the ReLU on a quarter of the values
            blocks += [nn.Conv2d(c_prev, f, kernel_size), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            c_prev = f
        self.encoder = nn.Sequential(*blocks, nn.Flatten())
        h, w = sizes[-1]
        self.lstm = nn.LSTM(c_prev * h * w, lstm_units, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(lstm_units, dense_units),
            nn.ReLU(),
            nn.Linear(dense_units, lead_steps * out_channels * height * width),
        )
        self.skip = LastFrameSkip(in_channels, out_channels, residual_channels)
        self.output_floor = output_floor(out_channels, nonnegative_channels, height, width, floor_per_cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]  # x: (B, T_in, C_in, H, W)
        feats = self.encoder(x.flatten(0, 1))  # (B*T_in, F)
        feats = feats.unflatten(0, (b, t))  # (B, T_in, F)
        _, (h_n, _) = self.lstm(feats)  # h_n: (1, B, lstm_units)
        out = self.head(h_n[-1]).view(b, *self.out_shape)  # (B, T_out, C_out, H, W)
        out = out + self.skip(x).unsqueeze(1)  # + last input frame of the targets that are inputs
        return out if self.output_floor is None else self.output_floor(out)
