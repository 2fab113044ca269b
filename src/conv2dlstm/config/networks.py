"""The registry of networks: one :class:`Network` entry per network, everything the rest of the code asks of one.

A network is a module of :mod:`conv2dlstm.training.networks` (its ``torch.nn.Module``), its section
``$defs.<name>`` of the configuration schema (its keys, defaults and descriptions), and its entry in
:data:`NETWORKS` here:

- ``module``: where its class lives, ``"package.module:Class"``; the training code imports it only
  when it builds the network, so this module stays torch-free (the Snakefile imports it through
  :mod:`conv2dlstm.config.validate`);
- ``kwargs``: its architecture's keyword arguments from its configuration section (``model.<name>``);
  the shapes of the data, the skip from the last input frame and the output floor are added the same
  way for every network (:func:`model_kwargs`, the contract of
  :mod:`conv2dlstm.training.networks.common`);
- ``problems``: the checks its configuration must pass against the grid and the windows, as
  ``(config key, message)`` pairs; the configuration checks run them before any job
  (:func:`config_problems`);
- ``labels``: short sweep labels of its keys (:data:`conv2dlstm.config.sweep.LABELS`);
- ``small``: a small configuration section, for tests and the tiny configuration of the suite;
- ``channels_last``: whether :func:`conv2dlstm.training.models.build_model` lays its 4-D weights out
  channels-last (NHWC), so that its convolutions run on channels-last activations: oneDNN's
  convolutions then need no reordering on every call. Set where it measured faster on the CPU
  (``bench/memory_format.py``, docs/performance.md): the same numbers to rounding.

What else lists networks derives from :data:`NETWORKS`: the schema's ``model.name`` enum and the
``model`` section's properties (:mod:`conv2dlstm.config.schema`; a registered network without its
``$defs`` section is an error naming it), the sweep labels, ``python -m conv2dlstm models``, the
benchmarks and every test of the network contract (``tests/unit/test_networks.py``). Adding a network
is: its module, its schema section, its entry here.

Only the standard library is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conv2dlstm.config.modelsize import (
    conv2d_lstm_grid_problem,
    conv2d_lstm_parameter_count,
    conv2d_lstm_size_problem,
    grid_shape,
)
from conv2dlstm.errors import ConfigError


@dataclass(frozen=True)
class Shapes:
    """The data's shapes a network is built for: variables, window lengths, grid cells."""

    input_variables: tuple[str, ...]
    target_variables: tuple[str, ...]
    input_steps: int
    lead_steps: int
    height: int
    width: int

    def kwargs(self) -> dict[str, int]:
        """The keyword arguments every network takes for the shapes."""
        return {
            "in_channels": len(self.input_variables),
            "out_channels": len(self.target_variables),
            "input_steps": int(self.input_steps),
            "lead_steps": int(self.lead_steps),
            "height": int(self.height),
            "width": int(self.width),
        }


Problems = Callable[[Mapping[str, Any], Shapes], list[tuple[str, str]]]


def _no_problems(section: Mapping[str, Any], shapes: Shapes) -> list[tuple[str, str]]:
    return []


@dataclass(frozen=True)
class Network:
    """One registered network (module docstring)."""

    name: str
    module: str
    summary: str
    kwargs: Callable[[Mapping[str, Any]], dict[str, Any]]
    problems: Problems = _no_problems
    labels: Mapping[str, str] = field(default_factory=dict)
    small: Mapping[str, Any] = field(default_factory=dict)
    channels_last: bool = False


def shapes_of(cfg: Mapping[str, Any]) -> Shapes:
    """The :class:`Shapes` of a validated configuration (its variables, windows and grid)."""
    height, width = grid_shape(cfg["grid"])
    return Shapes(
        input_variables=tuple(cfg["variables"]["inputs"]),
        target_variables=tuple(cfg["variables"]["targets"]),
        input_steps=int(cfg["windows"]["input_steps"]),
        lead_steps=int(cfg["windows"]["lead_steps"]),
        height=height,
        width=width,
    )


