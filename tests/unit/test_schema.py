"""The schema is the one definition of every configuration key: its enums equal the choices the code
dispatches on, and config/config.yaml is generated from it (conv2dlstm.config.defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conv2dlstm.cli import main
from conv2dlstm.config import defaults, networks, sources
from conv2dlstm.config import schema as schema_module
from conv2dlstm.config.schema import load_schema, resolve
from conv2dlstm.config.validate import validate_config
from conv2dlstm.data import checks, fetching, harmonize, regridding
from conv2dlstm.errors import ConfigError
from conv2dlstm.evaluation import strata
from conv2dlstm.steps import synthetic
from conv2dlstm.training import dataset, devices, loop

REPO = Path(__file__).resolve().parents[2]

CODE_CHOICES: dict[str, tuple[str, ...]] = {
    "synthetic.kind": synthetic.KINDS,
    "source.kind": fetching.SOURCE_KINDS,
    "harmonize.lon_convention": harmonize.LON_CONVENTIONS,
    "harmonize.duplicates": checks.DUPLICATE_POLICIES,
    "grid.method": regridding.METHODS,
    "model.name": tuple(networks.NETWORKS),
    "train.lr_schedule": loop.LR_SCHEDULES,
    "train.device": devices.DEVICES,
    "train.data_on_device": dataset.DATA_ON_DEVICE,
    "evaluate.by_season": tuple(strata.TIME_GROUPINGS),
}
"""Per enum key of the schema, the tuple of choices the code dispatches on."""


def _enums(node: dict[str, Any], root: dict[str, Any], path: str = "") -> dict[str, list[Any]]:
    node = resolve(node, root)
    out = {path: node["enum"]} if "enum" in node else {}
    for key, sub in node.get("properties", {}).items():
        out.update(_enums(sub, root, f"{path}.{key}" if path else key))
    return out


SCHEMA = load_schema()
ENUMS = _enums(SCHEMA, SCHEMA)


def test_the_schema_has_enums() -> None:
    assert {"model.name", "train.lr_schedule", "source.kind", "grid.method"} <= set(ENUMS)


@pytest.mark.parametrize("path", sorted(ENUMS))
def test_every_enum_equals_the_codes_list(path: str) -> None:
    """Each schema enum is listed in CODE_CHOICES (a new enum must be), with the code's tuple equal to it."""
    assert path in CODE_CHOICES, f"schema enum {path} has no entry in CODE_CHOICES: add the code's tuple of choices"
    assert list(CODE_CHOICES[path]) == ENUMS[path], path


def test_code_choices_name_only_schema_enums() -> None:
    assert set(CODE_CHOICES) <= set(ENUMS)


SHIPPED_YAML = sorted(
    str(p.relative_to(REPO))
    for pattern in ("workflow/schemas/*.yaml", "config/*.yaml", "tests/configs/*.yaml", "profiles/*/*.yaml")
    for p in REPO.glob(pattern)
)


def test_the_configuration_is_read_by_the_c_loader() -> None:
    """The locked PyYAML's wheels bundle libyaml: the C loader is there and is the one used (a
    PyYAML built without it would read the same documents about six times slower, in every step)."""
    assert yaml.__with_libyaml__, "PyYAML without libyaml: reinstall it from the lock (make setup)"
    assert schema_module.SAFE_LOADER is yaml.CSafeLoader


@pytest.mark.parametrize("path", SHIPPED_YAML)
def test_every_shipped_yaml_file_reads_as_pyyaml_s_python_loader_reads_it(path: str) -> None:
    """The schema, the configurations and the profiles: the loader that reads them gives what
    ``yaml.safe_load`` (pure Python) gives."""
    text = (REPO / path).read_text()
    assert schema_module.safe_load(text) == yaml.safe_load(text), path


def test_config_yaml_is_generated_from_the_schema() -> None:
    """config/config.yaml is exactly what the schema gives: every key, its default, its description."""
    text = (REPO / "config" / "config.yaml").read_text()
    defaults.check(text)
    assert yaml.safe_load(text) == validate_config({})
    assert "# MLflow experiment name; every run of this configuration is recorded under it" in text


