"""MLflow experiment tracking: one MLflow run per training run, reused after preemption.

- :func:`resolve_tracking_uri` - ``MLFLOW_TRACKING_URI`` in the environment, else ``mlflow.tracking_uri``.
- :func:`check_tracking` - fail before any training when the store cannot be used.
- :func:`start_run` - context yielding a :class:`Tracker`: experiment ``cfg["experiment"]``, run name
  = the run, every resolved config value as a param (:func:`conv2dlstm.config.runs.flatten`), tags for
  the code (git commit, dirty flag), data and stats checksums, package versions.
- :func:`resume_run` - log into an existing run (the evaluate step logs into the training run).
- :func:`mark_superseded` - tag a run replaced by a fresh training (``superseded``, ``superseded_by``).

The experiment is created with the tag ``mlflow.experimentKind = custom_model_development``
(:data:`EXPERIMENT_TAGS`). The UI of MLflow 3.17 does not choose its page by that tag but by its
global "GenAI / Model training" switch: :func:`ui_address` gives the address that opens the
experiment's training runs.
Every run is tagged with its name (``run``), the git commit (also as ``mlflow.source.git.commit``,
which the UI shows), the SLURM job id when there is one (``slurm.job_id`` from ``SLURM_JOB_ID``)
and whatever the caller adds (train: provenance digests and the ``sweep`` tags).

Many jobs at once, and stores that go away:

- Every call into the store is retried with exponential backoff while it fails for a transient
  reason (:func:`transient`: SQLite's "database is locked" after its own 20 s busy timeout, a
  server that does not answer or answers 5xx), for up to :data:`WAIT_ENV` seconds (default
  :data:`DEFAULT_WAIT_S`); then the error is raised. Creating the store and the experiment is
  serialized between processes by a file lock next to an SQLite database.
- Metrics go through :meth:`Tracker.log_metrics`, which never raises for a transient failure: it
  warns and keeps the metrics (with their step and time) pending, and sends them before the next
  ones, so training goes on while a tracking server is down. After the first failure, later calls
  try once and do not wait. :meth:`Tracker.flush` sends what is pending, waiting up to the budget;
  leaving :func:`start_run` or :func:`resume_run` normally flushes and raises
  :class:`TrackingError` when metrics still cannot be sent, so nothing is lost silently.
  :meth:`Tracker.backfill` logs the epochs of a training history that a run does not hold (a
  resumed training recovers what an earlier process could not send).
- For an ``http(s)`` store the MLflow client's own retries are bounded
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` defaults to 2 here instead of 7, about 4 s instead of 4
  minutes per call while the server is down), unless the environment sets them.

``mlflow`` takes seconds to import, so it is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from conv2dlstm import __version__
from conv2dlstm.config.runs import flatten
from conv2dlstm.errors import TrackingError

if TYPE_CHECKING:  # torch loads only where a model is logged: reading the store does not need it
    import torch

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "xarray", "zarr", "dask", "mlflow", "numpy")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: "custom_model_development"}
"""Tags of a new experiment: its kind, model development (not GenAI). MLflow 3.17's UI decides its page
by its own "Model training" switch instead (:data:`UI_QUERY`); the tag states the kind for the
tools and UI versions that read it."""
WAIT_ENV = "CONV2DLSTM_MLFLOW_WAIT_S"
DEFAULT_WAIT_S = 300.0
"""How long a call into the tracking store is retried while it fails for a transient reason."""
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
"""MLflow client settings for an http(s) store, unless the environment sets them (see module docstring)."""
_TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "Max retries exceeded",
    "Connection refused",
    "Connection aborted",
    "Connection reset",
    "timed out",
    "Bad Gateway",
    "Service Unavailable",
)
T = TypeVar("T")
_FIX = (
    "start the server, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a usable store (e.g. sqlite:///mlflow.db)"
)


def resolve_tracking_uri(cfg: dict[str, Any]) -> str:
    """``MLFLOW_TRACKING_URI`` from the environment when set, else ``cfg["mlflow"]["tracking_uri"]``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg["mlflow"]["tracking_uri"]


