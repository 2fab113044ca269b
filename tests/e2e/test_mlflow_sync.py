"""Offline tracking, synced later (``python -m conv2dlstm mlflow-sync``, docs/tracking.md): a real sqlite
store as an offline compute node leaves it, copied into a real ``mlflow server``.

The source is made by the project's own code: the train step on a tiny windows store (two tiny epochs,
the model logged), then the compare step's ``register_champion`` (``@champion``) and a ``@challenger``
on the same version. Then, in one scenario:

- the first sync (the CLI) copies the experiment, the run (name, status, times, params, tags, every
  metric history point with its step and timestamp, every artifact), its logged model, the registered
  version and both aliases; the target's ``@champion`` gives the run's ``checkpoints/best.pt``, which
  ``load_model`` loads with the trained weights;
- a second sync (the CLI, its source the ``--config``'s tracking URI) copies nothing;
- the source gains what the evaluate step adds later (metrics, a file, a tag, through the project's
  ``resume_run``) and a val_loss point, ``@champion`` moves to a new version and ``@challenger`` is
  removed: the next sync copies exactly those, with no metric point twice, and one more copies nothing.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from conv2dlstm.cli import main
from conv2dlstm.config.validate import validate_config
from conv2dlstm.steps import train
from conv2dlstm.tracking import registry, sync
from conv2dlstm.tracking import store as tracking
from conv2dlstm.training.models import load_model
from tests.support.mlflow_server import MlflowServer
from tests.support.windows_fixture import make_windows_store

pytestmark = pytest.mark.e2e

EXPERIMENT = "sync-e2e"
RUN = "offline"


@dataclass
class Source:
    uri: str
    run_id: str
    out: Path  # the run's train folder (best.pt)
    config: Path  # a configuration file whose mlflow.tracking_uri is the source


@pytest.fixture(scope="module")
def starting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MlflowServer, Future]]:
    """The target server, starting in the background (seconds of imports) while the source is made."""
    tmp = tmp_path_factory.mktemp("sync-server")
    srv = MlflowServer(tmp, f"sqlite:///{tmp}/server.db", "--artifacts-destination", str(tmp / "artifacts"))
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = pool.submit(srv.start)
        try:
            yield srv, started
        finally:
            wait([started])
            srv.stop()


@pytest.fixture(scope="module")
def server(starting: tuple[MlflowServer, Future], source: Source) -> MlflowServer:
    srv, started = starting
    started.result()
    return srv


@pytest.fixture(scope="module")
def source(starting: tuple[MlflowServer, Future], tmp_path_factory: pytest.TempPathFactory) -> Source:
    """What a compute node without a route to the server leaves: a sqlite store with one training run,
    its logged model, registered as ``@champion`` (and ``@challenger``). (``starting`` first: the server
    starts meanwhile.)"""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("sync-source")
    uri = f"sqlite:///{tmp}/mlflow.db"
    fx = make_windows_store(tmp / "w.zarr", n_time=24, height=6, width=7)
    settings = {
        "experiment": EXPERIMENT,
        "mlflow": {"tracking_uri": uri, "log_model": True},
        "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4]}},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01, "device": "cpu"},
    }
    out = tmp / "train" / RUN
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            train.main(validate_config(settings), run=RUN, windows=fx.store, stats=fx.stats, out_dir=out)
            champion = registry.register_champion(uri, EXPERIMENT)
    finally:
        torch.set_num_threads(threads)
    assert champion is not None and champion.version == "1"
    MlflowClient(uri).set_registered_model_alias(EXPERIMENT, registry.CHALLENGER_ALIAS, "1")
    config = tmp / "offline.yaml"
    config.write_text(yaml.safe_dump({"experiment": EXPERIMENT, "mlflow": {"tracking_uri": uri}}))
    return Source(uri, (out / "mlflow_run_id.txt").read_text().strip(), out, config)


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def copy_of(client, run_id: str):
    """The target's copy of the source run ``run_id`` (exactly one)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{sync.SYNCED_FROM_TAG}` = '{run_id}'")
    assert len(found) == 1, found
    return found[0]


