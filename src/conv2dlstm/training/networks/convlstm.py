"""The ConvLSTM encoder-forecaster, ``convlstm`` (Shi et al. 2015, https://arxiv.org/abs/1506.04214):
stacked ConvLSTM cells; its size does not depend on the grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from conv2dlstm.errors import ConfigError
from conv2dlstm.training.networks.common import LastFrameSkip, output_floor


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
    ``nonnegative_channels`` are floored (:class:`~conv2dlstm.training.networks.common.OutputFloor`)
    on the output only: the forecaster is fed its raw predictions, as in training, so the floored
    output is ``max(raw, floor)`` of the unconstrained one at every lead.
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
        hidden_channels: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        residual_channels: Sequence[int | None] | None = None,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
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
        self.output_floor = output_floor(out_channels, nonnegative_channels, height, width, floor_per_cell)
        self.skip = LastFrameSkip(in_channels, out_channels, residual_channels)

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
        base = self.skip(x)  # (B, C_out, H, W)
        prev = base
        outputs = []
        for _ in range(self.lead_steps):
            inp = prev
            for layer, cell in enumerate(self.forecaster):
                states[layer] = cell(inp, states[layer])
                inp = states[layer][0]
            hidden = torch.cat([s[0] for s in states], dim=1)  # (B, sum(C_h), H, W)
            prev = self.head(hidden) + base  # (B, C_out, H, W)
            outputs.append(prev)
        y = torch.stack(outputs, dim=1)  # (B, T_out, C_out, H, W)
        return y if self.output_floor is None else self.output_floor(y)