def residual_channels_for(input_variables: Sequence[str], target_variables: Sequence[str]) -> list[int | None] | None:
    """Input-channel index of each target variable (None where it is not an input); None if no overlap."""
    index = [list(input_variables).index(v) if v in input_variables else None for v in target_variables]
    return index if any(i is not None for i in index) else None


def nonnegative_channels(target_variables: Sequence[str], nonnegative: Sequence[str]) -> list[int]:
    """Indices of the target variables named in ``nonnegative`` (config ``variables.nonnegative``)."""
    names = set(nonnegative)
    return [i for i, v in enumerate(target_variables) if v in names]


# ----------------------------------------------------------------------------------------------
# The entries
# ----------------------------------------------------------------------------------------------


def _odd_kernel(name: str, key: str = "kernel_size") -> Problems:
    def problems(section: Mapping[str, Any], shapes: Shapes) -> list[tuple[str, str]]:
        kernel = int(section[key])
        if kernel % 2 == 1:
            return []
        return [
            (
                f"model.{name}.{key}",
                f"{kernel} must be odd ('same' padding keeps the grid size only for odd kernels); use 3 or 5",
            )
        ]

    return problems


def conv2d_lstm_parameters(section: Mapping[str, Any], shapes: Shapes) -> int:
    """Parameters of the ``conv2d_lstm`` network of ``section`` on ``shapes``, by arithmetic."""
    return conv2d_lstm_parameter_count(
        in_channels=len(shapes.input_variables),
        out_channels=len(shapes.target_variables),
        lead_steps=shapes.lead_steps,
        height=shapes.height,
        width=shapes.width,
        filters=[int(f) for f in section["filters"]],
        kernel_size=int(section["kernel_size"]),
        lstm_units=int(section["lstm_units"]),
        dense_units=int(section["dense_units"]),
    )


def _conv2d_lstm_problems(section: Mapping[str, Any], shapes: Shapes) -> list[tuple[str, str]]:
    problem = conv2d_lstm_grid_problem(shapes.height, shapes.width, section["filters"], int(section["kernel_size"]))
    if problem:
        return [("model.conv2d_lstm", problem)]
    n_params = conv2d_lstm_parameters(section, shapes)
    problem = conv2d_lstm_size_problem(n_params, shapes.height, shapes.width, int(section["max_parameters"]))
    return [("model.conv2d_lstm.max_parameters", problem)] if problem else []


def _simvp_problems(section: Mapping[str, Any], shapes: Shapes) -> list[tuple[str, str]]:
    bad = [int(k) for k in section["inception_kernels"] if int(k) % 2 != 1]
    if not bad:
        return []
    return [("model.simvp.inception_kernels", f"{bad} must be odd ('same' padding); e.g. [3, 5, 7, 11]")]


NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network(
            name="convlstm",
            module="conv2dlstm.training.networks.convlstm:ConvLSTM",
            summary="ConvLSTM encoder-forecaster (Shi et al. 2015)",
            kwargs=lambda s: {
                "hidden_channels": [int(c) for c in s["hidden_channels"]],
                "kernel_size": s["kernel_size"],
            },
            problems=_odd_kernel("convlstm"),
            labels={"hidden_channels": "hc", "kernel_size": "k"},
            small={"hidden_channels": [4], "kernel_size": 3},
        ),
        Network(
            name="conv2d_lstm",
            module="conv2dlstm.training.networks.conv2d_lstm:Conv2dLSTM",
            summary="the notebook's network: per-frame Conv2D + MaxPool, LSTM, dense map head",
            kwargs=lambda s: {
                "filters": [int(f) for f in s["filters"]],
                "kernel_size": s["kernel_size"],
                "lstm_units": s["lstm_units"],
                "dense_units": s["dense_units"],
                "max_parameters": s["max_parameters"],
            },
            problems=_conv2d_lstm_problems,
            labels={"filters": "f", "kernel_size": "ck", "lstm_units": "lstm", "dense_units": "dense"},
            small={"filters": [4], "kernel_size": 3, "lstm_units": 8, "dense_units": 8, "max_parameters": 20_000_000},
            channels_last=True,
        ),
        Network(
            name="unet",
            module="conv2dlstm.training.networks.unet:UNet",
            summary="U-Net over the input days stacked as channels (Ronneberger et al. 2015)",
            kwargs=lambda s: {"features": [int(f) for f in s["features"]], "kernel_size": s["kernel_size"]},
            problems=_odd_kernel("unet"),
            labels={"features": "uf", "kernel_size": "uk"},
            small={"features": [4, 8], "kernel_size": 3},
            channels_last=True,
        ),
        Network(
            name="simvp",
            module="conv2dlstm.training.networks.simvp:SimVP",
            summary="SimVP: spatial encoder, Inception translator, decoder (Gao et al. 2022)",
            kwargs=lambda s: {
                "spatial_channels": s["spatial_channels"],
                "temporal_channels": s["temporal_channels"],
                "spatial_layers": s["spatial_layers"],
                "temporal_layers": s["temporal_layers"],
                "inception_kernels": [int(k) for k in s["inception_kernels"]],
                "groups": s["groups"],
            },
            problems=_simvp_problems,
            labels={"spatial_channels": "hs", "temporal_channels": "ht"},
            small={
                "spatial_channels": 4,
                "temporal_channels": 8,
                "spatial_layers": 2,
                "temporal_layers": 2,
                "inception_kernels": [3, 5],
                "groups": 2,
            },
            channels_last=True,
        ),
    )
}
"""Every network, by config name ``model.name`` (module docstring)."""


def network(name: str) -> Network:
    """The registered network ``name``; a :class:`ConfigError` listing the registered ones otherwise."""
    if name not in NETWORKS:
        raise ConfigError(f"model.name {name!r} is not one of the registered networks {list(NETWORKS)}")
    return NETWORKS[name]


def model_kwargs(
    name: str,
    section: Mapping[str, Any],
    shapes: Shapes,
    *,
    nonnegative: Sequence[str] = (),
    floor_per_cell: bool = False,
) -> dict[str, Any]:
    """The keyword arguments that build network ``name`` for its configuration ``section`` and ``shapes``.

    Every network gets the shapes (:meth:`Shapes.kwargs`), its architecture's arguments, the skip
    from the last input frame for target variables that are also inputs (``residual_channels``) and,
    when a target is named in ``nonnegative`` (config ``variables.nonnegative``), the output floor's
    ``nonnegative_channels`` and ``floor_per_cell`` (per-pixel statistics)."""
    kwargs: dict[str, Any] = shapes.kwargs() | network(name).kwargs(section)
    kwargs["residual_channels"] = residual_channels_for(shapes.input_variables, shapes.target_variables)
    floored = nonnegative_channels(shapes.target_variables, nonnegative)
    if floored:
        kwargs |= {"nonnegative_channels": floored, "floor_per_cell": bool(floor_per_cell)}
    return kwargs


def model_kwargs_of(cfg: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """:func:`model_kwargs` of a validated configuration's network ``name`` (default ``model.name``)."""
    name = name or cfg["model"]["name"]
    return model_kwargs(
        name,
        cfg["model"][name],
        shapes_of(cfg),
        nonnegative=cfg["variables"]["nonnegative"],
        floor_per_cell=bool(cfg["normalize"]["per_pixel"]),
    )


def config_problems(cfg: Mapping[str, Any], name: str | None = None) -> list[str]:
    """What refuses network ``name`` (default ``model.name``) of a validated configuration, one message
    per problem, each starting with the config key to change."""
    name = name or cfg["model"]["name"]
    found = network(name).problems(cfg["model"][name], shapes_of(cfg))
    return [f"config key {key}: {message}" for key, message in found]
