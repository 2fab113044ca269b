"""Ensembles from seeds, found in the configuration alone (before any job).

Runs that differ only in ``train.seed`` (and their names) are the members of an ensemble: the same
network trained on the same data with other random initial weights, shuffling and dropout. The rule,
on the validated configuration:

- two runs belong to the same group when everything that determines their train and evaluate
  outputs (:func:`conv2dlstm.config.keys.result_config` of both steps, the run's ``model`` and
  ``train`` overrides merged in) is equal once ``train.seed`` is left out. Runtime settings
  (``train.device``, ``train.num_workers``, ...) do not count: they change how a run trains, not
  what it learns;
- a group whose runs have at least two different seeds is an ensemble; every run of the group is a
  member, in the order of ``runs``. A configuration with one run has none.

So ``sweep: {train.seed: [0, 1, 2, 3]}`` gives one ensemble of four members; a sweep over
``train.learning_rate`` alone gives none; ``sweep: {model.name: [convlstm, unet], train.seed: [0, 1]}``
gives two, one per network.

Names (:func:`ensembles`): the members' run names without the part that names their seed (the sweep's
``seed<value>`` or ``train.seed<value>``), followed by ``-ens``, e.g. ``convlstm-seed0`` and
``convlstm-seed1`` give ``convlstm-ens``; when those differ, their longest common beginning (``run-a``,
``run-b``: ``run-ens``); when nothing is common (``seed0``, ``seed1`` of a sweep over the seed alone,
or runs named freely), ``ensemble``. A name that another ensemble or a run already has gets ``-2``,
``-3``, ... appended.

Only jsonschema and PyYAML are imported (through :mod:`conv2dlstm.config.keys`), so the Snakefile uses
this module directly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from conv2dlstm.config.keys import result_config
from conv2dlstm.config.runs import run_names
from conv2dlstm.config.validate import run_config
from conv2dlstm.errors import ConfigError

SEED_KEY = ("train", "seed")
"""The key whose values tell the members of an ensemble apart."""
SUFFIX = "-ens"
"""Appended to the members' common name."""
DEFAULT_NAME = "ensemble"
"""The name of an ensemble whose members' names have nothing in common."""


@dataclass(frozen=True)
class Ensemble:
    """One ensemble: its name, the run names of its members and their seeds (same order)."""

    name: str
    members: tuple[str, ...]
    seeds: tuple[int, ...]


def _key_and_seed(cfg: dict[str, Any], run: str) -> tuple[str, int]:
    """Canonical JSON of what determines ``run``'s train and evaluate outputs with ``train.seed`` left
    out (the group key), and that seed."""
    single = run_config(cfg, run)
    section, key = SEED_KEY
    determined = {step: result_config(single, step) for step in ("train", "evaluate")}
    determined["train"].get(section, {}).pop(key, None)  # the train step's result config, its train section
    return json.dumps(determined, sort_keys=True), int(single[section][key])


def _strip_seed(name: str, seed: int) -> str:
    """``name`` without its ``-``-separated parts that name the seed (``seed<seed>``, ``train.seed<seed>``)."""
    pattern = re.compile(rf"^(?:train\.)?seed{seed}$")
    return "-".join(part for part in name.split("-") if not pattern.match(part))


def base_name(members: list[str], seeds: list[int]) -> str:
    """The name of an ensemble of ``members`` (run names) with ``seeds`` before it is made unique
    (see the module docstring): ``<common name>-ens`` or :data:`DEFAULT_NAME`."""
    stripped = [_strip_seed(name, seed) for name, seed in zip(members, seeds, strict=True)]
    common = os.path.commonprefix(stripped).rstrip("-_.")
    return f"{common}{SUFFIX}" if common else DEFAULT_NAME


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


def ensembles(cfg: dict[str, Any]) -> list[Ensemble]:
    """The ensembles of the validated configuration ``cfg`` (the rule of the module docstring), in the
    order of their first member in ``runs``; empty with fewer than two runs."""
    names = run_names(cfg)
    if len(names) < 2:
        return []
    groups: dict[str, list[tuple[str, int]]] = {}
    for run in names:
        key, seed = _key_and_seed(cfg, run)
        groups.setdefault(key, []).append((run, seed))
    taken = set(names)
    out = []
    for group in groups.values():
        members, seeds = [run for run, _ in group], [seed for _, seed in group]
        if len(set(seeds)) < 2:
            continue
        name = _unique(base_name(members, seeds), taken)
        taken.add(name)
        out.append(Ensemble(name, tuple(members), tuple(seeds)))
    return out


def ensemble_names(cfg: dict[str, Any]) -> list[str]:
    """The names of :func:`ensembles`."""
    return [e.name for e in ensembles(cfg)]


def ensemble(cfg: dict[str, Any], name: str) -> Ensemble:
    """The ensemble ``name`` of ``cfg``; :class:`ConfigError` naming the ensembles there are when it is not one."""
    found = {e.name: e for e in ensembles(cfg)}
    if name not in found:
        there = ", ".join(f"{e.name} ({', '.join(e.members)})" for e in found.values()) or "none"
        raise ConfigError(
            f"ensemble {name!r} is not formed by the configuration's runs (ensembles: {there}); an ensemble is "
            "two or more runs that differ only in train.seed, e.g. sweep: {train.seed: [0, 1]}"
        )
    return found[name]
