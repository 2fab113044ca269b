"""The contract every registered network keeps, as plain check functions of a network's name.

``tests/unit/test_networks.py`` runs every check in :data:`CHECKS` on every network of
:data:`conv2dlstm.config.networks.NETWORKS`, and once more on :class:`Throwaway`, a network that
exists only here, registered for the test in a temporary registry: the whole contract runs on a new
network with no other edit. Each check builds the network from its registry entry's ``small``
section (:func:`kwargs_for`), so a new network needs no edit here either.
"""

from __future__ import annotations

import copy
import csv
import gc
import json
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from conv2dlstm.artifacts import checkpoint
from conv2dlstm.config import networks
from conv2dlstm.errors import ConfigError
from conv2dlstm.training import loop, models
from conv2dlstm.training.networks.common import LastFrameSkip, floor_from_stats, output_floor

GRIDS = [(25, 25), (13, 11), (48, 28), (5, 5), (2, 3)]
"""Grids every network must take: the default, odd sizes, the notebook's box, the tiny suite's, the smallest."""


class Throwaway(nn.Module):
    """A network that exists only in the tests: one convolution over the input days stacked as channels."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        input_steps: int,
        lead_steps: int,
        height: int,
        width: int,
        channels: int = 4,
        residual_channels: Sequence[int | None] | None = None,
        nonnegative_channels: Sequence[int] | None = None,
        floor_per_cell: bool = False,
    ) -> None:
        super().__init__()
        self.out_shape = (lead_steps, out_channels)
        self.body = nn.Sequential(
            nn.Conv2d(input_steps * in_channels, channels, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels, lead_steps * out_channels, 1),
        )
        self.skip = LastFrameSkip(in_channels, out_channels, residual_channels)
        self.output_floor = output_floor(out_channels, nonnegative_channels, height, width, floor_per_cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape  # x: (B, T_in, C_in, H, W)
        y = self.body(x.flatten(1, 2)).view(b, *self.out_shape, h, w)  # (B, T_out, C_out, H, W)
        y = y + self.skip(x).unsqueeze(1)
        return y if self.output_floor is None else self.output_floor(y)


THROWAWAY = networks.Network(
    name="throwaway",
    module=f"{__name__}:Throwaway",
    summary="a network that exists only in the tests",
    kwargs=lambda s: {"channels": int(s["channels"])},
    labels={"channels": "tc"},
    small={"channels": 3},
)


def kwargs_for(
    name: str,
    height: int = 12,
    width: int = 10,
    *,
    inputs: Sequence[str] = ("a", "b"),
    targets: Sequence[str] = ("a",),
    input_steps: int = 3,
    lead_steps: int = 2,
    nonnegative: Sequence[str] = (),
    per_cell: bool = False,
) -> dict[str, Any]:
    """The network's keyword arguments from its small section, as the configuration derives them."""
    shapes = networks.Shapes(tuple(inputs), tuple(targets), input_steps, lead_steps, height, width)
    section = networks.network(name).small
    return networks.model_kwargs(name, section, shapes, nonnegative=nonnegative, floor_per_cell=per_cell)


def built(name: str, seed: int = 0, **kw: Any) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    kwargs = kwargs_for(name, **kw)
    return models.build_model(name, **kwargs), kwargs


def x_for(kwargs: dict[str, Any], batch: int = 2, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, kwargs["input_steps"], kwargs["in_channels"], kwargs["height"], kwargs["width"])
    return torch.randn(shape, generator=gen)  # (B, T_in, C_in, H, W)


# ---------------------------------------------------------------------------------------------
# the checks


def check_shapes(name: str, tmp_path: Path) -> None:
    """``(B, T_in, C_in, H, W)`` to ``(B, T_out, C_out, H, W)``, finite float32, on every grid of
    :data:`GRIDS`, with several input and target variables; or, on a grid the network cannot take,
    its registry entry's checks say so (before any job) and building it raises a ConfigError."""
    for height, width in GRIDS:
        for inputs, targets in [(("a",), ("a",)), (("a", "b", "c"), ("c", "d"))]:
            shapes = networks.Shapes(inputs, targets, 3, 2, height, width)
            if networks.network(name).problems(networks.network(name).small, shapes):
                with pytest.raises(ConfigError):
                    built(name, height=height, width=width, inputs=inputs, targets=targets)
                continue
            model, kwargs = built(name, height=height, width=width, inputs=inputs, targets=targets)
            y = model(x_for(kwargs, batch=3))
            assert y.shape == (3, 2, len(targets), height, width), (name, height, width, tuple(y.shape))
            assert y.dtype == torch.float32 and bool(torch.isfinite(y).all()), (name, height, width)


