"""MLflow tracking: URI resolution, fail-fast store checks (real HTTP servers), runs in a real sqlite store."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conv2dlstm.config.runs import flatten
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import TrackingError
from conv2dlstm.tracking import store as tracking


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """No tracking URI from the environment, and none left behind: ``mlflow.set_tracking_uri``
    exports ``MLFLOW_TRACKING_URI``, which overrides a configuration's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(status: int) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering every GET with ``status``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"OK" if status == 200 else b"error")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_resolve_tracking_uri_env_overrides(monkeypatch) -> None:
    cfg = validate_config({"mlflow": {"tracking_uri": "sqlite:///a.db"}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(cfg) == "sqlite:///a.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"


def test_unreachable_server_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is unreachable"):
        tracking.check_tracking(uri, timeout_s=5)
    assert time.monotonic() - start < 5  # refused at once, not after the timeout


def test_healthy_server_passes() -> None:
    with http_server(200) as uri:
        tracking.check_tracking(uri, timeout_s=5)


def test_failing_server_names_status() -> None:
    with http_server(503) as uri, pytest.raises(TrackingError, match=f"{uri} answered HTTP 503"):
        tracking.check_tracking(uri, timeout_s=5)


def test_sqlite_store_must_be_writable(tmp_path) -> None:
    tracking.check_tracking(f"sqlite:///{tmp_path}/sub/mlflow.db")
    assert (tmp_path / "sub").is_dir()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker}/mlflow.db"
    with pytest.raises(TrackingError, match=f"MLflow tracking store {uri}: directory .* is not writable"):
        tracking.check_tracking(uri)
    (tmp_path / "db_dir").mkdir()
    with pytest.raises(TrackingError, match="is a directory, not a database file"):
        tracking.check_tracking(f"sqlite:///{tmp_path}/db_dir")


def test_a_damaged_sqlite_store_is_named_with_the_way_back(tmp_path) -> None:
    """A damaged ``mlflow.db`` stops the step at the check with the URI, what SQLite found and the way
    back, not a SQLAlchemy traceback deep in MLflow."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
        con.executemany("INSERT INTO runs (name) VALUES (?)", [(f"run-{i}" * 40,) for i in range(2000)])
        con.execute("CREATE INDEX by_name ON runs (name)")
    uri = f"sqlite:///{db}"
    tracking.check_tracking(uri)  # intact
    data = bytearray(db.read_bytes())
    page = 4096
    data[5 * page : 5 * page + 200] = b"\xff" * 200  # a page in the middle, as a bad sector or a torn write
    db.write_bytes(bytes(data))
    with pytest.raises(TrackingError, match=rf"MLflow tracking store {uri}: the database .* is damaged \(.*restore it"):
        tracking.check_tracking(uri)
    db.write_bytes(b"garbage" * 1000)  # the header itself
    with pytest.raises(TrackingError, match=r"is damaged \(file is not a database\).*mlflow-new.db"):
        tracking.check_tracking(uri)


def test_local_store_path() -> None:
    assert str(tracking.local_store_path("sqlite:///mlflow.db")) == "mlflow.db"
    assert str(tracking.local_store_path("sqlite:////abs/m.db")) == "/abs/m.db"
    assert str(tracking.local_store_path("file:///abs/mlruns")) == "/abs/mlruns"
    assert str(tracking.local_store_path("./mlruns")) == "mlruns"
    assert tracking.local_store_path("http://host:5000") is None
    assert tracking.local_store_path("postgresql://u@h/db") is None


def test_git_state_outside_a_repository(tmp_path) -> None:
    assert tracking.git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_start_run_logs_config_and_tags_and_resumes(tmp_path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "exp-a", "mlflow": {"tracking_uri": uri}})
    with tracking.start_run(cfg, "run-a", tags={"stats_sha256": "abc"}, tracking_uri=uri) as tracker:
        tracker.log_metrics({"val_loss": 0.5}, step=1)
        run_id = tracker.run_id
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "run-a" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp-a"
    assert client.get_experiment(run.info.experiment_id).artifact_location == (tmp_path / "mlruns" / "exp-a").as_uri()
    assert run.data.params == flatten(cfg)
    tags = run.data.tags
    assert tags["stats_sha256"] == "abc"
    assert {"git.commit", "git.dirty", "version.torch", "version.mlflow", "version.zarr", "version.conv2dlstm"} <= set(
        tags
    )

    # A preempted training reopens its run; a training interrupted by SystemExit ends KILLED.
    with pytest.raises(SystemExit), tracking.start_run(cfg, "run-a", run_id=run_id, tracking_uri=uri) as tracker:
        assert tracker.run_id == run_id
        tracker.log_metrics({"val_loss": 0.4}, step=2)
        raise SystemExit(143)
    assert client.get_run(run_id).info.status == "KILLED"
    with tracking.resume_run(run_id, tracking_uri=uri) as tracker:
        tracker.log_metrics({"test_rmse": 1.5})
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [0.5, 0.4]
    assert run.data.metrics["test_rmse"] == 1.5
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_unknown_run(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError, match=f"MLflow run 0123abc is not in the tracking store {uri}"):
        with tracking.resume_run("0123abc", tracking_uri=uri):
            pass


def test_reopened_run_keeps_the_params_of_its_model(tmp_path, caplog) -> None:
    """A runtime param may change on resume (kept as first logged); a param that determines the model
    may not: that would be another model in the same MLflow run."""
    import logging

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "exp-b", "mlflow": {"tracking_uri": uri}, "train": {"device": "cpu"}})
    fixed = ("train.learning_rate",)
    with tracking.start_run(cfg, "run-b", tracking_uri=uri, fixed_params=fixed) as tracker:
        run_id = tracker.run_id
    runtime = validate_config({"experiment": "exp-b", "mlflow": {"tracking_uri": uri}, "train": {"device": "auto"}})
    with (
        caplog.at_level(logging.WARNING, logger="conv2dlstm"),
        tracking.start_run(runtime, "run-b", run_id=run_id, tracking_uri=uri, fixed_params=fixed),
    ):
        pass
    assert "keeps its first values of params ['train.device']" in caplog.text
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.params["train.device"] == "cpu"
    other = validate_config({"experiment": "exp-b", "mlflow": {"tracking_uri": uri}, "train": {"learning_rate": 0.5}})
    with pytest.raises(TrackingError, match=r"train.learning_rate: 0.003 -> 0.5.*must start a new MLflow run"):
        with tracking.start_run(other, "run-b", run_id=run_id, tracking_uri=uri, fixed_params=fixed):
            pass
    assert client.get_run(run_id).data.params["train.learning_rate"] == "0.003"


def test_mark_superseded(tmp_path, caplog) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "exp-c", "mlflow": {"tracking_uri": uri}})
    run_ids = []
    for _ in range(2):
        with tracking.start_run(cfg, "run-c", tracking_uri=uri) as tracker:
            run_ids.append(tracker.run_id)
    old, new = run_ids
    assert tracking.mark_superseded(uri, old, new)
    tags = MlflowClient(uri).get_run(old).data.tags
    assert tags["superseded"] == "true" and tags["superseded_by"] == new
    assert not tracking.mark_superseded(uri, "0" * 32, new)
    assert "cannot be tagged" in caplog.text


def test_new_experiment_opens_on_training_runs_and_runs_carry_their_tags(tmp_path, monkeypatch) -> None:
    """The experiment kind makes the MLflow UI open on the runs table; runs carry name, commit, job."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = validate_config({"experiment": "exp-kind", "mlflow": {"tracking_uri": uri}})
    with tracking.start_run(cfg, "lr0.001-convlstm", tracking_uri=uri, tags={"sweep": "abc"}) as tracker:
        run_id = tracker.run_id
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp-kind")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags = client.get_run(run_id).data.tags
    assert tags["run"] == "lr0.001-convlstm" and tags["mlflow.runName"] == "lr0.001-convlstm"
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] != ""
    assert tags["slurm.job_id"] == "4242" and tags["sweep"] == "abc"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert tracking.job_tags() == {}

    # an experiment created elsewhere without a kind (or with one the UI inferred) gets it
    other = client.create_experiment("made-by-hand", tags={"mlflow.experimentKind": "no_inferred_type"})
    with tracking.start_run(validate_config({"experiment": "made-by-hand"}), "r", tracking_uri=uri):
        pass
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
    mine = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    with tracking.start_run(validate_config({"experiment": "genai"}), "r", tracking_uri=uri):
        pass
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"  # a user's choice


