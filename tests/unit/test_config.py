from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml

from conv2dlstm.config.runs import config_digest, flatten, run_names
from conv2dlstm.config.schema import load_schema
from conv2dlstm.config.validate import (
    conv2d_lstm_parameters,
    date_keys,
    load_config,
    run_config,
    validate_config,
)
from conv2dlstm.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _walk(schema, root, path="", parent_default=None):
    """Yield (path, subschema, inherited default) for every property, following local $refs.

    A key's default may come from its parent's default (e.g. grid.lat = {start, stop, step}).
    """
    from conv2dlstm.config.schema import resolve as _resolve

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
    from conv2dlstm.config.schema import resolve as _resolve

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


SHIPPED = [("config.yaml",), ("seed_no3.yaml",), ("sweep.yaml",), ("zoo.yaml",), ("seed_no3.yaml", "zoo_seed_no3.yaml")]
"""Every file of config/, alone or over the configuration its comment says it is merged over."""


@pytest.mark.parametrize("names", SHIPPED, ids=["+".join(n) for n in SHIPPED])
def test_shipped_configs_are_valid(names):
    cfg = load_config([REPO / "config" / name for name in names])
    assert cfg["name"]


def test_every_shipped_config_is_validated():
    assert {p.name for p in (REPO / "config").glob("*.yaml")} == {n for names in SHIPPED for n in names}


def test_several_config_files_merge_as_snakemake_merges_them(tmp_path):
    """``--config a.yaml b.yaml``: b over a, mappings key by key, lists and values replaced, exactly
    Snakemake's merge of ``--configfile a.yaml b.yaml``."""
    from snakemake.utils import update_config

    from conv2dlstm.config.validate import overlay

    a = {"train": {"epochs": 3, "batch_size": 8}, "variables": {"inputs": ["sst", "sss"]}, "name": "a"}
    b = {"train": {"epochs": 5}, "variables": {"inputs": ["sst"]}, "experiment": "b"}
    expected = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    update_config(expected, b)
    assert overlay(a, b) == expected
    assert a["train"] == {"epochs": 3, "batch_size": 8}  # the inputs are not changed
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(a))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(b))
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["batch_size"] == 8 and cfg["variables"]["inputs"] == ["sst"]
    assert (cfg["name"], cfg["experiment"]) == ("a", "b")
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping of keys to values, got list"):
        load_config([tmp_path / "a.yaml", tmp_path / "list.yaml"])


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
    with pytest.raises(ConfigError, match=r"runs\[0\] \(name 'x'\): config key train.epochs: -3"):
        validate_config({"runs": [{"name": "x", "train": {"epochs": -3}}]})
    cfg = validate_config({"runs": [{"name": "x"}]})
    cfg["runs"] = [{"name": "x", "train": {"epochs": -3}}]  # not validated: run_config checks it too
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
    assert flat["train.epochs"] == "10"
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

    from conv2dlstm.config.keys import STEPS, step_view

    cfg = validate_config(
        {
            "harmonize": {"lon_convention": "0..360"},
            "grid": {"lon": {"start": 281.0, "stop": 305.0, "step": 1.0}},
        }
    )
    for step in STEPS[STEPS.index("fetch") :]:  # synth does not see harmonize nor grid
        part = load_config(json_text=json.dumps(step_view(cfg, step)))
        assert part["harmonize"]["lon_convention"] == "0..360"
    with pytest.raises(ConfigError, match="grid.lon"):
        validate_config({"grid": {"lon": {"start": 281.0, "stop": 305.0, "step": 1.0}}})


