"""``mlflow-sync`` without a tracking server (the end-to-end test with one: tests/e2e/test_mlflow_sync.py):
what is copied and what is not, sqlite to sqlite, idempotently; errors that name the store and the fix
(unreachable, HTTP 401 / 403 from a stand-in server, credentials in the URI), never the credentials."""

from __future__ import annotations

import http.server
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from conv2dlstm.cli import main
from conv2dlstm.errors import TrackingError
from conv2dlstm.tracking import sync
from tests.support.mlflow_server import free_port

PASSWORD = "pw-5e2b9c-S3CR3T"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("CONV2DLSTM_MLFLOW_WAIT_S", "0")


def point(step: int, timestamp: int, value: float) -> SimpleNamespace:
    return SimpleNamespace(step=step, timestamp=timestamp, value=value)


def test_missing_points_tags_and_mlmodel(tmp_path: Path) -> None:
    held = [point(1, 10, 0.5), point(2, 20, math.nan)]
    source = [*held, point(2, 20, math.nan), point(2, 21, 0.4), point(3, 30, 0.3), point(3, 30, 0.3)]
    assert [(p.step, p.timestamp) for p in sync.missing_points(source, held)] == [(2, 21), (3, 30)]

    runs = {"old": "new"}
    tags = {"run": "a", "superseded_by": "old", "supersedes": "other", "mlflow.runName": "a", "note": "old"}
    assert sync.wanted_tags(tags, "src", runs) == {
        "run": "a",
        "superseded_by": "new",  # names the copied run
        "supersedes": "other",  # a run not copied: as it is
        "note": "old",  # not a run id tag
        sync.SYNCED_FROM_TAG: "src",
    }

    mlmodel = tmp_path / "MLmodel"
    mlmodel.write_text("artifact_path: file:///src/m-1/artifacts\nmodel_id: m-1\nrun_id: r1\nflavors: {pytorch: {}}\n")
    sync.retarget_mlmodel(mlmodel, {"m-1": "m-2", "r1": "r2", "file:///src/m-1/artifacts": "mlflow-artifacts:/m-2"})
    text = mlmodel.read_text()
    assert "model_id: m-2" in text and "run_id: r2" in text and "mlflow-artifacts:/m-2" in text and "m-1" not in text


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A sqlite store with two runs of experiment ``offline``: the second supersedes the first, and
    holds params, tags, a metric history (with a NaN) and a file in a folder. Returns ``(uri,
    superseded run id, run id)``."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    tmp = tmp_path_factory.mktemp("sync-unit")
    uri = f"sqlite:///{tmp}/offline.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("offline", artifact_location=(tmp / "artifacts").as_uri())
    old = client.create_run(exp, run_name="a (superseded)", tags={"run": "a"}).info.run_id
    new = client.create_run(exp, run_name="a", tags={"run": "a", "supersedes": old}).info.run_id
    client.set_tag(old, "superseded_by", new)
    client.set_terminated(old, "FINISHED")
    points = [Metric("val_loss", v, 1000 + s, s) for s, v in enumerate([0.9, 0.5, math.nan], start=1)]
    client.log_batch(new, metrics=points, params=[Param("train.epochs", "3")], tags=[RunTag("git.dirty", "false")])
    (tmp / "evaluate").mkdir()
    (tmp / "evaluate" / "metrics.csv").write_text("run,value\na,1\n")
    client.log_artifact(new, str(tmp / "evaluate" / "metrics.csv"), "evaluate")
    client.set_terminated(new, "FAILED")
    return uri, old, new


def test_sqlite_to_sqlite_copies_once(source: tuple[str, str, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri, old, new = source
    target = f"sqlite:///{tmp_path}/server.db"
    first = sync.sync(uri, target)
    assert (first.experiments, first.runs, first.params, first.metrics, first.artifacts) == (1, 2, 1, 3, 1)
    assert first.runs_seen == 2 and first.statuses == 2

    client, src = MlflowClient(target), MlflowClient(uri)
    exp = client.get_experiment_by_name("offline")
    copies = {r.data.tags[sync.SYNCED_FROM_TAG]: r for r in client.search_runs([exp.experiment_id])}
    assert set(copies) == {old, new}
    copy = copies[new]
    assert (copy.info.run_name, copy.info.status) == ("a", "FAILED")
    assert copy.info.end_time == src.get_run(new).info.end_time
    assert copy.data.params == {"train.epochs": "3"} and copy.data.tags["git.dirty"] == "false"
    assert copy.data.tags["supersedes"] == copies[old].info.run_id  # the copied run, not the source's
    assert copies[old].data.tags["superseded_by"] == copy.info.run_id
    assert copies[old].info.run_name == "a (superseded)"
    history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(copy.info.run_id, "val_loss"))
    assert [h[:2] for h in history] == [(1, 1001), (2, 1002), (3, 1003)] and math.isnan(history[2][2])
    assert [a.path for a in client.list_artifacts(copy.info.run_id, "evaluate")] == ["evaluate/metrics.csv"]
    # a sqlite target keeps its artifacts beside its database, as the pipeline's own store does
    assert (tmp_path / "mlruns" / "offline").is_dir()

    again = sync.sync(uri, target, ["offline"])
    assert again.copied == 0 and again.summary() == "2 run(s) in sync; copied: nothing new"
    assert len(client.get_metric_history(copy.info.run_id, "val_loss")) == 3


def test_store_errors_name_the_store_and_the_fix(source: tuple[str, str, str], tmp_path: Path) -> None:
    uri = source[0]
    missing = f"sqlite:///{tmp_path}/nope.db"
    with pytest.raises(TrackingError, match=r"the source store sqlite:///.*nope\.db does not exist .*--from"):
        sync.sync(missing, f"sqlite:///{tmp_path}/t.db")
    assert not (tmp_path / "nope.db").exists()
    with pytest.raises(TrackingError, match="name the same store"):
        sync.sync(uri, uri)
    with pytest.raises(TrackingError, match=r"holds no experiment 'other'; it holds 'Default', 'offline'"):
        sync.sync(uri, f"sqlite:///{tmp_path}/t.db", ["other"])

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=rf"MLflow tracking server {down} \(target\) is unreachable.*start it"):
        sync.sync(uri, down)

    with pytest.raises(TrackingError) as caught:
        sync.sync(uri, f"http://alice:{PASSWORD}@127.0.0.1:1")
    assert "holds credentials" in str(caught.value) and "MLFLOW_TRACKING_PASSWORD" in str(caught.value)
    assert PASSWORD not in str(caught.value)


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers ``/health`` and refuses everything else with the server's status."""

    status = 401

    def _answer(self) -> None:
        code = 200 if self.path == "/health" else self.status
        body = f"refused; you sent {self.headers.get('Authorization')}".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing() -> Iterator[tuple[str, type[_Refusing]]]:
    handler = type("Handler", (_Refusing,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_point_at_the_environment(source, refusing, status: int, capsys) -> None:
    url, handler = refusing
    handler.status = status
    assert main(["mlflow-sync", "--from", source[0], "--to", url]) == 2
    err = capsys.readouterr().err
    assert f"error: MLflow tracking server {url} (target) refused" in err and f"HTTP {status}" in err
    assert "MLFLOW_TRACKING_USERNAME" in err and "MLFLOW_TRACKING_PASSWORD" in err
    assert PASSWORD not in err and "Traceback" not in err
    assert "refused; you sent Basic ***" in err  # the server echoed the header: redacted
