"""Offline tracking, synced later: copy the runs of one MLflow store into another
(``python -m conv2dlstm mlflow-sync --from <uri> --to <uri>``; docs/tracking.md).

Compute nodes with no route to the tracking server log to a local store (``sqlite:///mlflow.db``);
:func:`sync` copies its runs to the server afterwards:

- the experiments (same name; created when missing, with the source's tags);
- each run: name, status, start and end time, params, tags (the pipeline's provenance tags
  included; of MLflow's own, those the target sets itself are left out, :data:`SKIPPED_TAGS`),
  every metric with its whole history (value, step, timestamp), every artifact file (e.g.
  ``checkpoints/best.pt``, which the forecast step loads), and its logged models (MLflow 3
  ``LoggedModel``: params, tags, metrics, files, the run's model output);
- the registered models holding versions of those runs, the versions (their tags; a version's
  ``run_id`` tag and the tags ``supersedes`` / ``superseded_by`` name the copied runs) and the
  aliases (``champion``, ``challenger``) pointing at the copied versions.

Idempotent: a copied run carries the tag :data:`SYNCED_FROM_TAG` (the source run id), a copied
logged model the source model's id and a copied version ``models:/<name>/<source version>``, by
which a later sync finds them. It then adds only what the source gained (metric points by
``(step, timestamp, value)``, artifact files by path and size, tags, a later status) and moves the
aliases that moved; a sync that finds nothing new copies nothing. A copied run is set to its final
status last, so a sync that was interrupted leaves it RUNNING and the next one completes it.

Errors are :class:`~conv2dlstm.errors.TrackingError` naming the store (credentials redacted) and the
fix; a server that refuses the credentials (HTTP 401 / 403) points at ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import re
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from conv2dlstm.errors import TrackingError
from conv2dlstm.redact import redact_text, redact_url, userinfo
from conv2dlstm.tracking import store as tracking

log = logging.getLogger(__name__)

T = TypeVar("T")
SYNCED_FROM_TAG = "conv2dlstm.synced_from"
"""On a copied run: the source run id; on a copied logged model: the source model id; on a copied
model version: ``models:/<name>/<source version>``."""
DEFAULT_EXPERIMENT = "Default"
SKIPPED_TAGS = frozenset(
    {"mlflow.runName", "mlflow.log-model.history", "mlflow.modelVersions", "mlflow.artifactLocation"}
)
"""MLflow's own tags of runs and logged models that are not copied: the target sets them itself (the
run name, the versions registered from a model) or they name places in the source store."""
RUN_ID_TAGS = frozenset({"supersedes", "superseded_by", "mlflow.parentRunId", "run_id"})
"""Tags whose value is a run id: a copied one names the copied run."""
TERMINAL = frozenset({"FINISHED", "FAILED", "KILLED"})
AUTH_CODES = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
CREDENTIAL_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
QUIET_CLIENT = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
"""MLflow client settings for a sync, unless the environment sets them: no progress bars, and no
``View run at <server URL>`` lines written straight to stdout (past the redaction of the logs)."""
BATCH = {"params": 100, "tags": 100, "metrics": 1000}
"""The most entities of a kind one ``log_batch`` request may carry (MLflow's limits)."""
_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")
_RUNS_URI = re.compile(r"^runs:/([0-9a-f]+)/(.*)$")


@dataclass
class SyncReport:
    """What one sync copied (each count: items written to the target)."""

    experiments: int = 0
    runs: int = 0
    params: int = 0
    tags: int = 0
    metrics: int = 0
    artifacts: int = 0
    models: int = 0
    versions: int = 0
    aliases: int = 0
    statuses: int = 0
    runs_seen: int = 0

    @property
    def copied(self) -> int:
        """How many items were written in all (0: the target held everything already)."""
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "runs_seen")

    def summary(self) -> str:
        """One line: the counts that are not 0."""
        counts = [f"{getattr(self, f.name)} {f.name}" for f in fields(self) if f.name != "runs_seen"]
        shown = ", ".join(c for c in counts if not c.startswith("0 ")) or "nothing new"
        return f"{self.runs_seen} run(s) in sync; copied: {shown}"


@dataclass
class _Ids:
    """Source id -> target id of what this sync matched or copied."""

    runs: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)