# ---------------------------------------------------------------------------------------------
# Checks the configuration alone decides: every one runs in validate_config (Snakemake's parse)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runs", "fragment"),
    [
        (
            [{"name": "b"}, {"name": "a", "train": {"learning_rte": 0.1}}],
            "runs[1] (name 'a'): config key train: unknown key(s) 'learning_rte'; allowed keys are batch_size,",
        ),
        (
            [{"name": "a", "model": {"conv2d_lstm": {"filter": [8]}}}],
            "runs[0] (name 'a'): config key model.conv2d_lstm: unknown key(s) 'filter'",
        ),
        ([{"name": "a", "model": {"nmae": "convlstm"}}], "runs[0] (name 'a'): config key model: unknown key(s) 'nmae'"),
        (
            [{"name": "a", "model": {"name": "resnet"}}],
            "runs[0] (name 'a'): config key model.name: 'resnet' is not one of",
        ),
        ([{"name": "a", "train": {"batch_size": "big"}}], "runs[0] (name 'a'): config key train.batch_size: 'big'"),
    ],
)
def test_run_overrides_are_validated_with_the_config(runs, fragment):
    with pytest.raises(ConfigError) as info:
        validate_config({"runs": runs})
    assert fragment in str(info.value)
    if "unknown key" in fragment:
        assert "check the spelling" in str(info.value)


def test_run_overrides_that_are_valid_pass():
    cfg = validate_config(
        {
            "runs": [
                {"name": "a", "train": {"learning_rate": 0.1}},
                {"name": "b", "model": {"name": "conv2d_lstm", "conv2d_lstm": {"filters": [8]}}},
            ]
        }
    )
    assert run_config(cfg, "a")["train"]["learning_rate"] == 0.1
    assert run_config(cfg, "b")["model"]["conv2d_lstm"]["filters"] == [8]


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        ({"train": {"batch_size": 30, "gpus": 4}}, ""),  # 30 = 4 * 7.5
        ({"train": {"gpus": 3}}, ""),  # the default global batch, 16
        ({"runs": [{"name": "one"}, {"name": "ddp", "train": {"gpus": 3}}]}, "runs[1] (name 'ddp'): "),
        ({"train": {"gpus": 4}, "runs": [{"name": "a", "train": {"batch_size": 30}}]}, "runs[0] (name 'a'): "),
        ({"runs": [{"name": "cpu", "train": {"device": "cpu", "gpus": 3, "batch_size": 8}}]}, "runs[0] (name 'cpu'): "),
    ],
)
def test_batch_size_must_divide_over_gpus(cfg, where):
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    msg = str(info.value)
    assert msg.startswith(f"{where}config keys train.batch_size and train.gpus: train.batch_size = ")
    assert "(the global batch) is not divisible by the" in msg and "set train.batch_size to a multiple of" in msg
    assert "or train.gpus to a divisor of" in msg


def test_batch_size_divisible_by_gpus_passes():
    validate_config({"train": {"batch_size": 30, "gpus": 1}})
    validate_config(
        {"train": {"batch_size": 32, "gpus": 4}, "runs": [{"name": "a"}, {"name": "b", "train": {"gpus": 8}}]}
    )
    # the top-level train section is not a run when runs are listed: only the runs are checked
    validate_config({"train": {"batch_size": 30, "gpus": 4}, "runs": [{"name": "a", "train": {"batch_size": 32}}]})


GLOBAL_QUARTER_DEGREE = {
    "lat": {"start": -89.875, "stop": 89.875, "step": 0.25},
    "lon": {"start": -179.875, "stop": 179.875, "step": 0.25},
}


def test_conv2d_lstm_too_large_for_the_grid_is_refused():
    cfg = {"model": {"name": "conv2d_lstm"}, "grid": GLOBAL_QUARTER_DEGREE}
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    msg = str(info.value)
    n = conv2d_lstm_parameters(validate_config({"grid": GLOBAL_QUARTER_DEGREE}))  # as convlstm: valid
    assert n > 10**9
    assert msg.startswith("config key model.conv2d_lstm.max_parameters: ")
    assert f"{n:,} parameters on the 720x1440 grid" in msg and "20,000,000" in msg
    for fix in ("`model.name: convlstm`", "a coarser grid", "raise model.conv2d_lstm.max_parameters"):
        assert fix in msg


