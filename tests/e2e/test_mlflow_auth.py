"""The cluster's tracking server is authenticated: ``make mlflow-server`` (docs/slurm.md) runs MLflow's
basic-auth app, and no one else can read or change a user's records.

One real server for the module, started by the Makefile's own recipe (``make mlflow-server`` in a
directory holding the Makefile, its admin password in a file readable by its owner alone). The admin
creates two users through the REST API. Then:

- the recipe refuses to start without an admin password, with one on the make command line, from a
  file others can read, or with a default permission that would let others write;
- only ``/health`` answers without credentials (the project's reachability probe uses it): the REST
  API, the UI and the artifact proxy answer 401; what the server writes is its owner's alone;
- a job with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` in its environment trains
  (the train step on a tiny windows store), logs its metrics and files, and registers its model as
  the champion (the compare step's ``register_champion``); no password is written anywhere;
- a job without credentials, and the second user's job into the first user's experiment, fail
  before training (401, 403);
- a second user can neither read nor change that experiment, run, artifact or model, nor move the
  ``champion`` alias (403), until the owner grants them a permission;
- credentials in ~/.netrc (here the file named by ``NETRC``) work as well as the environment's;
- a user changes their own password, and the old one is refused at once.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conv2dlstm.config.validate import validate_config
from conv2dlstm.steps import train
from conv2dlstm.tracking import registry
from conv2dlstm.tracking.store import check_tracking
from tests.support.mlflow_server import MakeMlflowServer, free_port, rest
from tests.support.windows_fixture import make_windows_store
from tests.support.workflow import REPO, job_env, link_environment

pytestmark = pytest.mark.e2e

# Unique strings: finding one in a file is a leak.
ADMIN_PASSWORD = "admin-pw-6c1e9a-S3CR3T"
USERS = {"alice": "alice-pw-3f8b2d-S3CR3T", "bob": "bob-pw-7a4c1e-S3CR3T"}
SECRETS = (ADMIN_PASSWORD, *USERS.values())
EXPERIMENT = "auth-e2e"
EPOCHS = 2
API = "/api/2.0/mlflow"


def make_dir(path: Path) -> Path:
    """A directory to run ``make mlflow-server`` in: the Makefile, what ``setup`` depends on, and this
    test environment as its ``.venv`` (so that make installs nothing)."""
    for rel in ("Makefile", "pyproject.toml", "requirements/lock.txt"):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, path / rel)
    link_environment(path)
    return path


def password_file(path: Path, mode: int = 0o600) -> Path:
    path.write_text(ADMIN_PASSWORD + "\n")
    path.chmod(mode)
    return path


def leaks(*roots: Path, texts: dict[str, str] | None = None) -> list[str]:
    """Where any of :data:`SECRETS` occurs: in a file under ``roots`` (as bytes, hidden files and
    databases included; symbolic links not followed) or in one of ``texts``."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    for name, text in (texts or {}).items():
        found += [f"{name}: {s}" for s in SECRETS if s in text]
    return found


def unset() -> dict[str, str | None]:
    """What a make run must not inherit: an admin password, a setting of the recipe, a credential."""
    return {
        name: None
        for name in os.environ
        if name.startswith(("MLFLOW_AUTH_", "MLFLOW_TRACKING_")) or name == "MLFLOW_FLASK_SERVER_SECRET_KEY"
    }


