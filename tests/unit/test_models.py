"""Networks one by one: parameter counts, refusals, checkpoint loading. What every network keeps
(shapes, skip, floor, checkpoints, bf16, compile, DDP, resume) is tests/unit/test_networks.py."""

from __future__ import annotations

import json

import pytest
import torch

from conv2dlstm.artifacts import checkpoint
from conv2dlstm.config import networks
from conv2dlstm.config.modelsize import conv2d_lstm_parameter_count
from conv2dlstm.config.networks import residual_channels_for
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.training import models
from conv2dlstm.training.models import build_model, count_parameters, load_model, model_kwargs_from_config
from conv2dlstm.training.networks.conv2d_lstm import Conv2dLSTM
from conv2dlstm.training.networks.convlstm import ConvLSTM

SMALL = {
    "convlstm": {"hidden_channels": [4, 4], "kernel_size": 3},
    "conv2d_lstm": {"filters": [4, 8], "kernel_size": 3, "lstm_units": 8, "dense_units": 8},
}


def shape_kwargs(height: int, width: int, *, c_in: int = 2, c_out: int = 1, t_in: int = 3, t_out: int = 2) -> dict:
    return {
        "in_channels": c_in,
        "out_channels": c_out,
        "input_steps": t_in,
        "lead_steps": t_out,
        "height": height,
        "width": width,
    }


@pytest.mark.parametrize(
    ("height", "width", "kw"),
    [
        (48, 28, {}),
        (12, 10, {}),
        (25, 25, {"filters": [16], "kernel_size": 5, "lstm_units": 7, "dense_units": 3}),
        (13, 11, {"filters": [3, 5, 2], "kernel_size": 1}),
    ],
)
def test_conv2d_lstm_parameter_count_matches_allocated(height: int, width: int, kw: dict) -> None:
    model = Conv2dLSTM(**shape_kwargs(height, width, c_in=3, c_out=2, t_out=4), **kw)
    full = {"filters": [32, 64], "kernel_size": 3, "lstm_units": 64, "dense_units": 64} | kw
    expected = conv2d_lstm_parameter_count(
        in_channels=3, out_channels=2, lead_steps=4, height=height, width=width, **full
    )
    assert count_parameters(model) == expected


def test_conv2d_lstm_notebook_count_on_default_grid() -> None:
    # 25x25, filters [32, 64], kernel 3: 25 -> 23 -> 11 -> 9 -> 4, flatten 64*4*4 = 1024.
    conv = (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64)
    lstm = 4 * 64 * (1024 + 64 + 2)
    dense = 64 * 64 + 64 + 64 * (3 * 625) + 3 * 625
    assert (
        conv2d_lstm_parameter_count(
            in_channels=1,
            out_channels=1,
            lead_steps=3,
            height=25,
            width=25,
            filters=[32, 64],
            kernel_size=3,
            lstm_units=64,
            dense_units=64,
        )
        == conv + lstm + dense
        == 423_891
    )


def test_conv2d_lstm_refuses_large_grid_before_allocating() -> None:
    # 0.25 degree global grid: about 2 * 10^8 parameters (800 MB) would be needed; refused at once.
    with pytest.raises(ConfigError) as info:
        build_model("conv2d_lstm", **shape_kwargs(720, 1440, c_in=1, t_out=3))
    msg = str(info.value)
    expected = conv2d_lstm_parameter_count(
        in_channels=1,
        out_channels=1,
        lead_steps=3,
        height=720,
        width=1440,
        filters=[32, 64],
        kernel_size=3,
        lstm_units=64,
        dense_units=64,
    )
    assert f"{expected:,}" in msg
    assert "720x1440" in msg
    assert "model.name: convlstm" in msg
    assert "20,000,000" in msg