def wait_budget_s() -> float:
    """Seconds a store call is retried for (``CONV2DLSTM_MLFLOW_WAIT_S``, default :data:`DEFAULT_WAIT_S`)."""
    value = os.environ.get(WAIT_ENV, "")
    try:
        return max(float(value), 0.0) if value else DEFAULT_WAIT_S
    except ValueError:
        raise TrackingError(f"{WAIT_ENV}={value!r} is not a number of seconds; unset it or give e.g. 300") from None


def transient(exc: BaseException) -> bool:
    """Whether a failed store call may succeed when repeated: a locked SQLite database, a server that
    is down, overloaded or restarting. Invalid values, unknown runs and the like are not transient."""
    text = str(exc)
    if getattr(exc, "error_code", None) in _TRANSIENT_CODES or any(t in text for t in _TRANSIENT_TEXT):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("requests", "urllib3")  # connection errors of the HTTP client


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def retry(
    what: str,
    call: Callable[[], T],
    *,
    budget_s: float | None = None,
    first_delay_s: float = 0.5,
    max_delay_s: float = 30.0,
) -> T:
    """``call()``, repeated with exponential backoff (and jitter) while it raises a :func:`transient`
    error, for up to ``budget_s`` seconds (default :func:`wait_budget_s`); the last error is raised.
    ``what`` names the operation in the warnings."""
    budget = wait_budget_s() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    delay = first_delay_s
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not transient(exc) or left <= 0:
                raise
            pause = min(delay * (1.0 + 0.25 * random.random()), max_delay_s, left)
            log.warning(
                "MLflow: %s failed (attempt %d: %s); retrying in %.1f s (giving up after %.0f s more)",
                what,
                attempt,
                _short(exc),
                pause,
                left,
            )
            time.sleep(pause)
            delay = min(delay * 2, max_delay_s)
            attempt += 1


def bound_http_retries(uri: str, environ: MutableMapping[str, str] | None = None) -> None:
    """For an http(s) ``uri``, set :data:`HTTP_RETRY_DEFAULTS` where the environment does not."""
    env = os.environ if environ is None else environ
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        for key, value in HTTP_RETRY_DEFAULTS.items():
            env.setdefault(key, value)


def local_store_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI or the directory of a ``file:`` / plain-path URI; None for remote stores."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
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
        _check_server(uri, timeout_s)
        return
    path = local_store_path(uri)
    if path is None:
        return
    if parsed.scheme == "sqlite":
        _check_database(path, uri)
    else:
        if path.exists() and not path.is_dir():
            raise TrackingError(f"MLflow tracking store {uri}: {path} is a file, not a directory; {_FIX}")
        _check_writable_dir(path, uri)


def _check_server(uri: str, timeout_s: float) -> None:
    """:class:`TrackingError` unless the tracking server ``uri`` answers ``/health``, or else the REST
    API, with a 2xx status within ``timeout_s``."""
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
        raise TrackingError(f"MLflow tracking server {uri} answered HTTP {status} to /health and the REST API; {_FIX}")
    _check_credentials(uri, timeout_s)


CREDENTIALS_FIX = (
    "give this process a user of the server: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the "
    "environment (exported in the shell that starts Snakemake, so every job inherits them) or a ~/.netrc entry "
    "for the server's host; never in the configuration (docs/slurm.md)"
)


def _check_credentials(uri: str, timeout_s: float) -> None:
    """:class:`TrackingError` when the server ``uri`` runs MLflow's authentication and refuses this
    process's credentials (none, or wrong): a REST call as the MLflow client would make it."""
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None  # else ~/.netrc, as MLflow
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search"
    try:
        status = requests.get(url, params={"max_results": 1}, auth=auth, timeout=timeout_s).status_code
    except requests.RequestException:
        return  # /health answered: a flaky request here is left to the retries of the real calls
    if status == 401:
        who = f"user {user!r} and its password were refused" if user else "no user was given"
        raise TrackingError(f"MLflow tracking server {uri} requires authentication and {who}: {CREDENTIALS_FIX}")


def _check_database(path: Path, uri: str) -> None:
    """:class:`TrackingError` unless the sqlite database ``path`` of ``uri`` can be written: not a
    directory, in a writable directory (made when missing), and writable itself when it exists."""
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
        _check_intact(path, uri)


