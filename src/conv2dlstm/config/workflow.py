"""Small helpers the Snakefile uses (kept here so they are unit-tested like the rest)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any


def export_package_path(basedir: str | os.PathLike, environ: MutableMapping[str, str] | None = None) -> str:
    """Prepend ``<basedir>/src`` to ``PYTHONPATH`` so jobs run this checkout's package.

    Snakemake jobs, local or submitted to a cluster, inherit the environment of the main process,
    so every rule can call ``python -m conv2dlstm`` whether or not the package is installed in the
    job's environment. Returns the new value.
    """
    environ = os.environ if environ is None else environ
    src = str(Path(basedir).resolve() / "src")
    parts = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]
    environ["PYTHONPATH"] = os.pathsep.join([src, *parts])
    return environ["PYTHONPATH"]


CONFIG_ENV = "CONV2DLSTM_CONFIG"


def export_config(config: dict[str, Any], environ: MutableMapping[str, str] | None = None) -> str:
    """Put the validated configuration, as canonical JSON, in ``CONV2DLSTM_CONFIG`` for the jobs.

    Every rule calls its step with ``--config-json "$CONV2DLSTM_CONFIG"``: the step gets the whole
    configuration without it being a rule parameter (parameters are Snakemake's rerun trigger and
    hold only the values that determine the outputs, :mod:`conv2dlstm.config.keys`). Returns the JSON.
    """
    environ = os.environ if environ is None else environ
    environ[CONFIG_ENV] = json.dumps(config, sort_keys=True)
    return environ[CONFIG_ENV]


def train_gpus(config: dict[str, Any], run: str) -> int:
    """GPUs a train job of ``run`` asks for: ``train.gpus``, or 0 when it trains on the CPU.

    The train rule declares it as its ``gpu`` resource, which the SLURM executor turns into
    ``--gpus=N``; locally it only bounds how many train jobs run at once when ``--resources gpu=N``
    is given.
    """
    from conv2dlstm.config.validate import run_config

    train = run_config(config, run)["train"]
    return 0 if train["device"] == "cpu" else int(train["gpus"])


def determines_params(config: dict[str, Any], *steps: str) -> list[Callable[[Any], str | None]]:
    """The rule params that rerun ``steps``' jobs: one per key that can determine their outputs
    (:func:`conv2dlstm.config.keys.determining_keys`), in the rule as ``params: *determines_params(config,
    "<step>"), ...``.

    Each param is a function of the job's wildcards (per job: the braces of ``source.url`` are not
    wildcards) giving ``key=value`` (:func:`conv2dlstm.config.keys.result_item`) while the key determines
    one of the steps' outputs under the job's configuration (for train and evaluate the ``run``
    wildcard's), else None. The ``key=value`` strings are exactly :func:`conv2dlstm.config.keys.result_items`,
    so the job's params change exactly when its result configuration does.

    Snakemake compares a job's params with those it recorded as sets of their string forms and
    reruns the job when they differ; its reason then names the params found on one side only:
    with one param per key, only the changed ones, e.g. ``Params have changed since last
    execution: ... before: 'train.epochs=10' now: 'train.epochs=4'``.
    """
    from conv2dlstm.config.keys import determining_keys, result_items

    cache: dict[str | None, dict[str, str]] = {}  # per run: the items of one job are built once

    def items(wildcards: Any) -> dict[str, str]:
        run = getattr(wildcards, "run", None)
        if run not in cache:
            cache[run] = result_items(config, *steps, run=run)
        return cache[run]

    def param(name: str) -> Callable[[Any], str | None]:
        def value(wildcards: Any) -> str | None:
            return items(wildcards).get(name)

        return value

    return [param(spec.name) for spec in determining_keys(*steps)]


def compare_stem(config: dict[str, Any]) -> str:
    """``<outdir>/compare/<experiment>``: where the compare step writes ``.csv`` and ``.png``.

    One summary per experiment, so a sweep or a second configuration logged to another experiment
    never overwrites the default's; characters other than letters, digits, ``-``, ``_`` and ``.``
    in the experiment name become ``_``.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", str(config["experiment"])).strip(".") or "_"
    return f"{config['outdir']}/compare/{slug}"


UPSTREAM_STATE = "upstream.json"
"""The file ``check-upstream`` writes into the fetch step's folder when files of a url source changed
upstream (:mod:`conv2dlstm.data.upstream`); an input of the fetch rule once it exists."""


def raw_dir(config: dict[str, Any]) -> Path:
    """``<resources_dir>/raw/<name>``: the fetch step's folder (its ``manifest.json``, the files of a
    url source and their sidecars)."""
    return Path(config["resources_dir"]) / "raw" / str(config["name"])


def upstream_state(config: dict[str, Any]) -> Path:
    """``<resources_dir>/raw/<name>/upstream.json`` (:data:`UPSTREAM_STATE`)."""
    return raw_dir(config) / UPSTREAM_STATE


def source_files(config: dict[str, Any]) -> list[str]:
    """The inputs of the fetch rule that stand for the source's data, so that Snakemake reruns fetch
    and what follows when they change; [] when the configuration generates the data (the synth
    rule's output is then the input).

    For a ``files`` source, its files (``source.paths`` expanded, :func:`conv2dlstm.config.sources.expand_path`):
    a file replaced (a newer modification time) or the set of files changed (a file added to or
    removed from a glob) reruns fetch. A Zarr store is one input, its directory: a chunk rewritten
    in place does not change it (rerun with ``--forcerun fetch``).

    For a ``url`` source, :func:`upstream_state` once it exists: ``check-upstream`` writes it only
    when files changed upstream, so the next run fetches them again; [] before. Other kinds: []."""
    from conv2dlstm.config.sources import expand_path

    kind = config["source"]["kind"]
    if config["synthetic"]["kind"] != "none":
        return []
    if kind == "url":
        state = upstream_state(config)
        return [str(state)] if state.is_file() else []
    if kind != "files":
        return []
    found: list[str] = []
    for pattern in config["source"]["paths"]:
        found += [str(p) for p in expand_path(pattern) if str(p) not in found]
    return found
