"""Tracking that holds with many jobs at once, and while a tracking server goes away.

- Four training jobs at once (the tiny pipeline's windows prepared once, then a ``sweep`` of four
  seeds trained by the real Snakemake with ``--cores 4``, one thread each) log to one store: the
  default SQLite file, and an ``mlflow server`` with ``--serve-artifacts`` (``MLFLOW_TRACKING_URI``
  exported, as on a cluster). Every run, every per-epoch metric, every checkpoint and model is
  recorded, and no log holds a lock error or a traceback.
- A real server stopped during training: the training goes on, the metrics it could not send are
  sent once the server is back; a server still away at the end stops the step before ``model.pt``,
  and the rerun trains no further and logs what the run lacks.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import TrackingError
from conv2dlstm.steps import train
from conv2dlstm.tracking import store as tracking
from tests.support.mlflow_server import MlflowServer
from tests.support.windows_fixture import make_windows_store
from tests.support.workflow import REPO, job_env, run_snakemake

pytestmark = pytest.mark.e2e

TINY = REPO / "tests/configs/tiny.yaml"
EXPERIMENT = "load"
SEEDS = tuple(range(4))
RUNS = tuple(f"seed{s}" for s in SEEDS)
EPOCHS = 2
LOCK_ERRORS = ("database is locked", "database table is locked", "Traceback", "OperationalError")


@pytest.fixture(scope="module")
def prepared(tiny_run: Path, tmp_path_factory) -> Path:
    """A copy of the complete tiny pipeline (its windows and statistics are there), with ``load.yaml``:
    the tiny pipeline, a sweep of four seeds, two epochs of two small batches, models logged."""
    wf = tmp_path_factory.mktemp("load") / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["experiment"] = EXPERIMENT
    cfg["train"].update({"epochs": EPOCHS, "batch_size": 4, "max_batches_per_epoch": 2, "device": "cpu"})
    cfg["mlflow"]["log_model"] = True
    cfg["sweep"] = {"train.seed": list(SEEDS)}
    (wf / "load.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_snakemake(
        wf, "results/windows/oisst.zarr", "results/normalize/oisst.nc", "--cores", "2", "--configfile", "load.yaml"
    )  # targets first: --configfile takes several files
    assert "Nothing to be done" in proc.stdout + proc.stderr  # the sweep changes no data step
    for tracked in ("mlflow.db", "mlruns"):  # the tiny run's own records: these tests start with none
        path = wf / tracked
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return wf


def _check_store(uri: str) -> None:
    """Every run of the sweep is in the store, finished, with each epoch's metrics, its files and model."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert sorted(r.info.run_name for r in runs) == sorted(RUNS)
    sweeps = {r.data.tags["sweep"] for r in runs}
    assert len(sweeps) == 1, sweeps
    models = client.search_logged_models([exp.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in runs)
    for run in runs:
        run_id, name = run.info.run_id, run.info.run_name
        assert run.info.status == "FINISHED", name
        for metric in train.EPOCH_METRICS:
            steps = sorted(m.step for m in client.get_metric_history(run_id, metric))
            assert steps == list(range(1, EPOCHS + 1)), (name, metric, steps)
        assert "best_val_loss" in run.data.metrics, name
        assert run.data.params["train.seed"] == name.removeprefix("seed")
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"checkpoints", "history.csv", "model_summary.txt"} <= artifacts, (name, artifacts)
        assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]
    for model in models:
        assert str(model.status).upper().endswith("READY"), model
        files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
        assert {"MLmodel", "data"} <= files, files


def _no_lock_errors(*logs: Path) -> None:
    for log in logs:
        text = log.read_text(errors="replace")
        found = [e for e in LOCK_ERRORS if e in text]
        assert not found, f"{log}: {found}\n{text[-3000:]}"


def _train_all(wf: Path, env: dict[str, str]) -> list[Path]:
    """Train the runs at once through Snakemake (as many cores as runs); their logs."""
    targets = [f"results/train/{run}/model.pt" for run in RUNS]
    run_snakemake(
        wf,
        *targets,
        "--cores",
        str(len(RUNS)),
        "--set-threads",
        "train=1",
        "--configfile",
        "load.yaml",
        env=env,
        timeout=900,
    )
    logs = [wf / "results/logs/train" / f"{run}.log" for run in sorted(RUNS)]  # (the tiny run's is there too)
    assert all(log.is_file() for log in logs), logs
    return logs


def test_four_jobs_at_once_into_one_sqlite_store(prepared: Path, tmp_path: Path) -> None:
    wf = tmp_path / "wf"
    shutil.copytree(prepared, wf, symlinks=True)
    logs = _train_all(wf, job_env())
    _check_store(f"sqlite:///{wf}/mlflow.db")
    _no_lock_errors(*logs)