@dataclass
class Store:
    """An MLflow store, its client, and its calls: retried while they fail for a transient reason,
    then turned into a :class:`TrackingError` that names the store (:func:`store_error`)."""

    uri: str
    client: Any
    role: str = "store"

    @property
    def shown(self) -> str:
        return redact_url(self.uri)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried (:func:`conv2dlstm.tracking.store.retry`); a failure raises :class:`TrackingError`."""
        from mlflow.exceptions import MlflowException

        try:
            return tracking.retry(f"{what} in the {self.role} {self.shown}", fn)
        except (MlflowException, OSError) as exc:
            raise store_error(self.uri, what, exc, role=self.role) from exc
        except Exception as exc:
            if tracking.transient(exc):
                raise store_error(self.uri, what, exc, role=self.role) from exc
            raise


def _secrets() -> list[str]:
    """The credentials in the environment, as they are and as an HTTP basic ``Authorization`` header
    carries them, for :func:`conv2dlstm.redact.redact_text`."""
    values = [v for v in (os.environ.get(name, "") for name in CREDENTIAL_ENV) if v]
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if password:
        values.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    return values


def auth_status(exc: BaseException) -> int | None:
    """401 or 403 when ``exc`` is a server's refusal of the credentials, else None."""
    code = AUTH_CODES.get(str(getattr(exc, "error_code", "")))
    if code is not None:
        return code
    status = getattr(exc, "code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    return int(status) if status in (401, 403) else None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def store_error(uri: str, what: str, exc: BaseException, *, role: str = "store") -> TrackingError:
    """The :class:`TrackingError` for ``what`` failing in the store ``uri`` with ``exc``: the store, the
    cause (credentials redacted) and the fix."""
    shown = redact_url(uri)
    cause = _short(redact_text(str(exc), _secrets()))
    status = auth_status(exc)
    if status == 401:
        return TrackingError(
            f"MLflow tracking server {shown} ({role}) refused {what}: HTTP 401, not authenticated ({cause}); set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment, "
            "never in the URI, and rerun mlflow-sync"
        )
    if status == 403:
        return TrackingError(
            f"MLflow tracking server {shown} ({role}) refused {what}: HTTP 403, not permitted ({cause}); the "
            "account in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD lacks a permission there: its owner "
            "(or an admin) grants it, or set them to an account that holds it, and rerun mlflow-sync"
        )
    if tracking.transient(exc):
        return TrackingError(
            f"MLflow {role} {shown} did not answer while {what} ({cause}); start the server or correct the URI, "
            "then rerun mlflow-sync: it copies only what the target still lacks"
        )
    return TrackingError(
        f"MLflow {role} {shown}: {what} failed ({cause}); rerun mlflow-sync once fixed: it copies only what the "
        "target still lacks"
    )


def _check_uri(uri: str, role: str) -> None:
    """:class:`TrackingError` for a server's URI that writes credentials down (they belong in the
    environment; a database URI keeps its own, shown redacted)."""
    if urllib.parse.urlparse(uri).scheme in ("http", "https") and userinfo(uri):
        raise TrackingError(
            f"the {role} URI {redact_url(uri)} holds credentials; give the server's address alone and put them "
            "in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )


def _check_reachable(uri: str, role: str, timeout_s: float = 10.0) -> None:
    """:class:`TrackingError` unless something answers HTTP at the server ``uri`` (any status: whether
    the credentials are accepted is for the first API call to say)."""
    url = f"{uri.rstrip('/')}/health"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        if isinstance(getattr(exc, "reason", None), ssl.SSLError):
            return  # it answers; the MLflow client has TLS settings of its own (MLFLOW_TRACKING_SERVER_CERT_PATH)
        raise TrackingError(
            f"MLflow tracking server {redact_url(uri)} ({role}) is unreachable ({getattr(exc, 'reason', exc)}); "
            "start it (make mlflow-server) or correct the URI; from a node with no route to it, sync from a "
            "machine that has one (the login node), where the local store is on a shared file system"
        ) from exc


def open_store(uri: str, role: str) -> Store:
    """The store ``uri`` (``role``: ``source`` or ``target``), checked: an http(s) server answers and
    accepts the credentials; a local source exists; a local target is writable."""
    _check_uri(uri, role)
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        tracking.bound_http_retries(uri)
        _check_reachable(uri, role)
    elif role == "source":
        path = tracking.local_store_path(uri)
        if path is not None and not path.exists():
            raise TrackingError(
                f"the source store {redact_url(uri)} does not exist ({path}); give --from the store the runs were "
                "logged to (the configuration's mlflow.tracking_uri, e.g. sqlite:///mlflow.db in the working "
                "directory of the jobs)"
            )
    else:
        tracking.check_tracking(uri)
    store = Store(uri, None, role)
    store.client = store.call("opening the store", functools.partial(tracking.open_client, uri))
    store.call("reading the experiments", lambda: store.client.search_experiments(max_results=1))
    return store


def _pages(fetch: Callable[[str | None], Any]) -> list[Any]:
    """Every item of a paged MLflow search: ``fetch(page_token)`` until no token is left."""
    out: list[Any] = []
    token: str | None = None
    while True:
        page = fetch(token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@contextlib.contextmanager
def _quiet_client() -> Iterator[None]:
    """:data:`QUIET_CLIENT` in the environment (where it is not set) for the duration of a sync."""
    added = {k: v for k, v in QUIET_CLIENT.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# ------------------------------------------------------------------------------------------------
# Experiments and runs


def select_experiments(src: Store, names: Sequence[str] = ()) -> list[Any]:
    """The source's experiments named ``names`` (:class:`TrackingError` for one it lacks), or else
    all of them, the ``Default`` experiment only when it holds runs."""
    from mlflow.entities import ViewType

    found = src.call(
        "listing the experiments",
        lambda: _pages(lambda t: src.client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=t)),
    )
    by_name = {e.name: e for e in found}
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise TrackingError(
                f"the source {src.shown} holds no experiment {', '.join(map(repr, missing))}; it holds "
                f"{', '.join(map(repr, sorted(by_name))) or 'none'} (--experiment names one of them)"
            )
        return [by_name[n] for n in dict.fromkeys(names)]
    return [e for e in found if e.name != DEFAULT_EXPERIMENT or _has_runs(src, e.experiment_id)]


def _has_runs(store: Store, experiment_id: str) -> bool:
    runs = store.call("reading the runs", lambda: store.client.search_runs([experiment_id], max_results=1))
    return bool(runs)


def _search_runs(store: Store, experiment_id: str, filter_string: str = "") -> list[Any]:
    """The active runs of an experiment (oldest first), with ``filter_string``."""
    return store.call(
        "listing the runs",
        lambda: _pages(
            lambda t: store.client.search_runs(
                [experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"], page_token=t
            )
        ),
    )


def _target_experiment(tgt: Store, experiment: Any, report: SyncReport) -> str:
    """The id of the target's experiment named as ``experiment`` (created when missing, as the
    pipeline creates its own: :func:`conv2dlstm.tracking.store.start_run`), with the source's tags."""
    existed = tgt.call("reading the experiment", lambda: tgt.client.get_experiment_by_name(experiment.name))
    exp_id = tgt.call(
        f"creating experiment {experiment.name!r}",
        lambda: tracking._experiment_id(tgt.client, experiment.name, tgt.uri),
    )
    report.experiments += int(existed is None)
    held = tgt.call("reading the experiment", lambda: tgt.client.get_experiment(exp_id)).tags
    for key, value in experiment.tags.items():
        if held.get(key) != value:
            tgt.call("tagging the experiment", functools.partial(tgt.client.set_experiment_tag, exp_id, key, value))
    return str(exp_id)


def _match_runs(tgt: Store, src_runs: Sequence[Any], exp_id: str, ids: _Ids, report: SyncReport) -> None:
    """Find the copy of each of ``src_runs`` in the target experiment ``exp_id`` (tag
    :data:`SYNCED_FROM_TAG`), creating the missing ones; fills ``ids.runs``."""
    copies = _search_runs(tgt, exp_id, f"tags.`{SYNCED_FROM_TAG}` LIKE '%'")
    held = {r.data.tags[SYNCED_FROM_TAG]: r.info.run_id for r in copies}
    for run in src_runs:
        if run.info.run_id not in held:
            held[run.info.run_id] = _create_copy(tgt, exp_id, run)
            report.runs += 1
        ids.runs[run.info.run_id] = held[run.info.run_id]


def _create_copy(tgt: Store, exp_id: str, run: Any) -> str:
    """A new run in the target experiment ``exp_id`` with the name, start time and user of the source
    run ``run``, tagged :data:`SYNCED_FROM_TAG`; its id."""
    tags = {SYNCED_FROM_TAG: run.info.run_id}
    if "mlflow.user" in run.data.tags:
        tags["mlflow.user"] = run.data.tags["mlflow.user"]
    created = tgt.call(
        f"creating run {run.info.run_name!r}",
        lambda: tgt.client.create_run(exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name),
    )
    log.info("run %s (%s): copying into %s", run.info.run_name, run.info.run_id, created.info.run_id)
    return str(created.info.run_id)


def sync_experiment(src: Store, tgt: Store, experiment: Any, ids: _Ids, report: SyncReport) -> None:
    """Copy the experiment ``experiment`` of the source and every active run it holds."""
    exp_id = _target_experiment(tgt, experiment, report)
    src_runs = _search_runs(src, experiment.experiment_id)
    _match_runs(tgt, src_runs, exp_id, ids, report)  # all first: tags may name another run
    for run in src_runs:
        sync_run(src, tgt, run, ids, report)


def sync_run(src: Store, tgt: Store, run: Any, ids: _Ids, report: SyncReport) -> None:
    """Bring the target's copy of the source run ``run`` up to date; its status comes last."""
    target_id = ids.runs[run.info.run_id]
    held = tgt.call(f"reading run {target_id}", lambda: tgt.client.get_run(target_id))
    before = report.copied
    _sync_params(tgt, run, held, report)
    _sync_tags(tgt, run, held, ids, report)
    _sync_metrics(src, tgt, run, held, report)
    _sync_artifacts(src, tgt, run, held, report)
    _sync_models(src, tgt, run, held, ids, report)
    _sync_status(tgt, run, held, report)
    report.runs_seen += 1
    if report.copied > before:
        log.info(
            "run %s (%s -> %s): %d item(s) copied",
            run.info.run_name,
            run.info.run_id,
            target_id,
            report.copied - before,
        )


def _sync_params(tgt: Store, run: Any, held: Any, report: SyncReport) -> None:
    """Log the params of ``run`` that its copy ``held`` lacks (params never change in MLflow)."""
    from mlflow.entities import Param

    have = held.data.params
    differ = sorted(k for k, v in run.data.params.items() if k in have and have[k] != v)
    if differ:
        log.warning("run %s: the target holds other values of params %s; kept", held.info.run_id, differ)
    new = [Param(k, v) for k, v in run.data.params.items() if k not in have]
    for batch in _chunks(new, BATCH["params"]):
        tgt.call("logging params", functools.partial(tgt.client.log_batch, held.info.run_id, params=list(batch)))
    report.params += len(new)


def translate(key: str, value: str, runs: Mapping[str, str]) -> str:
    """A tag's value in the target: the copied run's id for a :data:`RUN_ID_TAGS` tag that names a
    copied run, else ``value``."""
    return runs.get(value, value) if key in RUN_ID_TAGS else value


def wanted_tags(tags: Mapping[str, str], source_id: str, runs: Mapping[str, str]) -> dict[str, str]:
    """The tags a copy of a run with ``tags`` (id ``source_id``) holds in the target."""
    out = {k: translate(k, v, runs) for k, v in tags.items() if k not in SKIPPED_TAGS and k != SYNCED_FROM_TAG}
    return out | {SYNCED_FROM_TAG: source_id}


def _sync_tags(tgt: Store, run: Any, held: Any, ids: _Ids, report: SyncReport) -> None:
    """Set the tags of ``run`` that its copy ``held`` lacks or holds with another value (and its name)."""
    from mlflow.entities import RunTag

    have = held.data.tags
    wanted = wanted_tags(run.data.tags, run.info.run_id, ids.runs)
    new = [RunTag(k, v) for k, v in wanted.items() if have.get(k) != v]
    for batch in _chunks(new, BATCH["tags"]):
        tgt.call("tagging the run", functools.partial(tgt.client.log_batch, held.info.run_id, tags=list(batch)))
    report.tags += len(new)
    if new:
        log.debug("run %s: tags %s", held.info.run_id, [t.key for t in new])
    if run.info.run_name and run.info.run_name != held.info.run_name:  # e.g. renamed "(superseded)" since
        tgt.call("renaming the run", lambda: tgt.client.update_run(held.info.run_id, name=run.info.run_name))
        report.tags += 1


def point_key(metric: Any) -> tuple[int, int, str]:
    """What tells two points of one metric's history apart: step, timestamp and value (exact; NaN too)."""
    return int(metric.step), int(metric.timestamp), repr(float(metric.value))


def missing_points(source: Iterable[Any], target: Iterable[Any]) -> list[Any]:
    """The points of ``source`` (a metric's history) that ``target`` lacks, each once, in order."""
    held = {point_key(m) for m in target}
    out = []
    for metric in source:
        key = point_key(metric)
        if key not in held:
            held.add(key)
            out.append(metric)
    return out


def _sync_metrics(src: Store, tgt: Store, run: Any, held: Any, report: SyncReport) -> None:
    """Log every point of every metric history of ``run`` that its copy ``held`` lacks."""
    from mlflow.entities import Metric

    source_id, target_id = run.info.run_id, held.info.run_id
    new = []
    for key in sorted(run.data.metrics):
        history = src.call(f"reading metric {key}", functools.partial(src.client.get_metric_history, source_id, key))
        if len(history) == 1 and key in held.data.metrics:
            continue  # a copy holds only points of the source: the one point is there (no request per score)
        have = (
            tgt.call(f"reading metric {key}", functools.partial(tgt.client.get_metric_history, target_id, key))
            if key in held.data.metrics
            else []
        )
        new += [Metric(key, m.value, m.timestamp, m.step) for m in missing_points(history, have)]
    for batch in _chunks(new, BATCH["metrics"]):
        tgt.call("logging metrics", functools.partial(tgt.client.log_batch, target_id, metrics=list(batch)))
    report.metrics += len(new)


def artifact_repo(store: Store, artifact_uri: str) -> Any:
    """The artifact repository of a run's (or model's) ``artifact_uri`` in ``store`` (no request: a
    run's listing through the client reads the run again for each folder)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=store.uri)


def artifact_files(store: Store, repo: Any, path: str | None = None) -> dict[str, int | None]:
    """``path -> size`` of every file in the artifact repository ``repo`` (under ``path``), recursively."""
    out: dict[str, int | None] = {}
    for item in store.call("listing the artifacts", functools.partial(repo.list_artifacts, path)):
        if item.is_dir:
            out |= artifact_files(store, repo, item.path)
        else:
            out[item.path] = item.file_size
    return out


def _sync_artifacts(src: Store, tgt: Store, run: Any, held: Any, report: SyncReport) -> None:
    """Copy the artifact files of ``run`` that its copy ``held`` lacks, or holds with another size."""
    source, target = artifact_repo(src, run.info.artifact_uri), artifact_repo(tgt, held.info.artifact_uri)
    have = artifact_files(tgt, target)
    files = artifact_files(src, source)
    new = [p for p, size in files.items() if p not in have or (None not in (size, have[p]) and size != have[p])]
    if not new:
        return
    with tempfile.TemporaryDirectory(prefix="conv2dlstm-sync-") as tmp:
        for path in new:
            local = src.call(f"downloading {path}", functools.partial(source.download_artifacts, path, tmp))
            folder = os.path.dirname(path) or None
            tgt.call(f"uploading {path}", functools.partial(target.log_artifact, local, folder))
    report.artifacts += len(new)


def _sync_status(tgt: Store, run: Any, held: Any, report: SyncReport) -> None:
    """Give the copy ``held`` the status and end time of ``run`` (last: a copy stays RUNNING until
    everything else is in)."""
    status, end = run.info.status, run.info.end_time
    if status == held.info.status and (status not in TERMINAL or end == held.info.end_time):
        return
    if status in TERMINAL:
        tgt.call("ending the run", lambda: tgt.client.set_terminated(held.info.run_id, status=status, end_time=end))
    else:
        tgt.call("updating the run", lambda: tgt.client.update_run(held.info.run_id, status=status))
    report.statuses += 1


# ------------------------------------------------------------------------------------------------
# Logged models (MLflow 3)


def _is_ready(model: Any) -> bool:
    return str(getattr(model.status, "value", model.status)).upper().endswith("READY")


def _logged_models(store: Store, experiment_id: str, run_id: str) -> list[Any]:
    """The logged models whose source run is ``run_id``."""
    return store.call(
        "listing the logged models",
        lambda: _pages(
            lambda t: store.client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{run_id}'", page_token=t
            )
        ),
    )


def _sync_models(src: Store, tgt: Store, run: Any, held: Any, ids: _Ids, report: SyncReport) -> None:
    """Copy the logged models of ``run`` (complete ones: status READY) that its copy ``held`` lacks,
    and their tags and metrics; fills ``ids.models``."""
    copies = {m.tags.get(SYNCED_FROM_TAG): m for m in _logged_models(tgt, held.info.experiment_id, held.info.run_id)}
    for model in _logged_models(src, run.info.experiment_id, run.info.run_id):
        if not _is_ready(model):
            log.warning(
                "run %s: logged model %s is %s in the source; not copied", run.info.run_id, model.model_id, model.status
            )
            continue
        copy = copies.get(model.model_id)
        if copy is None:
            copy = _create_model(tgt, model, held)
            report.models += 1
        if not _is_ready(copy):  # new, or a sync stopped during its upload
            _upload_model(src, tgt, model, copy, held.info.run_id)
        ids.models[model.model_id] = copy.model_id
        _sync_model_extras(tgt, model, copy, run, held, report)


def _model_tags(model: Any) -> dict[str, str]:
    """The tags of a logged model that its copy holds: all but :data:`SKIPPED_TAGS` (``mlflow.modelVersions``,
    the versions registered from it, is the target's own)."""
    return {k: v for k, v in model.tags.items() if k not in SKIPPED_TAGS}


def _create_model(tgt: Store, model: Any, held: Any) -> Any:
    """A new logged model in the target like ``model``, made by the copied run ``held``."""
    tags = {**_model_tags(model), SYNCED_FROM_TAG: model.model_id}
    return tgt.call(
        f"creating logged model {model.name!r}",
        lambda: tgt.client.create_logged_model(
            held.info.experiment_id,
            name=model.name,
            source_run_id=held.info.run_id,
            tags=tags,
            params=dict(model.params),
            model_type=model.model_type or None,
        ),
    )


def retarget_mlmodel(path: Path, ids: Mapping[str, str]) -> None:
    """Rewrite the top-level values of the ``MLmodel`` file ``path`` that ``ids`` maps (the source model's
    id, its run id and artifact location -> the copy's)."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        return
    changed = {k: ids[v] for k, v in spec.items() if isinstance(v, str) and v in ids}
    if changed:
        path.write_text(yaml.safe_dump(spec | changed, sort_keys=False))


def _upload_model(src: Store, tgt: Store, model: Any, copy: Any, target_run: str) -> None:
    """Download the files of ``model`` from the source, point its ``MLmodel`` at the copy, upload them
    into ``copy`` and mark it READY."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="conv2dlstm-sync-model-") as tmp:
        local = src.call(
            f"downloading logged model {model.model_id}",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=model.artifact_location, dst_path=tmp, tracking_uri=src.uri
            ),
        )
        mlmodel = Path(local) / "MLmodel"
        if mlmodel.is_file():
            ids = {model.model_id: copy.model_id, model.artifact_location: copy.artifact_location}
            retarget_mlmodel(mlmodel, ids | ({model.source_run_id: target_run} if model.source_run_id else {}))
        tgt.call(
            f"uploading logged model {copy.model_id}", lambda: tgt.client.log_model_artifacts(copy.model_id, local)
        )
    tgt.call("finalizing the logged model", lambda: tgt.client.finalize_logged_model(copy.model_id, "READY"))


def _sync_model_extras(tgt: Store, model: Any, copy: Any, run: Any, held: Any, report: SyncReport) -> None:
    """The copy's tags and metrics (``copy`` as found or created) as the source model's, and the copied
    run's model output."""
    from mlflow.entities import LoggedModelOutput, Metric

    tags = {k: v for k, v in _model_tags(model).items() if copy.tags.get(k) != v}
    if tags:
        tgt.call("tagging the logged model", lambda: tgt.client.set_logged_model_tags(copy.model_id, tags))
        report.tags += len(tags)
        log.debug("logged model %s: tags %s", copy.model_id, sorted(tags))
    new = [
        Metric(m.key, m.value, m.timestamp, m.step, run_id=held.info.run_id, model_id=copy.model_id)
        for m in _missing_model_metrics(model.metrics or [], copy.metrics or [])
    ]
    for batch in _chunks(new, BATCH["metrics"]):
        tgt.call(
            "logging model metrics", functools.partial(tgt.client.log_batch, held.info.run_id, metrics=list(batch))
        )
    report.metrics += len(new)
    outputs = getattr(held.outputs, "model_outputs", None) or []
    if all(o.model_id != copy.model_id for o in outputs):
        step = next(
            (o.step for o in getattr(run.outputs, "model_outputs", None) or [] if o.model_id == model.model_id), 0
        )
        tgt.call(
            "linking the model to its run",
            lambda: tgt.client.log_outputs(held.info.run_id, [LoggedModelOutput(copy.model_id, step)]),
        )


def _missing_model_metrics(source: Sequence[Any], target: Sequence[Any]) -> list[Any]:
    """The metrics of a logged model that its copy lacks (by key, step, timestamp and value)."""
    held = {(m.key, *point_key(m)) for m in target}
    return [m for m in source if (m.key, *point_key(m)) not in held]


# ------------------------------------------------------------------------------------------------
# The model registry


def _versions(store: Store, name: str) -> list[Any]:
    """The versions of the registered model ``name``."""
    where = f"name = '{name}'"
    return store.call(
        f"listing the versions of {name!r}",
        lambda: _pages(lambda t: store.client.search_model_versions(where, page_token=t)),
    )


def sync_registry(src: Store, tgt: Store, ids: _Ids, report: SyncReport) -> None:
    """Copy the registered models of the source that hold versions of the copied runs: those versions
    and the aliases pointing at them."""
    registered = src.call(
        "listing the registered models", lambda: _pages(lambda t: src.client.search_registered_models(page_token=t))
    )
    for model in registered:
        versions = [v for v in _versions(src, model.name) if v.run_id in ids.runs]
        if versions:
            _sync_registered_model(src, tgt, model.name, versions, ids, report)


def _sync_registered_model(
    src: Store, tgt: Store, name: str, versions: Sequence[Any], ids: _Ids, report: SyncReport
) -> None:
    """The registered model ``name`` in the target (created when missing), the ``versions`` of the copied
    runs, and its aliases."""
    source = src.call(f"reading registered model {name!r}", lambda: src.client.get_registered_model(name))
    held = _ensure_registered(tgt, source, report)
    copies = {} if held is None else {(v.run_id, v.tags.get(SYNCED_FROM_TAG)): v for v in _versions(tgt, name)}
    mapping: dict[str, str] = {}
    for version in sorted(versions, key=lambda v: int(v.version)):
        copied = _sync_version(tgt, name, version, copies, ids, report)
        if copied is not None:
            mapping[str(version.version)] = copied
    held_aliases = {} if held is None else {alias: str(v) for alias, v in (held.aliases or {}).items()}
    _sync_aliases(tgt, source, held_aliases, mapping, report)


def _registered(store: Store, name: str) -> Any | None:
    """The registered model ``name`` of ``store``, None when it has none (or none this account may read:
    an authenticated server answers 403, not 404, for a model that does not exist)."""
    found = store.call(
        f"reading registered model {name!r}",
        lambda: store.client.search_registered_models(filter_string=f"name = '{name}'", max_results=10),
    )
    return next((m for m in found if m.name == name), None)


def _ensure_registered(tgt: Store, source: Any, report: SyncReport) -> Any | None:
    """The registered model named as ``source`` in the target, with its description and tags: as it
    was found, or None when it is created now."""
    name = source.name
    held = _registered(tgt, name)
    if held is None:
        tgt.call(
            f"creating registered model {name!r}",
            _exists_as(
                name,
                tgt,
                lambda: tgt.client.create_registered_model(
                    name, tags=dict(source.tags), description=source.description
                ),
            ),
        )
        return None
    if source.description and not held.description:
        tgt.call(
            "describing the registered model", lambda: tgt.client.update_registered_model(name, source.description)
        )
    for key, value in source.tags.items():
        if held.tags.get(key) != value:
            tgt.call(
                "tagging the registered model", functools.partial(tgt.client.set_registered_model_tag, name, key, value)
            )
            report.tags += 1
    return held


def _exists_as(name: str, tgt: Store, fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` (creating the registered model ``name``), raising :class:`TrackingError` when the target
    holds a model of that name that this account may not read."""

    def call() -> T:
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            raise TrackingError(
                f"the target {tgt.shown} holds a registered model {name!r} that this account may not read; its "
                "owner (or an admin) grants a permission on it, or sync with MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD of an account that holds one"
            ) from None

    return call


def version_source(version: Any, ids: _Ids) -> tuple[str, str | None] | None:
    """``(source, model id)`` of the copy of ``version`` in the target: its copied logged model
    (``models:/<id>``) or its run's artifact path in the copied run (``runs:/<id>/<path>``); None when
    neither is copied."""
    match = _MODEL_URI.match(version.source or "")
    model_id = version.model_id or (match.group(1) if match else None)
    if model_id is not None:
        copied = ids.models.get(model_id)
        return None if copied is None else (f"models:/{copied}", copied)
    runs = _RUNS_URI.match(version.source or "")
    if runs and runs.group(1) in ids.runs:
        return f"runs:/{ids.runs[runs.group(1)]}/{runs.group(2)}", None
    return None


def _sync_version(
    tgt: Store, name: str, version: Any, copies: Mapping[tuple[str, str], Any], ids: _Ids, report: SyncReport
) -> str | None:
    """The target's copy of the model version ``version`` (in ``copies``, by its run and
    :data:`SYNCED_FROM_TAG`; created when missing), with its tags; returns its version, None when it
    cannot be copied (a warning says why)."""
    target_run = ids.runs[version.run_id]
    marker = f"models:/{name}/{version.version}"
    tags = {k: translate(k, v, ids.runs) for k, v in version.tags.items()} | {SYNCED_FROM_TAG: marker}
    copy = copies.get((target_run, marker))
    if copy is None:
        source = version_source(version, ids)
        if source is None:
            log.warning("%s (%s) has no logged model or run artifact in the copy; not copied", marker, version.source)
            return None
        copy = tgt.call(
            f"registering {marker}",
            lambda: tgt.client.create_model_version(
                name,
                source[0],
                run_id=target_run,
                tags=tags,
                description=version.description or None,
                model_id=source[1],
            ),
        )
        report.versions += 1
    new = {k: v for k, v in tags.items() if copy.tags.get(k) != v}
    for key, value in new.items():
        tgt.call(
            "tagging the model version",
            functools.partial(tgt.client.set_model_version_tag, name, copy.version, key, value),
        )
    report.tags += len(new)
    if new:
        log.debug("models:/%s/%s: tags %s", name, copy.version, sorted(new))
    return str(copy.version)


def _sync_aliases(
    tgt: Store, source: Any, held: Mapping[str, str], mapping: Mapping[str, str], report: SyncReport
) -> None:
    """Point each alias of the source's registered model at the copy of its version (``mapping``:
    source version -> target version); remove the target's aliases (``held``: alias -> version) that the
    source no longer has, where they point at a copied version."""
    name = source.name
    aliases = {alias: str(v) for alias, v in (source.aliases or {}).items()}
    for alias, version in aliases.items():
        wanted = mapping.get(version)
        if wanted is not None and held.get(alias) != wanted:
            tgt.call(
                f"setting alias {alias}", functools.partial(tgt.client.set_registered_model_alias, name, alias, wanted)
            )
            log.info("models:/%s@%s -> version %s in %s", name, alias, wanted, tgt.shown)
            report.aliases += 1
    copied = set(mapping.values())
    for alias, version in held.items():
        if alias not in aliases and version in copied:
            tgt.call(
                f"removing alias {alias}", functools.partial(tgt.client.delete_registered_model_alias, name, alias)
            )
            log.info("models:/%s@%s removed in %s (as in the source)", name, alias, tgt.shown)
            report.aliases += 1


# ------------------------------------------------------------------------------------------------


DEFAULT_SOURCE = "sqlite:///mlflow.db"


def default_source(cfg: Mapping[str, Any] | None) -> str:
    """Where offline jobs logged: the configuration's ``mlflow.tracking_uri`` (not ``MLFLOW_TRACKING_URI``,
    which where one syncs usually names the server), else :data:`DEFAULT_SOURCE`."""
    return str(cfg["mlflow"]["tracking_uri"]) if cfg is not None else DEFAULT_SOURCE


def _same_store(a: str, b: str) -> bool:
    pa, pb = tracking.local_store_path(a), tracking.local_store_path(b)
    if pa is not None and pb is not None:
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def sync(source: str, target: str, experiments: Sequence[str] = ()) -> SyncReport:
    """Copy the runs of ``experiments`` (default: all; the ``Default`` experiment only when it holds
    runs) from the store ``source`` into the store ``target``, with their models, registered versions
    and aliases (module docstring). Idempotent; returns what it copied."""
    if _same_store(source, target):
        raise TrackingError(f"--from and --to name the same store ({redact_url(source)}); give the server as --to")
    with _quiet_client():
        src = open_store(source, "source")
        chosen = select_experiments(src, experiments)
        tgt = open_store(target, "target")
        ids, report = _Ids(), SyncReport()
        for experiment in chosen:
            sync_experiment(src, tgt, experiment, ids, report)
        sync_registry(src, tgt, ids, report)
    log.info("MLflow sync %s -> %s: %s", src.shown, tgt.shown, report.summary())
    return report
