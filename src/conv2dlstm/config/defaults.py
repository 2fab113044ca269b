"""``config/config.yaml``, generated from the schema: every key with its default, its description as
a comment above it. The schema is the one place a key is defined; ``python -m conv2dlstm
config-defaults --write config/config.yaml`` (``make config``) writes the file and ``--check`` fails
when it differs from what the schema gives (a test runs the check). Only PyYAML is imported.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import yaml

from conv2dlstm.config.schema import load_schema, resolve, safe_load

WIDTH = 100
"""Width of the comment lines."""


def _scalar(value: Any) -> str:
    """``value`` in YAML flow style: strings quoted only where plain YAML would read something else."""
    if isinstance(value, str):
        plain = value and value.strip() == value and not value.startswith(("{", "[", "*", "&", "!", "%", "@", "`"))
        if plain and ": " not in value and " #" not in value:
            try:
                if safe_load(value) == value:
                    return value
            except yaml.YAMLError:
                pass
        return json.dumps(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no YAML form for {value!r}")


def _comment(text: str, indent: str) -> list[str]:
    words = " ".join(str(text).split())
    return [
        f"{indent}# {line}"
        for line in textwrap.wrap(words, WIDTH - len(indent) - 2, break_on_hyphens=False, break_long_words=False)
    ]


def _is_section(prop: dict[str, Any]) -> bool:
    """A mapping of keys (rendered key by key), not a leaf whose whole value is one setting."""
    return prop.get("type") == "object" and "properties" in prop and "x-steps" not in prop


def _lines(schema: dict[str, Any], root: dict[str, Any], default: dict[str, Any], indent: str) -> Iterator[str]:
    for key, raw in schema.get("properties", {}).items():
        prop = resolve(raw, root)
        if "description" in prop:
            yield from _comment(prop["description"], indent)
        value = default[key]
        if _is_section(prop):
            yield f"{indent}{key}:"
            yield from _lines(prop, root, value, indent + "  ")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            yield f"{indent}{key}:"  # a mapping of mappings (harmonize.units): one entry a line
            yield from (f"{indent}  {k}: {_scalar(v)}" for k, v in value.items())
        else:
            yield f"{indent}{key}: {_scalar(value)}"
        if not indent:
            yield ""


def render() -> str:
    """The text of ``config/config.yaml``: the schema's ``x-header``, then every key's description and
    default, section by section, in the schema's order."""
    from conv2dlstm.config.validate import validate_config

    schema = load_schema()
    defaults = validate_config({})
    header = [
        line for paragraph in schema["x-header"].strip().split("\n\n") for line in [*_comment(paragraph, ""), "#"]
    ]
    body = list(_lines(schema, schema, defaults, ""))
    return "\n".join([*header[:-1], "", *body]).rstrip("\n") + "\n"


def check(text: str, *, path: str = "config/config.yaml") -> None:
    """:class:`ConfigError` naming the first line where ``text`` differs from :func:`render`."""
    from conv2dlstm.errors import ConfigError
    from conv2dlstm.textdiff import first_difference

    found = first_difference(text, render())
    if found is not None:
        n, a, b = found
        raise ConfigError(
            f"{path} differs from the schema's defaults and descriptions at line {n}:\n  {path}: {a}\n"
            f"  schema: {b}\nit is generated: change workflow/schemas/config.schema.yaml, then "
            f"`python -m conv2dlstm config-defaults --write {path}` (make config)"
        )
