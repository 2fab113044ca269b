"""The typed view of the configuration (``conv2dlstm.config.settings``) against the schema, and every enum of
the schema against the code that acts on it."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from conv2dlstm.config import settings
from conv2dlstm.config.schema import load_schema
from conv2dlstm.config.validate import load_config, validate_config
from conv2dlstm.data import fetching, harmonize, regridding
from conv2dlstm.steps import synthetic
from conv2dlstm.training import dataset as data
from conv2dlstm.training import devices, loop, models

REPO = Path(__file__).resolve().parents[2]

CODE_CHOICES: dict[str, tuple[str, ...]] = {
    "synthetic.kind": synthetic.KINDS,
    "source.kind": fetching.SOURCE_KINDS,
    "harmonize.lon_convention": harmonize.LON_CONVENTIONS,
    "harmonize.duplicates": harmonize.DUPLICATE_POLICIES,
    "grid.method": regridding.METHODS,
    "model.name": models.MODEL_NAMES,
    "train.lr_schedule": loop.LR_SCHEDULES,
    "train.device": devices.DEVICES,
    "train.data_on_device": data.DATA_ON_DEVICE,
}
"""Per enum key of the schema, the tuple of choices the code dispatches on."""


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _unwrap(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(hint) in (typing.Union, __import__("types").UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        assert len(args) == 1, hint
        return args[0]
    return hint


def walk(node: dict[str, Any], hint: Any, path: str, root: dict[str, Any]) -> Iterator[tuple[str, dict, Any]]:
    """(dotted key, schema node, type hint) for every key below ``node``, paired through the dataclasses."""
    node = _resolve(node, root)
    yield path, node, hint
    hint = _unwrap(hint)
    props = node.get("properties")
    if props is None:
        return
    if dataclasses.is_dataclass(hint):
        hints = get_type_hints(hint)
        for key, sub in props.items():
            child = f"{path}.{key}" if path else key
            assert key in hints, f"schema key {child} has no field in settings.{hint.__name__}"
            yield from walk(sub, hints[key], child, root)
    else:
        assert get_origin(hint) in (Mapping, dict), f"{path}: schema object with properties, but hint {hint}"
        _, item = get_args(hint)
        for key, sub in props.items():
            yield from walk(sub, item, f"{path}.{key}", root)


SCHEMA = load_schema()
NODES = list(walk(SCHEMA, settings.Settings, "", SCHEMA))
ENUMS = {path: node["enum"] for path, node, _ in NODES if "enum" in node}


def test_every_schema_object_has_exactly_the_dataclass_fields() -> None:
    for path, node, hint in NODES:
        hint = _unwrap(hint)
        if "properties" in node and dataclasses.is_dataclass(hint):
            fields = {f.name for f in dataclasses.fields(hint)}
            assert fields == set(node["properties"]), (path or "<root>", hint.__name__)


def _allows_null(node: dict[str, Any]) -> bool:
    node = _resolve(node, SCHEMA)
    types = node.get("type")
    if types == "null" or (isinstance(types, list) and "null" in types):
        return True
    return any(_allows_null(branch) for key in ("oneOf", "anyOf") for branch in node.get(key, []))


def _optional(hint: Any) -> bool:
    return get_origin(hint) in (typing.Union, __import__("types").UnionType) and type(None) in get_args(hint)


def test_a_field_is_optional_exactly_where_the_schema_allows_null() -> None:
    """A validated config may hold None only where the schema allows null, and the view must take it."""
    wrong = [
        f"{path}: schema allows null {_allows_null(node)}, hint {hint}"
        for path, node, hint in NODES
        if path and _allows_null(node) != _optional(hint)
    ]
    assert not wrong, wrong


def test_the_schema_has_enums() -> None:
    assert {"model.name", "train.lr_schedule", "source.kind", "grid.method"} <= set(ENUMS)


@pytest.mark.parametrize("path", sorted(ENUMS))
def test_every_enum_is_a_literal_with_the_same_choices(path: str) -> None:
    hint = dict((p, h) for p, _, h in NODES)[path]
    assert get_origin(hint) is Literal, f"{path}: {hint} is not a Literal"
    assert list(get_args(hint)) == ENUMS[path], path


@pytest.mark.parametrize("path", sorted(ENUMS))
def test_every_enum_equals_the_codes_list(path: str) -> None:
    """Each schema enum is listed in CODE_CHOICES (a new enum must be), with the code's tuple equal to it."""
    assert path in CODE_CHOICES, f"schema enum {path} has no entry in CODE_CHOICES: add the code's tuple of choices"
    assert list(CODE_CHOICES[path]) == ENUMS[path], path


def test_code_choices_name_only_schema_enums() -> None:
    assert set(CODE_CHOICES) <= set(ENUMS)


@pytest.mark.parametrize(
    "config", ["config/config.yaml", "config/seed_no3.yaml", "config/sweep.yaml", "tests/configs/tiny.yaml"]
)
def test_shipped_configs_round_trip(config: str) -> None:
    """The view holds every value of a validated config, typed: as plain data it equals the dict."""
    cfg = load_config(REPO / config)
    view = settings.Settings.from_config(cfg)

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    assert plain(view) == plain(cfg)
    assert view.train.epochs == cfg["train"]["epochs"] and isinstance(view.grid.lat.step, float)
    assert view.splits.train.start == cfg["splits"]["train"]["start"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.train.epochs = 1  # type: ignore[misc]


def test_an_unvalidated_dict_is_refused_with_the_key() -> None:
    cfg = validate_config({})
    cfg["train"]["learning_rte"] = 0.1
    with pytest.raises(TypeError, match=r"config\.train: unknown key\(s\) \['learning_rte'\]"):
        settings.Settings.from_config(cfg)
    bad = validate_config({})
    bad["grid"]["method"] = "bilinear"
    with pytest.raises(ValueError, match="grid.method: 'bilinear' is not one of"):
        settings.Settings.from_config(bad)


def test_choices_lists_a_literal() -> None:
    assert settings.choices(settings.LrSchedule) == ("cosine", "plateau", "constant")
    assert all(type(c) is str for c in settings.choices(settings.Device))  # plain strings, as YAML gives them
