"""The targets of bench/targets.yaml, how every bench reports the ones it misses, and where it
writes its results.

Each bench imports this module from its own directory (``python bench/<name>.py`` puts bench/ on
the path): ``targets.load()`` reads the file, ``targets.report(missed)`` prints one ``MISSED:``
line per missed target and returns the exit status of ``--check`` (1 when any is missed; a missed
target is recorded as missed, never lowered), and ``targets.write_results(name, payload)`` writes
the bench's JSON to bench/results/ (git-ignored), with the instruction-set caps it ran under
(:func:`instruction_set_caps`).

Instruction sets: torch's own kernels, oneDNN (torch's and TensorFlow's) and MKL each pick the
widest vector instructions the CPU has; each can be capped by an environment variable
(:data:`ISA_CAPS`). ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``
runs a bench on an AVX-512 CPU with the instructions of an AVX2-only one (docs/performance.md).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

FILE = Path(__file__).resolve().parent / "targets.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
"""The environment variables that cap the vector instructions of torch's kernels, oneDNN and MKL."""


def instruction_set_caps() -> dict[str, str]:
    """The caps of :data:`ISA_CAPS` set in this environment (empty: every library uses the CPU's own)."""
    return {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}


def describe_instruction_sets() -> str:
    """The instruction-set caps in words, for a bench's printed header."""
    caps = instruction_set_caps()
    if not caps:
        return "the CPU's own instruction sets"
    return "instruction sets capped: " + ", ".join(f"{k}={v}" for k, v in caps.items())


def load() -> dict[str, Any]:
    """Every target of bench/targets.yaml, by its key."""
    doc = yaml.safe_load(FILE.read_text())
    if not isinstance(doc, dict):
        raise SystemExit(f"{FILE} is not a mapping of targets")
    return doc


def write_results(name: str, payload: Any, *, stamped: bool = False) -> Path:
    """``payload`` as JSON in bench/results/: ``<name>.json``, or ``<name>-<date>-<time>.json`` when
    ``stamped`` (a bench whose runs are kept side by side); its path. A mapping gets the
    instruction-set caps it ran under (``instruction_set_caps``, ``{}`` for none) unless it has them."""
    if isinstance(payload, dict):
        payload = {**payload, "instruction_set_caps": payload.get("instruction_set_caps", instruction_set_caps())}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / (f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json" if stamped else f"{name}.json")
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def report(missed: Sequence[str]) -> int:
    """Print each of ``missed`` as ``MISSED: ...``; the exit status of ``--check``."""
    for line in missed:
        print(f"MISSED: {line}", flush=True)
    return 1 if missed else 0
