"""Small helpers the Snakefile uses (kept here so they are unit-tested like the rest)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import MutableMapping
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


def forecast_determines(config: dict[str, Any]) -> str:
    """The config values that determine a forecast's inputs, as canonical JSON (the forecast rules'
    params): the fetch and regrid keys (``source.end`` among them: the latest initial date) and the
    normalize keys (the statistics)."""
    from conv2dlstm.config.keys import result_config

    return json.dumps({step: result_config(config, step) for step in ("fetch", "regrid", "normalize")}, sort_keys=True)


def compare_stem(config: dict[str, Any]) -> str:
    """``<outdir>/compare/<experiment>``: where the compare step writes ``.csv`` and ``.png``.

    One summary per experiment, so a sweep or a second configuration logged to another experiment
    never overwrites the default's; characters other than letters, digits, ``-``, ``_`` and ``.``
    in the experiment name become ``_``.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", str(config["experiment"])).strip(".") or "_"
    return f"{config['outdir']}/compare/{slug}"