def _locked() -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")


def test_transient_errors() -> None:
    from mlflow.exceptions import MlflowException

    assert tracking.transient(_locked())
    assert tracking.transient(
        MlflowException(
            "API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception HTTPConnectionPool"
            "(host='127.0.0.1', port=9): Max retries exceeded with url",
            error_code="INTERNAL_ERROR",
        )
    )
    assert tracking.transient(ConnectionRefusedError(111, "Connection refused"))
    assert not tracking.transient(MlflowException("Run 'x' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not tracking.transient(MlflowException("Invalid value", error_code="INVALID_PARAMETER_VALUE"))
    assert not tracking.transient(FileNotFoundError("no such file"))
    assert not tracking.transient(ValueError("bad"))


def test_retry_backs_off_on_transient_errors_only(monkeypatch) -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise _locked()
        return "ok"

    assert tracking.retry("a call", flaky, budget_s=10, first_delay_s=0.05) == "ok"
    assert len(calls) == 3 and calls[2] - calls[1] > calls[1] - calls[0] > 0.04  # growing pauses
    with pytest.raises(ValueError):
        tracking.retry("a call", lambda: (_ for _ in ()).throw(ValueError("bad")), budget_s=10)
    start = time.monotonic()
    with pytest.raises(Exception, match="database is locked"):
        tracking.retry("a call", lambda: (_ for _ in ()).throw(_locked()), budget_s=0.3, first_delay_s=0.05)
    assert time.monotonic() - start < 2
    monkeypatch.setenv(tracking.WAIT_ENV, "soon")
    with pytest.raises(TrackingError, match="CONV2DLSTM_MLFLOW_WAIT_S='soon' is not a number of seconds"):
        tracking.wait_budget_s()


def test_metrics_wait_while_the_store_fails_and_are_sent_in_order_later(tmp_path, monkeypatch, caplog) -> None:
    """A store failing for a while never fails log_metrics: the metrics wait, keep their step and
    time, and go out first when it answers again; leaving the run with metrics unsent is an error."""
    import logging

    from mlflow import MlflowClient

    monkeypatch.setenv(tracking.WAIT_ENV, "0.2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "exp-down", "mlflow": {"tracking_uri": uri}})
    down = {"on": False}
    real_send = tracking.Tracker._send

    def send(self, item):
        if down["on"]:
            raise _locked()
        return real_send(self, item)

    monkeypatch.setattr(tracking.Tracker, "_send", send)
    with (
        caplog.at_level(logging.WARNING, logger="conv2dlstm"),
        tracking.start_run(cfg, "r", tracking_uri=uri) as tracker,
    ):
        assert tracker.log_metrics({"val_loss": 1.0}, step=1)
        down["on"] = True
        assert not tracker.log_metrics({"val_loss": 0.9}, step=2)
        assert not tracker.log_metrics({"val_loss": 0.8}, step=3)
        assert [p.step for p in tracker.pending] == [2, 3] and tracker.failing
        down["on"] = False
        assert tracker.log_metrics({"val_loss": 0.7}, step=4)
        assert not tracker.pending and not tracker.failing
        run_id = tracker.run_id
    assert "cannot log metrics to run" in caplog.text and "training goes on" in caplog.text
    history = MlflowClient(uri).get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 1.0),
        (2, 0.9),
        (3, 0.8),
        (4, 0.7),
    ]
    assert len({m.timestamp for m in history}) >= 2  # each kept its own time

    down["on"] = True
    with pytest.raises(TrackingError, match=r"did not accept the metrics of step\(s\) \[0\]"):
        with tracking.resume_run(run_id, tracking_uri=uri) as tracker:
            tracker.log_metrics({"test_rmse": 1.0})
    down["on"] = False
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_backfill_logs_the_epochs_a_run_lacks(tmp_path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "exp-backfill", "mlflow": {"tracking_uri": uri}})
    rows = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 2.0 / e, "lr": 0.1, "samples_per_s": 5.0} for e in (1, 2, 3, 4)
    ]
    with tracking.start_run(cfg, "r", tracking_uri=uri) as tracker:
        tracker.log_metrics({k: v for k, v in rows[0].items() if k != "epoch"}, step=1)
        assert tracker.backfill(rows, ("train_loss", "val_loss", "lr", "samples_per_s")) == 3
        assert tracker.backfill(rows, ("train_loss", "val_loss", "lr", "samples_per_s")) == 0
        run_id = tracker.run_id
    history = MlflowClient(uri).get_metric_history(run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.0), (3, 2.0 / 3), (4, 0.5)]


