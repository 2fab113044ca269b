"""MLflow experiment tracking: one MLflow run per training run, reused after preemption.

- :func:`resolve_tracking_uri` - ``MLFLOW_TRACKING_URI`` in the environment, else ``mlflow.tracking_uri``.
- :func:`check_tracking` - fail before any training when the store cannot be used.
- :func:`start_run` - context yielding a :class:`Tracker`: experiment ``cfg["experiment"]``, run name
  = the run, every resolved config value as a param (:func:`conv2dlstm.config.flatten`), tags for
  the code (git commit, dirty flag), data and stats checksums, package versions.
- :func:`resume_run` - log into an existing run (the evaluate step logs into the training run).
- :func:`mark_superseded` - tag a run replaced by a fresh training (``superseded``, ``superseded_by``).

``mlflow`` takes seconds to import, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conv2dlstm import __version__
from conv2dlstm.config import flatten
from conv2dlstm.errors import TrackingError

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "xarray", "zarr", "dask", "mlflow", "numpy")
_FIX = (
    "start the server, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a usable store "
    "(e.g. sqlite:///mlflow.db)"
)


def resolve_tracking_uri(cfg: dict[str, Any]) -> str:
    """``MLFLOW_TRACKING_URI`` from the environment when set, else ``cfg["mlflow"]["tracking_uri"]``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg["mlflow"]["tracking_uri"]


def local_store_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI or the directory of a ``file:`` / plain-path URI; None for remote stores."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        path = path.split("?", 1)[0]
        if not path or path == ":memory:":
            return None
        return Path(path)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or re.fullmatch(r"[A-Za-z]", parsed.scheme):  # plain path (or a Windows drive)
        return Path(uri)
    return None


def _check_writable_dir(directory: Path, uri: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".mlflow-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking store {uri}: directory {directory} is not writable ({exc}); {_FIX}"
        ) from exc


def _probe_http(url: str, timeout_s: float) -> int:
    """HTTP status of a GET on ``url`` (raises OSError when nothing answers)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`TrackingError` naming ``uri`` when the tracking store cannot be used.

    http(s): the server must answer ``/health`` (or the REST API) within ``timeout_s``; sqlite and
    file stores: the database file (or directory) must be writable. Other schemes are not probed.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        base = uri.rstrip("/")
        try:
            status = _probe_http(f"{base}/health", timeout_s)
            if not 200 <= status < 300:
                status = _probe_http(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", timeout_s)
        except (OSError, ValueError) as exc:  # refused, unresolvable, timed out
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); {_FIX}"
            ) from exc
        if not 200 <= status < 300:
            raise TrackingError(
                f"MLflow tracking server {uri} answered HTTP {status} to /health and the REST API; {_FIX}"
            )
        return
    path = local_store_path(uri)
    if path is None:
        return
    if parsed.scheme == "sqlite":
        if path.is_dir():
            raise TrackingError(f"MLflow tracking store {uri}: {path} is a directory, not a database file; {_FIX}")
        _check_writable_dir(path.parent if str(path.parent) else Path("."), uri)
        if path.exists() and not os.access(path, os.W_OK):
            raise TrackingError(f"MLflow tracking store {uri}: database {path} is not writable; {_FIX}")
        if path.exists():
            try:
                with open(path, "ab"):
                    pass
            except OSError as exc:
                raise TrackingError(
                    f"MLflow tracking store {uri}: database {path} is not writable ({exc}); {_FIX}"
                ) from exc
    else:
        if path.exists() and not path.is_dir():
            raise TrackingError(f"MLflow tracking store {uri}: {path} is a file, not a directory; {_FIX}")
        _check_writable_dir(path, uri)


def git_state(path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"git.commit": sha, "git.dirty": "true"/"false"}`` of the repository holding ``path``
    (default: this package's source); ``"unknown"`` outside a repository."""
    where = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", where, *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": dirty}


def package_versions() -> dict[str, str]:
    """``version.<package>`` tags for the packages that determine a result."""
    out = {"version.conv2dlstm": __version__}
    for name in VERSIONED_PACKAGES:
        try:
            out[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialize store creation between processes sharing one sqlite file (parallel training jobs)."""
    path = local_store_path(uri)
    if path is None or not uri.startswith("sqlite:"):
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts live next to the database (``<db dir>/mlruns/<experiment>``)
    rather than under whichever directory the experiment happened to be created from."""
    path = local_store_path(uri)
    if path is None or not uri.startswith("sqlite:"):
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return (path.resolve().parent / "mlruns" / safe).as_uri()


def check_run(uri: str, run_id: str) -> None:
    """Raise :class:`TrackingError` unless the store ``uri`` is usable and holds the run ``run_id``."""
    from mlflow.exceptions import MlflowException

    check_tracking(uri)
    try:
        _client(uri).get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow run {run_id} is not in the tracking store {uri}; train the run again or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at the store it was logged to"
        ) from exc