def check_land_mask(name: str, tmp_path: Path) -> None:
    """Land is 0 in the inputs (the windows step sets it) and has weight 0 in the loss: the loss and
    every gradient are the same whatever the target holds on land, NaN included."""
    model, kwargs = built(name, height=9, width=7)
    mask = np.ones((9, 7), dtype=bool)
    mask[:, :2] = False  # land in the two westernmost columns
    weights = loop.loss_weights(mask, np.linspace(0, 10, 9), latitude_weighted=True)
    x = x_for(kwargs) * torch.as_tensor(mask, dtype=torch.float32)
    y = torch.randn(2, 2, 1, 9, 7)

    def loss_and_grads(target: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = loop.masked_mse(model(x), target, weights)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(y)
    land = y.clone()
    land[..., ~torch.as_tensor(mask)] = float("nan")
    loss_land, grads_land = loss_and_grads(land)
    assert bool(torch.isfinite(loss)) and torch.equal(loss, loss_land), name
    assert grads and all(torch.equal(a, b) for a, b in zip(grads, grads_land, strict=True)), name


def check_residual(name: str, tmp_path: Path) -> None:
    """With every weight zero the network is persistence on the targets that are inputs and 0 on the others."""
    model, kwargs = built(name, inputs=("a", "b", "c"), targets=("c", "d", "a"))
    assert kwargs["residual_channels"] == [2, None, 0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = x_for(kwargs)
    y = model(x)  # (B, T_out, C_out, H, W)
    for lead in range(y.shape[1]):
        assert torch.equal(y[:, lead, 0], x[:, -1, 2]), (name, lead)
        assert torch.equal(y[:, lead, 1], torch.zeros_like(y[:, lead, 1])), (name, lead)
        assert torch.equal(y[:, lead, 2], x[:, -1, 0]), (name, lead)


def check_nonnegative(name: str, tmp_path: Path) -> None:
    """A nonnegative target: the raw output while training (the loss sees the unconstrained network);
    in evaluation mode ``max(raw, floor)``, so never below 0 physical and equal to the unconstrained
    output wherever that is at or above 0; the other target untouched; the floor in the checkpoint."""
    for per_cell in (False, True):
        common = dict(inputs=("a", "b"), targets=("a", "b"), per_cell=per_cell)
        free, base = built(name, seed=3, **common)
        floored, kwargs = built(name, seed=3, nonnegative=("b",), **common)
        assert kwargs["nonnegative_channels"] == [1] and kwargs["floor_per_cell"] is per_cell
        floored.load_state_dict(free.state_dict(), strict=False)  # the floor buffer is not in `free`
        mean = np.full((1, 12, 10), 0.3) if per_cell else np.array([0.3])
        floor = floor_from_stats(mean, np.full_like(mean, 0.4))  # 0 physical is -0.75 normalized
        floored.output_floor.set_floor(floor)
        x = x_for(kwargs, batch=4)
        x[:, :, 1] -= 1.0  # variable b near its floor: the free network goes below it somewhere
        with torch.no_grad():
            assert torch.equal(floored.train()(x), free.train()(x)), (name, per_cell)
            y_free, y_floor = free.eval()(x), floored.eval()(x)
        assert bool((y_free[:, :, 1] < -0.75).any()), (name, "the free network must go below 0 in this case")
        assert bool((y_floor[:, :, 1] >= -0.75).all()), (name, per_cell)
        above = y_free[:, :, 1] >= -0.75
        assert torch.equal(y_floor[:, :, 1][above], y_free[:, :, 1][above]), name
        assert torch.equal(y_floor[:, :, 0], y_free[:, :, 0]), name
        path = tmp_path / f"{name}-floor-{per_cell}.pt"
        _save(path, name, kwargs, floored)
        loaded, _ = models.load_model(path)
        with torch.no_grad():
            assert torch.equal(loaded(x), y_floor), name


def _save(path: Path, name: str, kwargs: dict[str, Any], model: nn.Module) -> None:
    ckpt = {"model_name": name, "model_kwargs": kwargs, "model_state": model.state_dict()}
    torch.save({"format_version": checkpoint.FORMAT_VERSION} | ckpt, path)


def check_checkpoint(name: str, tmp_path: Path) -> None:
    """The checkpoint file alone rebuilds the network, in eval mode, with equal outputs; its kwargs are JSON."""
    model, kwargs = built(name, height=13, width=11)
    json.dumps(kwargs)  # model_kwargs travel in MLflow params and provenance records
    path = tmp_path / f"{name}.pt"
    _save(path, name, kwargs, model.eval())
    loaded, ckpt = models.load_model(path)
    assert not loaded.training and ckpt["model_name"] == name
    x = x_for(kwargs)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)), name


def check_memory_format(name: str, tmp_path: Path) -> None:
    """Its 4-D weights are channels-last exactly when its entry says so (and stay so after weights
    are loaded), and its outputs and gradients are those of the same weights in the default layout,
    to rounding."""
    model, kwargs = built(name)
    fourd = [p for p in model.parameters() if p.dim() == 4]
    wanted = networks.network(name).channels_last
    assert not wanted or fourd, (name, "channels_last is set but it has no 4-D weights")
    for p in fourd:
        assert p.is_contiguous(memory_format=torch.channels_last if wanted else torch.contiguous_format), name
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    model.load_state_dict(plain.state_dict())  # a checkpoint of either layout loads into the built one
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fourd) or not wanted, name
    x = x_for(kwargs)
    outs = []
    for each in (model, plain):
        y = each(x)
        y.square().mean().backward()
        outs.append((y.detach(), [p.grad for p in each.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def check_bf16(name: str, tmp_path: Path) -> None:
    """Under bfloat16 autocast on the CPU: close to float32, a finite float32 loss, finite float32 gradients."""
    model, kwargs = built(name, height=12, width=16)
    x = x_for(kwargs, batch=4)
    y = torch.randn(4, 2, 1, 12, 16)
    weights = loop.loss_weights(np.ones((12, 16), dtype=bool), np.linspace(-10, 10, 12), latitude_weighted=False)
    with torch.no_grad():
        reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(x)
        loss = loop.masked_mse(pred, y, weights)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss)), name
    scale = reference.abs().max().item()
    assert (pred.float() - reference).abs().max().item() < 0.05 * scale + 0.05, name
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)


