"""The best model, findable: ``models:/<experiment>@champion`` (its run's ``checkpoints/best.pt``, loaded
with :func:`conv2dlstm.training.models.load_model`, weights only; docs/tracking.md).

After the compare step (:func:`after_compare`):

- every run of the configuration gets the ``sweep`` tags of the whole configuration
  (:func:`conv2dlstm.config.keys.sweep_tags`): a run trained by an earlier, smaller sweep and not retrained
  joins the current one;
- the best run of the experiment by validation loss (the ``best_val_loss`` metric of the training;
  test scores are never used to choose, only copied onto the version for reporting) is registered
  in the MLflow model registry under the experiment's name, and the alias ``champion`` points at it
  (:func:`register_champion`).

Candidates are the experiment's FINISHED runs whose logged model still exists
(``mlflow.log_model: true``), superseded or not, and, when the compare step knows its runs, that were
validated on the same windows store as they were (the ``provenance.inputs.windows`` tag): validation
losses on other data do not compare. A superseded run (a later training of the same run name
started afresh, e.g. with fewer epochs) keeps its model, so a worse retraining never takes the
alias from it: the best run of the configuration just compared is then registered as a
*challenger* (alias ``challenger``) and a warning names both. A model registered before is reused
(one version per run), and the alias only moves when another run becomes the best. With
``mlflow.log_model: false`` nothing is registered (a warning says so).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conv2dlstm.errors import TrackingError
from conv2dlstm.tracking import store as tracking

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
SELECT_METRIC = "best_val_loss"
WINDOWS_TAG = "provenance.inputs.windows"
RUN_ID_FILE = "mlflow_run_id.txt"
MODEL_NAME = "model"
"""The name under which the train step logs its model (:meth:`conv2dlstm.tracking.store.Tracker.log_model`)."""


@dataclass(frozen=True)
class Champion:
    """The registered best run: ``models:/<name>@champion`` is version ``version``."""

    name: str
    version: str
    run_id: str
    run_name: str
    best_val_loss: float
    model_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{CHAMPION_ALIAS}"


def read_run_ids(models: Sequence[Path]) -> dict[str, str]:
    """``run name -> MLflow run id`` from the ``mlflow_run_id.txt`` beside each ``model.pt``
    (``<outdir>/train/<run>/model.pt``); a run without the file is left out with a warning."""
    out: dict[str, str] = {}
    for model in map(Path, models):
        path = model.parent / RUN_ID_FILE
        run_id = path.read_text().strip() if path.is_file() else ""
        if run_id:
            out[model.parent.name] = run_id
        else:
            log.warning("%s is missing or empty; run %s is not tagged with the sweep", path, model.parent.name)
    return out


def held_runs(client: Any, run_ids: Mapping[str, str]) -> dict[str, Any]:
    """``run name -> MLflow run`` of the ``run_ids`` the store holds; the others (logged to another
    store) are left out with a warning."""
    from mlflow.exceptions import MlflowException

    out = {}
    for name, run_id in run_ids.items():
        try:
            out[name] = tracking.retry(f"reading run {run_id}", functools.partial(client.get_run, run_id))
        except MlflowException as exc:
            if tracking.transient(exc):
                raise
            log.warning("MLflow run %s of run %s is not in this store; left out", run_id, name)
    return out


def tag_sweep(client: Any, runs: Mapping[str, Any], tags: Mapping[str, str]) -> list[str]:
    """Set ``tags`` on each of ``runs`` (name -> MLflow run) whose tags differ; returns the names tagged."""
    from mlflow.entities import RunTag

    tagged = []
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    for name, run in runs.items():
        if any(run.data.tags.get(k) != v for k, v in tags.items()):
            tracking.retry(
                f"tagging run {run.info.run_id}", functools.partial(client.log_batch, run.info.run_id, tags=batch)
            )
            tagged.append(name)
    return tagged


def candidates(client: Any, experiment_id: str, windows: set[str] | None = None) -> list[Any]:
    """The experiment's FINISHED runs with a finite ``best_val_loss`` (and, when ``windows`` is
    given, a windows digest in it), best first. Superseded runs stay candidates: their models are
    as valid as when they were trained."""
    runs = tracking.retry(
        "searching the experiment's runs",
        lambda: client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000),
    )
    out = []
    for run in runs:
        loss = run.data.metrics.get(SELECT_METRIC)
        if loss is None or not math.isfinite(loss):
            continue
        if windows is not None and run.data.tags.get(WINDOWS_TAG) not in windows:
            continue
        out.append(run)
    return sorted(out, key=lambda r: (r.data.metrics[SELECT_METRIC], r.info.start_time or 0, r.info.run_id))


def _version_of(client: Any, name: str, run_id: str, model: Any) -> str:
    """The registered version of ``name`` made from run ``run_id``, created when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    versions = tracking.retry(
        "searching model versions", lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    )
    if versions:
        return str(max(int(v.version) for v in versions))
    try:
        version = tracking.retry(f"registering model {name!r}", lambda: mlflow.register_model(model.model_uri, name))
    except MlflowException as exc:
        if tracking.transient(exc):
            raise
        raise TrackingError(
            f"MLflow refused to register the best model under the name {name!r} (the experiment name): {exc}; "
            "choose an `experiment` name MLflow accepts as a registered model name (letters, digits, - _ .)"
        ) from exc
    return str(version.version)