def test_conv2d_lstm_limit_is_configurable() -> None:
    n = conv2d_lstm_parameter_count(
        in_channels=2,
        out_channels=1,
        lead_steps=2,
        height=12,
        width=10,
        filters=[4, 8],
        kernel_size=3,
        lstm_units=8,
        dense_units=8,
    )
    build_model("conv2d_lstm", **shape_kwargs(12, 10), **SMALL["conv2d_lstm"], max_parameters=n)
    with pytest.raises(ConfigError, match=f"{n:,} parameters"):
        build_model("conv2d_lstm", **shape_kwargs(12, 10), **SMALL["conv2d_lstm"], max_parameters=n - 1)


def test_conv2d_lstm_grid_too_small() -> None:
    # 9 -> 7 -> 3 -> 1 -> 0: the second block leaves nothing.
    with pytest.raises(ConfigError, match=r"9x17 grid .* too small .*9x17 -> 3x7 -> 0x2"):
        build_model("conv2d_lstm", **shape_kwargs(9, 17))


# Configurations (grid, variables, windows, conv2d_lstm) whose parameter count the config validation
# computes by arithmetic; each must equal the count of the network the train step builds.
CONFIG_SHAPES = {
    "default 25x25 sst": {},
    "seed 48x28 fe,po4,si->no3": {
        "grid": {
            "lat": {"start": 5.75, "stop": 17.5, "step": 0.25},
            "lon": {"start": 73.0, "stop": 79.75, "step": 0.25},
        },
        "variables": {"inputs": ["fe", "po4", "si"], "targets": ["no3"]},
        "windows": {"input_steps": 5, "lead_steps": 1},
    },
    "odd 13x11, two targets, one block k5": {
        "grid": {
            "lat": {"start": 30.0, "stop": 36.0, "step": 0.5},
            "lon": {"start": -70.0, "stop": -65.0, "step": 0.5},
        },
        "variables": {"inputs": ["sst", "sss"], "targets": ["sst", "sss"]},
        "windows": {"input_steps": 3, "lead_steps": 2},
        "model": {"conv2d_lstm": {"filters": [6], "kernel_size": 5, "lstm_units": 7, "dense_units": 3}},
    },
    "9x30 (stop not a whole step away), three 1x1 blocks": {
        "grid": {"lat": {"start": 0.0, "stop": 8.5, "step": 1.0}, "lon": {"start": 10.0, "stop": 39.9, "step": 1.0}},
        "windows": {"lead_steps": 4},
        "model": {"conv2d_lstm": {"filters": [3, 5, 2], "kernel_size": 1, "lstm_units": 4, "dense_units": 5}},
    },
}


@pytest.mark.parametrize("overrides", CONFIG_SHAPES.values(), ids=CONFIG_SHAPES.keys())
def test_conv2d_lstm_count_from_config_equals_built_model(overrides: dict) -> None:
    from conv2dlstm.config.modelsize import grid_shape
    from conv2dlstm.config.validate import conv2d_lstm_parameters
    from conv2dlstm.data.regridding import target_grid

    model_cfg = {"name": "conv2d_lstm", **overrides.get("model", {})}
    cfg = validate_config({**overrides, "model": model_cfg})
    grid = target_grid(cfg["grid"])  # the grid the regrid step writes, and the windows store holds
    assert grid_shape(cfg["grid"]) == (grid.sizes["lat"], grid.sizes["lon"])
    kwargs = model_kwargs_from_config(
        cfg["model"],
        input_variables=cfg["variables"]["inputs"],
        target_variables=cfg["variables"]["targets"],
        input_steps=cfg["windows"]["input_steps"],
        lead_steps=cfg["windows"]["lead_steps"],
        height=grid.sizes["lat"],
        width=grid.sizes["lon"],
    )
    assert conv2d_lstm_parameters(cfg) == count_parameters(build_model("conv2d_lstm", **kwargs))


@pytest.mark.parametrize(
    ("start", "stop", "step"),
    [
        (21.0, 45.0, 1.0),
        (5.75, 17.5, 0.25),
        (-79.0, -55.0, 1.0),
        (0.0, 6.5, 1.0),
        (0.1, 0.7, 0.2),
        (-89.875, 89.875, 0.25),
        (280.125, 305.875, 0.25),
        (1.0, 1.0, 0.5),
        (0.0, 1.0, 0.1),
    ],
)
def test_axis_cells_equals_regrid_axis(start: float, stop: float, step: float) -> None:
    from conv2dlstm.config.modelsize import axis_cells
    from conv2dlstm.data.regridding import axis_centres

    assert axis_cells(start, stop, step) == axis_centres(start, stop, step).size