def check_compile(name: str, tmp_path: Path) -> None:
    """``torch.compile`` traces the network (TorchDynamo and AOTAutograd, forward and backward) and
    gives eager mode's values; the C++ kernels of TorchInductor are the train step's own test
    (tests/unit/test_accel_paths.py), too slow to build for every network on a small machine."""
    import torch._dynamo

    model, kwargs = built(name)
    x = x_for(kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    eager_out = model(x)
    compiled_out = compiled(x)
    assert torch.allclose(compiled_out, eager_out, atol=1e-5, rtol=1e-5), name
    compiled_out.square().mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters()), name
    torch._dynamo.reset()


def check_ddp_step(name: str, tmp_path: Path) -> None:
    """Two optimizer steps under ``DistributedDataParallel`` (gloo, the CPU backend) equal two steps
    without it: every parameter takes part in the loss (DDP refuses unused ones at the second step)
    and the buffers need no synchronisation (``forward_sync_buffers=False``, as the train step wraps)."""
    import torch.distributed as dist

    x = x_for(kwargs_for(name))
    y = torch.randn(2, 2, 1, 12, 10)
    results = []
    for distributed in (False, True):
        model, _ = built(name, seed=5)
        if distributed:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            net: nn.Module = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        else:
            net = model
        try:
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            for _ in range(2):
                optimizer.zero_grad()
                (net(x) - y).square().mean().backward()
                optimizer.step()
        finally:
            if distributed:
                # the DDP model goes first: destroyed with its reducer, the group could wait forever
                # on its gloo threads (conv2dlstm.training.distributed.release_frames)
                net = model
                gc.collect()
                dist.destroy_process_group()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True)), name


def check_kill_and_resume(name: str, tmp_path: Path) -> None:
    """The train step, stopped by SIGTERM during its second epoch and run again, resumes from
    ``last.pt`` and ends with the weights and losses of an uninterrupted run, bit for bit."""
    from conv2dlstm.config.validate import validate_config
    from conv2dlstm.steps import train
    from conv2dlstm.training.preemption import TrainingInterrupted
    from tests.support.windows_fixture import make_windows_store

    fx = make_windows_store(tmp_path / "w.zarr", n_time=40, height=6, width=7)
    cfg = validate_config(
        {
            "experiment": "test-contract",
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "log_model": False},
            "train": {
                "epochs": 3,
                "batch_size": 4,
                "max_batches_per_epoch": 3,
                "learning_rate": 0.01,
                "device": "cpu",
                "patience": 5,
            },
        }
    )
    cfg["model"] = {**cfg["model"], "name": name, name: dict(networks.network(name).small)}

    def run(out: Path) -> None:
        train.main(cfg, run=name, windows=fx.store, stats=fx.stats, out_dir=out)

    run(tmp_path / "reference")
    build = train.build_model
    calls = {"n": 0}

    def build_with_a_kill(model_name: str, **kwargs: Any) -> nn.Module:
        model = build(model_name, **kwargs)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls["n"] += module.training
            if calls["n"] == 5 and module.training:  # epoch 2, batch 2 (3 training batches per epoch)
                signal.raise_signal(signal.SIGTERM)

        model.register_forward_hook(hook)
        return model

    train.build_model = build_with_a_kill
    try:
        try:
            run(tmp_path / "interrupted")
        except TrainingInterrupted:
            pass
        else:
            raise AssertionError(f"{name}: the train step did not stop on SIGTERM")
    finally:
        train.build_model = build
    state = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] == 1, (name, state["epoch"])
    run(tmp_path / "interrupted")  # resumes
    a = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "interrupted" / "model.pt", weights_only=True)["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [list(csv.DictReader(open(tmp_path / d / "history.csv"))) for d in ("reference", "interrupted")]
    assert [(r["train_loss"], r["val_loss"]) for r in rows[0]] == [(r["train_loss"], r["val_loss"]) for r in rows[1]]


CHECKS: dict[str, Callable[[str, Path], None]] = {
    f.__name__.removeprefix("check_"): f
    for f in (
        check_shapes,
        check_land_mask,
        check_residual,
        check_nonnegative,
        check_checkpoint,
        check_memory_format,
        check_bf16,
        check_compile,
        check_ddp_step,
        check_kill_and_resume,
    )
}
"""Every check of the contract, by name."""
