"""Data-parallel training: 2 CPU processes (gloo, real torchrun started as the train rule starts it,
running the real CLI) against 1 process.

The two-process runs must give the single-process loss curve and weights up to float rounding: the
gradients and losses are float32 sums taken in another order (the all-reduce adds the ranks'
partial sums), ~1e-7 relative per step. Over the 205 AdamW steps here the runs agree to 3e-7
(relative) on the losses and 7e-7 on the weights (of order 1); the tolerances, rtol 1e-5 and
atol 1e-5, leave a factor of ten.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conv2dlstm import cli
from conv2dlstm.config.validate import load_config, run_config, validate_config
from conv2dlstm.errors import ConfigError
from conv2dlstm.steps import train
from conv2dlstm.training import distributed, loop
from conv2dlstm.training.dataset import shard_batches
from conv2dlstm.training.models import load_model
from tests.support.windows_fixture import make_windows_store

OUTPUTS = {"best.pt", "last.pt", "model.pt", "history.csv", "mlflow_run_id.txt", "model_summary.txt"}
EPOCHS = 5
TIMEOUT_S = 240


def ddp_config(db: Path, gpus: int, experiment: str = "test-ddp", **train_overrides) -> dict:
    """A tiny ConvLSTM; 81 training windows in global batches of 2 (one window per process and step)."""
    return validate_config(
        {
            "experiment": experiment,
            "mlflow": {"tracking_uri": f"sqlite:///{db}", "log_model": False},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [8]}},
            "train": {
                "epochs": EPOCHS,
                "batch_size": 2,
                "learning_rate": 0.01,
                "device": "cpu",
                "gpus": gpus,
                "patience": 10,
            }
            | train_overrides,
        }
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 81 training windows: the last global batch holds one window, so rank 1's share of it is empty.
    return make_windows_store(tmp_path_factory.mktemp("ddp") / "w.zarr", n_time=145, height=16, width=16)


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> Path:
    """One sqlite store for the module (creating its tables takes seconds); an experiment per test."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


@pytest.fixture(scope="module")
def reference(store, mlflow_db, tmp_path_factory) -> Path:
    """The single-process run (train.gpus = 1) of the same configuration, on one torch thread."""
    out = tmp_path_factory.mktemp("single") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            for name in distributed.TORCHRUN_ENV:
                mp.delenv(name, raising=False)
            train.main(
                ddp_config(mlflow_db, gpus=1, experiment="test-ddp-single"),
                run="convlstm",
                windows=store.store,
                stats=store.stats,
                out_dir=out,
            )
    finally:
        torch.set_num_threads(threads)
    return out


def cli_args(cfg: dict, store, out: Path) -> list[str]:
    return [
        "train",
        "--config-json",
        json.dumps(cfg),
        "--run",
        "convlstm",
        "--windows",
        str(store.store),
        "--stats",
        str(store.stats),
        "--out-dir",
        str(out),
    ]


def start_cli(cfg: dict, store, out: Path) -> subprocess.Popen:
    """What the train rule runs for the run (``torchrun ... -m -- conv2dlstm train ...`` for
    ``train.gpus: 2``) in a subprocess, this interpreter's bin first on PATH, one torch thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", *distributed.TORCHRUN_ENV)}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    launcher = shlex.split(distributed.rule_launcher(cfg, "convlstm"))
    return subprocess.Popen(
        [*launcher, *cli_args(cfg, store, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, output


def history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def wait_for_epochs(proc: subprocess.Popen, out: Path, n: int) -> None:
    """Until ``history.csv`` has ``n`` rows (written by rank 0 after each epoch)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not ((out / "history.csv").exists() and len(history(out)) >= n):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def worker_pid(torchrun: int, rank: int) -> int:
    """The worker of ``rank`` that the process ``torchrun`` started."""
    for pid in children(torchrun):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under process {torchrun}")


