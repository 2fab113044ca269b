"""Sweeps in two lines: a grid of ``model`` / ``train`` values expanded into ``runs`` entries.

A configuration may give, beside (or instead of) explicit ``runs``,

.. code-block:: yaml

    sweep:
      train.learning_rate: [0.001, 0.003]
      model.name: [convlstm, conv2d_lstm]

:func:`sweep_runs` expands it into the Cartesian product of the values, in the order written, one
``runs`` entry per point: ``{"name": "lr0.001-convlstm", "train": {"learning_rate": 0.001},
"model": {"name": "convlstm"}}``. :func:`conv2dlstm.config.validate.validate_config` appends these entries
to the explicit ``runs`` and empties ``sweep``, so every step downstream sees plain ``runs``
entries, validated like any other run.

Run names (:func:`point_name`) are built from the values alone and are deterministic: one part per
key joined by ``-``; a part is the key's short label (:data:`LABELS`, else its last component)
followed by the value, or the value alone for keys with a fixed set of values (``model.name``,
``train.lr_schedule``, ...). Lists join with ``x`` (``hc16x16``), booleans give ``<label>`` or
``no<label>``; characters outside ``[A-Za-z0-9_.-]`` (a Snakemake wildcard's) become ``_``. When two
points would get the same name, every part uses the full dotted key instead of the label.

Keys must be leaf keys of the ``model`` or ``train`` sections of the schema (the runs share the data
steps); each value is checked against the key's schema. Every error is a
:class:`~conv2dlstm.errors.ConfigError` naming the key and the value.

:func:`conv2dlstm.config.keys.sweep_tags` gives the MLflow tags that group the runs of one sweep (``sweep``, a digest of
everything that determines the sweep's results, and ``sweep.runs``, the run names).

Only jsonschema and PyYAML are imported (through :mod:`conv2dlstm.config.validate`), like the Snakefile needs.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import jsonschema

from conv2dlstm.config.networks import NETWORKS
from conv2dlstm.config.schema import load_schema, resolve
from conv2dlstm.errors import ConfigError

SECTIONS = ("model", "train")
"""Top-level sections a sweep may vary: what a ``runs`` entry may override."""
LABELS: dict[str, str] = {
    "train.learning_rate": "lr",
    "train.batch_size": "bs",
    "train.weight_decay": "wd",
    "train.epochs": "ep",
    "train.grad_clip": "clip",
    "train.patience": "pat",
    "train.seed": "seed",
    "train.max_batches_per_epoch": "mb",
} | {f"model.{n.name}.{key}": label for n in NETWORKS.values() for key, label in n.labels.items()}
"""Short labels of the keys swept most often (each network's from its registry entry,
:data:`conv2dlstm.config.networks.NETWORKS`); other keys are labelled by their last component."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
"""What a run name may hold (the schema's pattern for ``runs[].name``, a Snakemake wildcard)."""


def leaf_schema(dotted: str) -> dict[str, Any] | None:
    """The resolved schema of the leaf key ``a.b.c`` (one carrying ``x-steps``), or None when the
    key is not in the schema or is a section rather than a leaf."""
    root = load_schema()
    sub: dict[str, Any] = root
    for part in dotted.split("."):
        props = resolve(sub, root).get("properties", {})
        if part not in props:
            return None
        sub = props[part]
    resolved = resolve(sub, root)
    return resolved if "x-steps" in resolved else None


def _section_keys(section: str) -> list[str]:
    """Every leaf key (dotted) of a top-level section, in schema order."""
    root = load_schema()
    out: list[str] = []

    def walk(sub: dict[str, Any], prefix: str) -> None:
        for key, prop in resolve(sub, root).get("properties", {}).items():
            resolved = resolve(prop, root)
            if "x-steps" in resolved:
                out.append(prefix + key)
            else:
                walk(resolved, f"{prefix}{key}.")

    walk(root["properties"][section], f"{section}.")
    return out


def check_key(key: str) -> dict[str, Any]:
    """The schema of the sweep key ``key``; :class:`ConfigError` naming it unless it is a leaf key
    of ``model`` or ``train``."""
    section = key.split(".", 1)[0]
    if section not in SECTIONS:
        raise ConfigError(
            f"config key sweep: {key!r} is not a model or train key; a sweep varies only model.* and "
            "train.* keys (all its runs share the data steps): use another configuration file for "
            "other data"
        )
    schema = leaf_schema(key)
    if schema is None:
        keys = _section_keys(section)
        under = [k for k in keys if k.startswith(key + ".")]
        if under:
            raise ConfigError(
                f"config key sweep: {key!r} is a section, not a key; sweep one of its keys: {', '.join(under)}"
            )
        raise ConfigError(
            f"config key sweep: unknown key {key!r} (check the spelling); the {section} keys are {', '.join(keys)}"
        )
    return schema


def check_values(key: str, values: list[Any], schema: dict[str, Any]) -> None:
    """Each value is valid for ``key`` (its schema) and appears once; :class:`ConfigError` otherwise."""
    validator = jsonschema.Draft202012Validator({**schema, "$defs": load_schema().get("$defs", {})})
    for value in values:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            raise ConfigError(f"config key sweep.{key}: value {value!r} is not valid for {key}: {error.message}")
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise ConfigError(f"config key sweep.{key}: value {value!r} is listed twice; list each value once")
        seen.append(value)


def _value_text(value: Any) -> str:
    """A value as it appears in a run name (before replacing characters a name may not hold)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "x".join(_value_text(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def _part(key: str, value: Any, schema: dict[str, Any], *, full: bool) -> str:
    """One key's part of a run name (see the module docstring)."""
    label = key if full else LABELS.get(key, key.rsplit(".", 1)[-1])
    if isinstance(value, bool):
        text = label if value else f"no{label}"
    elif "enum" in schema and not full:
        text = _value_text(value)
    else:
        text = f"{label}{_value_text(value)}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def point_name(point: dict[str, Any], schemas: dict[str, dict[str, Any]], *, full: bool = False) -> str:
    """The run name of one grid point ``{dotted key: value}`` (keys in sweep order)."""
    return "-".join(_part(k, v, schemas[k], full=full) for k, v in point.items())


def _set(entry: dict[str, Any], dotted: str, value: Any) -> None:
    node = entry
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def sweep_runs(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The ``runs`` entries of the grid ``sweep`` (dotted key -> values): its Cartesian product in
    the order written, each named by :func:`point_name`. Empty for an empty grid."""
    if not sweep:
        return []
    schemas = {}
    for key, values in sweep.items():
        schemas[key] = check_key(key)
        check_values(key, values, schemas[key])
    points = [dict(zip(sweep, combo, strict=True)) for combo in itertools.product(*sweep.values())]
    names = [point_name(p, schemas) for p in points]
    if len(set(names)) < len(names):
        names = [point_name(p, schemas, full=True) for p in points]
    if len(set(names)) < len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"config key sweep: the points {dupes} would share a run name; give values that "
            "differ as text, or list those runs in `runs` with names of your own"
        )
    runs = []
    for name, point in zip(names, points, strict=True):
        if not NAME_PATTERN.match(name):  # pragma: no cover - _part keeps only allowed characters
            raise ConfigError(f"config key sweep: run name {name!r} is not a valid Snakemake wildcard")
        entry: dict[str, Any] = {"name": name}
        for key, value in point.items():
            _set(entry, key, value)
        runs.append(entry)
    return runs
