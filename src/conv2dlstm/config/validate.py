"""Configuration: one JSON schema (``workflow/schemas/config.schema.yaml``) with a default for every key.

:func:`validate_config` fills defaults, validates types and ranges against the schema, then checks
what a schema cannot express: calendar dates, chronological splits each long enough for one window,
grid in the longitude convention, unique run names, and for every run (each ``runs`` entry merged
over ``model`` and ``train``, as :func:`run_config` gives it) its overrides against the schema, a
global batch divisible by ``train.gpus``, and a ``conv2d_lstm`` that fits the grid and
``model.conv2d_lstm.max_parameters``. It also refuses a credential written in a URL (user info, a
literal secret query parameter: credentials come from ~/.netrc or the environment,
:mod:`conv2dlstm.redact`), a ``source.url`` placeholder other than ``{date}`` (with an optional
strftime format), ``source.variables`` for the kinds that would ignore it (url, files), and
``evaluate.regions`` that are not named like one or do not lie on the grid
(:func:`conv2dlstm.config.strata.regions_problem`). Everything the configuration alone decides is
checked here, so Snakemake stops when it parses the configuration, before any job. Every error is a
:class:`~conv2dlstm.errors.ConfigError` naming the key, the bad value and the fix. Snakemake
validates once (``workflow/rules/common.smk``); each CLI step validates the configuration it
receives again, so the package is usable without Snakemake. Only jsonschema and PyYAML are imported
(both Snakemake dependencies; :mod:`conv2dlstm.config.modelsize` is arithmetic,
:mod:`conv2dlstm.redact` the standard library), so the Snakefile can use this module directly.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import string
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from conv2dlstm.config import networks
from conv2dlstm.config.modelsize import (
    axis_problem,
)
from conv2dlstm.config.runs import merge_run, run_names
from conv2dlstm.config.schema import DATE_REF, load_schema, resolve, safe_load
from conv2dlstm.config.sources import GROUPS
from conv2dlstm.config.strata import regions_problem
from conv2dlstm.errors import ConfigError
from conv2dlstm.redact import env_refs, redact_text, redact_url, url_secret_problem

SPLITS = ("train", "val", "test")


def _fill_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    schema = resolve(schema, root)
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            resolved = resolve(sub, root)
            if key not in instance and "default" in resolved:
                instance[key] = copy.deepcopy(resolved["default"])
            if key in instance:
                _fill_defaults(instance[key], resolved, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _fill_defaults(item, schema["items"], root)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _format_error(error: jsonschema.ValidationError) -> str:
    where = _key_path(error)
    # jsonschema's stubs type schema and instance as possibly unset (errors built by hand); a validator's
    # additionalProperties error always carries the object schema and the object
    if (
        error.validator == "additionalProperties"
        and isinstance(error.schema, Mapping)
        and isinstance(error.instance, Mapping)
    ):
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        return (
            f"config key {where}: unknown key(s) {', '.join(map(repr, extra))}; "
            f"allowed keys are {', '.join(allowed)} (check the spelling)"
        )
    if error.validator == "enum":
        return f"config key {where}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "pattern" and str(error.validator_value).startswith("^[0-9]{4}"):
        return f"config key {where}: {error.instance!r} is not a date; write it as YYYY-MM-DD"
    return f"config key {where}: {error.message}"


@functools.cache
def date_keys() -> tuple[str, ...]:
    """Dotted names of every key that uses the schema's date definition (``synthetic.start``, ...,
    ``splits.test.end``), found by walking the schema's properties through local ``$ref``s."""
    schema = load_schema()
    found: list[str] = []

    def walk(sub: dict[str, Any], prefix: str) -> None:
        for key, prop in resolve(sub, schema).get("properties", {}).items():
            if prop.get("$ref") == DATE_REF:
                found.append(prefix + key)
            else:
                walk(prop, f"{prefix}{key}.")

    walk(schema, "")
    return tuple(found)


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` of a nested mapping, or None where a level is missing."""
    value: Any = cfg
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_date(value: str, key: str) -> dt.date:
    """The calendar date written ``YYYY-MM-DD`` (the schema checked the pattern) at config key ``key``.

    An impossible date (``2019-02-30``, month 13) raises :class:`ConfigError` naming the key.
    """
    try:
        year, month, day = (int(part) for part in value.split("-"))
        return dt.date(year, month, day)
    except ValueError as exc:
        raise ConfigError(
            f"config key {key}: {value!r} is not a calendar date ({exc}); write it as YYYY-MM-DD"
        ) from None


def _check_dates(cfg: dict[str, Any]) -> dict[str, dt.date]:
    """Every date key parsed (:func:`date_keys`), by dotted name; the first impossible date raises."""
    dates = {}
    for key in date_keys():
        value = _lookup(cfg, key)
        if isinstance(value, str):
            dates[key] = parse_date(value, key)
    return dates


def _check_splits(cfg: dict[str, Any], dates: dict[str, dt.date]) -> None:
    """Each split ends on or after its start; train, val and test follow each other without overlap."""
    for split in SPLITS:
        if dates[f"splits.{split}.end"] < dates[f"splits.{split}.start"]:
            p = cfg["splits"][split]
            raise ConfigError(f"config key splits.{split}: end {p['end']} is before start {p['start']}; swap them")
    for a, b in (("train", "val"), ("val", "test")):
        if dates[f"splits.{b}.start"] <= dates[f"splits.{a}.end"]:
            raise ConfigError(
                f"config key splits.{b}.start: {cfg['splits'][b]['start']} is not after "
                f"splits.{a}.end {cfg['splits'][a]['end']}; splits must be chronological and must "
                "not overlap (overlap leaks the future into training)"
            )


def _check_split_lengths(cfg: dict[str, Any], dates: dict[str, dt.date]) -> None:
    """Each split holds at least one window: ``windows.input_steps + windows.lead_steps`` consecutive
    days inside it (a window never straddles a split boundary; the data has one step per day)."""
    w = cfg["windows"]
    length = int(w["input_steps"]) + int(w["lead_steps"])
    for split in SPLITS:
        start, end = dates[f"splits.{split}.start"], dates[f"splits.{split}.end"]
        days = (end - start).days + 1
        if days < length:
            raise ConfigError(
                f"config key splits.{split}: {start}..{end} holds {days} day(s), fewer than one window of "
                f"windows.input_steps + windows.lead_steps = {w['input_steps']} + {w['lead_steps']} = "
                f"{length} consecutive days, so no {split} window fits in it (a window never straddles a "
                f"split boundary); lengthen splits.{split} to at least {length} days, or lower "
                "windows.input_steps or windows.lead_steps"
            )


def _check_grid(cfg: dict[str, Any], given: set[str]) -> None:
    """Axes run upwards; ``grid.lon`` lies in ``harmonize.lon_convention`` (when ``grid`` was given)."""
    for axis in ("lat", "lon"):
        ax = cfg["grid"][axis]
        if ax["stop"] < ax["start"]:
            raise ConfigError(f"config key grid.{axis}: stop {ax['stop']} is below start {ax['start']}")
        problem = axis_problem(axis, ax)
        if problem:
            raise ConfigError(problem)
    lon = cfg["grid"]["lon"]
    convention = cfg["harmonize"]["lon_convention"]
    lo, hi = (-180.0, 180.0) if convention == "-180..180" else (0.0, 360.0)
    if "grid" in given and (lon["start"] < lo or lon["stop"] > hi):
        raise ConfigError(
            f"config key grid.lon: {lon['start']}..{lon['stop']} is outside {convention}, the "
            "convention set by harmonize.lon_convention; change one of the two"
        )


def _check_region(cfg: dict[str, Any]) -> None:
    """Each ``region`` range is ``[min, max]``."""
    for rng_key in ("lat", "lon"):
        rng = cfg["region"][rng_key]
        if rng is not None and rng[1] < rng[0]:
            raise ConfigError(f"config key region.{rng_key}: {rng} must be [min, max]")


def _check_batch_split(train: dict[str, Any]) -> None:
    """``train.batch_size`` (the global batch) divides evenly over the ``train.gpus`` processes."""
    batch, gpus = int(train["batch_size"]), int(train["gpus"])
    if gpus > 1 and batch % gpus:
        nearest = gpus * max(1, round(batch / gpus))
        raise ConfigError(
            f"config keys train.batch_size and train.gpus: train.batch_size = {batch} (the global batch) is "
            f"not divisible by the {gpus} training processes (train.gpus = {gpus}); each process takes "
            f"batch_size / {gpus} windows per step: set train.batch_size to a multiple of {gpus}, e.g. "
            f"{nearest}, or train.gpus to a divisor of {batch}"
        )


def conv2d_lstm_parameters(cfg: dict[str, Any]) -> int:
    """Parameters of the ``conv2d_lstm`` network of a validated configuration (its ``model``, grid,
    variables and ``windows.lead_steps``), by arithmetic (:func:`conv2dlstm.config.networks.conv2d_lstm_parameters`)."""
    return networks.conv2d_lstm_parameters(cfg["model"]["conv2d_lstm"], networks.shapes_of(cfg))


def _check_model(cfg: dict[str, Any]) -> None:
    """The network ``model.name`` can be built with its section on the configured grid and windows:
    its registry entry's checks (:func:`conv2dlstm.config.networks.config_problems`)."""
    problems = networks.config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def max_lead(cfg: Mapping[str, Any]) -> int:
    """The last lead evaluate scores and forecast forecasts: ``evaluate.max_lead``, 0 meaning
    ``windows.lead_steps``."""
    return int(cfg["evaluate"]["max_lead"]) or int(cfg["windows"]["lead_steps"])


def _check_horizon(cfg: dict[str, Any]) -> None:
    """``evaluate.max_lead`` is 0 or at least ``windows.lead_steps``; past it the network feeds on its own
    outputs, so every input variable must also be a target."""
    lead_steps, wanted = int(cfg["windows"]["lead_steps"]), int(cfg["evaluate"]["max_lead"])
    if 0 < wanted < lead_steps:
        raise ConfigError(
            f"config key evaluate.max_lead: {wanted} is below windows.lead_steps = {lead_steps}, the leads the "
            f"network is trained for and always scored at; set 0 (= windows.lead_steps) or a value >= {lead_steps}"
        )
    inputs, targets = cfg["variables"]["inputs"], cfg["variables"]["targets"]
    fed = [v for v in inputs if v not in targets]
    if wanted > lead_steps and fed:
        raise ConfigError(
            f"config key evaluate.max_lead: {wanted} > windows.lead_steps = {lead_steps} rolls the network out on its "
            f"own outputs, but the input variables {fed} are not targets (variables.targets = {targets}), so "
            f"nothing predicts them; add them to variables.targets, or set evaluate.max_lead to 0 or {lead_steps}"
        )


def _check_strata(cfg: dict[str, Any]) -> None:
    """``evaluate.regions`` are named and lie on the grid (:func:`conv2dlstm.config.strata.regions_problem`)."""
    problem = regions_problem(cfg)
    if problem:
        raise ConfigError(problem)


def _check_animation(cfg: dict[str, Any]) -> None:
    """``evaluate.animation_lead`` is one of the leads scored (up to :func:`max_lead`), or 0."""
    lead, last = int(cfg["evaluate"]["animation_lead"]), max_lead(cfg)
    if lead > last:
        raise ConfigError(
            f"config key evaluate.animation_lead: {lead} is past the last lead scored, {last} (evaluate.max_lead, "
            f"0 meaning windows.lead_steps); animate a lead from 1 to {last}, or set 0 for no animation"
        )


def _check_events(cfg: dict[str, Any]) -> None:
    """``evaluate.events.variables`` are target variables (events are scored on forecasts)."""
    named, targets = cfg["evaluate"]["events"]["variables"], cfg["variables"]["targets"]
    unknown = [v for v in named if v not in targets]
    if unknown:
        raise ConfigError(
            f"config key evaluate.events.variables: {unknown} are not target variables (variables.targets = "
            f"{targets}); name targets only, or add them to variables.targets"
        )


def _check_run(cfg: dict[str, Any]) -> None:
    """The checks of one run's configuration (its ``model`` and ``train`` with overrides merged)."""
    _check_batch_split(cfg["train"])
    _check_model(cfg)


def _check_runs(cfg: dict[str, Any]) -> None:
    """Unique run names; then every run: the top-level ``model`` and ``train`` when ``runs`` is
    empty, else each entry merged over them (:func:`_merge_run`), validated against the schema and
    checked, its errors prefixed with ``runs[i] (name ...)``."""
    names = [r["name"] for r in cfg["runs"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"config key runs: run name(s) {dupes} appear more than once; names must be unique")
    if not cfg["runs"]:
        _check_run(cfg)
        return
    schema = load_schema()
    for i, entry in enumerate(cfg["runs"]):
        merged = merge_run(cfg, entry)
        try:
            _fill_defaults(merged, schema, schema)
            _check_schema(merged, schema)
            _check_run(merged)
        except ConfigError as exc:
            raise ConfigError(f"runs[{i}] (name {entry['name']!r}): {exc}") from None


URL_KEYS = ("source.url", "source.store", "mlflow.tracking_uri", "dask.scheduler_address")
"""Keys that hold a URL; none may carry a credential (:func:`_check_url_secrets`)."""
ENV_REF_KEYS = ("source.url",)
"""URL keys whose query parameters may take their value from the environment (``?token=$NAME``):
the url source resolves them when it makes a request (fsspec stores cannot carry a query)."""
NETRC_FIX = (
    "put the user name and password in ~/.netrc (a line 'machine <host> login <user> password "
    "<password>', then chmod 600 ~/.netrc; or in the file named by the NETRC environment variable), which "
    "http(s) downloads read, and a query token in an environment variable named as the parameter's whole "
    "value, e.g. ?token=$MY_TOKEN (resolved only when the request is made)"
)
CREDENTIAL_FIXES = {
    "source.url": NETRC_FIX,
    "source.store": (
        "object stores read credentials from their own environment variables or files, never from the URL "
        "(s3://: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials; gs://: "
        "GOOGLE_APPLICATION_CREDENTIALS or gcloud's login; az://: the AZURE_STORAGE_* variables); an "
        "http(s):// store reads ~/.netrc (a line 'machine <host> login <user> password <password>', then "
        "chmod 600 ~/.netrc; or the file named by the NETRC environment variable)"
    ),
    "source.paths": (
        "list local files only (remote data: source.kind url or zarr, with credentials from ~/.netrc or the "
        "environment)"
    ),
    "mlflow.tracking_uri": (
        "give an MLflow server MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
        "MLFLOW_TRACKING_TOKEN) in the environment, and a database its own password file (~/.pgpass for "
        "PostgreSQL, ~/.my.cnf for MySQL)"
    ),
    "dask.scheduler_address": "set TLS credentials in Dask's own configuration (distributed.comm.tls)",
}
"""Per URL key: where its credentials go instead of the URL."""
STRFTIME_CODES = frozenset("aAbBcCdDeFfgGhHIjklmMnpPrRsStTuUVwWxXyYzZ%")
"""strftime directives a ``{date:...}`` format may use (Python's and the common C library ones)."""
URL_PLACEHOLDERS = (
    "the only placeholder is {date}, the date being fetched, with an optional strftime format after a "
    "colon, e.g. {date:%Y%m%d} or {date:%Y/%j}; write a literal brace as {{ or }}"
)


def _url_values(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, value) of every URL-valued key that is set: :data:`URL_KEYS` and each ``source.paths``
    entry (as ``source.paths[i]``)."""
    out = [(key, value) for key in URL_KEYS if isinstance(value := _lookup(cfg, key), str) and value]
    paths = _lookup(cfg, "source.paths") or []
    out.extend((f"source.paths[{i}]", p) for i, p in enumerate(paths) if isinstance(p, str))
    return out


def _host(url: str) -> str | None:
    """The host name of ``url``, or None (no host, or not a URL)."""
    try:
        return urllib.parse.urlsplit(url.strip()).hostname
    except ValueError:
        return None


def _check_url_secrets(cfg: dict[str, Any]) -> None:
    """No URL of the configuration carries a credential: no user info (``user:password@``,
    ``token@``) and no query parameter that looks secret with a literal value
    (:func:`conv2dlstm.redact.url_secret_problem`). The configuration is written down everywhere
    (rule params in .snakemake/metadata, manifest.json, MLflow parameters, checkpoints, logs), so
    the credentials must come from ~/.netrc or the environment instead. ``$NAME`` query values are
    allowed only where the fetch step resolves them (:data:`ENV_REF_KEYS`)."""
    for key, value in _url_values(cfg):
        base_key = key.split("[")[0]
        fix = CREDENTIAL_FIXES[base_key].replace("<host>", _host(value) or "<host>")
        problem = url_secret_problem(value)
        if problem:
            raise ConfigError(
                f"config key {key}: {redact_url(value)!r} has {problem}; the configuration is written down "
                "(rule params in .snakemake/metadata, manifest.json, MLflow parameters, checkpoints, logs), "
                f"so no credential may be in it. Remove it from the URL; {fix}"
            )
        refs = env_refs(value)
        if refs and base_key not in ENV_REF_KEYS:
            raise ConfigError(
                f"config key {key}: {redact_url(value)!r} references environment variable(s) "
                f"{', '.join('$' + r for r in refs)} in its query, which only source.url resolves; {fix}"
            )


def _strftime_problem(spec: str) -> str | None:
    """Why ``spec`` is not a strftime format for ``{date:spec}`` (a nested field, an unknown
    directive, a lone ``%``, or one :meth:`datetime.__format__` rejects), or None."""
    if "{" in spec or "}" in spec:
        return "a format may not hold another placeholder"
    i = 0
    while i < len(spec):
        if spec[i] == "%":
            j = i + 1
            if j < len(spec) and spec[j] in "-_0^#":  # C library flags: %-d, %_m, ...
                j += 1
            if j >= len(spec):
                return f"it ends with a lone {spec[i:]!r}"
            if spec[j] not in STRFTIME_CODES:
                return f"%{spec[j]} is not a strftime directive (%Y year, %m month, %d day, %j day of year, ...)"
            i = j
        i += 1
    try:
        format(dt.datetime(2019, 1, 2, 3, 4, 5), spec)
    except (ValueError, TypeError) as exc:
        return f"formatting a date with it fails ({exc})"
    return None


def _check_url_template(cfg: dict[str, Any]) -> None:
    """``source.url`` is a template whose only placeholder is ``{date}``, with an optional strftime
    format (:func:`_strftime_problem`): what the fetch step formats with each date. An unknown
    placeholder (``{day}``, ``{date.year}``, ``{date!r}``), a bad format (``{date:%Q}``) or an
    unbalanced brace is refused here, before Snakemake or the fetch step trips over it."""
    template = _lookup(cfg, "source.url")
    if not isinstance(template, str):
        return
    shown = redact_url(template)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            f"config key source.url: {shown!r} is not a valid template ({exc}); {URL_PLACEHOLDERS}"
        ) from None
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    for name, spec, conv in fields:
        field = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if name != "date" or conv:
            raise ConfigError(
                f"config key source.url: placeholder {field} in {shown!r} is not allowed; {URL_PLACEHOLDERS}"
            )
        problem = _strftime_problem(spec or "")
        if problem:
            raise ConfigError(
                f"config key source.url: the format of {field} in {shown!r} is not a date format: {problem}; "
                f"{URL_PLACEHOLDERS}"
            )


FETCH_SUBSET_KINDS = GROUPS["subsetting"]
"""Source kinds that subset the data while fetching, and so read ``source.variables``."""


def _check_source_variables(cfg: dict[str, Any]) -> None:
    """``source.variables`` is set only for the kinds that read it (:data:`FETCH_SUBSET_KINDS`):
    kind url downloads whole files and kind files lists them, so there it would be silently
    ignored; which variables are used is said by ``variables.inputs`` / ``targets``, with
    ``harmonize.rename`` mapping source names onto them."""
    source = cfg.get("source") or {}
    kind, variables = source.get("kind"), source.get("variables")
    if variables and kind not in FETCH_SUBSET_KINDS:
        raise ConfigError(
            f"config key source.variables: {variables} has no effect for source.kind {kind!r} (only kinds "
            f"{' and '.join(FETCH_SUBSET_KINDS)} subset variables while fetching; kind {kind} keeps every "
            "variable of the files); remove it, and choose the variables with variables.inputs and "
            "variables.targets (map source names onto them with harmonize.rename, e.g. "
            "{analysed_sst: sst})"
        )


def _check_source(cfg: dict[str, Any]) -> None:
    """The ``source`` and URL checks: no credential in any URL, a valid ``source.url`` template,
    ``source.variables`` only where it is read."""
    _check_url_secrets(cfg)
    _check_url_template(cfg)
    _check_source_variables(cfg)


def _check_semantics(cfg: dict[str, Any], given: set[str]) -> None:
    """Checks across keys, in order: source and URLs (:func:`_check_source`), dates, splits (order,
    then length), grid, region, unit ranges, runs, the evaluation's horizon, regions and event variables.

    ``given`` are the top-level sections the caller supplied. Only the longitude-convention check
    uses it: it is skipped when ``grid`` was filled in from defaults (a step view may hold
    ``harmonize`` without ``grid``, and the default grid must not be checked against a given 0..360
    convention). Every other check takes a default as the value the run uses, so that
    ``validate-config --config X`` says what ``snakemake --configfile X`` says (X merged over
    config/config.yaml, whose values are the schema defaults). The step views validated again (the
    train step's, by its torchrun workers) hold every key these checks read: ``splits``,
    ``windows``, ``grid``, ``variables``, ``model`` and ``train``. Views of steps before train hide
    ``train.batch_size`` and (before windows) ``windows``; nothing validates those alone.
    """
    _check_source(cfg)
    dates = _check_dates(cfg)
    _check_splits(cfg, dates)
    _check_split_lengths(cfg, dates)
    _check_grid(cfg, given)
    _check_region(cfg)
    _check_unit_ranges(cfg)
    _check_runs(cfg)
    _check_horizon(cfg)
    _check_animation(cfg)
    _check_strata(cfg)
    _check_events(cfg)


def _check_unit_ranges(cfg: dict[str, Any]) -> None:
    """Each ``harmonize.units`` range has min <= max (a unit's spelling is checked by the regrid
    step, which holds the units library)."""
    for name, spec in sorted(cfg.get("harmonize", {}).get("units", {}).items()):
        lo, hi = spec.get("min"), spec.get("max")
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"config key harmonize.units.{name}: min {lo:g} is above max {hi:g}; swap them")


def _check_schema(cfg: dict[str, Any], schema: dict[str, Any]) -> None:
    """Validate against the JSON schema; the error nearest the top (then by key name) is raised."""
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), _key_path(e)))
    if errors:
        raise ConfigError(redact_text(_format_error(errors[0])))


def validate_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Return a validated copy of ``cfg`` with every default filled in.

    Raises :class:`ConfigError` naming the first bad key: schema errors first, then the ``sweep``
    grid (expanded into ``runs`` entries, :func:`_expand_sweep`), then :func:`_check_semantics`
    (which validates every ``runs`` entry as its merged run config).
    """
    schema = load_schema()
    cfg = copy.deepcopy(cfg) if cfg else {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(cfg).__name__}")
    given = set(cfg)
    _fill_defaults(cfg, schema, schema)
    _check_schema(cfg, schema)
    _expand_sweep(cfg)
    _check_semantics(cfg, given)
    return cfg


def _expand_sweep(cfg: dict[str, Any]) -> None:
    """Append the runs of the ``sweep`` grid to ``runs`` and empty ``sweep``
    (:func:`conv2dlstm.config.sweep.sweep_runs`), so that everything downstream sees plain ``runs``
    entries and validating again changes nothing."""
    if cfg.get("sweep"):
        from conv2dlstm.config.sweep import sweep_runs

        grid = sweep_runs(cfg["sweep"])
        clash = sorted({r["name"] for r in grid} & {r["name"] for r in cfg["runs"]})
        if clash:
            raise ConfigError(
                f"config keys sweep and runs: the grid's run name(s) {clash} are also names of runs "
                "entries; rename those runs entries (or drop them: the grid already has them)"
            )
        cfg["runs"] = [*cfg["runs"], *grid]
        cfg["sweep"] = {}


def overlay(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged over ``base`` as ``snakemake --configfile a.yaml b.yaml`` merges b over a:
    mappings key by key, lists and values replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = overlay(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values, got {type(raw).__name__}")
    return raw or {}


def load_config(
    path: str | Path | Sequence[str | Path] | None = None, *, json_text: str | None = None
) -> dict[str, Any]:
    """Load a YAML file (or several, each merged over the ones before as Snakemake merges its
    ``--configfile`` arguments, :func:`overlay`; or a JSON string, as the Snakemake rules pass it)
    and validate it."""
    if path is not None and json_text is not None:
        raise ConfigError("give either a config file or a JSON config string, not both")
    if json_text is not None:
        try:
            raw = json.loads(json_text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json is not valid JSON: {exc}") from exc
    elif path is not None:
        paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
        raw = {}
        for one in paths:
            raw = overlay(raw, _read_yaml(one))
    else:
        raw = {}
    return validate_config(raw)


def run_config(cfg: dict[str, Any], run: str) -> dict[str, Any]:
    """The configuration of one run: ``model`` and ``train`` with that run's overrides, validated."""
    if not cfg["runs"]:
        if run != cfg["model"]["name"]:
            raise ConfigError(f"run {run!r} is not configured; the only run is {cfg['model']['name']!r}")
        out = copy.deepcopy(cfg)
    else:
        entry = next((r for r in cfg["runs"] if r["name"] == run), None)
        if entry is None:
            raise ConfigError(f"run {run!r} is not configured; runs are {run_names(cfg)}")
        out = merge_run(cfg, entry)
    out["runs"] = []
    try:
        return validate_config(out)
    except ConfigError as exc:
        raise ConfigError(f"run {run!r}: {exc}") from exc