def test_conv2d_lstm_limit_is_the_configured_one():
    base = validate_config({"model": {"name": "conv2d_lstm"}})
    n = conv2d_lstm_parameters(base)
    assert n == 423_891  # 25x25 default grid, sst -> sst, 3 leads (tests/unit/test_models.py derives it)
    validate_config({"model": {"name": "conv2d_lstm", "conv2d_lstm": {"max_parameters": n}}})
    with pytest.raises(ConfigError, match=f"{n:,} parameters.*max_parameters = {n - 1:,}"):
        validate_config({"model": {"name": "conv2d_lstm", "conv2d_lstm": {"max_parameters": n - 1}}})


def test_conv2d_lstm_size_is_checked_per_run():
    runs = [
        {"name": "small", "model": {"name": "convlstm"}},
        {"name": "notebook", "model": {"name": "conv2d_lstm", "conv2d_lstm": {"max_parameters": 1000}}},
    ]
    with pytest.raises(
        ConfigError,
        match=r"^runs\[1\] \(name 'notebook'\): config key model.conv2d_lstm.max_parameters: "
        r"model conv2d_lstm would have 423,891 parameters",
    ):
        validate_config({"runs": runs})
    # an inactive architecture is not checked: the top-level conv2d_lstm is never built here
    validate_config(
        {
            "model": {"name": "conv2d_lstm"},
            "grid": GLOBAL_QUARTER_DEGREE,
            "runs": [{"name": "a", "model": {"name": "convlstm"}}],
        }
    )
    validate_config({"grid": GLOBAL_QUARTER_DEGREE})  # convlstm: any grid


def test_conv2d_lstm_count_follows_grid_variables_and_leads():
    small = conv2d_lstm_parameters(validate_config({}))
    more = conv2d_lstm_parameters(
        validate_config(
            {"variables": {"inputs": ["sst", "sss"], "targets": ["sst", "sss"]}, "windows": {"lead_steps": 4}}
        )
    )
    finer = conv2d_lstm_parameters(validate_config({"grid": {"lat": {"start": 21.0, "stop": 45.0, "step": 0.5}}}))
    assert small < more and small < finer


def test_grid_too_small_for_conv2d_lstm_blocks():
    tiny = {"lat": {"start": 30.5, "stop": 34.5, "step": 1.0}, "lon": {"start": -69.5, "stop": -65.5, "step": 1.0}}
    with pytest.raises(ConfigError) as info:
        validate_config({"model": {"name": "conv2d_lstm"}, "grid": tiny})
    msg = str(info.value)
    assert msg.startswith(
        "config key model.conv2d_lstm: the 5x5 grid (lat x lon cells of grid.lat and grid.lon) is too small"
    )
    assert "5x5 -> 1x1 -> -1x-1" in msg
    for fix in (
        "fewer model.conv2d_lstm.filters",
        "smaller model.conv2d_lstm.kernel_size",
        "a larger grid",
        "model.name: convlstm",
    ):
        assert fix in msg
    validate_config({"model": {"name": "conv2d_lstm", "conv2d_lstm": {"filters": [8]}}, "grid": tiny})  # 5 -> 1
    with pytest.raises(ConfigError, match=r"runs\[0\] \(name 'nb'\): config key model.conv2d_lstm: the 5x5 grid"):
        validate_config({"grid": tiny, "runs": [{"name": "nb", "model": {"name": "conv2d_lstm"}}]})


def test_convlstm_even_kernel_is_refused():
    with pytest.raises(ConfigError, match=r"config key model.convlstm.kernel_size: 4 must be odd.*use 3 or 5"):
        validate_config({"model": {"convlstm": {"kernel_size": 4}}})
    with pytest.raises(ConfigError, match=r"runs\[0\] \(name 'k'\): config key model.convlstm.kernel_size: 2"):
        validate_config({"runs": [{"name": "k", "model": {"convlstm": {"kernel_size": 2}}}]})


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_shorter_than_a_window_is_refused(split):
    periods = {
        "train": ("2019-01-01", "2020-12-31"),
        "val": ("2021-01-01", "2021-06-30"),
        "test": ("2021-07-01", "2021-12-31"),
    }
    start = periods[split][0]
    short = {split: {"start": start, "end": str(dt.date.fromisoformat(start) + dt.timedelta(days=6))}}  # 7 days
    with pytest.raises(ConfigError) as info:
        validate_config({"splits": short})  # windows 5 + 3 = 8 days
    msg = str(info.value)
    assert msg.startswith(f"config key splits.{split}: {start}..")
    assert "holds 7 day(s), fewer than one window of windows.input_steps + windows.lead_steps = 5 + 3 = 8" in msg
    assert f"lengthen splits.{split} to at least 8 days" in msg and "lower windows.input_steps" in msg
    validate_config({"splits": short, "windows": {"input_steps": 5, "lead_steps": 2}})  # exactly one window