def _run_label(run: Any) -> str:
    """The run's name as the pipeline knows it (the ``run`` tag; the MLflow name of a superseded run
    carries a suffix)."""
    return str(run.data.tags.get("run") or run.info.run_name)


def _point_alias(client: Any, name: str, alias: str, run: Any, model: Any) -> tuple[str, str | None]:
    """Register ``run``'s ``model`` under ``name`` (once per run), point ``alias`` at that version and
    tag it with the run, its ``best_val_loss`` and, for reporting only, its ``test_rmse_*`` scores.
    Returns ``(version, previous version of the alias or None)``."""
    from mlflow.exceptions import MlflowException

    version = _version_of(client, name, run.info.run_id, model)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    previous = None if current is None else str(current.version)
    if previous != version:
        tracking.retry(f"setting the {alias} alias", lambda: client.set_registered_model_alias(name, alias, version))
    scores = {
        SELECT_METRIC: run.data.metrics[SELECT_METRIC],
        **{k: v for k, v in run.data.metrics.items() if k.startswith("test_rmse_")},
    }
    tags = {"run": _run_label(run), "run_id": run.info.run_id, **{k: f"{v:.6g}" for k, v in scores.items()}}
    for key, value in tags.items():
        tracking.retry(
            "tagging the model version", functools.partial(client.set_model_version_tag, name, version, key, value)
        )
    return version, previous


