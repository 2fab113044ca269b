"""Configuration: one JSON schema (``workflow/schemas/config.schema.yaml``) with a default for every key.

:func:`validate_config` fills defaults, validates types and ranges against the schema, then checks
what a schema cannot express (chronological splits, grid in the longitude convention, unique run
names). Every error is a :class:`~conv2dlstm.errors.ConfigError` naming the key, the bad value and
the fix. Snakemake validates once (``workflow/rules/common.smk``); each CLI step validates the
sections it receives again, so the package is usable without Snakemake. Only jsonschema and PyYAML
are imported (both Snakemake dependencies), so the Snakefile can use this module directly.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from conv2dlstm.errors import ConfigError

SCHEMA_FILE = "config.schema.yaml"


@functools.cache
def load_schema() -> dict[str, Any]:
    """The configuration schema shipped with the package (the same file Snakemake validates with)."""
    text = resources.files("conv2dlstm").joinpath(SCHEMA_FILE).read_text()
    return yaml.safe_load(text)


def _resolve(subschema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Merge a local ``$ref`` ("#/$defs/...") with its sibling keywords (siblings win)."""
    ref = subschema.get("$ref")
    if ref is None:
        return subschema
    target: Any = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    merged = dict(_resolve(target, root))
    merged.update({k: v for k, v in subschema.items() if k != "$ref"})
    return merged


def _fill_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    schema = _resolve(schema, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            resolved = _resolve(sub, root)
            if key not in instance and "default" in resolved:
                instance[key] = copy.deepcopy(resolved["default"])
            if key in instance:
                _fill_defaults(instance[key], resolved, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"], root)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _format_error(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return (
            f"config key {where}: unknown key(s) {', '.join(map(repr, extra))}; "
            f"allowed keys are {', '.join(allowed)} (check the spelling)"
        )
    if error.validator == "enum":
        return f"config key {where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "pattern" and error.validator_value.startswith("^[0-9]{4}"):
        return f"config key {where}: {error.instance!r} is not a date; write it as YYYY-MM-DD"
    return f"config key {where}: {error.message}"


def _check_semantics(cfg: dict[str, Any], given: set[str]) -> None:
    """Checks across keys. ``given`` are the top-level sections the caller supplied: a check that
    involves a section filled in from defaults only is skipped (a rule passes only the sections its
    step reads: the fetch rule passes harmonize but not grid, and the default grid must not be
    checked against a given 0..360 convention)."""
    periods = {}
    for split in ("train", "val", "test"):
        p = cfg["splits"][split]
        start, end = dt.date.fromisoformat(p["start"]), dt.date.fromisoformat(p["end"])
        if end < start:
            raise ConfigError(
                f"config key splits.{split}: end {p['end']} is before start {p['start']}; swap them"
            )
        periods[split] = (start, end)
    for a, b in (("train", "val"), ("val", "test")):
        if periods[b][0] <= periods[a][1]:
            raise ConfigError(
                f"config key splits.{b}.start: {cfg['splits'][b]['start']} is not after "
                f"splits.{a}.end {cfg['splits'][a]['end']}; splits must be chronological and must "
                "not overlap (overlap leaks the future into training)"
            )
    for axis in ("lat", "lon"):
        ax = cfg["grid"][axis]
        if ax["stop"] < ax["start"]:
            raise ConfigError(f"config key grid.{axis}: stop {ax['stop']} is below start {ax['start']}")
    lon = cfg["grid"]["lon"]
    convention = cfg["harmonize"]["lon_convention"]
    lo, hi = (-180.0, 180.0) if convention == "-180..180" else (0.0, 360.0)
    if "grid" in given and (lon["start"] < lo or lon["stop"] > hi):
        raise ConfigError(
            f"config key grid.lon: {lon['start']}..{lon['stop']} is outside {convention}, the "
            "convention set by harmonize.lon_convention; change one of the two"
        )
    for rng_key in ("lat", "lon"):
        rng = cfg["region"][rng_key]
        if rng is not None and rng[1] < rng[0]:
            raise ConfigError(f"config key region.{rng_key}: {rng} must be [min, max]")
    names = [r["name"] for r in cfg["runs"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config key runs: run name(s) {dupes} appear more than once; names must be unique")


def validate_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Return a validated copy of ``cfg`` with every default filled in.

    Raises :class:`ConfigError` naming the first bad key.
    """
    schema = load_schema()
    cfg = copy.deepcopy(cfg) if cfg else {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(cfg).__name__}")
    given = set(cfg)
    _fill_defaults(cfg, schema, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), _key_path(e)))
    if errors:
        raise ConfigError(_format_error(errors[0]))
    _check_semantics(cfg, given)
    return cfg


def load_config(path: str | Path | None = None, *, json_text: str | None = None) -> dict[str, Any]:
    """Load a YAML file (or a JSON string, as the Snakemake rules pass it) and validate it."""
    if path is not None and json_text is not None:
        raise ConfigError("give either a config file or a JSON config string, not both")
    if json_text is not None:
        try:
            raw = json.loads(json_text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from exc
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    else:
        raw = {}
    return validate_config(raw)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def run_names(cfg: dict[str, Any]) -> list[str]:
    """Names of the configured runs (one run named after ``model.name`` when ``runs`` is empty)."""
    return [r["name"] for r in cfg["runs"]] or [cfg["model"]["name"]]


def run_config(cfg: dict[str, Any], run: str) -> dict[str, Any]:
    """The configuration of one run: ``model`` and ``train`` with that run's overrides, validated."""
    if not cfg["runs"]:
        if run != cfg["model"]["name"]:
            raise ConfigError(f"run {run!r} is not configured; the only run is {cfg['model']['name']!r}")
        out = copy.deepcopy(cfg)
    else:
        entry = next((r for r in cfg["runs"] if r["name"] == run), None)
        if entry is None:
            raise ConfigError(f"run {run!r} is not configured; runs are {run_names(cfg)}")
        out = copy.deepcopy(cfg)
        out["model"] = _deep_merge(cfg["model"], entry.get("model", {}))
        out["train"] = _deep_merge(cfg["train"], entry.get("train", {}))
    out["runs"] = []
    try:
        return validate_config(out)
    except ConfigError as exc:
        raise ConfigError(f"run {run!r}: {exc}") from exc


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flat ``a.b.c -> value`` strings with stable keys (MLflow params line up across runs)."""
    out: dict[str, str] = {}
    for key in sorted(cfg):
        value = cfg[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)
    return out


def config_digest(cfg: dict[str, Any]) -> str:
    """Short SHA-256 of the canonical JSON form of a (section of a) config."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