def _check_intact(path: Path, uri: str) -> None:
    """:class:`TrackingError` naming the way back when the sqlite database ``path`` is damaged
    (SQLite's ``PRAGMA quick_check``: milliseconds for a tracking store of many runs)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            found = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        found = [str(exc)]
    if found and found != ["ok"]:
        raise TrackingError(
            f"MLflow tracking store {uri}: the database {path} is damaged ({'; '.join(found)[:300]}); restore it "
            f"from a backup, or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a new store (e.g. "
            f"sqlite:///{path.with_name(path.stem + '-new' + path.suffix)}); the models and results on disk stay, "
            "and the runs logged from then on go to the new store"
        )


def git_state(path: str | os.PathLike | None = None) -> dict[str, str]:
    """``{"git.commit": sha, "git.dirty": "true"/"false"}`` of the repository holding ``path``
    (default: this package's source); ``"unknown"`` outside a repository."""
    where = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", where, *args], check=True, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": dirty}


UI_QUERY = "workflowType=machine_learning"
"""The MLflow 3.17 UI shows an experiment's training runs only in its "Model training" mode: a
global switch (top left, remembered by the browser) that ignores the experiment's kind tag, and that
this query sets."""


def ui_address(uri: str, experiment: str, base: str | None = None) -> str:
    """The address of ``experiment``'s training runs in the MLflow UI serving the store ``uri``:
    ``<base>/#/experiments/<id>/runs?workflowType=machine_learning``. ``base`` defaults to the server
    itself for an http(s) store, else ``http://127.0.0.1:5000`` (``make mlflow-ui``).
    :class:`TrackingError` when the store does not hold the experiment yet."""
    if base is None:
        base = uri if urllib.parse.urlparse(uri).scheme in ("http", "https") else "http://127.0.0.1:5000"
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise TrackingError(f"MLflow store {uri} does not exist yet ({path}); run the pipeline first")
    exp = retry(f"reading experiment {experiment!r}", lambda: open_client(uri).get_experiment_by_name(experiment))
    if exp is None:
        raise TrackingError(f"MLflow experiment {experiment!r} is not in {uri} yet; run the pipeline first")
    return f"{base.rstrip('/')}/#/experiments/{exp.experiment_id}/runs?{UI_QUERY}"


