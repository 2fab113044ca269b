"""Runs of a configuration and its flat forms: run names, a run's overrides merged over ``model`` and
``train``, flat ``a.b.c`` keys (MLflow params) and digests. The standard library only."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from typing import Any


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_run(cfg: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with the ``runs`` entry's ``model`` and ``train`` overrides merged in and
    ``runs`` emptied: the configuration of that run, before validation."""
    out = copy.deepcopy(cfg)
    out["model"] = deep_merge(cfg["model"], entry.get("model") or {})
    out["train"] = deep_merge(cfg["train"], entry.get("train") or {})
    out["runs"] = []
    return out


def run_names(cfg: dict[str, Any]) -> list[str]:
    """Names of the configured runs (one run named after ``model.name`` when ``runs`` is empty)."""
    return [r["name"] for r in cfg["runs"]] or [cfg["model"]["name"]]


def flat_items(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": leaf}`` in sorted key order (an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for key in sorted(mapping):
        value = mapping[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_items(value, name + "."))
        else:
            out[name] = value
    return out


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flat ``a.b.c -> value`` strings with stable keys (MLflow params line up across runs)."""
    return {
        name: json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)
        for name, value in flat_items(cfg, prefix).items()
    }


def config_digest(cfg: dict[str, Any]) -> str:
    """Short SHA-256 of the canonical JSON form of a (section of a) config."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
