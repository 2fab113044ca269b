from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conv2dlstm.config import (
    config_digest,
    flatten,
    load_config,
    load_schema,
    run_config,
    run_names,
    validate_config,
)
from conv2dlstm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _walk(schema, root, path="", parent_default=None):
    """Yield (path, subschema, inherited default) for every property, following local $refs.

    A key's default may come from its parent's default (e.g. grid.lat = {start, stop, step}).
    """
    from conv2dlstm.config import _resolve

    sub = _resolve(schema, root)
    for key, child in sub.get("properties", {}).items():
        inherited = parent_default.get(key) if isinstance(parent_default, dict) else None
        own = _resolve(child, root).get("default", inherited)
        yield f"{path}{key}", child, inherited
        yield from _walk(child, root, f"{path}{key}.", own)
    items = sub.get("items")
    if isinstance(items, dict):
        yield from _walk(items, root, f"{path}[].")


def test_every_key_has_description_and_default():
    schema = load_schema()
    from conv2dlstm.config import _resolve

    missing = []
    for path, sub, inherited in _walk(schema, schema):
        resolved = _resolve(sub, schema)
        if "description" not in resolved:
            missing.append(f"{path}: description")
        # items of `runs` are user-named entries; their `name` is required by design
        if "default" not in resolved and inherited is None and not path.startswith("runs.[]"):
            missing.append(f"{path}: default")
    assert not missing, missing


def test_empty_config_is_valid_and_filled():
    cfg = validate_config({})
    assert cfg["windows"]["input_steps"] == 5
    assert cfg["model"]["convlstm"]["hidden_channels"] == [16, 16]
    assert cfg["grid"]["lat"] == {"start": 21.0, "stop": 45.0, "step": 1.0}


@pytest.mark.parametrize("name", ["config.yaml", "seed_no3.yaml", "sweep.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "config" / name)
    assert cfg["name"]


def test_default_config_comments_every_key():
    lines = (REPO / "config" / "config.yaml").read_text().splitlines()
    cfg = yaml.safe_load("\n".join(lines))
    # every top-level schema section appears in the default config file
    assert set(load_schema()["properties"]) == set(cfg)
    # every key line carries a comment, on the line or on the line above
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"line {i + 1} has no comment: {line}"


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"trian": {}}, "unknown key(s) 'trian'"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
        ({"model": {"name": "transformer"}}, "model.name: 'transformer' is not one of"),
        ({"grid": {"method": "bilinear"}}, "grid.method"),
        ({"splits": {"train": {"start": "2019-13-01x", "end": "2020-01-01"}}}, "splits.train.start"),
        ({"windows": {"lead_steps": -1}}, "windows.lead_steps"),
        ({"grid": {"lat": {"start": 0, "stop": 1}}}, "grid.lat"),
    ],
)
def test_schema_errors_name_the_key(bad, fragment):
    with pytest.raises(ConfigError) as info:
        validate_config(bad)
    assert fragment in str(info.value)


def test_overlapping_splits_are_refused():
    bad = {"splits": {"val": {"start": "2020-12-01", "end": "2021-06-30"}}}
    with pytest.raises(ConfigError, match=r"splits\.val\.start.*not after splits\.train\.end"):
        validate_config(bad)


def test_grid_must_use_lon_convention():
    bad = {"grid": {"lon": {"start": 280.0, "stop": 300.0, "step": 1.0}}}
    with pytest.raises(ConfigError, match="harmonize.lon_convention"):
        validate_config(bad)
    ok = validate_config({**bad, "harmonize": {"lon_convention": "0..360"}})
    assert ok["grid"]["lon"]["start"] == 280.0


def test_runs_override_model_and_train():
    cfg = validate_config(
        {"runs": [{"name": "a"}, {"name": "b", "model": {"name": "conv2d_lstm"}, "train": {"epochs": 2}}]}
    )
    assert run_names(cfg) == ["a", "b"]
    b = run_config(cfg, "b")
    assert b["model"]["name"] == "conv2d_lstm" and b["train"]["epochs"] == 2
    assert b["train"]["batch_size"] == cfg["train"]["batch_size"]
    assert run_config(cfg, "a")["model"]["name"] == "convlstm"
    with pytest.raises(ConfigError, match="run 'c' is not configured"):
        run_config(cfg, "c")


def test_run_override_is_validated():
    cfg = validate_config({"runs": [{"name": "x", "train": {"epochs": -3}}]})
    with pytest.raises(ConfigError, match="run 'x'.*train.epochs"):
        run_config(cfg, "x")


def test_duplicate_run_names():
    with pytest.raises(ConfigError, match="appear more than once"):
        validate_config({"runs": [{"name": "a"}, {"name": "a"}]})


def test_default_run_is_model_name():
    cfg = validate_config({"model": {"name": "conv2d_lstm"}})
    assert run_names(cfg) == ["conv2d_lstm"]
    assert run_config(cfg, "conv2d_lstm")["model"]["name"] == "conv2d_lstm"


def test_flatten_is_stable_and_flat():
    cfg = validate_config({})
    flat = flatten(cfg)
    assert flat["train.epochs"] == "20"
    assert flat["variables.inputs"] == json.dumps(["sst"])
    assert all(isinstance(v, str) for v in flat.values())
    assert list(flat) == sorted(flat)
    assert config_digest(cfg) == config_digest(validate_config({}))


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(json_text="{")


def test_step_views_of_a_0_360_config_validate_alone():
    """A step hands its view on (the torchrun workers of train do); a 0..360 grid config must
    validate from every step's view."""
    import json

    from conv2dlstm.keys import STEPS, step_view

    cfg = validate_config(
        {
            "harmonize": {"lon_convention": "0..360"},
            "grid": {"lon": {"start": 281.0, "stop": 305.0, "step": 1.0}},
        }
    )
    for step in STEPS[STEPS.index("fetch"):]:  # synth does not see harmonize nor grid
        part = load_config(json_text=json.dumps(step_view(cfg, step)))
        assert part["harmonize"]["lon_convention"] == "0..360"
    with pytest.raises(ConfigError, match="grid.lon"):
        validate_config({"grid": {"lon": {"start": 281.0, "stop": 305.0, "step": 1.0}}})