def _client(uri: str) -> Any:
    """An ``MlflowClient``; creating it creates the store's tables on first use (serialized)."""
    from mlflow import MlflowClient

    with _store_lock(uri):
        return MlflowClient(uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} in {uri} is deleted; restore it (mlflow experiments "
                    "restore) or choose another `experiment` name"
                )
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


class Tracker:
    """Logging into one active MLflow run (returned by :func:`start_run` and :func:`resume_run`)."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, run_id=self.run_id)

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

    def log_model(self, model: torch.nn.Module, input_example: np.ndarray, *, name: str = "model") -> str:
        """Log ``model`` (eval mode, CPU) with a signature inferred from ``input_example``, a real
        small batch ``(B, T_in, C_in, H, W)`` float32; returns the model URI."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        model = model.eval().cpu()
        example = np.ascontiguousarray(input_example, dtype=np.float32)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        return info.model_uri


def changed_params(existing: dict[str, str], params: dict[str, str]) -> list[str]:
    """Names of ``params`` that ``existing`` (a run's logged params) holds with another value."""
    return sorted(k for k, v in params.items() if k in existing and existing[k] != v)


def _log_params_once(client: Any, run_id: str, params: dict[str, str], fixed: Collection[str] = ()) -> None:
    """Log params, skipping those the (resumed) run has.

    A changed value of a ``fixed`` param (one that determines the model: the run logged a model
    made with its first value) raises :class:`TrackingError`; any other changed value (a runtime
    setting) is kept as first logged, with a warning.
    """
    import mlflow

    existing = client.get_run(run_id).data.params
    changed = changed_params(existing, params)
    conflicting = [k for k in changed if k in fixed]
    if conflicting:
        shown = ", ".join(f"{k}: {existing[k]} -> {params[k]}" for k in conflicting)
        raise TrackingError(
            f"MLflow run {run_id} was logged with other values of params that determine its model ({shown}); "
            "a training with these values must start a new MLflow run: delete mlflow_run_id.txt and last.pt "
            "of this run, or rerun the train step"
        )
    if changed:
        log.warning("MLflow run %s keeps its first values of params %s (runtime settings that changed since)",
                    run_id, changed)
    new = {k: v for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new, run_id=run_id)


def mark_superseded(uri: str, old_run_id: str, new_run_id: str) -> bool:
    """Tag the MLflow run ``old_run_id`` ``superseded=true`` and ``superseded_by=<new_run_id>``
    (a training that started afresh replaced it). Returns False, with a warning, when the store
    does not hold the old run."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.set_tag(old_run_id, "superseded", "true")
        client.set_tag(old_run_id, "superseded_by", new_run_id)
    except MlflowException as exc:
        log.warning("MLflow run %s (superseded by %s) cannot be tagged in %s: %s", old_run_id, new_run_id, uri, exc)
        return False
    return True


@contextlib.contextmanager
def _active(run: Any) -> Iterator[None]:
    """End ``run`` FINISHED on success, KILLED on interruption (SystemExit, Ctrl-C), FAILED otherwise."""
    import mlflow

    try:
        yield
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        mlflow.end_run(status)
        raise
    mlflow.end_run("FINISHED")


@contextlib.contextmanager
def start_run(
    cfg: dict[str, Any],
    run_name: str,
    *,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    fixed_params: Collection[str] = (),
) -> Iterator[Tracker]:
    """Open the MLflow run of a training run and yield a :class:`Tracker`.

    With ``run_id`` of an existing run (a resumed training), that run is reopened; otherwise a new
    run named ``run_name`` is created in experiment ``cfg["experiment"]`` (created when missing).
    Logs ``config.flatten(cfg)`` as params and sets git, version and ``tags`` tags. A reopened run
    must hold the same values of ``fixed_params`` (the params that determine the model), else
    :class:`TrackingError` (see :func:`_log_params_once`).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, cfg["experiment"], uri)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s is not in %s; starting a new run", run_id, uri)
            run_id = None
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    with _active(run):
        _log_params_once(client, run.info.run_id, flatten(cfg), fixed_params)
        all_tags = {**git_state(), **package_versions(), **(tags or {})}
        mlflow.set_tags({k: str(v) for k, v in all_tags.items()})
        yield Tracker(run.info.run_id, run.info.experiment_id)


@contextlib.contextmanager
def resume_run(run_id: str, *, tracking_uri: str | None = None) -> Iterator[Tracker]:
    """Reopen the existing MLflow run ``run_id`` (e.g. to log evaluation results into a training run)."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    check_run(uri, run_id)
    mlflow.set_tracking_uri(uri)
    run = mlflow.start_run(run_id=run_id)
    with _active(run):
        yield Tracker(run.info.run_id, run.info.experiment_id)
