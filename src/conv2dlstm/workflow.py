"""Small helpers the Snakefile uses (kept here so they are unit-tested like the rest)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def export_package_path(basedir: str | os.PathLike, environ: dict[str, str] | None = None) -> str:
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


def config_json(config: dict[str, Any], *sections: str) -> str:
    """The named top-level sections of a validated config as canonical JSON (a rule's ``params``).

    Passing only what a step reads means a config change re-runs exactly the affected steps
    (Snakemake's params rerun trigger).
    """
    missing = [s for s in sections if s not in config]
    if missing:
        raise KeyError(f"config has no section(s) {missing}")
    return json.dumps({k: config[k] for k in sections}, sort_keys=True)


def run_config_json(config: dict[str, Any], run: str) -> str:
    """What a train or evaluate job of ``run`` needs: the whole config, with only that run's entry."""
    sel = {k: v for k, v in config.items() if k != "runs"}
    sel["runs"] = [r for r in config["runs"] if r["name"] == run]
    return json.dumps(sel, sort_keys=True)


def train_gpus(config: dict[str, Any], run: str) -> int:
    """GPUs a train job of ``run`` asks for: ``train.gpus``, or 0 when it trains on the CPU.

    The train rule declares it as its ``gpu`` resource, which the SLURM executor turns into
    ``--gpus=N``; locally it only bounds how many train jobs run at once when ``--resources gpu=N``
    is given.
    """
    from conv2dlstm.config import run_config

    train = run_config(config, run)["train"]
    return 0 if train["device"] == "cpu" else int(train["gpus"])