def assert_matches_reference(out: Path, reference: Path) -> None:
    ours, ref = history(out), history(reference)
    assert [int(r["epoch"]) for r in ours] == [int(r["epoch"]) for r in ref] == list(range(1, EPOCHS + 1))
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(
            [float(r[column]) for r in ours], [float(r[column]) for r in ref], rtol=1e-5, err_msg=column
        )
    assert [r["lr"] for r in ours] == [r["lr"] for r in ref]
    _, ckpt = load_model(out / "model.pt")  # the unwrapped model's state: no "module." prefix
    _, ref_ckpt = load_model(reference / "model.pt")
    assert ckpt["best_epoch"] == ref_ckpt["best_epoch"] and ckpt["epoch"] == ref_ckpt["epoch"]
    assert ckpt["model_state"].keys() == ref_ckpt["model_state"].keys()
    assert not [k for k in ckpt["model_state"] if k.startswith("module.")]
    for key, value in ckpt["model_state"].items():
        torch.testing.assert_close(value, ref_ckpt["model_state"][key], rtol=1e-5, atol=1e-5, msg=key)


def assert_one_mlflow_run(cfg: dict, out: Path) -> None:
    """One run (rank 0's), finished, with one value per epoch of each metric, equal to history.csv."""
    from mlflow import MlflowClient

    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name(cfg["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == (out / "mlflow_run_id.txt").read_text().strip()
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    for name in ("train_loss", "val_loss", "lr", "samples_per_s"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == list(range(1, EPOCHS + 1))
    logged = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)
    assert [m.value for m in logged] == pytest.approx([float(r["val_loss"]) for r in history(out)], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_shards_partition_each_batch() -> None:
    batches = [[7, 3, 9, 1], [4, 0, 8], [5]]
    shares = [shard_batches(batches, r, 2) for r in range(2)]
    assert shares == [[[7, 9], [4, 8], [5]], [[3, 1], [0], []]]
    for i, batch in enumerate(batches):
        assert sorted(shares[0][i] + shares[1][i]) == sorted(batch)
    assert shard_batches(batches, 0, 1) == batches
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        shard_batches(batches, 2, 2)


@pytest.mark.parametrize("world_size, batch_size", [(2, 5), (3, 2)])  # (3, 2): one rank has no share
def test_averaged_share_gradients_equal_the_batch_gradient(world_size: int, batch_size: int) -> None:
    """DDP averages the ranks' gradients of share_loss: that must be the gradient of masked_mse."""
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    weights = loop.loss_weights(np.arange(30).reshape(5, 6) % 4 != 0, np.linspace(0, 60, 5), True)
    x = torch.randn(batch_size, 2, 1, 5, 6, generator=gen)  # (B, T, C, H, W)
    y = torch.randn(batch_size, 2, 1, 5, 6, generator=gen)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, list(net.parameters())))

    def forward(idx: list[int]) -> torch.Tensor:
        return net(x[idx].flatten(0, 1)).view(len(idx), 2, 1, 5, 6)

    expected = grads(loop.masked_mse(forward(list(range(batch_size))), y, weights))
    total = [torch.zeros_like(g) for g in expected]
    for rank in range(world_size):
        share = shard_batches([list(range(batch_size))], rank, world_size)[0]
        idx = share or [0]
        loss = loop.share_loss(
            forward(idx), y[idx], weights, batch_size=batch_size, world_size=world_size, has_share=bool(share)
        )
        total = [t + g for t, g in zip(total, grads(loss))]
    for t, e in zip(total, expected):
        torch.testing.assert_close(t / world_size, e, rtol=1e-5, atol=1e-7)


def test_the_rule_launches_torchrun_for_more_than_one_process() -> None:
    cfg = validate_config(
        {"runs": [{"name": "one"}, {"name": "cpu2", "train": {"gpus": 2, "device": "cpu", "batch_size": 4}}]}
    )
    assert distributed.rule_launcher(cfg, "one") == "python -m conv2dlstm"
    torchrun = distributed.rule_launcher(cfg, "cpu2")
    assert shlex.split(torchrun) == distributed.launch_command(2)
    assert torchrun.startswith("torchrun --standalone --nproc-per-node=2 --signals-to-handle=SIGTERM,SIGINT,")
    assert torchrun.endswith(" --shutdown-timeout=120 -m -- conv2dlstm")


def test_distributed_is_torch_free() -> None:
    """The Snakefile imports it (the train rule's launcher) where torch may not be installed."""
    code = "import sys, conv2dlstm.training.distributed; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_torchrun_hands_the_rule_arguments_to_every_worker_untouched() -> None:
    """The train rule's arguments after ``torchrun ... -m -- conv2dlstm``: the whole configuration,
    from which each worker derives its run's (and the sweep tags)."""
    full = validate_config({"runs": [{"name": "small", "train": {"gpus": 2, "batch_size": 4}}]})
    argv = ["train", "--config-json", json.dumps(full), "--run", "small", "--windows", "w.zarr", "--stats", "s.nc"]
    argv += ["--out-dir", "o", "--time-limit-minutes", "240"]
    args = cli.build_parser().parse_args(argv)
    assert (args.step, args.run, args.windows, args.stats, args.out_dir) == (
        "train",
        "small",
        Path("w.zarr"),
        Path("s.nc"),
        Path("o"),
    )
    assert run_config(load_config(json_text=args.config_json), "small") == run_config(full, "small")
    # torchrun hands every argument after the module to the workers untouched
    from torch.distributed.run import parse_args

    command = distributed.launch_command(2)
    assert command[0] == "torchrun"
    parsed = parse_args([*command[1:], *argv])
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (True, "conv2dlstm", argv)
    assert parsed.nproc_per_node == "2" and parsed.standalone and "SIGUSR1" in parsed.signals_to_handle


def _train_then_fail(seen: list) -> None:
    """A DDP model trained one step in this frame (gloo, the default group), then an error."""
    model = torch.nn.Conv2d(1, 2, 3)
    net = distributed.wrap_model(model, distributed.Context(0, 0, 2), torch.device("cpu"))
    net(torch.randn(2, 1, 5, 5)).square().mean().backward()  # the reducer's allreduce on the gloo threads
    seen.append(weakref.ref(net))
    raise RuntimeError("a step failed")


def test_a_failed_block_frees_its_ddp_model_before_the_group_is_destroyed(monkeypatch) -> None:
    """The DDP model of a block that raised is gone when the process group is destroyed: were its
    reducer the group's last holder, destroying it (GIL held) could wait forever on gloo threads
    that need the GIL (``release_frames``). A second rank cannot join in this process, so the
    rendezvous is an in-process store of one rank; the group, DDP and their teardown are torch's."""
    import torch.distributed as dist

    init, destroy = dist.init_process_group, dist.destroy_process_group
    seen: list = []
    alive_at_destroy: list[bool] = []
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend, **kw: init(backend, store=dist.HashStore(), rank=0, world_size=1)
    )

    def recording_destroy(*args, **kwargs):
        alive_at_destroy.append(seen[0]() is not None)
        return destroy(*args, **kwargs)

    monkeypatch.setattr(dist, "destroy_process_group", recording_destroy)
    with pytest.raises(RuntimeError, match="a step failed") as failed:
        with distributed.process_group(distributed.Context(0, 0, 2), torch.device("cpu")):
            _train_then_fail(seen)
    assert alive_at_destroy == [False]
    assert not dist.is_initialized()
    assert "_train_then_fail" in "".join(traceback.format_tb(failed.value.__traceback__))  # the text is kept


