"""Networks built, counted and loaded by name: ``x (B, T_in, C_in, H, W)`` to ``y (B, T_out, C_out, H, W)``.

The networks are the modules of :mod:`conv2dlstm.training.networks`, registered in
:data:`conv2dlstm.config.networks.NETWORKS` (one entry per network: its class, its keyword arguments
from its configuration section, its configuration checks). Their shared contract, the skip from the
last input frame and the output floor of targets that cannot be negative, is
:mod:`conv2dlstm.training.networks.common`.

:func:`build_model` builds a network from plain keyword arguments (:func:`model_kwargs_from_config`);
the same ``model_kwargs`` are stored in every checkpoint, so :func:`rebuild_model` and
:func:`load_model` rebuild a model from its file alone. :func:`parameter_counts` counts every
registered network's parameters on torch's ``meta`` device, allocating nothing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from conv2dlstm.artifacts import checkpoint as checkpoint_file
from conv2dlstm.config import networks
from conv2dlstm.errors import ConfigError
from conv2dlstm.training.networks.common import OutputFloor, floor_from_stats

__all__ = [
    "OutputFloor",
    "build_model",
    "count_parameters",
    "floor_from_stats",
    "load_model",
    "model_kwargs_from_config",
    "model_names",
    "network_class",
    "parameter_counts",
    "rebuild_model",
]


def model_names() -> tuple[str, ...]:
    """The registered networks (config key ``model.name``), in registry order."""
    return tuple(networks.NETWORKS)


def network_class(name: str) -> type[nn.Module]:
    """The ``torch.nn.Module`` class of the registered network ``name``."""
    module, _, attr = networks.network(name).module.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"network {name!r} is registered as {module}:{attr}, which is not a torch.nn.Module class")
    return cls


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered network ``name`` from keyword arguments (:func:`model_kwargs_from_config`),
    its 4-D weights channels-last where its entry says so (:attr:`conv2dlstm.config.networks.Network.channels_last`;
    loading weights keeps the layout, moving to a device too)."""
    model = network_class(name)(**kwargs)
    if networks.network(name).channels_last:
        # Module.to(memory_format=...) is documented; torch's type stubs omit the keyword
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def model_kwargs_from_config(
    model_cfg: Mapping[str, Any],
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
    """``build_model`` keyword arguments for the ``model`` config section (its ``name`` and that
    network's section) and the data's shapes (:func:`conv2dlstm.config.networks.model_kwargs`)."""
    name = model_cfg["name"]
    shapes = networks.Shapes(
        input_variables=tuple(input_variables),
        target_variables=tuple(target_variables),
        input_steps=int(input_steps),
        lead_steps=int(lead_steps),
        height=int(height),
        width=int(width),
    )
    section = model_cfg.get(name, {})
    return networks.model_kwargs(name, section, shapes, nonnegative=nonnegative, floor_per_cell=floor_per_cell)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_counts(cfg: Mapping[str, Any]) -> dict[str, int | str]:
    """Per registered network, its trainable parameters for the configuration ``cfg`` (its section of
    ``model``, the variables, windows and grid); built on torch's ``meta`` device, so nothing is
    allocated whatever the grid. A network the configuration refuses (e.g. a ``conv2d_lstm`` above
    its ``max_parameters``) gives the reason instead."""
    out: dict[str, int | str] = {}
    for name in model_names():
        problems = networks.config_problems(cfg, name)
        if problems:
            out[name] = "refused: " + "; ".join(problems)
            continue
        try:
            with torch.device("meta"):
                out[name] = count_parameters(build_model(name, **networks.model_kwargs_of(cfg, name)))
        except ConfigError as exc:
            out[name] = f"refused: {exc}"
    return out


def rebuild_model(ckpt: Mapping[str, Any], *, path: str | os.PathLike = "") -> nn.Module:
    """The network of ``ckpt`` built from the checkpoint alone (its
    :data:`~conv2dlstm.artifacts.checkpoint.MODEL_KEYS`), with its weights, in eval mode on the CPU. ``path`` names
    the file in the :class:`DataError` of a checkpoint whose entries do not build a model of this version."""
    where = path or "(in memory)"
    name, kwargs = ckpt["model_name"], ckpt["model_kwargs"]
    if name not in networks.NETWORKS:
        raise checkpoint_file.error(where, f"names the model {name!r}, which is not one of {list(model_names())}")
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