def job_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``slurm.job_id`` (``SLURM_JOB_ID``) and ``slurm.cluster`` (``SLURM_CLUSTER_NAME``) inside a
    SLURM job; nothing elsewhere."""
    environ = os.environ if environ is None else environ
    names = {"slurm.job_id": "SLURM_JOB_ID", "slurm.cluster": "SLURM_CLUSTER_NAME"}
    return {tag: environ[var] for tag, var in names.items() if environ.get(var)}


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
    client = open_client(uri)
    try:
        retry(f"reading run {run_id}", lambda: client.get_run(run_id))
    except MlflowException as exc:
        if transient(exc):
            raise TrackingError(
                f"MLflow tracking store {uri} failed while reading run {run_id} ({_short(exc)}); {_FIX}"
            ) from exc
        raise TrackingError(
            f"MLflow run {run_id} is not in the tracking store {uri}; train the run again or point "
            "MLFLOW_TRACKING_URI / mlflow.tracking_uri at the store it was logged to"
        ) from exc


def open_client(uri: str) -> Any:
    """An ``MlflowClient``; creating it creates the store's tables on first use (serialized)."""
    from mlflow import MlflowClient

    with _store_lock(uri):
        client = MlflowClient(uri)
        if uri.startswith("sqlite:"):  # the store (tables, migrations) is created on first use
            retry("creating the store", lambda: client.search_experiments(max_results=1))
        return client


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created with :data:`EXPERIMENT_TAGS` when missing. An existing
    experiment without an explicit kind (none, or one the UI inferred) gets the tag too."""
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        try:
            exp = retry(f"reading experiment {name!r}", lambda: client.get_experiment_by_name(name))
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "PERMISSION_DENIED":
                raise
            user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(from ~/.netrc)"
            raise TrackingError(
                f"MLflow tracking server {uri}: user {user} has no permission on experiment {name!r}, which another "
                "user created: its owner can grant it (docs/slurm.md, sharing), or give this configuration another "
                "`experiment` name"
            ) from exc
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"MLflow experiment {name!r} in {uri} is deleted; restore it (mlflow experiments "
                    "restore) or choose another `experiment` name"
                )
            kind = exp.tags.get(EXPERIMENT_KIND_TAG, "")
            if not kind or kind.endswith("_inferred") or kind == "no_inferred_type":
                for key, value in EXPERIMENT_TAGS.items():
                    retry(
                        "tagging the experiment",
                        functools.partial(client.set_experiment_tag, exp.experiment_id, key, value),
                    )
            return exp.experiment_id
        try:
            return retry(
                f"creating experiment {name!r}",
                lambda: client.create_experiment(
                    name, artifact_location=_artifact_location(uri, name), tags=EXPERIMENT_TAGS
                ),
            )
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


@dataclass
class _Pending:
    """Metrics not yet in the store: values, step and the time they were measured (ms)."""

    metrics: dict[str, float]
    step: int
    timestamp_ms: int


class Tracker:
    """Logging into one active MLflow run (returned by :func:`start_run` and :func:`resume_run`).

    Metrics never fail on a transient store error: they stay in :attr:`pending` and are sent first
    by the next :meth:`log_metrics` or :meth:`flush` (module docstring). Files, models and tags are
    retried for the wait budget and then raise.
    """

    def __init__(self, run_id: str, experiment_id: str, *, uri: str | None = None, client: Any = None) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.uri = uri
        self._client = client
        self.pending: list[_Pending] = []
        self.failing = False  # the last attempt to send metrics failed

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri) if self.uri else MlflowClient()
        return self._client

    def _send(self, item: _Pending) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, float(v), item.timestamp_ms, item.step) for k, v in item.metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def flush(self, *, budget_s: float | None = None) -> bool:
        """Send the pending metrics in order, retrying for up to ``budget_s`` (default: the wait
        budget; 0: one attempt). Returns whether none is left; a non-transient error raises."""
        while self.pending:
            item = self.pending[0]
            try:
                retry(
                    f"logging metrics of step {item.step} to run {self.run_id}",
                    functools.partial(self._send, item),
                    budget_s=budget_s,
                )
            except Exception as exc:
                if not transient(exc):
                    raise
                self.failing = True
                log.warning(
                    "MLflow: cannot log metrics to run %s in %s (%s); %d step(s) kept, sent with the next "
                    "metrics (training goes on)",
                    self.run_id,
                    self.uri or "the store",
                    _short(exc),
                    len(self.pending),
                )
                return False
            self.pending.pop(0)
            if self.failing:
                log.warning("MLflow: the store answers again; sent the metrics of step %d kept meanwhile", item.step)
                self.failing = False
        return True

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, *, budget_s: float | None = None) -> bool:
        """Log ``metrics`` at ``step`` after any still pending. On a transient failure warn, keep them
        pending and return False (no exception). While the store is failing a call tries once;
        otherwise it retries for ``budget_s`` (default 30 s, within the wait budget)."""
        self.pending.append(
            _Pending(
                {k: float(v) for k, v in metrics.items()}, 0 if step is None else int(step), int(time.time() * 1000)
            )
        )
        if budget_s is None:
            budget_s = 0.0 if self.failing else min(30.0, wait_budget_s())
        return self.flush(budget_s=budget_s)

    def backfill(self, rows: Sequence[Mapping[str, float]], keys: Sequence[str], *, step_key: str = "epoch") -> int:
        """Log the ``keys`` of each row of a history (one row per step ``row[step_key]``) whose step
        the run does not hold for ``keys[0]``: what an earlier process could not send. Returns how
        many steps were added (they are pending, not lost, if the store fails)."""
        if not rows or not keys:
            return 0
        held = retry(
            f"reading the {keys[0]} history of run {self.run_id}",
            lambda: {m.step for m in self.client.get_metric_history(self.run_id, keys[0])},
        )
        missing = [r for r in rows if int(r[step_key]) not in held]
        for row in missing:
            self.pending.append(
                _Pending({k: float(row[k]) for k in keys if k in row}, int(row[step_key]), int(time.time() * 1000))
            )
        if missing:
            log.warning(
                "MLflow run %s lacked the metrics of step(s) %s (not sent by an earlier process); logging "
                "them from the training history",
                self.run_id,
                [int(r[step_key]) for r in missing],
            )
            self.flush()
        return len(missing)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        retry(f"tagging run {self.run_id}", lambda: self.client.log_batch(self.run_id, tags=batch))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        import mlflow

        retry(
            f"uploading {Path(path).name} to run {self.run_id}",
            lambda: mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id),
        )

    def logged_model_uri(self, name: str = "model") -> str | None:
        """The URI of the model ``name`` this run already logged (status READY), or None."""
        model = logged_model(self.client, self.experiment_id, self.run_id, name)
        return None if model is None else model.model_uri

    def log_model(self, model: torch.nn.Module, input_example: np.ndarray, *, name: str = "model") -> str:
        """Log ``model`` (eval mode, CPU) with a signature inferred from ``input_example``, a real
        small batch ``(B, T_in, C_in, H, W)`` float32; returns the model URI. A model ``name`` the
        run already holds is kept (a rerun after a failed upload logs it once)."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        existing = self.logged_model_uri(name)
        if existing is not None:
            log.info("MLflow run %s already holds model %r (%s); not logging it again", self.run_id, name, existing)
            return existing

        model = model.eval().cpu()
        example = np.ascontiguousarray(input_example, dtype=np.float32)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        info = retry(
            f"logging the model of run {self.run_id}",
            lambda: mlflow.pytorch.log_model(
                model,
                name=name,
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            ),
        )
        return info.model_uri


