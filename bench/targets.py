"""The targets of bench/targets.yaml, and how every bench reports the ones it misses.

Each bench imports this module from its own directory (``python bench/<name>.py`` puts bench/ on
the path): ``targets.load()`` reads the file, and ``targets.report(missed)`` prints one ``MISSED:``
line per missed target and returns the exit status of ``--check`` (1 when any is missed; a missed
target is recorded as missed, never lowered).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

FILE = Path(__file__).resolve().parent / "targets.yaml"


def load() -> dict[str, Any]:
    """Every target of bench/targets.yaml, by its key."""
    doc = yaml.safe_load(FILE.read_text())
    if not isinstance(doc, dict):
        raise SystemExit(f"{FILE} is not a mapping of targets")
    return doc


def report(missed: Sequence[str]) -> int:
    """Print each of ``missed`` as ``MISSED: ...``; the exit status of ``--check``."""
    for line in missed:
        print(f"MISSED: {line}", flush=True)
    return 1 if missed else 0
