"""The U-Net, ``unet`` (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597): a convolutional
encoder-decoder with skips over the input days stacked as channels, predicting every lead at once;
its size does not depend on the grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from conv2dlstm.errors import ConfigError
from conv2dlstm.training.networks.common import LastFrameSkip, output_floor

NORM_GROUPS = 8
"""The GroupNorm groups wanted; a layer of ``c`` channels gets ``gcd(8, c)`` (a divisor of ``c``)."""


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with ``gcd(NORM_GROUPS, channels)`` groups: independent of the batch."""
    return nn.GroupNorm(math.gcd(NORM_GROUPS, channels), channels)


class DoubleConv(nn.Sequential):
    """Two ``[Conv2d(k, 'same') -> GroupNorm -> ReLU]`` layers: ``(N, C_in, H, W)`` to ``(N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        pad = kernel_size // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad),
            norm(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad),
            norm(out_channels),
            nn.ReLU(),
        )


def check_unet_arguments(features: Sequence[int], kernel_size: int) -> list[int]:
    """The ``features`` as ints; a :class:`ConfigError` naming the key and the fix for impossible settings."""
    feats = [int(f) for f in features]
    if not feats:
        raise ConfigError("model.unet.features is empty; give the channels of at least one level, e.g. [16, 32, 64]")
    if any(f < 1 for f in feats):
        raise ConfigError(
            f"model.unet.features {feats} must all be >= 1 (the channels of each level), e.g. [16, 32, 64]"
        )
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ConfigError(
            f"model.unet.kernel_size = {kernel_size} must be odd and >= 1 ('same' padding keeps the grid size "
            "only for odd kernels); use 3 or 5"
        )
    return feats


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) over the input days stacked as channels.

    The ``T_in`` input frames ``(B, T_in, C_in, H, W)`` are stacked as ``T_in * C_in`` channels. The
    contracting path has one level per entry of ``features``: a :class:`DoubleConv` of ``features[l]``
    channels, then a 2x2 max-pooling before the next level (``L`` levels, ``L - 1`` poolings). The
    expanding path mirrors it: at each level a 2x2 up-convolution (stride 2) to ``features[l]``
    channels, concatenated with the contracting path's features of that level, and a
    :class:`DoubleConv`. A 1x1 convolution maps the ``features[0]`` channels to ``T_out * C_out``: every
    lead at once, plus the last input frame of the targets that are inputs
    (:class:`~conv2dlstm.training.networks.common.LastFrameSkip`), then the output floor.

    Departures from the paper: 'same'-padded convolutions (odd ``kernel_size``) instead of unpadded
    ones with cropped skips, so any grid works: the input is zero-padded (centred) to a multiple of
    ``2 ** (L - 1)`` and the output cropped back to ``(H, W)``; GroupNorm after every convolution
    (``gcd(8, channels)`` groups; not BatchNorm, so a prediction does not depend on the batch). With
    every parameter zero the network adds nothing to the skip.
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
        features: Sequence[int] = (16, 32, 64),
        kernel_size: int = 3,
        residual_channels: Sequence[int | None] | None = None,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
    ) -> None:
        super().__init__()
        feats = check_unet_arguments(features, kernel_size)
        self.lead_steps = lead_steps
        self.out_channels = out_channels
        self.multiple = 2 ** (len(feats) - 1)  # the padded grid divides evenly at every pooling
        self.down = nn.ModuleList(
            DoubleConv(c_in, c_out, kernel_size) for c_in, c_out in zip([input_steps * in_channels, *feats[:-1]], feats)
        )
        self.pool = nn.MaxPool2d(2)
        # expanding path, from the deepest level up: level l takes features[l + 1] from below
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(feats[level + 1], feats[level], kernel_size=2, stride=2)
            for level in reversed(range(len(feats) - 1))
        )
        self.up_conv = nn.ModuleList(
            DoubleConv(2 * feats[level], feats[level], kernel_size) for level in reversed(range(len(feats) - 1))
        )
        self.head = nn.Conv2d(feats[0], lead_steps * out_channels, kernel_size=1)
        self.skip = LastFrameSkip(in_channels, out_channels, residual_channels)
        self.output_floor = output_floor(out_channels, nonnegative_channels, height, width, floor_per_cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]  # x: (B, T_in, C_in, H, W)
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        top, left = pad_h // 2, pad_w // 2
        z = F.pad(x.flatten(1, 2), (left, pad_w - left, top, pad_h - top))  # (B, T_in*C_in, H_p, W_p)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                z = self.pool(z)  # (B, features[level-1], H_p / 2**level, W_p / 2**level)
            z = block(z)  # (B, features[level], H_p / 2**level, W_p / 2**level)
            skips.append(z)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips[:-1])):
            z = conv(torch.cat([up(z), skip], dim=1))  # (B, features[level], ...) one level up
        z = self.head(z[:, :, top : top + h, left : left + w])  # (B, T_out*C_out, H, W)
        out = z.unflatten(1, (self.lead_steps, self.out_channels))  # (B, T_out, C_out, H, W)
        out = out + self.skip(x).unsqueeze(1)  # + last input frame of the targets that are inputs
        return out if self.output_floor is None else self.output_floor(out)
