"""The rerun contract: which config key determines which step (conv2dlstm.config.keys)."""

from __future__ import annotations

import json

import pytest

from conv2dlstm.config import keys
from conv2dlstm.config.runs import flatten
from conv2dlstm.config.schema import load_schema
from conv2dlstm.config.validate import run_config, validate_config
from tests.support.plan import steps_planned_by


def _leaf_names(schema: dict, sub: dict, prefix: str = "") -> set[str]:
    """Every property path of the schema down to the annotated leaves (walked independently of keys)."""
    from conv2dlstm.config.schema import resolve as _resolve

    out = set()
    for key, prop in sub.get("properties", {}).items():
        resolved = _resolve(prop, schema)
        name = f"{prefix}{key}"
        if "x-steps" in resolved:
            out.add(name)
        elif "properties" in resolved:
            out |= _leaf_names(schema, resolved, name + ".")
        else:
            out.add(name)
    return out


def test_every_schema_key_has_a_rerun_decision():
    schema = load_schema()
    names = {s.name for s in keys.key_specs()}
    assert _leaf_names(schema, schema) - {"runs", "sweep"} == names
    # every value of the default config belongs to exactly one annotated key
    cfg = validate_config({})
    covered = {k for k in flatten(cfg) if any(k == n or k.startswith(n + ".") for n in names)}
    assert covered == set(flatten(cfg)) - {"runs", "sweep"}


def test_result_config_holds_exactly_the_determining_keys():
    cfg = validate_config({})
    regrid = keys.result_config(cfg, "regrid")
    assert set(regrid) == {"source", "harmonize", "region", "grid", "variables"}
    # not kind, url, parallel, retries, ...; max_missing: the files whose values are all fill values
    assert set(regrid["source"]) == {"start", "end", "max_missing"}
    assert "dask" not in regrid and "outdir" not in regrid and "name" not in regrid
    assert keys.result_config(cfg, "compare") == {}
    assert keys.result_config(cfg, "evaluate", "convlstm") == {
        "evaluate": {
            "plot_date": "",
            "max_lead": 0,
            "regions": {},
            "by_season": "none",
            "animation_lead": 1,
            "animation_frames": 120,
            "events": {
                "variables": [],
                "quantile": 0.9,
                "min_duration_days": 1,
                "min_training_years": 2,
                "smooth_days": 31,
            },
        }
    }
    train = keys.result_config(cfg, "train", "convlstm")
    assert set(train["model"]) == {"name", "convlstm"}  # the inactive architecture is not there
    assert "device" not in train["train"] and "num_workers" not in train["train"]
    assert train["mlflow"] == {"log_model": True}


@pytest.mark.parametrize(
    ("change", "step", "differs"),
    [
        ({"source": {"parallel": 9, "retries": 0, "timeout_s": 5}}, "fetch", False),
        ({"source": {"url": "file:x/{date:%Y}.nc"}}, "fetch", True),
        ({"source": {"paths": ["a.nc"]}}, "fetch", False),  # kind url does not read paths
        ({"source": {"kind": "files", "paths": ["a.nc"]}}, "fetch", True),
        ({"dask": {"scheduler_address": "tcp://127.0.0.1:1"}}, "regrid", False),
        ({"grid": {"min_ocean_fraction": 0.7}}, "regrid", True),
        ({"grid": {"method": "linear"}}, "regrid", True),
        ({"evaluate": {"plot_date": "2021-07-10", "batch_size": 2}}, "train", False),
        ({"evaluate": {"batch_size": 2}}, "evaluate", False),
        ({"model": {"conv2d_lstm": {"filters": [8]}}}, "train", False),
        ({"model": {"convlstm": {"hidden_channels": [8]}}}, "train", True),
        ({"train": {"device": "cpu", "num_workers": 2, "compile": True, "gpus": 2}}, "train", False),
        ({"train": {"learning_rate": 0.0005}}, "train", True),
    ],
)
def test_digest_changes_exactly_with_result_keys(change, step, differs):
    base, changed = validate_config({}), validate_config(change)
    run = "convlstm" if step in keys.RUN_STEPS else None
    assert (keys.result_digest(base, step, run) != keys.result_digest(changed, step, run)) is differs


def test_conditions_follow_the_run_configuration():
    cfg = validate_config({"runs": [{"name": "a"}, {"name": "nb", "model": {"name": "conv2d_lstm"}}]})
    assert "conv2d_lstm" in keys.result_config(cfg, "train", "nb")["model"]
    assert "conv2d_lstm" not in keys.result_config(cfg, "train", "a")["model"]
    # inside the step, the run's own configuration gives the same digest as the workflow's params
    assert keys.result_digest(run_config(cfg, "nb"), "train") == keys.result_digest(cfg, "train", "nb")
    assert json.loads(keys.result_json(cfg, "train", "nb")) == keys.result_config(run_config(cfg, "nb"), "train")


