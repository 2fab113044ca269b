"""The configuration schema shipped with the package (``workflow/schemas/config.schema.yaml``, the
file Snakemake validates with) and the one resolver of its local ``$ref``s. What the schema derives
from tables of the code is filled in here: ``x-enum: source-kinds`` becomes the ``enum`` of the kinds
of :data:`conv2dlstm.config.sources.SOURCE_KINDS`. Only PyYAML is imported."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

from conv2dlstm.config.sources import SOURCE_KINDS

SCHEMA_FILE = "config.schema.yaml"
DATE_REF = "#/$defs/date"
"""The schema definition every date key uses (a ``YYYY-MM-DD`` string pattern)."""


@functools.cache
def load_schema() -> dict[str, Any]:
    """The configuration schema shipped with the package (the same file Snakemake validates with)."""
    text = resources.files("conv2dlstm.config").joinpath(SCHEMA_FILE).read_text()
    schema = yaml.safe_load(text)
    _derive_enums(schema)
    return schema


DERIVED_ENUMS = {"source-kinds": lambda: list(SOURCE_KINDS)}
"""``x-enum`` names and the choices each stands for."""


def _derive_enums(node: Any) -> None:
    if isinstance(node, dict):
        if "x-enum" in node:
            node["enum"] = DERIVED_ENUMS[node["x-enum"]]()
        for value in node.values():
            _derive_enums(value)
    elif isinstance(node, list):
        for value in node:
            _derive_enums(value)


def resolve(subschema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Merge a local ``$ref`` ("#/$defs/...") with its sibling keywords (siblings win)."""
    ref = subschema.get("$ref")
    if ref is None:
        return subschema
    target: Any = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    merged = dict(resolve(target, root))
    merged.update({k: v for k, v in subschema.items() if k != "$ref"})
    return merged