def register_champion(
    uri: str, experiment: str, *, windows: set[str] | None = None, current: Collection[str] = ()
) -> Champion | None:
    """Register the best run of ``experiment`` (:func:`candidates`, the first whose model exists) as
    the model ``experiment`` with the alias :data:`CHAMPION_ALIAS`; None (with a warning) when no
    run qualifies. The version carries the run's name, its ``best_val_loss`` and, for reporting
    only, its ``test_rmse_*`` scores as tags.

    ``current`` are the MLflow run ids of the configuration just compared. When none of them is the
    champion, the best of them with a model is registered too, under the alias
    :data:`CHALLENGER_ALIAS`, and a warning says that it did not beat the champion; when one of them
    is the champion, a challenger alias left from before is removed."""
    import mlflow

    tracking.bound_http_retries(uri)
    mlflow.set_tracking_uri(uri)
    client = tracking.open_client(uri)
    exp = tracking.retry(f"reading experiment {experiment!r}", lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        log.warning("experiment %r is not in %s; no model registered", experiment, uri)
        return None
    wanted = set(current)
    with_model = _runs_with_model(client, exp.experiment_id, windows, wanted, experiment=experiment)
    if not with_model:
        log.warning("no finished run of experiment %r logged a model; nothing registered", experiment)
        return None
    name = experiment
    best, model = with_model[0]
    version = _point_champion(client, name, best, model)
    challengers = [(r, m) for r, m in with_model if r.info.run_id in wanted]
    if challengers and challengers[0][0].info.run_id != best.info.run_id:
        _point_challenger(client, name, challengers[0], best=best, champion=version)
    elif challengers:  # the configuration's run is the champion: no challenger is left
        _drop_alias(client, name, CHALLENGER_ALIAS)
    _describe(client, name, experiment)
    return Champion(
        name, version, best.info.run_id, _run_label(best), best.data.metrics[SELECT_METRIC], model.model_uri
    )


def _runs_with_model(
    client: Any, experiment_id: str, windows: set[str] | None, wanted: set[str], *, experiment: str
) -> list[tuple[Any, Any]]:
    """``(run, logged model)`` of the candidates of experiment ``experiment_id`` (:func:`candidates`) that
    logged a model, best first: the champion, then further runs only until the best of ``wanted`` (run
    ids) is among them. A WARNING names the runs better than the champion that logged no model."""
    with_model: list[tuple[Any, Any]] = []
    skipped: list[str] = []
    for run in candidates(client, experiment_id, windows):
        if with_model:  # the champion is found; only the best run of `current` is still looked for
            if not wanted or any(r.info.run_id in wanted for r, _ in with_model):
                break
            if run.info.run_id not in wanted:
                continue
        model = tracking.logged_model(client, experiment_id, run.info.run_id, MODEL_NAME)
        if model is not None:
            with_model.append((run, model))
        elif not with_model:
            skipped.append(_run_label(run))
    if skipped:
        log.warning(
            "run(s) %s of experiment %r have a lower %s but logged no model "
            "(mlflow.log_model was false); they are not registered",
            skipped,
            experiment,
            SELECT_METRIC,
        )
    return with_model


def _point_champion(client: Any, name: str, best: Any, model: Any) -> str:
    """Point ``models:/<name>@champion`` at the version of run ``best``'s ``model``, logging a change;
    returns that version."""
    version, previous = _point_alias(client, name, CHAMPION_ALIAS, best, model)
    if previous != version:
        log.info(
            "models:/%s@%s -> version %s (run %s, %s %.6g)%s",
            name,
            CHAMPION_ALIAS,
            version,
            _run_label(best),
            SELECT_METRIC,
            best.data.metrics[SELECT_METRIC],
            f", was version {previous}" if previous is not None else "",
        )
    return version


def _point_challenger(client: Any, name: str, challenger: tuple[Any, Any], *, best: Any, champion: str) -> None:
    """Point ``models:/<name>@challenger`` at the version of ``challenger`` (``(run, logged model)``),
    with a WARNING that it does not beat the champion, run ``best`` (version ``champion``)."""
    run, challenger_model = challenger
    version, _ = _point_alias(client, name, CHALLENGER_ALIAS, run, challenger_model)
    log.warning(
        "run %s (MLflow run %s, %s %.6g) does not beat the champion, run %s (MLflow run %s%s, %s %.6g): "
        "models:/%s@%s stays version %s; the new run is models:/%s@%s (version %s)",
        _run_label(run),
        run.info.run_id,
        SELECT_METRIC,
        run.data.metrics[SELECT_METRIC],
        _run_label(best),
        best.info.run_id,
        ", superseded" if best.data.tags.get("superseded") == "true" else "",
        SELECT_METRIC,
        best.data.metrics[SELECT_METRIC],
        name,
        CHAMPION_ALIAS,
        champion,
        name,
        CHALLENGER_ALIAS,
        version,
    )


def _drop_alias(client: Any, name: str, alias: str) -> None:
    """Remove ``alias`` from the registered model ``name`` when it is set."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return
    tracking.retry(f"removing the {alias} alias", lambda: client.delete_registered_model_alias(name, alias))
    log.info("models:/%s@%s removed: the configuration's run is the champion", name, alias)


def _describe(client: Any, name: str, experiment: str) -> None:
    """Give the registered model ``name`` its description, unless it has one."""
    registered = tracking.retry("reading the registered model", lambda: client.get_registered_model(name))
    if not registered.description:
        tracking.retry(
            "describing the registered model",
            lambda: client.update_registered_model(
                name,
                description=(
                    f"The best run of experiment {experiment} by validation loss ({SELECT_METRIC}), registered by the "
                    "compare step of the pipeline; load its run's checkpoints/best.pt with "
                    "conv2dlstm.training.models.load_model (weights only, no pickle). A newer run that did not "
                    f"beat it is '@{CHALLENGER_ALIAS}'. "
                    "Version tags: the run, its validation loss and, for reporting only, its test RMSE."
                ),
            ),
        )


def after_compare(cfg: dict[str, Any], models: Sequence[Path]) -> Champion | None:
    """The compare step's MLflow part: tag the runs of ``models`` (their ``mlflow_run_id.txt``) with
    the configuration's sweep tags, then :func:`register_champion` among the runs validated on the
    same windows store (unless ``mlflow.log_model`` is false: a warning, nothing registered)."""
    from conv2dlstm.config.keys import sweep_tags

    uri = tracking.resolve_tracking_uri(cfg)
    tracking.check_tracking(uri)
    tracking.bound_http_retries(uri)
    client = tracking.open_client(uri)
    runs = held_runs(client, read_run_ids(models))
    tagged = tag_sweep(client, runs, sweep_tags(cfg))
    if tagged:
        log.info("tagged run(s) %s with this sweep", tagged)
    if not cfg["mlflow"]["log_model"]:
        log.warning(
            "mlflow.log_model is false, so no run logged a model; models:/%s@%s is not "
            "registered (set mlflow.log_model: true and retrain to register the best run)",
            cfg["experiment"],
            CHAMPION_ALIAS,
        )
        return None
    windows = {r.data.tags[WINDOWS_TAG] for r in runs.values() if r.data.tags.get(WINDOWS_TAG)} or None
    current = {r.info.run_id for r in runs.values()}
    return register_champion(uri, cfg["experiment"], windows=windows, current=current)
