"""The torch device a step runs on, from the configuration's ``train.device`` (``auto``, ``cpu``, ``cuda``).

One concern: choosing the device. The steps that run a network (train, evaluate, forecast) import
it from here rather than from each other.
"""

from __future__ import annotations

import torch

from conv2dlstm.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
"""The choices of ``train.device``: ``auto`` is CUDA when available, else the CPU."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available; set train.device to auto or cpu")
    if name not in DEVICES:
        raise ConfigError(f"train.device {name!r} is not one of {', '.join(DEVICES)}")
    return torch.device(name)