def test_modelsize_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, conv2dlstm.config.validate, conv2dlstm.config.modelsize; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_convlstm_size_independent_of_grid() -> None:
    counts = {
        count_parameters(ConvLSTM(**shape_kwargs(h, w), hidden_channels=[8, 16]))
        for h, w in [(12, 10), (48, 28), (101, 7)]
    }
    assert len(counts) == 1
    # encoder cells (2+8)->4*8, (8+16)->4*16 and forecaster (1+8)->4*8, (8+16)->4*16, 3x3; head 24->1.
    expected = (10 * 32 * 9 + 32) + (24 * 64 * 9 + 64) + (9 * 32 * 9 + 32) + (24 * 64 * 9 + 64) + (24 + 1)
    assert counts == {expected}


def test_convlstm_even_kernel_refused() -> None:
    with pytest.raises(ConfigError, match="kernel_size = 4 must be odd"):
        build_model("convlstm", **shape_kwargs(12, 10), hidden_channels=[4], kernel_size=4)


def test_residual_channels_for() -> None:
    assert residual_channels_for(["sst"], ["sst"]) == [0]
    assert residual_channels_for(["sst", "no3"], ["no3", "po4"]) == [1, None]
    assert residual_channels_for(["sst"], ["no3"]) is None


@pytest.mark.parametrize("name", models.model_names())
def test_model_kwargs_from_config_builds(name: str) -> None:
    cfg = validate_config({"model": {"name": name}})
    kwargs = model_kwargs_from_config(
        cfg["model"],
        input_variables=["sst", "no3"],
        target_variables=["no3"],
        input_steps=5,
        lead_steps=3,
        height=25,
        width=25,
    )
    assert kwargs["in_channels"] == 2 and kwargs["out_channels"] == 1 and kwargs["residual_channels"] == [1]
    assert kwargs.items() >= networks.network(name).kwargs(cfg["model"][name]).items()  # the schema's defaults
    model = build_model(name, **kwargs)
    assert model(torch.zeros(1, 5, 2, 25, 25)).shape == (1, 3, 1, 25, 25)


def _saved_checkpoint(tmp_path, **changes) -> tuple[dict, object]:
    kwargs = shape_kwargs(12, 10) | SMALL["convlstm"]
    model = build_model("convlstm", **kwargs)
    ckpt = {
        "format_version": checkpoint.FORMAT_VERSION,
        "model_name": "convlstm",
        "model_kwargs": kwargs,
        "model_state": model.state_dict(),
    } | changes
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    return ckpt, path


def test_load_model_truncated_file(tmp_path) -> None:
    _, path = _saved_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"(?s)checkpoint {path} cannot be read .*truncated.*re-run the train step"):
        load_model(path)