def histories(client, run) -> dict[str, list[tuple[int, int, float]]]:
    """Every metric history of ``run``: ``key -> [(step, timestamp, value), ...]`` in order."""
    return {
        key: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }


def files(client, run_id: str, path: str | None = None) -> dict[str, int]:
    out = {}
    for item in client.list_artifacts(run_id, path):
        out |= files(client, run_id, item.path) if item.is_dir else {item.path: item.file_size}
    return out


def champion_checkpoint(client, tmp: Path, alias: str = registry.CHAMPION_ALIAS) -> Path:
    """``checkpoints/best.pt`` of ``models:/<experiment>@<alias>``, as the forecast step finds it."""
    version = client.get_model_version_by_alias(EXPERIMENT, alias)
    tmp.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(version.run_id, "checkpoints/best.pt", str(tmp)))


def assert_same_run(src, tgt, source_id: str) -> None:
    """The target's copy of run ``source_id`` holds what the source run holds."""
    run, copy = src.get_run(source_id), copy_of(tgt, source_id)
    assert (copy.info.run_name, copy.info.status) == (run.info.run_name, run.info.status) == (RUN, "FINISHED")
    assert (copy.info.start_time, copy.info.end_time) == (run.info.start_time, run.info.end_time)
    assert copy.data.params == run.data.params and len(run.data.params) > 50
    expected = {k: v for k, v in run.data.tags.items() if k not in sync.SKIPPED_TAGS}
    assert {k: copy.data.tags.get(k) for k in expected} == expected
    assert copy.data.tags[sync.SYNCED_FROM_TAG] == source_id
    assert copy.data.tags["provenance.digest"] == run.data.tags["provenance.digest"]
    assert histories(tgt, copy) == histories(src, run)
    assert files(tgt, copy.info.run_id) == files(src, source_id)


