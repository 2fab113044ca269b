"""SimVP, ``simvp`` (Gao et al., CVPR 2022, "SimVP: Simpler yet Better Video Prediction",
https://arxiv.org/abs/2206.05099): a per-frame spatial encoder, a translator of Inception modules over
the frames stacked as channels, and a per-frame spatial decoder; all convolutional, its size does not
depend on the grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from conv2dlstm.errors import ConfigError
from conv2dlstm.training.networks.common import LastFrameSkip, output_floor

NEGATIVE_SLOPE = 0.2
"""The LeakyReLU slope of every layer (as in the paper)."""


def conv_norm_act(conv: nn.Module, channels: int, groups: int) -> nn.Sequential:
    """``conv -> GroupNorm(gcd(groups, channels)) -> LeakyReLU``; GroupNorm does not depend on the batch."""
    return nn.Sequential(conv, nn.GroupNorm(math.gcd(groups, channels), channels), nn.LeakyReLU(NEGATIVE_SLOPE))


def spatial_strides(layers: int) -> list[int]:
    """The strides of the spatial encoder's layers: 1, 2, 1, 2, ... (``layers // 2`` of them 2)."""
    return [1 + layer % 2 for layer in range(layers)]


class SpatialEncoder(nn.Module):
    """The per-frame encoder: ``spatial_layers`` ``[Conv2d(3) -> GroupNorm -> LeakyReLU]``, strides 1, 2, 1, 2, ...

    ``(N, C_in, H, W)`` to the latent ``(N, C_S, H / 2**s, W / 2**s)`` (``s`` stride-2 layers) and the
    first layer's output ``(N, C_S, H, W)``, the decoder's skip.
    """

    def __init__(self, in_channels: int, channels: int, layers: int, groups: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            conv_norm_act(nn.Conv2d(c_in, channels, 3, stride=stride, padding=1), channels, groups)
            for c_in, stride in zip([in_channels] + [channels] * (layers - 1), spatial_strides(layers))
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.layers[0](x)  # (N, C_S, H, W): stride 1
        z = first
        for layer in list(self.layers)[1:]:
            z = layer(z)  # (N, C_S, H', W'), halved at every stride-2 layer
        return z, first


class SpatialDecoder(nn.Module):
    """The per-frame decoder mirroring :class:`SpatialEncoder`: a stride-2 layer is a transposed
    convolution (3x3, doubles the grid exactly), a stride-1 layer a 'same' 3x3 convolution, each with
    GroupNorm and LeakyReLU; the last layer (the mirror of the encoder's first) reads the latent
    concatenated with the encoder's first-layer output. ``(N, C_S, H', W')`` and ``(N, C_S, H, W)`` to
    ``(N, C_S, H, W)``.
    """

    def __init__(self, channels: int, layers: int, groups: int) -> None:
        super().__init__()
        modules = []
        for layer, stride in reversed(list(enumerate(spatial_strides(layers)))):
            c_in = 2 * channels if layer == 0 else channels
            conv: nn.Module
            if stride == 2:
                conv = nn.ConvTranspose2d(c_in, channels, 3, stride=2, padding=1, output_padding=1)
            else:
                conv = nn.Conv2d(c_in, channels, 3, padding=1)
            modules.append(conv_norm_act(conv, channels, groups))
        self.layers = nn.ModuleList(modules)

    def forward(self, z: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        layers = list(self.layers)
        for layer in layers[:-1]:
            z = layer(z)  # (N, C_S, ...), doubled at every transposed layer
        return layers[-1](torch.cat([z, first], dim=1))  # (N, C_S, H, W)


class Inception(nn.Module):
    """The translator's Inception module: a 1x1 convolution to ``hidden`` channels, then parallel group
    convolutions (one per kernel size, 'same' padding, each with GroupNorm and LeakyReLU) to ``out``
    channels, summed. ``(N, C_in, H, W)`` to ``(N, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, kernels: Sequence[int], groups: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, hidden, 1)
        g = math.gcd(groups, hidden, out_channels)  # divides both sides of the group convolution
        self.branches = nn.ModuleList(
            conv_norm_act(nn.Conv2d(hidden, out_channels, k, padding=k // 2, groups=g), out_channels, g)
            for k in kernels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce(x)  # (N, hidden, H, W)
        out = self.branches[0](z)
        for branch in list(self.branches)[1:]:
            out = out + branch(z)  # (N, C_out, H, W)
        return out


class Translator(nn.Module):
    """The temporal translator: ``modules`` Inception modules in a U shape over the frames stacked as channels.

    The first ``modules // 2`` form the encoder (the first from ``channels`` to ``hidden`` channels),
    the others the decoder (the last back to ``channels``); a decoder module after the first reads its
    predecessor's output concatenated with the output of the mirrored encoder module (the skips of the
    paper). ``(N, channels, H', W')`` to the same shape.
    """

    def __init__(self, channels: int, hidden: int, modules: int, kernels: Sequence[int], groups: int) -> None:
        super().__init__()
        n_enc = modules // 2
        n_dec = modules - n_enc
        self.encoder = nn.ModuleList(
            Inception(channels if i == 0 else hidden, hidden // 2, hidden, kernels, groups) for i in range(n_enc)
        )
        # decoder module j > 0 reads the skip of encoder module n_enc - 1 - j, where there is one
        self.n_skips = [0] + [1 if n_enc - 1 - j >= 0 else 0 for j in range(1, n_dec)]
        self.decoder = nn.ModuleList(
            Inception(
                hidden * (1 + self.n_skips[j]),
                hidden // 2,
                channels if j == n_dec - 1 else hidden,
                kernels,
                groups,
            )
            for j in range(n_dec)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        z = x  # (N, channels, H', W')
        for module in self.encoder:
            z = module(z)  # (N, hidden, H', W')
            skips.append(z)
        skips.pop()  # the last encoder output is the decoder's input, not a skip
        for j, module in enumerate(self.decoder):
            if self.n_skips[j]:
                z = torch.cat([z, skips.pop()], dim=1)  # (N, 2*hidden, H', W')
            z = module(z)  # (N, hidden, H', W'); the last: (N, channels, H', W')
        return z


def check_simvp_arguments(
    *,
    spatial_channels: int,
    temporal_channels: int,
    spatial_layers: int,
    temporal_layers: int,
    inception_kernels: Sequence[int],
    groups: int,
) -> list[int]:
    """The inception kernels as ints; a :class:`ConfigError` naming the key and the fix for impossible settings."""
    for key, value, least, example in (
        ("spatial_channels", spatial_channels, 1, 16),
        ("temporal_channels", temporal_channels, 2, 64),
        ("spatial_layers", spatial_layers, 1, 2),
        ("temporal_layers", temporal_layers, 2, 4),
        ("groups", groups, 1, 4),
    ):
        if int(value) < least:
            raise ConfigError(f"model.simvp.{key} = {value} must be >= {least}; use e.g. {example}")
    kernels = [int(k) for k in inception_kernels]
    if not kernels or any(k < 1 or k % 2 != 1 for k in kernels):
        raise ConfigError(
            f"model.simvp.inception_kernels {kernels} must be a non-empty list of odd kernel sizes ('same' "
            "padding keeps the grid size only for odd kernels); use e.g. [3, 5, 7, 11]"
        )
    return kernels


class SimVP(nn.Module):
    """SimVP (Gao et al. 2022): spatial encoder, temporal translator, spatial decoder.

    Every input frame ``(C_in, H, W)`` goes through the same :class:`SpatialEncoder`
    (``spatial_layers`` layers of ``spatial_channels`` = ``C_S`` channels, strides 1, 2, 1, 2, ...);
    the ``T_in`` latent frames stacked as ``T_in * C_S`` channels go through the :class:`Translator`
    (``temporal_layers`` Inception modules of ``temporal_channels`` channels, kernels
    ``inception_kernels``, ``groups`` groups, in a U shape with skips); the result, split back into
    ``T_in`` frames, goes through the :class:`SpatialDecoder` with the skip from the encoder's first
    layer. Then the prediction, the last input frame of the targets that are inputs added
    (:class:`~conv2dlstm.training.networks.common.LastFrameSkip`), and the output floor.

    Departures from the paper: it predicts as many frames as it reads (``T_out = T_in``) with a 1x1
    readout per frame; here the decoder's per-frame features, stacked as ``(B, T_in*C_S, H, W)``, go
    through one 1x1 convolution to ``T_out * C_out`` channels, so ``lead_steps`` need not equal
    ``input_steps``. ``temporal_layers`` counts all the translator's Inception modules (``N_t`` of the
    paper's figure), ``temporal_layers // 2`` in its encoder half and the rest in its decoder half, so
    it must be >= 2. Any grid: the input is zero-padded (centred) to a multiple of ``2 ** (spatial_layers
    // 2)`` and the output cropped back to ``(H, W)``. GroupNorm groups are ``gcd(groups, channels)``
    (a divisor of the channels). With every parameter zero the network adds nothing to the skip.
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
        spatial_channels: int = 16,
        temporal_channels: int = 64,
        spatial_layers: int = 2,
        temporal_layers: int = 4,
        inception_kernels: Sequence[int] = (3, 5, 7, 11),
        groups: int = 4,
        residual_channels: Sequence[int | None] | None = None,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
    ) -> None:
        super().__init__()
        kernels = check_simvp_arguments(
            spatial_channels=spatial_channels,
            temporal_channels=temporal_channels,
            spatial_layers=spatial_layers,
            temporal_layers=temporal_layers,
            inception_kernels=inception_kernels,
            groups=groups,
        )
        self.lead_steps = lead_steps
        self.out_channels = out_channels
        self.multiple = 2 ** (spatial_layers // 2)  # the padded grid divides evenly at every stride-2 layer
        self.encoder = SpatialEncoder(in_channels, spatial_channels, spatial_layers, groups)
        self.translator = Translator(
            input_steps * spatial_channels, temporal_channels, temporal_layers, kernels, groups
        )
        self.decoder = SpatialDecoder(spatial_channels, spatial_layers, groups)
        self.head = nn.Conv2d(input_steps * spatial_channels, lead_steps * out_channels, kernel_size=1)
        self.skip = LastFrameSkip(in_channels, out_channels, residual_channels)
        self.output_floor = output_floor(out_channels, nonnegative_channels, height, width, floor_per_cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t_in, _, h, w = x.shape  # x: (B, T_in, C_in, H, W)
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        top, left = pad_h // 2, pad_w // 2
        frames = F.pad(x.flatten(0, 1), (left, pad_w - left, top, pad_h - top))  # (B*T_in, C_in, H_p, W_p)
        latent, first = self.encoder(frames)  # (B*T_in, C_S, H', W'), (B*T_in, C_S, H_p, W_p)
        latent = self.translator(latent.unflatten(0, (b, t_in)).flatten(1, 2))  # (B, T_in*C_S, H', W')
        latent = latent.unflatten(1, (t_in, -1)).flatten(0, 1)  # (B*T_in, C_S, H', W')
        feats = self.decoder(latent, first)  # (B*T_in, C_S, H_p, W_p)
        feats = feats[:, :, top : top + h, left : left + w].unflatten(0, (b, t_in)).flatten(1, 2)  # (B, T_in*C_S, H, W)
        out = self.head(feats).unflatten(1, (self.lead_steps, self.out_channels))  # (B, T_out, C_out, H, W)
        out = out + self.skip(x).unsqueeze(1)  # + last input frame of the targets that are inputs
        return out if self.output_floor is None else self.output_floor(out)
