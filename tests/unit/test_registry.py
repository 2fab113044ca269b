"""The best model is findable: models:/<experiment>@champion (conv2dlstm.tracking.registry), in a real sqlite store."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conv2dlstm.config.validate import validate_config
from conv2dlstm.tracking import registry
from conv2dlstm.tracking import store as tracking

EXAMPLE = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    """No tracking URI from the environment, and none left behind: ``mlflow.set_tracking_uri``
    exports ``MLFLOW_TRACKING_URI``, which overrides a configuration's store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


def _log_run(
    cfg: dict, name: str, val_loss: float, *, model: bool = True, tags: dict | None = None, seed: int = 0
) -> tuple[str, torch.nn.Module]:
    """One finished MLflow run of ``cfg``'s experiment with ``best_val_loss`` and, optionally, a model."""
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    with tracking.start_run(cfg, name, tags={registry.WINDOWS_TAG: "w1", **(tags or {})}) as tracker:
        tracker.log_metrics({"best_val_loss": val_loss, "test_rmse_sst_lead1": 10 * val_loss})
        if model:
            tracker.log_model(net, EXAMPLE)
    return tracker.run_id, net


def _versions(client, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_the_best_run_by_validation_loss_becomes_the_champion(tmp_path: Path, monkeypatch) -> None:
    import mlflow.pytorch
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "champ", "mlflow": {"tracking_uri": uri}})
    _log_run(cfg, "a", 0.5, seed=1)
    b_id, b_net = _log_run(cfg, "b", 0.3, seed=2)
    _log_run(cfg, "no-model", 0.1, model=False)
    superseded_id, _ = _log_run(cfg, "old", 0.35, seed=3)
    tracking.mark_superseded(uri, superseded_id, b_id)
    _log_run(cfg, "other-data", 0.01, tags={registry.WINDOWS_TAG: "w2"}, seed=4)

    champion = registry.register_champion(uri, "champ", windows={"w1"})
    assert champion is not None and (champion.run_id, champion.run_name, champion.version) == (b_id, "b", "1")
    loaded = mlflow.pytorch.load_model("models:/champ@champion")
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.from_numpy(EXAMPLE)), b_net(torch.from_numpy(EXAMPLE)))
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("champ", "champion")
    assert version.tags["run"] == "b" and float(version.tags["best_val_loss"]) == 0.3
    assert "by validation loss" in client.get_registered_model("champ").description
    assert float(version.tags["test_rmse_sst_lead1"]) == pytest.approx(3.0)  # for reporting only

    # registering again changes nothing; a better run moves the alias to a new version
    assert registry.register_champion(uri, "champ", windows={"w1"}).version == "1"
    assert _versions(client, "champ") == ["1"]
    e_id, _ = _log_run(cfg, "e", 0.2, seed=5)
    champion = registry.register_champion(uri, "champ", windows={"w1"})
    assert (champion.run_id, champion.version) == (e_id, "2")
    assert client.get_model_version_by_alias("champ", "champion").run_id == e_id
    # without the windows filter the run validated on other data would win
    assert registry.register_champion(uri, "champ").run_name == "other-data"


def test_a_worse_retraining_does_not_take_the_champion(tmp_path: Path, monkeypatch, caplog) -> None:
    """Retraining a run with a worse setting (e.g. fewer epochs) supersedes its MLflow run, but the
    superseded run's model stays the champion; the retraining becomes the challenger."""
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config({"experiment": "retrain", "mlflow": {"tracking_uri": uri}})
    first_id, first_net = _log_run(cfg, "convlstm", 0.00250, seed=1)
    assert registry.register_champion(uri, "retrain", windows={"w1"}, current={first_id}).version == "1"

    worse_id, worse_net = _log_run(cfg, "convlstm", 0.00292, seed=2)
    assert tracking.mark_superseded(uri, first_id, worse_id)
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        champion = registry.register_champion(uri, "retrain", windows={"w1"}, current={worse_id})
    assert champion is not None
    assert (champion.run_id, champion.version, champion.run_name) == (first_id, "1", "convlstm")
    assert "does not beat the champion" in caplog.text and worse_id in caplog.text
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("retrain", "champion").run_id == first_id
    challenger = client.get_model_version_by_alias("retrain", "challenger")
    assert (challenger.run_id, str(challenger.version), challenger.tags["run"]) == (worse_id, "2", "convlstm")
    example = torch.from_numpy(EXAMPLE)
    with torch.no_grad():
        torch.testing.assert_close(mlflow.pytorch.load_model("models:/retrain@champion")(example), first_net(example))
        torch.testing.assert_close(mlflow.pytorch.load_model("models:/retrain@challenger")(example), worse_net(example))
    # the runs table tells the superseded run from its successor
    assert client.get_run(first_id).info.run_name == "convlstm (superseded)"
    assert client.get_run(worse_id).info.run_name == "convlstm"
    assert tracking.mark_superseded(uri, first_id, worse_id)  # idempotent: one suffix
    assert client.get_run(first_id).info.run_name == "convlstm (superseded)"

    # a better retraining takes the alias back
    better_id, _ = _log_run(cfg, "convlstm", 0.00200, seed=3)
    tracking.mark_superseded(uri, worse_id, better_id)
    champion = registry.register_champion(uri, "retrain", windows={"w1"}, current={better_id})
    assert (champion.run_id, champion.version) == (better_id, "3")
    with pytest.raises(MlflowException):  # no challenger left behind
        client.get_model_version_by_alias("retrain", "challenger")


def test_after_compare_tags_the_sweep_and_registers_nothing_without_models(tmp_path: Path, monkeypatch, caplog) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate_config(
        {"experiment": "nomodel", "mlflow": {"tracking_uri": uri, "log_model": False}, "sweep": {"train.seed": [1, 2]}}
    )
    models = []
    for name in ("seed1", "seed2"):
        run_id, _ = _log_run(cfg, name, 0.4, model=False, tags={"sweep": "old"})
        (tmp_path / name).mkdir()
        (tmp_path / name / "mlflow_run_id.txt").write_text(run_id + "\n")
        models.append(tmp_path / name / "model.pt")
    assert registry.read_run_ids(models) == {
        "seed1": (tmp_path / "seed1/mlflow_run_id.txt").read_text().strip(),
        "seed2": (tmp_path / "seed2/mlflow_run_id.txt").read_text().strip(),
    }
    with caplog.at_level(logging.WARNING, logger="conv2dlstm"):
        assert registry.after_compare(cfg, models) is None
    assert "mlflow.log_model is false" in caplog.text
    client = MlflowClient(uri)
    from conv2dlstm.config.keys import sweep_tags

    for run_id in registry.read_run_ids(models).values():
        tags = client.get_run(run_id).data.tags
        assert tags["sweep"] == sweep_tags(cfg)["sweep"] and tags["sweep.runs"] == "seed1,seed2"
    assert not client.search_registered_models()
