"""Fetch step: get the raw data of ``source`` and describe it in ``manifest.json``
(:func:`conv2dlstm.data.fetching.fetch_source`, which documents the source kinds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conv2dlstm.data import fetching


def main(cfg: dict[str, Any], *, out_dir: Path) -> Path:
    """Fetch ``cfg["source"]`` into ``out_dir``; write and return ``out_dir/manifest.json``."""
    return fetching.fetch_source(cfg, out_dir=out_dir)