def test_four_jobs_at_once_through_an_mlflow_server(prepared: Path, tmp_path: Path) -> None:
    wf = tmp_path / "wf"
    shutil.copytree(prepared, wf, symlinks=True)
    with MlflowServer(
        tmp_path,
        f"sqlite:///{tmp_path}/server.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ) as server:
        logs = _train_all(wf, job_env({"MLFLOW_TRACKING_URI": server.url}))
        _check_store(server.url)
    assert not (wf / "mlflow.db").exists() and not (wf / "mlruns").exists(), "nothing logged beside the workflow"
    assert list((tmp_path / "server-artifacts").rglob("best.pt")), "artifacts went through the server"
    _no_lock_errors(*logs, server.log)


# ------------------------------------------------------------------------------------------------
# A server that goes away during training


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def server(tmp_path: Path, monkeypatch) -> MlflowServer:
    """A real server with artifacts served through it; the training process talks to it only."""
    srv = MlflowServer(
        tmp_path,
        f"sqlite:///{tmp_path}/server.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    )
    srv.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    for key, value in tracking.HTTP_RETRY_DEFAULTS.items():  # set here so the test restores them
        monkeypatch.setenv(key, value)
    yield srv
    srv.stop()


def _config(tmp_path: Path, epochs: int) -> dict:
    return validate_config(
        {
            "experiment": "outage",
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4]}},
            "train": {"epochs": epochs, "batch_size": 8, "patience": epochs, "device": "cpu", "learning_rate": 0.01},
        }
    )


def _stop_and_start(monkeypatch, server: MlflowServer, *, stop_at: int, start_at: int | None):
    """The server stops just before the metrics of epoch ``stop_at`` are sent and starts again before
    those of epoch ``start_at`` (never, when None). Returns the real ``Tracker.log_metrics``."""
    real = tracking.Tracker.log_metrics

    def log_metrics(self, metrics, step=None, **kwargs):
        if step == stop_at:
            server.stop()
        if start_at is not None and step == start_at:
            server.start()
        return real(self, metrics, step, **kwargs)

    monkeypatch.setattr(tracking.Tracker, "log_metrics", log_metrics)
    return real


def test_training_goes_on_while_the_server_is_away(
    tmp_path: Path, server: MlflowServer, monkeypatch, caplog, one_thread
) -> None:
    from mlflow import MlflowClient

    fx = make_windows_store(tmp_path / "w.zarr", n_time=40, height=10, width=12)
    out = tmp_path / "train" / "r"
    monkeypatch.setenv(tracking.WAIT_ENV, "5")  # the first failed epoch waits 5 s for the server, not 30
    _stop_and_start(monkeypatch, server, stop_at=2, start_at=4)
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        train.main(_config(tmp_path, 5), run="r", windows=fx.store, stats=fx.stats, out_dir=out)
    assert (out / "model.pt").is_file()
    assert "cannot log metrics to run" in caplog.text and "training goes on" in caplog.text
    assert "the store answers again" in caplog.text

    client = MlflowClient(server.url)
    run = client.get_run((out / "mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FINISHED"
    history = {int(r.split(",")[0]): float(r.split(",")[2]) for r in (out / "history.csv").read_text().split()[1:]}
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert logged == pytest.approx(history) and sorted(logged) == [1, 2, 3, 4, 5]  # nothing lost
    assert {"checkpoints", "history.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(client.search_logged_models([run.info.experiment_id])) == 1


def test_server_away_at_the_end_stops_before_model_pt_and_the_rerun_only_logs(
    tmp_path: Path, server: MlflowServer, monkeypatch, caplog, one_thread
) -> None:
    from mlflow import MlflowClient

    fx = make_windows_store(tmp_path / "w.zarr", n_time=40, height=10, width=12)
    out = tmp_path / "train" / "r"
    cfg = _config(tmp_path, 3)
    monkeypatch.setenv(tracking.WAIT_ENV, "3")
    real = _stop_and_start(monkeypatch, server, stop_at=3, start_at=None)
    with pytest.raises(TrackingError, match=r"training is complete .* rerun the train step once the store is back"):
        train.main(cfg, run="r", windows=fx.store, stats=fx.stats, out_dir=out)
    assert not (out / "model.pt").exists()
    trained = (out / "history.csv").read_text()
    assert len(trained.split()) == 1 + 3

    monkeypatch.setattr(tracking.Tracker, "log_metrics", real)  # the server stays up from here on
    server.start()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        train.main(cfg, run="r", windows=fx.store, stats=fx.stats, out_dir=out)
    assert (out / "model.pt").is_file() and (out / "history.csv").read_text() == trained  # no more training
    assert "resuming run r after epoch 3" in caplog.text
    assert "lacked the metrics of step(s) [3]" in caplog.text

    client = MlflowClient(server.url)
    run = client.get_run((out / "mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FINISHED" and "best_val_loss" in run.data.metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [1, 2, 3]
    assert len(client.search_logged_models([run.info.experiment_id])) == 1