def as_user(monkeypatch: pytest.MonkeyPatch, user: str) -> None:
    """The job's credentials, as a job gets them: in its environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USERS[user])


def refused(call) -> str:
    """The error code of the MlflowException that ``call()`` raises."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as info:
        call()
    return info.value.error_code


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeMlflowServer]:
    """``make mlflow-server`` with its defaults (store, artifacts, users in the directory; others get
    NO_PERMISSIONS), the admin password from a file; the admin has created alice and bob."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    srv = make_dir(root / "srv")
    secret = password_file(root / "admin-password")
    with MakeMlflowServer(
        srv, f"MLFLOW_AUTH_ADMIN_PASSWORD_FILE={secret}", log=root / "server.log", env=unset()
    ) as server:
        # the server answering /health is this one, not another on a reused port
        assert rest(f"{server.url}{API}/experiments/search?max_results=1")[0] == 401
        for user, password in USERS.items():
            status, text = rest(
                f"{server.url}{API}/users/create",
                "POST",
                {"username": user, "password": password},
                user="admin",
                password=ADMIN_PASSWORD,
            )
            assert status == 200, (status, text)
        yield server


@dataclass
class AliceRun:
    run_id: str
    experiment_id: str
    root: Path  # the windows store and the train step's outputs
    log: str
    cfg: dict
    store: Path
    stats: Path


@pytest.fixture(scope="module")
def alice_run(server: MakeMlflowServer, tmp_path_factory: pytest.TempPathFactory) -> AliceRun:
    """Alice's job: the train step (two tiny epochs, the model logged) against the server with her
    credentials in the environment, then the compare step's registration of the champion."""
    root = tmp_path_factory.mktemp("alice")
    fx = make_windows_store(root / "w.zarr", n_time=40, height=10, width=12)
    cfg = validate_config(
        {
            "experiment": EXPERIMENT,
            "mlflow": {"tracking_uri": server.url},
            "model": {"name": "convlstm", "convlstm": {"hidden_channels": [4, 4]}},
            "train": {"epochs": EPOCHS, "batch_size": 8, "learning_rate": 0.01, "device": "cpu"},
        }
    )
    out = root / "train" / "convlstm"
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    logger = logging.getLogger()
    level, threads = logger.level, torch.get_num_threads()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            as_user(mp, "alice")
            train.main(cfg, run="convlstm", windows=fx.store, stats=fx.stats, out_dir=out)
            champion = registry.register_champion(server.url, EXPERIMENT)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        torch.set_num_threads(threads)
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    assert champion is not None and champion.run_id == run_id and champion.version == "1"
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        as_user(mp, "alice")
        experiment_id = MlflowClient(server.url).get_run(run_id).info.experiment_id
    return AliceRun(run_id, experiment_id, root, captured.getvalue(), cfg, fx.store, fx.stats)


# ------------------------------------------------------------------------------------------------