def test_result_items_are_the_result_config_flat():
    """One ``key=value`` item per determining key (the rule params): together exactly result_config."""
    cfg = validate_config({"runs": [{"name": "a"}, {"name": "nb", "model": {"name": "conv2d_lstm"}}]})
    for step in keys.STEPS:
        for run in ("a", "nb") if step in keys.RUN_STEPS else (None,):
            items = keys.result_items(cfg, step, run=run)
            rebuilt: dict = {}
            for name, item in items.items():
                key, _, value = item.partition("=")
                assert key == name
                keys._set(rebuilt, tuple(name.split(".")), json.loads(value))
            assert rebuilt == keys.result_config(cfg, step, run), (step, run)
            assert set(items) <= {s.name for s in keys.determining_keys(step)}
    assert keys.result_item("train.epochs", 10) == "train.epochs=10"
    assert keys.result_item("source.url", "file:x/{date:%Y}.nc") == 'source.url="file:x/{date:%Y}.nc"'
    assert keys.result_item("grid.lat", {"stop": 2.0, "start": 1.0}) == 'grid.lat={"start": 1.0, "stop": 2.0}'


def test_determining_keys_are_every_key_a_step_may_depend_on():
    train = {s.name for s in keys.determining_keys("train")}
    assert {"train.epochs", "model.name", "model.convlstm.hidden_channels", "model.conv2d_lstm.filters"} <= train
    assert not {"train.device", "train.num_workers", "outdir", "grid.lat"} & train
    forecast = {s.name for s in keys.determining_keys("fetch", "regrid", "normalize")}
    assert {"source.url", "source.paths", "grid.lat", "normalize.per_pixel"} <= forecast
    assert keys.determining_keys("compare") == ()
    with pytest.raises(ValueError, match="unknown step"):
        keys.determining_keys("plot")


def test_a_step_cannot_read_a_key_of_a_later_step():
    cfg = validate_config({})
    view = keys.step_view(cfg, "windows")
    assert view["windows"] == cfg["windows"] and view["splits"] == cfg["splits"]
    assert view["dask"] == cfg["dask"]  # runtime keys are visible to every step
    with pytest.raises(KeyError):
        view["evaluate"]["plot_date"]
    assert "learning_rate" not in view["train"] and "device" in view["train"]
    train_view = keys.step_view(run_config(cfg, "convlstm"), "train")
    assert train_view["grid"] == cfg["grid"]  # upstream keys: logged as MLflow params
    assert "evaluate" in train_view and "plot_date" not in train_view["evaluate"]
    assert keys.step_view(cfg, "compare") == cfg


def test_planned_steps_are_the_determined_steps_and_everything_downstream():
    cfg = validate_config({})
    spec = {s.name: s for s in keys.key_specs()}
    assert steps_planned_by(spec["source.retries"], cfg) == set()
    assert steps_planned_by(spec["splits.val"], cfg) == {"windows", "train", "evaluate", "compare"}
    assert steps_planned_by(spec["evaluate.plot_date"], cfg) == {"evaluate", "compare"}
    assert steps_planned_by(spec["outdir"], cfg) == {"regrid", "normalize", "windows", "train", "evaluate", "compare"}
    assert steps_planned_by(spec["synthetic.seed"], cfg) == set(keys.STEPS) - {"ensemble"}  # one run: no ensemble
    seeds = validate_config({"sweep": {"train.seed": [0, 1]}})
    assert steps_planned_by(spec["synthetic.seed"], seeds) == set(keys.STEPS)
    assert steps_planned_by(spec["train.epochs"], seeds) == {"train", "evaluate", "ensemble", "compare"}
    real = validate_config({"synthetic": {"kind": "none"}})
    assert steps_planned_by(spec["synthetic.seed"], real) == set()
    assert "synth" not in steps_planned_by(spec["name"], real)


def test_an_unannotated_key_is_refused(monkeypatch):
    schema = json.loads(json.dumps(load_schema()))
    schema["properties"]["grid"]["properties"]["new_key"] = {"type": "integer", "default": 1, "description": "x"}
    monkeypatch.setattr(keys, "load_schema", lambda: schema)
    keys.key_specs.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"grid\.new_key"):
            keys.key_specs()
    finally:
        keys.key_specs.cache_clear()


def test_config_file_equals_the_schema_defaults(repo_root):
    """One set of defaults: config/config.yaml lists every key with the schema's default, so
    `snakemake --configfile my.yaml` and `validate-config --config my.yaml` agree."""
    import yaml

    raw = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    assert raw == validate_config({})


def test_schema_has_no_stray_keys():
    """A comma in a flow-style description splits it into keys with no value (YAML): none may exist."""

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                assert value is not None or key == "default", f"stray key {path}.{key}: quote the description"
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(load_schema(), "schema")
