"""Sweeps in two lines: the grid form of the configuration (conv2dlstm.config.sweep, config.validate_config)."""

from __future__ import annotations

import re

import pytest

from conv2dlstm.config import keys
from conv2dlstm.config.keys import sweep_tags
from conv2dlstm.config.runs import run_names
from conv2dlstm.config.sweep import sweep_runs
from conv2dlstm.config.validate import run_config, validate_config
from conv2dlstm.errors import ConfigError


def test_grid_expands_to_the_cartesian_product_in_the_order_written():
    cfg = validate_config(
        {
            "sweep": {"train.learning_rate": [0.001, 0.003], "model.name": ["convlstm", "conv2d_lstm"]},
            "grid": {"lat": {"start": 30.5, "stop": 44.5, "step": 1.0}},
        }
    )
    assert run_names(cfg) == ["lr0.001-convlstm", "lr0.001-conv2d_lstm", "lr0.003-convlstm", "lr0.003-conv2d_lstm"]
    assert cfg["sweep"] == {}  # downstream sees plain runs entries
    assert cfg["runs"][1] == {
        "name": "lr0.001-conv2d_lstm",
        "train": {"learning_rate": 0.001},
        "model": {"name": "conv2d_lstm"},
    }
    run = run_config(cfg, "lr0.003-conv2d_lstm")
    assert run["train"]["learning_rate"] == 0.003 and run["model"]["name"] == "conv2d_lstm"
    assert validate_config(cfg) == cfg  # validating again changes nothing


def test_grid_adds_to_explicit_runs_and_names_are_valid_wildcards():
    cfg = validate_config(
        {
            "runs": [{"name": "mine", "train": {"epochs": 2}}],
            "sweep": {
                "model.convlstm.hidden_channels": [[8, 8], [4]],
                "train.bf16": [True, False],
                "train.weight_decay": [1e-05],
                "train.lr_schedule": ["constant"],
            },
        }
    )
    names = run_names(cfg)
    assert names == [
        "mine",
        "hc8x8-bf16-wd1e-05-constant",
        "hc8x8-nobf16-wd1e-05-constant",
        "hc4-bf16-wd1e-05-constant",
        "hc4-nobf16-wd1e-05-constant",
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names)
    assert run_config(cfg, "hc4-nobf16-wd1e-05-constant")["model"]["convlstm"]["hidden_channels"] == [4]


def test_names_are_deterministic_and_fall_back_to_full_keys_when_labels_collide():
    grid = {"model.convlstm.kernel_size": [3], "model.conv2d_lstm.kernel_size": [3, 5]}
    assert [r["name"] for r in sweep_runs(grid)] == ["k3-ck3", "k3-ck5"]
    assert sweep_runs(grid) == sweep_runs(dict(grid))
    same_label = {"train.epochs": [2], "train.seed": [1, 2]}
    assert [r["name"] for r in sweep_runs(same_label)] == ["ep2-seed1", "ep2-seed2"]
    clash = {"train.device": ["cpu"], "train.data_on_device": ["auto", "never"], "train.lr_schedule": ["cosine"]}
    assert [r["name"] for r in sweep_runs(clash)] == ["cpu-auto-cosine", "cpu-never-cosine"]
    collide = {"train.max_batches_per_epoch": [1], "train.num_workers": [1, 2], "train.gpus": [1]}
    assert [r["name"] for r in sweep_runs(collide)] == ["mb1-num_workers1-gpus1", "mb1-num_workers2-gpus1"]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"grid.method": ["linear"]}, "config key sweep: 'grid.method' is not a model or train key"),
        ({"learning_rate": [0.1]}, "config key sweep: 'learning_rate' is not a model or train key"),
        ({"train.learnin_rate": [0.1]}, "unknown key 'train.learnin_rate' .*train.learning_rate"),
        ({"model.convlstm": [{}]}, "'model.convlstm' is a section, not a key; .*model.convlstm.kernel_size"),
        ({"train.learning_rate": [-1]}, r"config key sweep.train.learning_rate: value -1 is not valid"),
        ({"model.name": ["lstm"]}, r"config key sweep.model.name: value 'lstm' is not valid"),
        ({"train.learning_rate": 0.1}, r"config key sweep.train.learning_rate: 0.1 is not of type 'array'"),
        ({"train.learning_rate": []}, r"config key sweep.train.learning_rate: \[\] should be non-empty"),
        ({"train.seed": [1, 1]}, "config key sweep.train.seed: value 1 is listed twice"),
        ({"model.convlstm.kernel_size": [3, 4]}, r"runs\[1\] \(name 'k4'\): config key model.convlstm.kernel_size"),
    ],
)
def test_bad_grids_name_the_key_and_value(sweep, message):
    with pytest.raises(ConfigError, match=message):
        validate_config({"sweep": sweep})


def test_grid_names_must_not_repeat_explicit_runs():
    with pytest.raises(ConfigError, match=r"config keys sweep and runs: the grid's run name\(s\) \['seed1'\]"):
        validate_config({"sweep": {"train.seed": [1, 2]}, "runs": [{"name": "seed1"}]})


def test_a_grid_point_determines_its_own_run_only():
    base = validate_config({"sweep": {"train.seed": [1, 2]}})
    more = validate_config({"sweep": {"train.seed": [1, 2, 3]}})
    for run in ("seed1", "seed2"):
        assert keys.result_config(base, "train", run) == keys.result_config(more, "train", run)
    assert keys.result_config(more, "train", "seed3")["train"]["seed"] == 3


def test_sweep_tags_group_the_runs_of_one_configuration():
    cfg = validate_config({"sweep": {"train.seed": [1, 2]}})
    tags = sweep_tags(cfg)
    assert re.fullmatch(r"[0-9a-f]{12}", tags["sweep"]) and tags["sweep.runs"] == "seed1,seed2"
    assert sweep_tags(validate_config({"sweep": {"train.seed": [1, 2]}})) == tags
    assert (
        sweep_tags(
            validate_config(
                {"runs": [{"name": "seed1", "train": {"seed": 1}}, {"name": "seed2", "train": {"seed": 2}}]}
            )
        )
        == tags
    )
    assert sweep_tags(validate_config({"sweep": {"train.seed": [1, 3]}}))["sweep"] != tags["sweep"]
    other_data = validate_config({"sweep": {"train.seed": [1, 2]}, "windows": {"stride": 2}})
    assert sweep_tags(other_data)["sweep"] != tags["sweep"]
    assert sweep_tags(validate_config({}))["sweep.runs"] == "convlstm"


def test_each_training_process_derives_the_sweep_tags_from_the_whole_configuration(monkeypatch, tmp_path):
    """The train rule passes the whole configuration (to every torchrun worker alike); the CLI gives
    train.main the run's configuration and the sweep tags of all runs."""
    import json

    from conv2dlstm import cli
    from conv2dlstm.steps import train

    full = validate_config({"sweep": {"train.seed": [1, 2]}})
    seen = {}
    monkeypatch.setattr(train, "main", lambda cfg, **kwargs: seen.update(kwargs, seed=cfg["train"]["seed"]))
    argv = ["train", "--config-json", json.dumps(full), "--run", "seed2", "--windows", "w.zarr", "--stats", "s.nc"]
    assert cli.main([*argv, "--out-dir", str(tmp_path / "o")]) == 0
    assert seen["sweep"] == sweep_tags(full) and seen["run"] == "seed2" and seen["seed"] == 2