def logged_model(client: Any, experiment_id: str, run_id: str, name: str = "model") -> Any | None:
    """The model ``name`` (an MLflow ``LoggedModel``) that run ``run_id`` logged completely (status
    READY), or None."""
    found = retry(
        f"searching the models of run {run_id}",
        lambda: client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
        ),
    )
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    return ready[0] if ready else None


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

    existing = retry(f"reading run {run_id}", lambda: client.get_run(run_id)).data.params
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
        log.warning(
            "MLflow run %s keeps its first values of params %s (runtime settings that changed since)", run_id, changed
        )
    new = {k: v for k, v in params.items() if k not in existing}
    if new:
        retry(f"logging the params of run {run_id}", lambda: mlflow.log_params(new, run_id=run_id))


SUPERSEDED_SUFFIX = " (superseded)"
"""Appended to the MLflow name of a superseded run, so the UI's runs table tells it from its successor
(the pipeline's own name stays in the ``run`` tag)."""


def mark_superseded(uri: str, old_run_id: str, new_run_id: str) -> bool:
    """Tag the MLflow run ``old_run_id`` ``superseded=true`` and ``superseded_by=<new_run_id>``
    (a training that started afresh replaced it) and append :data:`SUPERSEDED_SUFFIX` to its name.
    Returns False, with a warning, when the store does not hold the old run."""
    from mlflow.exceptions import MlflowException

    client = open_client(uri)
    try:
        retry(f"tagging run {old_run_id} superseded", lambda: client.set_tag(old_run_id, "superseded", "true"))
        retry(f"tagging run {old_run_id} superseded", lambda: client.set_tag(old_run_id, "superseded_by", new_run_id))
        name = retry(f"reading run {old_run_id}", lambda: client.get_run(old_run_id)).info.run_name or ""
        if not name.endswith(SUPERSEDED_SUFFIX):
            retry(
                f"renaming run {old_run_id}",
                lambda: client.update_run(old_run_id, name=name + SUPERSEDED_SUFFIX),
            )
    except MlflowException as exc:
        log.warning("MLflow run %s (superseded by %s) cannot be tagged in %s: %s", old_run_id, new_run_id, uri, exc)
        return False
    return True


def _end_run(status: str) -> None:
    """End the active run with ``status``; a store that cannot record it leaves the run RUNNING in
    MLflow, with a warning, and is no reason to fail (the run's results are already logged).
    ``mlflow.end_run`` removes the run from this process's active runs before it calls the store, so
    none stays active either way."""
    try:
        retry(f"ending the run {status}", lambda: _end_active(status), budget_s=min(60.0, wait_budget_s()))
    except Exception as exc:
        if not transient(exc):
            raise
        log.warning("MLflow: could not mark the run %s (%s); it shows as RUNNING in the UI", status, _short(exc))