def test_release_frames_frees_what_chained_exceptions_keep() -> None:
    class Held:
        pass

    def fails(kept: list) -> None:
        held = Held()
        kept.append(weakref.ref(held))
        raise KeyError("first")

    kept: list = []
    try:
        try:
            fails(kept)
        except KeyError as first:
            raise ValueError("second") from first
    except ValueError as exc:
        assert kept[0]() is not None  # the traceback of the cause holds the frame of fails()
        distributed.release_frames(exc)
        assert kept[0]() is None


def test_context_from_environment() -> None:
    assert distributed.Context.from_env({}) == distributed.Context(0, 0, 1)
    assert not distributed.under_torchrun({}) and distributed.under_torchrun({"LOCAL_RANK": "0"})
    ctx = distributed.Context.from_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (1, 2, True, False)
    with pytest.raises(ConfigError, match="RANK=2, LOCAL_RANK=0, WORLD_SIZE=2 in the environment are inconsistent"):
        distributed.Context.from_env({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})


def test_more_than_one_process_outside_torchrun_is_refused_at_once(store, tmp_path, capsys, monkeypatch) -> None:
    """``python -m conv2dlstm train`` of a run with train.gpus: 2: exit status 2, nothing written,
    the error names the value and the torchrun command."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    cfg = ddp_config(tmp_path / "mlflow.db", gpus=2)
    out = tmp_path / "out"
    assert cli.main(cli_args(cfg, store, out)) == 2
    err = capsys.readouterr().err
    assert "train.gpus = 2 (run convlstm) trains with 2 processes started by torchrun" in err
    assert f"start it as `{shlex.join(distributed.launch_command(2))} train <the same arguments>`" in err
    assert "or set train.gpus to 1" in err
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()
    distributed.require_torchrun(2, "convlstm", {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})  # a worker
    distributed.require_torchrun(1, "convlstm", {})  # one process


def test_batch_not_divisible_by_processes(store, tmp_path, capsys, monkeypatch) -> None:
    """In a plain CLI process (exit status 2, nothing written; before the launcher's error, which
    torchrun would not fix alone) and in a torchrun worker."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = ddp_config(tmp_path / "mlflow.db", gpus=2)
    cfg["train"]["batch_size"] = 3  # past validation, which refuses it as well (tests/unit/test_config.py)
    out = tmp_path / "out"
    assert cli.main(cli_args(cfg, store, out)) == 2
    err = capsys.readouterr().err
    assert "train.batch_size = 3 (the global batch) is not divisible by the 2 training processes" in err
    assert "set train.batch_size to a multiple of 2" in err
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="train.batch_size = 3 .* not divisible by the 2 training processes"):
        train.main(cfg, run="convlstm", windows=store.store, stats=store.stats, out_dir=out)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Two CPU processes through torchrun
