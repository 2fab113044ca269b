"""The targets of bench/targets.yaml, how every bench reports the ones it misses, and where it
writes its results.

Each bench imports this module from its own directory (``python bench/<name>.py`` puts bench/ on
the path): ``targets.load()`` reads the file, ``targets.report(missed)`` prints one ``MISSED:``
line per missed target and returns the exit status of ``--check`` (1 when any is missed; a missed
target is recorded as missed, never lowered), and ``targets.write_results(name, payload)`` writes
the bench's JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

FILE = Path(__file__).resolve().parent / "targets.yaml"
RESULTS = Path(__file__).resolve().parent / "results"


def load() -> dict[str, Any]:
    """Every target of bench/targets.yaml, by its key."""
    doc = yaml.safe_load(FILE.read_text())
    if not isinstance(doc, dict):
        raise SystemExit(f"{FILE} is not a mapping of targets")
    return doc


def write_results(name: str, payload: Any, *, stamped: bool = False) -> Path:
    """``payload`` as JSON in bench/results/: ``<name>.json``, or ``<name>-<date>-<time>.json`` when
    ``stamped`` (a bench whose runs are kept side by side); its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json" if stamped else f"{name}.json")
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def report(missed: Sequence[str]) -> int:
    """Print each of ``missed`` as ``MISSED: ...``; the exit status of ``--check``."""
    for line in missed:
        print(f"MISSED: {line}", flush=True)
    return 1 if missed else 0