def _make(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``make mlflow-server <args>`` in a session of its own, its group stopped should it not end."""
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "mlflow-server", f"MLFLOW_PORT={free_port()}", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"make mlflow-server {' '.join(args)} started a server:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_make_mlflow_server_refuses_to_start_without_a_safe_admin_password(tmp_path: Path) -> None:
    cwd = make_dir(tmp_path / "srv")
    env = {k: v for k, v in job_env().items() if k not in unset()}
    readable = password_file(tmp_path / "readable", 0o644)
    mine = password_file(tmp_path / "mine")
    cases = {
        "no admin password": ((), "no admin password"),
        "on the command line": ((f"MLFLOW_AUTH_ADMIN_PASSWORD={ADMIN_PASSWORD}",), "on the command line"),
        "a file others read": ((f"MLFLOW_AUTH_ADMIN_PASSWORD_FILE={readable}",), f"chmod 600 {readable}"),
        "no such file": ((f"MLFLOW_AUTH_ADMIN_PASSWORD_FILE={tmp_path / 'none'}",), "cannot read"),
        "others may write": (
            (f"MLFLOW_AUTH_ADMIN_PASSWORD_FILE={mine}", "MLFLOW_AUTH_PERMISSION=EDIT"),
            "NO_PERMISSIONS or READ",
        ),
    }
    for case, (args, message) in cases.items():
        proc = _make(cwd, *args, env=env)
        assert proc.returncode != 0 and message in proc.stderr, (case, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, case
    assert not list(cwd.glob("mlflow-*")), "nothing written, nothing started"


def test_only_health_answers_without_credentials(
    server: MakeMlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conv2dlstm.errors import TrackingError

    url = server.url
    assert rest(f"{url}/health") == (200, "OK")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(TrackingError, match="requires authentication and no user was given"):
        check_tracking(url)  # the steps' store check says where the credentials go
    as_user(monkeypatch, "alice")
    check_tracking(url)
    for path in (f"{API}/experiments/search?max_results=1", "/", "/api/2.0/mlflow-artifacts/artifacts"):
        assert rest(f"{url}{path}")[0] == 401, path
    assert rest(f"{url}{API}/experiments/search?max_results=1", user="alice", password=USERS["bob"])[0] == 401
    assert rest(f"{url}{API}/experiments/search?max_results=1", user="alice", password=USERS["alice"])[0] == 200
    # the generated configuration holds no secret; what the server writes is its owner's alone
    ini = server.cwd / "mlflow-auth.ini"
    assert "default_permission = NO_PERMISSIONS" in ini.read_text()
    for path in (ini, server.cwd / "mlflow-auth.db", server.cwd / "mlflow-server.db"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # the admin's password is in its file and nowhere else (the server's directory, its log)
    assert leaks(server.cwd.parent) == [f"{server.cwd.parent / 'admin-password'}: {ADMIN_PASSWORD}"]


def test_an_authenticated_job_trains_logs_and_registers_without_writing_a_password(
    server: MakeMlflowServer, alice_run: AliceRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    as_user(monkeypatch, "alice")
    client = MlflowClient(server.url)
    run = client.get_run(alice_run.run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    for metric in train.EPOCH_METRICS:
        assert sorted(m.step for m in client.get_metric_history(alice_run.run_id, metric)) == [1, 2], metric
    assert "best_val_loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(alice_run.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert list((server.cwd / "mlartifacts").rglob("best.pt")), "the files went through the server"
    assert client.get_model_version_by_alias(EXPERIMENT, registry.CHAMPION_ALIAS).run_id == alice_run.run_id
    found = leaks(
        alice_run.root,
        server.cwd,
        texts={"job log": alice_run.log, "server log": server.log.read_text(errors="replace")},
    )
    assert not found, found


@pytest.mark.parametrize("user", [None, "bob"], ids=["no credentials", "another user"])
def test_a_job_without_credentials_or_permission_fails_before_training(
    server: MakeMlflowServer, alice_run: AliceRun, user: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At once (401 and 403 are not retried), with no model written, and a message saying where the
    credentials go, or whose experiment it is; bob's job names alice's experiment."""
    from conv2dlstm.errors import TrackingError

    # MLFLOW_TRACKING_URI too: an earlier test's mlflow.set_tracking_uri exports it, and it wins over the config
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "NETRC",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    if user:
        as_user(monkeypatch, user)
    out = tmp_path / "train"
    words = (
        r"requires authentication and no user was given: .*MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        if user is None
        else rf"user {user} has no permission on experiment '{EXPERIMENT}', which another user created"
    )
    with pytest.raises(TrackingError, match=words):
        train.main(alice_run.cfg, run="convlstm", windows=alice_run.store, stats=alice_run.stats, out_dir=out)
    assert not (out / "model.pt").exists() and not (out / "last.pt").exists()


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")  # (AuthServiceClient's imports)
def test_a_second_user_can_neither_read_nor_change_the_first_users_records(
    server: MakeMlflowServer, alice_run: AliceRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    url, run_id, exp_id = server.url, alice_run.run_id, alice_run.experiment_id
    bob = {"user": "bob", "password": USERS["bob"]}
    as_user(monkeypatch, "alice")
    alice = MlflowClient(url)
    artifact_uri = alice.get_run(run_id).info.artifact_uri  # mlflow-artifacts:/<experiment>/<run>/artifacts
    best = f"{url}/api/2.0/mlflow-artifacts/artifacts/{artifact_uri.split(':/', 1)[1]}/checkpoints/best.pt"
    assert rest(best, user="alice", password=USERS["alice"])[0] == 200

    as_user(monkeypatch, "bob")
    client = MlflowClient(url)
    denied = "PERMISSION_DENIED"
    assert refused(lambda: client.get_experiment(exp_id)) == denied
    assert refused(lambda: client.get_experiment_by_name(EXPERIMENT)) == denied
    assert EXPERIMENT not in {e.name for e in client.search_experiments()}
    assert refused(lambda: client.get_run(run_id)) == denied
    assert refused(lambda: client.set_tag(run_id, "moved", "by bob")) == denied
    assert refused(lambda: client.log_metric(run_id, "val_loss", 0.0, step=99)) == denied
    assert refused(lambda: client.delete_run(run_id)) == denied
    assert refused(lambda: client.delete_experiment(exp_id)) == denied
    assert refused(lambda: client.set_registered_model_alias(EXPERIMENT, registry.CHAMPION_ALIAS, "1")) == denied
    assert refused(lambda: client.delete_registered_model_alias(EXPERIMENT, registry.CHAMPION_ALIAS)) == denied
    assert EXPERIMENT not in {m.name for m in client.search_registered_models()}
    # the REST endpoints themselves, not only the client's lookups before them
    alias = {"name": EXPERIMENT, "alias": registry.CHAMPION_ALIAS, "version": "1"}
    assert rest(f"{url}{API}/registered-models/alias", "POST", alias, **bob)[0] == 403
    assert rest(f"{url}{API}/runs/set-tag", "POST", {"run_id": run_id, "key": "k", "value": "v"}, **bob)[0] == 403
    assert rest(f"{url}{API}/runs/delete", "POST", {"run_id": run_id}, **bob)[0] == 403
    assert rest(best, **bob)[0] == 403
    assert rest(f"{url}{API}/users/create", "POST", {"username": "eve", "password": "e" * 16}, **bob)[0] == 403
    assert client.create_experiment("bobs-own")  # bob's account works: what he was refused is alice's

    # nothing of alice's changed
    as_user(monkeypatch, "alice")
    run = alice.get_run(run_id)
    assert run.info.lifecycle_stage == "active" and "moved" not in run.data.tags and "k" not in run.data.tags
    assert 99 not in {m.step for m in alice.get_metric_history(run_id, "val_loss")}
    assert alice.get_model_version_by_alias(EXPERIMENT, registry.CHAMPION_ALIAS).run_id == run_id

    # the owner shares the experiment read-only (docs/slurm.md): bob reads, and still cannot write
    AuthServiceClient(url).grant_user_permission("bob", "experiment", exp_id, "READ")
    as_user(monkeypatch, "bob")
    assert client.get_run(run_id).info.run_id == run_id
    assert refused(lambda: client.set_tag(run_id, "moved", "by bob")) == denied


def test_credentials_from_netrc(
    server: MakeMlflowServer, alice_run: AliceRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1\nlogin alice\npassword {USERS['alice']}\n")
    netrc.chmod(0o600)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(netrc))
    client = MlflowClient(server.url)
    assert client.get_run(alice_run.run_id).info.status == "FINISHED"
    run_id = client.create_run(alice_run.experiment_id, run_name="netrc").info.run_id  # writes, uploads
    client.log_metric(run_id, "val_loss", 1.0, step=1)
    (tmp_path / "note.txt").write_text("uploaded with ~/.netrc credentials\n")
    client.log_artifact(run_id, str(tmp_path / "note.txt"))
    assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
    client.set_terminated(run_id)


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")  # (AuthServiceClient's imports)
def test_a_user_changes_their_password_and_the_old_one_stops_at_once(
    server: MakeMlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Last: bob's password changes.) The server remembers checked credentials for 60 s; a change
    through the API still takes effect at once."""
    from mlflow.server.auth.client import AuthServiceClient

    search = f"{server.url}{API}/experiments/search?max_results=1"
    new = "bob-new-pw-5d9e2f-S3CR3T"
    assert rest(search, user="bob", password=USERS["bob"])[0] == 200  # checked, so remembered
    as_user(monkeypatch, "bob")
    AuthServiceClient(server.url).update_user_password("bob", new, current_password=USERS["bob"])
    assert rest(search, user="bob", password=USERS["bob"])[0] == 401
    assert rest(search, user="bob", password=new)[0] == 200
