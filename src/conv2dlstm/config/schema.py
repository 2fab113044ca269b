"""The configuration schema shipped with the package (``workflow/schemas/config.schema.yaml``, the
file Snakemake validates with) and the one resolver of its local ``$ref``s. What the schema derives
from tables of the code is filled in here: ``x-enum: source-kinds`` becomes the ``enum`` of the kinds
of :data:`conv2dlstm.config.sources.SOURCE_KINDS`, ``x-enum: networks`` the registered networks
(:data:`conv2dlstm.config.networks.NETWORKS`), and ``x-network-sections`` (the ``model`` section) gets
one property per registered network, its ``$defs`` section. Only PyYAML is imported."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

from conv2dlstm.config.networks import NETWORKS
from conv2dlstm.config.sources import SOURCE_KINDS
from conv2dlstm.errors import ConfigError

SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""PyYAML's safe loader, its C version where PyYAML has libyaml (its wheels do): the same documents,
about six times faster on the schema, which every step and every Snakemake run loads."""


def safe_load(text: str) -> Any:
    """``yaml.safe_load(text)`` through :data:`SAFE_LOADER`."""
    return yaml.load(text, Loader=SAFE_LOADER)


SCHEMA_FILE = "config.schema.yaml"
DATE_REF = "#/$defs/date"
"""The schema definition every date key uses (a ``YYYY-MM-DD`` string pattern)."""


@functools.cache
def load_schema() -> dict[str, Any]:
    """The configuration schema shipped with the package (the same file Snakemake validates with)."""
    text = resources.files("conv2dlstm.config").joinpath(SCHEMA_FILE).read_text()
    schema = safe_load(text)
    _derive_enums(schema)
    return schema


DERIVED_ENUMS = {"source-kinds": lambda: list(SOURCE_KINDS), "networks": lambda: list(NETWORKS)}
"""``x-enum`` names and the choices each stands for."""


def network_sections(schema: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` section's property of every registered network: a ``$ref`` to its ``$defs``
    section; a :class:`ConfigError` names a registered network the schema has no section for."""
    missing = [name for name in NETWORKS if name not in schema.get("$defs", {})]
    if missing:
        raise ConfigError(
            f"the networks {missing} are registered (conv2dlstm.config.networks.NETWORKS) but the configuration "
            f"schema has no $defs section for them: add $defs.<name> to {SCHEMA_FILE} (its keys, defaults, "
            "descriptions and x-steps)"
        )
    return {name: {"$ref": f"#/$defs/{name}"} for name in NETWORKS}


def _derive_enums(node: Any, root: dict[str, Any] | None = None) -> None:
    root = node if root is None else root
    if isinstance(node, dict):
        if node.get("x-network-sections"):
            node["properties"] = {**node["properties"], **network_sections(root)}
        if "x-enum" in node:
            node["enum"] = DERIVED_ENUMS[node["x-enum"]]()
        for value in node.values():
            _derive_enums(value, root)
    elif isinstance(node, list):
        for value in node:
            _derive_enums(value, root)


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