# ---------------------------------------------------------------------------------------------


def test_two_processes_give_the_single_process_run(store, reference, mlflow_db, tmp_path) -> None:
    cfg = ddp_config(mlflow_db, gpus=2, experiment="test-ddp-two")
    out = tmp_path / "out"
    code, output = finish(start_cli(cfg, store, out))
    assert code == 0, output
    assert {p.name for p in out.iterdir()} == OUTPUTS  # rank 0 alone writes, nothing partial
    assert output.count("run complete") == 1 and output.count("epoch 1/5") == 1
    assert_matches_reference(out, reference)
    from conv2dlstm.config.keys import step_view

    assert torch.load(out / "last.pt", weights_only=True)["config"] == step_view(run_config(cfg, "convlstm"), "train")
    assert_one_mlflow_run(cfg, out)


def test_signals_stop_all_ranks_and_resume(store, reference, mlflow_db, tmp_path) -> None:
    """SIGTERM to torchrun (which passes it on to the workers), then SIGUSR1 to rank 1 alone (all
    ranks agree to stop at the same step); each time rank 0 leaves a consistent last.pt and a KILLED
    MLflow run, and the resumed run ends as the uninterrupted single-process one."""
    from mlflow import MlflowClient

    cfg = ddp_config(mlflow_db, gpus=2, experiment="test-ddp-signals")
    out = tmp_path / "out"
    client = MlflowClient(cfg["mlflow"]["tracking_uri"])
    done = 0
    for target, signum in (("torchrun", signal.SIGTERM), ("rank 1", signal.SIGUSR1)):
        proc = start_cli(cfg, store, out)
        wait_for_epochs(proc, out, done + 1)
        os.kill(proc.pid if target == "torchrun" else worker_pid(proc.pid, rank=1), signum)
        code, output = finish(proc)
        # the workers exit 128 + signal (torchrun reports it for a worker that stopped first);
        # torchrun itself exits 1, after a signal as after a failed worker
        assert code == 1, output
        assert f"run convlstm stopped on {signum.name}" in output, output
        assert target == "torchrun" or f"(exitcode: {128 + signum})" in output, output
        state = torch.load(out / "last.pt", weights_only=True)
        assert not state["finished"] and done < state["epoch"] < EPOCHS, (target, state["epoch"])
        assert len(state["history"]) == len(history(out)) == state["epoch"]
        assert not (out / "model.pt").exists()
        run_id = (out / "mlflow_run_id.txt").read_text().strip()
        assert client.get_run(run_id).info.status == "KILLED", output  # rank 0 stopped on the agreed signal
        done = state["epoch"]

    code, output = finish(start_cli(cfg, store, out))
    assert code == 0, output
    assert f"resuming run convlstm after epoch {done}" in output
    assert (out / "mlflow_run_id.txt").read_text().strip() == run_id
    assert_matches_reference(out, reference)
    assert_one_mlflow_run(cfg, out)