def _end_active(status: str) -> None:
    """End the active run, or, after an earlier attempt removed it from the stack, its last run."""
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        mlflow.end_run(status)
    else:
        last = mlflow.last_active_run()
        if last is not None:
            open_client(mlflow.get_tracking_uri()).set_terminated(last.info.run_id, status)


@contextlib.contextmanager
def _active(run: Any, tracker: Tracker) -> Iterator[None]:
    """End ``run`` FINISHED on success, KILLED on interruption (SystemExit, Ctrl-C), FAILED otherwise.

    On success the pending metrics are sent first (waiting up to the budget); metrics that still
    cannot be sent raise :class:`TrackingError` (the run is marked FAILED; a rerun that reopens it
    logs them again). On an exception one attempt is made to send them; what is left is named in a
    warning.
    """
    try:
        yield
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
        if tracker.pending and not tracker.flush(budget_s=0):
            log.warning(
                "MLflow: the metrics of step(s) %s were not sent to run %s",
                [p.step for p in tracker.pending],
                tracker.run_id,
            )
        _end_run(status)
        raise
    if not tracker.flush():
        steps = [p.step for p in tracker.pending]
        _end_run("FAILED")
        raise TrackingError(
            f"MLflow tracking store {tracker.uri} did not accept the metrics of step(s) {steps} of run "
            f"{tracker.run_id} for {wait_budget_s():.0f} s ({WAIT_ENV}); rerun the step once the store is back; {_FIX}"
        )
    _end_run("FINISHED")


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
    run named ``run_name`` is created in experiment ``cfg["experiment"]`` (created when missing, with
    :data:`EXPERIMENT_TAGS`). Logs ``config.flatten(cfg)`` as params and sets the tags ``run``, git,
    ``mlflow.source.git.commit``, SLURM job (:func:`job_tags`), version and ``tags``. A reopened run
    must hold the same values of ``fixed_params`` (the params that determine the model), else
    :class:`TrackingError` (see :func:`_log_params_once`).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or resolve_tracking_uri(cfg)
    bound_http_retries(uri)
    mlflow.set_tracking_uri(uri)
    client = open_client(uri)
    experiment_id = _experiment_id(client, cfg["experiment"], uri)
    if run_id is not None:
        try:
            retry(f"reading run {run_id}", lambda: client.get_run(run_id))
        except MlflowException as exc:
            if transient(exc):
                raise
            log.warning("MLflow run %s is not in %s; starting a new run", run_id, uri)
            run_id = None
    if run_id is not None:
        run = retry(f"reopening run {run_id}", lambda: mlflow.start_run(run_id=run_id))
    else:
        run = retry(
            f"creating run {run_name!r}", lambda: mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
        )
    tracker = Tracker(run.info.run_id, run.info.experiment_id, uri=uri, client=client)
    with _active(run, tracker):
        _log_params_once(client, run.info.run_id, flatten(cfg), fixed_params)
        git = git_state()
        source = {"mlflow.source.git.commit": git["git.commit"]} if git["git.commit"] != "unknown" else {}
        all_tags = {"run": run_name, **git, **source, **job_tags(), **package_versions(), **(tags or {})}
        retry(f"tagging run {run.info.run_id}", lambda: mlflow.set_tags({k: str(v) for k, v in all_tags.items()}))
        yield tracker


@contextlib.contextmanager
def resume_run(run_id: str, *, tracking_uri: str | None = None) -> Iterator[Tracker]:
    """Reopen the existing MLflow run ``run_id`` (e.g. to log evaluation results into a training run)."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    bound_http_retries(uri)
    check_run(uri, run_id)
    mlflow.set_tracking_uri(uri)
    run = retry(f"reopening run {run_id}", lambda: mlflow.start_run(run_id=run_id))
    tracker = Tracker(run.info.run_id, run.info.experiment_id, uri=uri, client=open_client(uri))
    with _active(run, tracker):
        yield tracker