def test_offline_store_synced_to_a_server(source: Source, server: MlflowServer, tmp_path: Path, capsys) -> None:
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    src, tgt = MlflowClient(source.uri), MlflowClient(server.url)

    # 1. the first sync copies everything
    assert main(["mlflow-sync", "--from", source.uri, "--to", server.url]) == 0
    assert "1 run(s) in sync; copied: 1 experiments, 1 runs," in capsys.readouterr().out
    exp = tgt.get_experiment_by_name(EXPERIMENT)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert_same_run(src, tgt, source.run_id)
    copy = copy_of(tgt, source.run_id)
    assert {h[0] for h in histories(tgt, copy)["val_loss"]} == {1, 2}
    assert "checkpoints/best.pt" in files(tgt, copy.info.run_id)

    # its logged model: READY, made by the copied run, its MLmodel pointing at the copy
    (model,) = src.search_logged_models([src.get_run(source.run_id).info.experiment_id])
    (copied,) = tgt.search_logged_models([exp.experiment_id])
    assert str(copied.status).endswith("READY") and copied.source_run_id == copy.info.run_id
    assert copied.tags[sync.SYNCED_FROM_TAG] == model.model_id and copied.params == model.params
    assert [o.model_id for o in copy.outputs.model_outputs] == [copied.model_id]
    assert {a.path for a in tgt.list_logged_model_artifacts(copied.model_id)} >= {"MLmodel", "data"}
    (tmp_path / "model").mkdir()
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{copied.artifact_location}/MLmodel", dst_path=str(tmp_path / "model"), tracking_uri=server.url
    )
    spec = yaml.safe_load(Path(local).read_text())
    assert (spec["model_id"], spec["run_id"]) == (copied.model_id, copy.info.run_id)

    # the registry: @champion and @challenger name the copied run's version, whose best.pt loads
    version = tgt.get_model_version_by_alias(EXPERIMENT, registry.CHAMPION_ALIAS)
    assert version.run_id == copy.info.run_id and version.source == f"models:/{copied.model_id}"
    assert version.tags["run_id"] == copy.info.run_id and version.tags["run"] == RUN
    assert version.tags[sync.SYNCED_FROM_TAG] == f"models:/{EXPERIMENT}/1"
    assert tgt.get_model_version_by_alias(EXPERIMENT, registry.CHALLENGER_ALIAS).version == version.version
    net, ckpt = load_model(champion_checkpoint(tgt, tmp_path / "champion"))
    trained = torch.load(source.out / "best.pt", weights_only=True)["model_state"]
    assert ckpt["model_state"].keys() == trained.keys()
    assert all(torch.equal(ckpt["model_state"][k], trained[k]) for k in trained)
    assert not net.training

    # 2. a second sync (its source from --config) copies nothing
    before = histories(tgt, copy_of(tgt, source.run_id))
    assert main(["mlflow-sync", "--config", str(source.config), "--to", server.url]) == 0
    assert capsys.readouterr().out.strip() == "1 run(s) in sync; copied: nothing new"
    assert histories(tgt, copy_of(tgt, source.run_id)) == before
    assert len(tgt.search_runs([exp.experiment_id])) == 1
    assert len(tgt.search_model_versions(f"name = '{EXPERIMENT}'")) == 1
    assert len(tgt.search_logged_models([exp.experiment_id])) == 1

    # 3. the source gains the evaluate step's records and a training epoch; the aliases move
    metrics_csv = tmp_path / "evaluate" / "metrics.csv"
    metrics_csv.parent.mkdir()
    with open(metrics_csv, "w", newline="") as fh:
        csv.writer(fh).writerows(
            [["run", "model", "variable", "lead", "metric", "value"], [RUN, "m", "sst", 1, "rmse", 0.5]]
        )
    with tracking.resume_run(source.run_id, tracking_uri=source.uri) as tracker:
        assert tracker.log_metrics({"test_rmse_sst_lead1": 0.5, "test_rmse_sst_lead2": 0.7}, step=0)
        tracker.set_tags({"evaluate.provenance.digest": "0123456789abcdef"})
        tracker.log_artifact(metrics_csv, "evaluate")
    src.log_batch(source.run_id, metrics=[Metric("val_loss", 0.25, int(time.time() * 1000), 3)])
    v2 = src.create_model_version(
        EXPERIMENT, model.model_uri, run_id=source.run_id, tags={"run": RUN, "run_id": source.run_id}
    )
    src.set_registered_model_alias(EXPERIMENT, registry.CHAMPION_ALIAS, v2.version)
    src.delete_registered_model_alias(EXPERIMENT, registry.CHALLENGER_ALIAS)

    report = sync.sync(source.uri, server.url)
    assert (report.runs, report.models, report.params, report.experiments) == (0, 0, 0, 0)
    assert report.metrics == 3, report  # two new keys, one new val_loss point
    assert (report.artifacts, report.versions, report.aliases, report.statuses) == (1, 1, 2, 1), report
    assert report.tags == 1, report  # evaluate.provenance.digest
    assert_same_run(src, tgt, source.run_id)
    after = histories(tgt, copy_of(tgt, source.run_id))
    assert [h[0] for h in after["val_loss"]] == [1, 2, 3]
    assert after["test_rmse_sst_lead1"] == [(0, after["test_rmse_sst_lead1"][0][1], 0.5)]
    assert {k: v for k, v in after.items() if k in before and k != "val_loss"} == {
        k: v for k, v in before.items() if k != "val_loss"
    }
    champion = tgt.get_model_version_by_alias(EXPERIMENT, registry.CHAMPION_ALIAS)
    assert champion.tags[sync.SYNCED_FROM_TAG] == f"models:/{EXPERIMENT}/{v2.version}"
    assert champion.version != version.version and champion.run_id == copy.info.run_id
    assert registry.CHALLENGER_ALIAS not in tgt.get_registered_model(EXPERIMENT).aliases
    assert load_model(champion_checkpoint(tgt, tmp_path / "champion2"))[1]["run"] == RUN

    # 4. and once more: nothing
    assert sync.sync(source.uri, server.url).copied == 0
