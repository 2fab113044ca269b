"""The configuration schema shipped with the package (``workflow/schemas/config.schema.yaml``, the
file Snakemake validates with) and the one resolver of its local ``$ref``s. Only PyYAML is imported."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

SCHEMA_FILE = "config.schema.yaml"
DATE_REF = "#/$defs/date"
"""The schema definition every date key uses (a ``YYYY-MM-DD`` string pattern)."""


@functools.cache
def load_schema() -> dict[str, Any]:
    """The configuration schema shipped with the package (the same file Snakemake validates with)."""
    text = resources.files("conv2dlstm.config").joinpath(SCHEMA_FILE).read_text()
    return yaml.safe_load(text)


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