def test_load_model_foreign_file(tmp_path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(DataError, match=rf"(?s)checkpoint {path} cannot be read.*re-run the train step"):
        load_model(path)
    with pytest.raises(DataError, match=r"does not exist.*re-run the train step"):
        load_model(tmp_path / "absent.pt")
    torch.save([1, 2, 3], path)
    with pytest.raises(DataError, match=r"holds a list, not a checkpoint dict"):
        load_model(path)


def test_load_model_dict_without_model_name(tmp_path) -> None:
    kwargs = shape_kwargs(12, 10) | SMALL["convlstm"]
    path = tmp_path / "old.pt"
    state = build_model("convlstm", **kwargs).state_dict()
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model_kwargs": kwargs, "model_state": state}, path)
    with pytest.raises(DataError, match=rf"checkpoint {path} lacks \['model_name'\].*re-run the train step"):
        load_model(path)


def test_load_model_mismatching_state(tmp_path) -> None:
    other = build_model("convlstm", **shape_kwargs(12, 10), hidden_channels=[8], kernel_size=3)
    _, path = _saved_checkpoint(tmp_path, model_state=other.state_dict())
    with pytest.raises(
        DataError, match=rf"(?s)checkpoint {path} has weights that do not fit its convlstm model.*re-run"
    ):
        load_model(path)


def test_load_model_kwargs_of_another_version(tmp_path) -> None:
    _, path = _saved_checkpoint(tmp_path, model_kwargs=shape_kwargs(12, 10) | {"n_layers": 2})
    with pytest.raises(DataError, match=r"model_kwargs that do not build a convlstm model.*re-run the train step"):
        load_model(path)
    _, path = _saved_checkpoint(tmp_path, model_name="resnet")
    with pytest.raises(DataError, match=r"names the model 'resnet'"):
        load_model(path)


def _training_checkpoint(name: str = "convlstm") -> tuple[torch.nn.Module, dict]:
    """A checkpoint as the train step builds it (artifacts.checkpoint.build)."""
    torch.manual_seed(2)
    kwargs = shape_kwargs(12, 10) | SMALL[name]
    model = build_model(name, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    progress = {"epoch": 3, "best_val_loss": 0.5, "best_epoch": 2, "epochs_since_best": 1, "history": [{"epoch": 1}]}
    ckpt = checkpoint.build(
        run="r",
        model_name=name,
        model_kwargs=kwargs,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(0),
        rng_state={"torch": torch.get_rng_state()},
        progress=progress,
        finished=False,
        config={},
        input_variables=["a", "b"],
        target_variables=["a"],
        mlflow_run_id="0" * 32,
        record={"digest": "d" * 16},
        result_config={},
    )
    return model, ckpt


def test_checkpoint_build_save_load_restore(tmp_path) -> None:
    """One list of entries for writer and reader; the model rebuilt from the file alone; the training
    state restored into fresh objects."""
    model, ckpt = _training_checkpoint()
    assert tuple(ckpt) == checkpoint.KEYS and ckpt["format_version"] == checkpoint.FORMAT_VERSION
    path = tmp_path / checkpoint.LAST
    checkpoint.save(path, ckpt)
    loaded = checkpoint.load(path)
    assert loaded.keys() == ckpt.keys() and checkpoint.digest(loaded) == "d" * 16
    rebuilt = models.rebuild_model(loaded, path=path)
    assert not rebuilt.training
    x = torch.randn(2, 3, 2, 12, 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    fresh = build_model("convlstm", **ckpt["model_kwargs"])
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    generator = torch.Generator()
    rng, progress = checkpoint.restore(
        loaded, model=fresh, optimizer=optimizer, scheduler=scheduler, generator=generator
    )
    assert progress == {
        "epoch": 3,
        "best_val_loss": 0.5,
        "best_epoch": 2,
        "epochs_since_best": 1,
        "history": [{"epoch": 1}],
    }
    assert torch.equal(rng["torch"], ckpt["rng_state"]["torch"]) and optimizer.param_groups[0]["lr"] == 0.01
    assert torch.equal(generator.get_state(), ckpt["generator_state"])


def test_checkpoint_of_another_version_or_lacking_entries_is_refused(tmp_path) -> None:
    _, ckpt = _training_checkpoint()
    path = tmp_path / "best.pt"
    torch.save({**ckpt, "format_version": 0}, path)
    with pytest.raises(
        checkpoint.IncompatibleCheckpoint,
        match=rf"checkpoint {path} has checkpoint format 0, this version reads 1.*re-run the train step",
    ) as info:
        checkpoint.load(path)
    assert info.value.problems == ("has checkpoint format 0, this version reads 1",)
    with pytest.raises(DataError, match="has checkpoint format 0"):
        load_model(path)  # the model reader checks the version too
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer_state", "history")}, path)
    with pytest.raises(DataError, match=r"lacks \['optimizer_state', 'history'\].*re-run the train step"):
        checkpoint.load(path)
    load_model(path)  # the model alone is all it needs
    torch.save({k: ckpt[k] for k in checkpoint.MODEL_KEYS}, path)
    with pytest.raises(DataError, match=r"has checkpoint format None"):
        checkpoint.load(path)
    with pytest.raises(DataError, match=r"has checkpoint format None"):
        load_model(path)  # the model reader checks the version too


# ---------------------------------------------------------------------------------------------
# output floor: variables that cannot be negative


def test_output_floor_must_be_set_and_fit() -> None:
    kwargs = shape_kwargs(6, 5, c_out=2) | SMALL["convlstm"] | {"nonnegative_channels": [0]}
    model = build_model("convlstm", **kwargs)
    model(torch.zeros(1, 3, 2, 6, 5))  # training mode: the raw output, no floor needed
    with pytest.raises(RuntimeError, match="output floor .* never set"):
        model.eval()(torch.zeros(1, 3, 2, 6, 5))
    with pytest.raises(DataError, match=r"expected finite \(1, 1, 1\)"):
        model.output_floor.set_floor([1.0, 2.0])
    with pytest.raises(ConfigError, match="nonnegative_channels"):
        build_model("convlstm", **(kwargs | {"nonnegative_channels": [2]}))
    model.output_floor.set_floor([-1.5])
    assert torch.isfinite(model(torch.zeros(1, 3, 2, 6, 5))).all()


def test_model_kwargs_floor_the_nonnegative_targets_only() -> None:
    cfg = validate_config({})
    common = dict(input_variables=["fe", "po4"], input_steps=5, lead_steps=1, height=25, width=25)
    kwargs = model_kwargs_from_config(
        cfg["model"],
        target_variables=["sst", "no3"],
        nonnegative=cfg["variables"]["nonnegative"],
        floor_per_cell=True,
        **common,
    )
    assert kwargs["nonnegative_channels"] == [1] and kwargs["floor_per_cell"] is True
    sst_only = model_kwargs_from_config(
        cfg["model"], target_variables=["sst"], nonnegative=cfg["variables"]["nonnegative"], **common
    )
    assert "nonnegative_channels" not in sst_only  # unchanged kwargs: earlier checkpoints still resume
    assert (
        build_model("convlstm", **sst_only).state_dict().keys()
        == build_model("convlstm", **model_kwargs_from_config(cfg["model"], target_variables=["sst"], **common))
        .state_dict()
        .keys()
    )


def test_parameter_counts_on_the_meta_device_equal_a_real_build(capsys) -> None:
    """Every registered network is counted without allocating it, as a real build counts it; a network
    the grid refuses gives the reason; `python -m conv2dlstm models` lists them all."""
    from conv2dlstm.cli import main
    from conv2dlstm.config.modelsize import grid_shape

    cfg = validate_config(
        {
            "grid": {
                "lat": {"start": 21.0, "stop": 30.0, "step": 1.0},
                "lon": {"start": -79.0, "stop": -64.0, "step": 1.0},
            }
        }
    )
    counts = models.parameter_counts(cfg)
    assert set(counts) == set(models.model_names())
    height, width = grid_shape(cfg["grid"])
    for name in models.model_names():
        kwargs = model_kwargs_from_config(
            {**cfg["model"], "name": name},
            input_variables=["sst"],
            target_variables=["sst"],
            input_steps=5,
            lead_steps=3,
            height=height,
            width=width,
            nonnegative=cfg["variables"]["nonnegative"],
        )
        assert counts[name] == count_parameters(build_model(name, **kwargs)), name
    tight = validate_config({"model": {"conv2d_lstm": {"max_parameters": 1000}}})
    with pytest.raises(ConfigError):  # the configuration itself is refused when it trains conv2d_lstm ...
        validate_config({"model": {"name": "conv2d_lstm", "conv2d_lstm": {"max_parameters": 1000}}})
    assert str(models.parameter_counts(tight)["conv2d_lstm"]).startswith("refused: ")  # ... and listed so

    assert main(["models", "--config-json", json.dumps(cfg)]) == 0
    out = capsys.readouterr().out
    assert "networks on the 10 x 16 grid" in out
    for name in models.model_names():
        assert f"{counts[name]:,}" in out, name
    assert "* convlstm" in out
