"""Which configuration key determines which step's outputs: the rerun contract, in one place.

Every leaf key of ``workflow/schemas/config.schema.yaml`` carries an ``x-steps`` annotation saying
which steps' outputs its value determines:

- ``x-steps: [regrid, normalize]`` - a *result* key: changing it changes those steps' outputs.
  The form ``{fetch: {source.kind: subsetting}, regrid: true}`` adds a condition per step: the
  key determines ``fetch`` only while ``source.kind`` is one of the kinds that subset while
  fetching (a group of :data:`conv2dlstm.config.sources.SOURCE_KINDS`, :func:`expand_kinds`; the
  url source never reads it), ``regrid`` always.
- ``x-steps: []`` - a *runtime* key: it changes only how or where a step runs (parallelism,
  retries, timeouts, the Dask scheduler, devices, the tracking store), never its result.
- ``x-output-path: true`` - a *path* key: it names where outputs go (``outdir``, ``name``); its
  ``x-steps`` are the steps whose output paths it is part of. A new path is a new output, so
  Snakemake plans those steps by their paths alone; path keys are not part of any digest.

From this annotation:

- :func:`result_config` - the values that determine one step's outputs (conditions evaluated on
  the run's configuration). Every artifact records :func:`result_digest` of them as its
  provenance, and the workflow passes them as the rule's ``params``, one ``key=value`` param per
  key (:func:`result_items`, :func:`determining_keys`, :func:`conv2dlstm.config.workflow.determines_params`):
  Snakemake reruns a rule exactly when they change, and its reason names only the changed keys.
- :func:`step_view` - what a step may read: its own result keys, those of the steps upstream of it
  (an upstream change reruns it anyway), runtime and path keys. The CLI hands each step this view,
  so a step that reads a key not annotated for it fails loudly (``KeyError``) instead of silently
  depending on a value that does not rerun it.

Only jsonschema and PyYAML are imported (through :mod:`conv2dlstm.config.validate`), so the Snakefile uses
this module directly.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from conv2dlstm.config.runs import run_names
from conv2dlstm.config.schema import load_schema, resolve
from conv2dlstm.config.sources import expand_kinds
from conv2dlstm.config.validate import run_config

STEPS = ("synth", "fetch", "regrid", "normalize", "windows", "train", "evaluate", "ensemble", "compare")
"""The steps in pipeline order: each step's inputs come from steps before it. ``ensemble`` runs only
where runs form an ensemble (:mod:`conv2dlstm.config.ensembles`)."""
RUN_STEPS = ("train", "evaluate")
"""Steps that run once per configured run (the ``runs`` entries override ``model`` and ``train``)."""
RUN_KEYS = (("runs",), ("sweep",))
"""Keys that declare runs rather than values: not leaves. ``sweep`` is expanded into ``runs``
entries by validation (:mod:`conv2dlstm.config.sweep`); the entries override ``model`` and ``train`` keys,
which keep their own annotation."""


@dataclass(frozen=True)
class KeySpec:
    """The rerun annotation of one leaf key."""

    path: tuple[str, ...]
    steps: dict[str, dict[str, tuple[Any, ...]] | None]  # step -> condition (None = always)
    output_path: bool = False

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def runtime(self) -> bool:
        return not self.steps and not self.output_path

    def determines(self, step: str, cfg: dict[str, Any]) -> bool:
        """Whether the key's value determines ``step``'s outputs under configuration ``cfg``."""
        if self.output_path or step not in self.steps:
            return False
        condition = self.steps[step]
        return condition is None or all(get(cfg, key) in allowed for key, allowed in condition.items())


def get(cfg: dict[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` of a nested mapping."""
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


def _parse_steps(name: str, raw: Any) -> dict[str, dict[str, tuple[Any, ...]] | None]:
    items: dict[str, Any] = {s: True for s in raw} if isinstance(raw, list) else dict(raw)
    out: dict[str, dict[str, tuple[Any, ...]] | None] = {}
    for step, condition in items.items():
        if step not in STEPS:
            raise ValueError(f"schema key {name}: x-steps names unknown step {step!r}; steps are {STEPS}")
        if condition is True:
            out[step] = None
        else:
            out[step] = {
                k: expand_kinds(values, where=f"schema key {name}") if k == "source.kind" else tuple(values)
                for k, v in condition.items()
                for values in [v if isinstance(v, list) else [v]]
            }
    return out