def test_windows_longer_than_a_split_are_refused():
    with pytest.raises(ConfigError, match=r"config key splits.val: 2021-01-01..2021-06-30 holds 181 day\(s\).* = 200"):
        validate_config({"windows": {"input_steps": 190, "lead_steps": 10}})


def test_date_keys_are_every_key_using_the_date_definition():
    assert set(date_keys()) == {
        "synthetic.start",
        "synthetic.end",
        "source.start",
        "source.end",
        *(f"splits.{s}.{e}" for s in ("train", "val", "test") for e in ("start", "end")),
    }


@pytest.mark.parametrize(
    "key",
    [
        "synthetic.start",
        "synthetic.end",
        "source.start",
        "source.end",
        "splits.train.start",
        "splits.train.end",
        "splits.val.start",
        "splits.val.end",
        "splits.test.start",
        "splits.test.end",
    ],
)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2019-05-32", "day is out of range for month"),
        ("2019-02-29", "day is out of range for month"),  # 2019 is not a leap year
        ("2019-13-01", "month must be in 1..12"),
    ],
)
def test_impossible_dates_name_their_key(key, value, reason):
    cfg: dict = {}
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node.setdefault(part, {})
    if parents[0] == "splits":  # a period needs both ends
        node.update(validate_config({})["splits"][parents[1]])
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert str(info.value) == (f"config key {key}: {value!r} is not a calendar date ({reason}); write it as YYYY-MM-DD")


def test_leap_day_is_a_date():
    cfg = validate_config({"source": {"start": "2020-02-29"}, "synthetic": {"end": "2020-02-29"}})
    assert cfg["source"]["start"] == "2020-02-29"


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, conv2dlstm.config.validate; "
        "print(sorted(m for m in ('torch', 'numpy', 'xarray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_run_config_of_the_shipped_and_test_configs_validates():
    for path in [*(REPO / "config").glob("*.yaml"), *(REPO / "tests/configs").glob("*.yaml")]:
        cfg = load_config(path)
        for run in run_names(cfg):
            assert run_config(cfg, run)["runs"] == [], path


def test_train_view_of_a_checked_config_validates_alone():
    """torchrun workers validate the train step's view of a run again: it holds every key the run
    checks read (grid, variables, windows, splits, model, train), so it passes as the whole did."""
    from conv2dlstm.config.keys import RUN_STEPS, step_view

    cfg = validate_config(
        {
            "grid": {
                "lat": {"start": 5.75, "stop": 17.5, "step": 0.25},
                "lon": {"start": 73.0, "stop": 79.75, "step": 0.25},
            },
            "variables": {"inputs": ["fe", "po4", "si"], "targets": ["no3"]},
            "windows": {"input_steps": 2, "lead_steps": 1},
            "splits": {
                "train": {"start": "2019-01-01", "end": "2019-01-10"},
                "val": {"start": "2019-01-11", "end": "2019-01-13"},
                "test": {"start": "2019-01-14", "end": "2019-01-16"},
            },
            "train": {"batch_size": 30},
            "runs": [
                {
                    "name": "nb",
                    "model": {"name": "conv2d_lstm", "conv2d_lstm": {"max_parameters": 952_000}},
                    "train": {"gpus": 3},
                }
            ],
        }
    )
    for step in RUN_STEPS:
        view = step_view(run_config(cfg, "nb"), step)
        assert validate_config({**view, "runs": [{"name": "nb"}]})["train"]["gpus"] == 3