def test_a_config_yaml_that_differs_is_named_with_the_fix(tmp_path: Path, capsys) -> None:
    text = defaults.render().replace("epochs: 10", "epochs: 12")
    with pytest.raises(ConfigError, match=r"at line \d+:\n  config/config.yaml:   epochs: 12\n  schema:   epochs: 10"):
        defaults.check(text)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["config-defaults", "--check", str(path)]) == 2
    assert "make config" in capsys.readouterr().err
    assert main(["config-defaults", "--write", str(path)]) == 0
    assert path.read_text() == defaults.render()


def test_scalars_are_written_as_yaml_reads_them() -> None:
    for value in [
        "2019-01-01",
        "",
        "D",
        "-180..180",
        "sqlite:///mlflow.db",
        "a: b",
        "yes",
        "null",
        0.003,
        1e-4,
        None,
        True,
        [20.125, 45.875],
        {"unit": "degC", "min": -3.0},
        "file:x/{date:%Y%m}/y.nc",
    ]:
        assert yaml.safe_load(f"k: {defaults._scalar(value)}") == {"k": value}, value


def _kind_conditions(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """(key, the raw value of its ``source.kind`` condition) for every condition in the schema file."""
    out = []
    if isinstance(node, dict):
        steps = node.get("x-steps")
        if isinstance(steps, dict):
            out += [
                (path, cond["source.kind"])
                for cond in steps.values()
                if isinstance(cond, dict) and "source.kind" in cond
            ]
        for key, value in node.items():
            out += _kind_conditions(value, f"{path}.{key}" if key not in ("properties", "$defs") else path)
    return out


def test_conditions_on_source_kinds_name_one_kind_or_a_group() -> None:
    """A condition that lists several kinds by name would miss a new kind: they name groups of the
    one table of kinds (conv2dlstm.config.sources), which a new kind joins by its row alone."""
    raw = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    conditions = _kind_conditions(raw)
    assert len(conditions) >= 9
    for key, value in conditions:
        names = value if isinstance(value, list) else [value]
        kinds = [n for n in names if n in sources.SOURCE_KINDS]
        assert not (isinstance(value, list) and len(kinds) > 1), f"{key}: lists kinds {kinds}; name a group"
        sources.expand_kinds(names)  # every name is a kind or a group


def test_a_new_source_kind_joins_the_enum_and_every_condition_of_its_group(monkeypatch) -> None:
    """One row in the table of kinds: the schema's enum and the rerun conditions follow."""
    from conv2dlstm.config import keys, schema

    row = sources.SourceKind("fetch_thredds", ("netcdf",), subsets=True, dated=False)
    monkeypatch.setitem(sources.SOURCE_KINDS, "thredds", row)
    monkeypatch.setitem(sources.GROUPS, "subsetting", (*sources.GROUPS["subsetting"], "thredds"))
    monkeypatch.setitem(sources.GROUPS, "fetching-the-period", (*sources.GROUPS["fetching-the-period"], "thredds"))
    for cached in (schema.load_schema, keys.key_specs):
        cached.cache_clear()
    try:
        assert "thredds" in schema.load_schema()["properties"]["source"]["properties"]["kind"]["enum"]
        cfg = validate_config({"source": {"kind": "thredds"}})
        specs = {spec.name: spec for spec in keys.key_specs()}
        for name in ("source.variables", "source.start", "region.lat", "variables.inputs"):
            assert specs[name].determines("fetch", cfg), name
        assert not specs["source.url"].determines("fetch", cfg)
    finally:
        monkeypatch.undo()
        for cached in (schema.load_schema, keys.key_specs):
            cached.cache_clear()


def test_the_fetch_step_has_a_fetcher_for_every_kind() -> None:
    assert set(fetching.FETCHERS) == set(sources.SOURCE_KINDS)
    for name, kind in sources.SOURCE_KINDS.items():
        assert fetching.FETCHERS[name].__name__ == kind.fetcher
