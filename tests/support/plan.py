"""What `snakemake --dry-run` must plan when one config key changes: the oracle of the rerun tests."""

from __future__ import annotations

from typing import Any

from conv2dlstm.config import keys


def steps_planned_by(spec: keys.KeySpec, cfg: dict[str, Any]) -> set[str]:
    """The steps whose outputs change when the key changes: those it determines (or whose paths it
    names) under ``cfg``, and every step downstream of them. ``synth`` only when the config
    generates data, ``ensemble`` only when its runs form an ensemble (conv2dlstm.config.ensembles)."""
    from conv2dlstm.config.ensembles import ensembles

    direct = set(spec.steps) if spec.output_path else {s for s in keys.STEPS if spec.determines(s, cfg)}
    if cfg["synthetic"]["kind"] == "none":
        direct.discard("synth")
    if not direct:
        return set()
    first = min(keys.STEPS.index(s) for s in direct)
    planned = set(keys.STEPS[first:])
    if cfg["synthetic"]["kind"] == "none":
        planned.discard("synth")
    if not ensembles(cfg):
        planned.discard("ensemble")
    return planned