def test_ui_address_opens_the_training_runs(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(TrackingError, match="does not exist yet"):
        tracking.ui_address(uri, "exp-ui")
    cfg = validate_config({"experiment": "exp-ui", "mlflow": {"tracking_uri": uri}})
    with tracking.start_run(cfg, "r", tracking_uri=uri):
        pass
    from mlflow import MlflowClient

    exp_id = MlflowClient(uri).get_experiment_by_name("exp-ui").experiment_id
    assert (
        tracking.ui_address(uri, "exp-ui")
        == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    )
    assert tracking.ui_address(uri, "exp-ui", "http://login01:5000/").startswith("http://login01:5000/#/experiments/")
    with pytest.raises(TrackingError, match="experiment 'nope' is not in"):
        tracking.ui_address(uri, "nope")


def test_reading_the_store_does_not_load_torch(tmp_path: Path) -> None:
    """compare and summary read the store and never run a network: torch (2 s to import on two
    cores) loads only where a model is logged or evaluated."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys, conv2dlstm.cli, conv2dlstm.steps.compare, conv2dlstm.evaluation.results\n"
        "from conv2dlstm.errors import TrackingError\n"
        "from conv2dlstm.tracking import store\n"
        f"client = store.open_client({uri!r})\n"
        "client.create_experiment('exp')\n"
        f"print(store.ui_address({uri!r}, 'exp').endswith('runs?' + store.UI_QUERY))\n"
        "try:\n"
        f"    store.ui_address({uri!r}, 'absent')\n"
        "except TrackingError:\n"
        "    print('refused')\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "refused", "False"]