@functools.cache
def key_specs() -> tuple[KeySpec, ...]:
    """Every annotated leaf key of the schema, in schema order.

    A property is a leaf when it carries ``x-steps`` (its value is compared as a whole, e.g. a grid
    axis or ``harmonize.rename``); otherwise it must be an object whose properties are walked. A
    property that is neither raises ``ValueError``: every key needs a rerun decision. The
    :data:`RUN_KEYS` (``runs``, and ``sweep``, which validation turns into ``runs`` entries) are not
    leaves: their entries override ``model`` and ``train`` keys, which keep their annotation.
    """
    schema = load_schema()
    specs: list[KeySpec] = []
    missing: list[str] = []

    def walk(sub: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for key, prop in sub.get("properties", {}).items():
            path = (*prefix, key)
            resolved = resolve(prop, schema)
            if path in RUN_KEYS:
                continue
            if "x-steps" in resolved:
                specs.append(
                    KeySpec(
                        path,
                        _parse_steps(".".join(path), resolved["x-steps"]),
                        bool(resolved.get("x-output-path", False)),
                    )
                )
            elif "properties" in resolved:
                walk(resolved, path)
            else:
                missing.append(".".join(path))

    walk(schema, ())
    if missing:
        raise ValueError(f"schema keys without an x-steps annotation: {missing}; say which steps each determines")
    return tuple(specs)


def _set(out: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        out = out.setdefault(part, {})
    out[path[-1]] = copy.deepcopy(value)


def _for_step(cfg: dict[str, Any], step: str, run: str | None) -> dict[str, Any]:
    """For train and evaluate with ``run``, that run's configuration; else ``cfg`` as given (inside
    a step, ``cfg`` already is the run's configuration)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; steps are {STEPS}")
    return run_config(cfg, run) if step in RUN_STEPS and run is not None else cfg


def result_config(cfg: dict[str, Any], step: str, run: str | None = None) -> dict[str, Any]:
    """The configuration values that determine ``step``'s outputs, as a nested mapping: the rule's
    params and the provenance of its artifacts. For train and evaluate, give ``run`` with the whole
    configuration, or no ``run`` with the run's own configuration (what a step holds)."""
    cfg = _for_step(cfg, step, run)
    out: dict[str, Any] = {}
    for spec in key_specs():
        if spec.determines(step, cfg):
            _set(out, spec.path, get(cfg, spec.name))
    return out


def result_json(cfg: dict[str, Any], step: str, run: str | None = None) -> str:
    """:func:`result_config` as canonical JSON (what :func:`result_digest` hashes)."""
    return json.dumps(result_config(cfg, step, run), sort_keys=True)


def result_item(name: str, value: Any) -> str:
    """``<dotted key>=<value as canonical JSON>``, e.g. ``train.epochs=10``: one determining value as
    one rule param (:func:`conv2dlstm.config.workflow.determines_params`)."""
    return f"{name}={json.dumps(value, sort_keys=True)}"


def result_items(cfg: dict[str, Any], *steps: str, run: str | None = None) -> dict[str, str]:
    """The values that determine the outputs of any of ``steps``, flat: dotted key ->
    :func:`result_item`. Holds exactly what :func:`result_config` of each step holds (for train and
    evaluate, that of ``run``)."""
    out: dict[str, str] = {}
    for step in steps:
        step_cfg = _for_step(cfg, step, run)
        for spec in key_specs():
            if spec.determines(step, step_cfg):
                out[spec.name] = result_item(spec.name, get(step_cfg, spec.name))
    return out


def determining_keys(*steps: str) -> tuple[KeySpec, ...]:
    """The keys that determine the outputs of any of ``steps`` under some configuration (their
    conditions aside; path keys excluded), in schema order."""
    for step in steps:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; steps are {STEPS}")
    return tuple(s for s in key_specs() if not s.output_path and any(step in s.steps for step in steps))


def result_digest(cfg: dict[str, Any], step: str, run: str | None = None) -> str:
    """SHA-256 (16 hex digits) of :func:`result_json`: two runs with the same digest and the same
    inputs produce the same outputs."""
    return hashlib.sha256(result_json(cfg, step, run).encode()).hexdigest()[:16]


def visible_to(spec: KeySpec, step: str) -> bool:
    """Whether ``step`` may read the key: runtime and path keys, and the result keys of the step or
    of any step upstream of it (regardless of conditions)."""
    if spec.runtime or spec.output_path:
        return True
    upstream = STEPS[: STEPS.index(step) + 1]
    return any(s in upstream for s in spec.steps)


def step_view(cfg: dict[str, Any], step: str) -> dict[str, Any]:
    """``cfg`` (validated; for train and evaluate the run's configuration) restricted to the keys
    ``step`` may read (:func:`visible_to`); the :data:`RUN_KEYS` are kept as given."""
    out: dict[str, Any] = {}
    for spec in key_specs():
        if visible_to(spec, step):
            _set(out, spec.path, get(cfg, spec.name))
    for (key,) in RUN_KEYS:
        if key in cfg:
            out[key] = copy.deepcopy(cfg[key])
    return out


def sweep_tags(cfg: dict[str, Any]) -> dict[str, str]:
    """MLflow tags grouping the runs of the (validated, whole) configuration ``cfg``.

    ``sweep``: 12 hex digits of SHA-256 over what determines every result of the sweep (the result
    configuration of each data step, and of train and evaluate for each run): the runs of one
    ``snakemake`` invocation share it, and another set of runs or data gives another.
    ``sweep.runs``: the run names, comma-separated.
    """
    names = run_names(cfg)
    payload = {
        "data": {step: result_config(cfg, step) for step in STEPS if step not in (*RUN_STEPS, "ensemble", "compare")},
        "runs": {name: {step: result_config(cfg, step, name) for step in ("train", "evaluate")} for name in names},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return {"sweep": digest, "sweep.runs": ",".join(names)}
