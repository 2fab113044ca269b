"""Provenance: one record per artifact saying what determined it, summed up in one digest.

A provenance record is a small JSON-able mapping::

    {"step": "windows",
     "config_digest": "<16 hex>",               # keys.result_digest(cfg, step)
     "inputs": {"regrid": "<16 hex>", "stats": "<16 hex>"},   # the digest of each input artifact
     "digest": "<16 hex>"}                      # SHA-256 over the three fields above

Two artifacts with the same ``digest`` were written by the same step from the same result
configuration (:func:`conv2dlstm.config.keys.result_digest`) and from inputs with the same digests, so they
hold the same result. Paths never enter a record: the same configuration run in two directories
gives the same digests.

Where each artifact keeps its record, and what its inputs are:

| step | artifact | record | inputs |
| --- | --- | --- | --- |
| regrid | Zarr store | attribute ``provenance`` (JSON string) | ``manifest``: the manifest's top-level ``sha256`` |
| normalize | statistics netCDF | global attribute ``provenance`` (JSON string) | ``regrid`` |
| windows | Zarr store | attribute ``provenance`` (JSON string) | ``regrid``, ``stats`` |
| train | ``last.pt``, ``best.pt``, ``model.pt`` | entry ``provenance`` (a dict) | ``windows``, ``stats`` |
| evaluate | ``predictions.nc``, MLflow tags | global attr. ``provenance`` | ``checkpoint``, ``windows``, ``stats`` |

The digest of an input is the ``digest`` of its record (for the manifest: its ``sha256``). Readers:
:func:`read_zarr`, :func:`read_netcdf` (or :func:`from_attrs` / :func:`from_checkpoint` on what is
already open) here, and the artifact modules' own: :func:`conv2dlstm.artifacts.manifest.read_digest`,
:func:`conv2dlstm.artifacts.checkpoint.read_provenance`, and
:func:`conv2dlstm.artifacts.digests.digest_of` for any artifact by its kind. This module imports no
artifact module: they import it. Each raises :class:`~conv2dlstm.errors.DataError` naming the artifact
and the step to rerun when the record is missing or malformed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conv2dlstm.config import keys
from conv2dlstm.config.runs import flat_items
from conv2dlstm.errors import DataError

ATTR = "provenance"
"""Name of the attribute (Zarr, netCDF) or checkpoint entry holding the record."""
RESULT_CONFIG_KEY = "result_config"
"""Checkpoint entry holding :func:`conv2dlstm.config.keys.result_config` of the train step (to name changed keys)."""
INPUTS: dict[str, tuple[str, ...]] = {
    "regrid": ("manifest",),
    "normalize": ("regrid",),
    "windows": ("regrid", "stats"),
    "train": ("windows", "stats"),
    "evaluate": ("checkpoint", "windows", "stats"),
}
"""The inputs each recording step names in its record."""
FIELDS = ("step", "config_digest", "inputs", "digest")
DIGEST_LENGTH = 16


def rerun_advice(step: str) -> str:
    """How to rebuild the artifact of ``step``, for error messages."""
    return f"rerun the {step} step (`snakemake --forcerun {step}`, or delete it and rerun the workflow)"


def record_digest(step: str, config_digest: str, inputs: Mapping[str, str]) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of ``step``, ``config_digest`` and the
    ``inputs`` sorted by name."""
    canonical = json.dumps(
        {"step": step, "config_digest": config_digest, "inputs": dict(sorted(inputs.items()))}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]


def make_record(step: str, config_digest: str, inputs: Mapping[str, str]) -> dict[str, Any]:
    """The provenance record of ``step`` (inputs sorted by name); ``ValueError`` when the input names
    are not those of :data:`INPUTS` for the step."""
    expected = INPUTS.get(step)
    if expected is None or sorted(inputs) != sorted(expected):
        raise ValueError(f"step {step!r} records inputs {list(expected or ())}; got {sorted(inputs)}")
    ordered = {name: str(inputs[name]) for name in sorted(inputs)}
    return {
        "step": step,
        "config_digest": config_digest,
        "inputs": ordered,
        "digest": record_digest(step, config_digest, ordered),
    }


def for_step(cfg: Mapping[str, Any], step: str, inputs: Mapping[str, str]) -> dict[str, Any]:
    """The record of ``step`` run with configuration ``cfg`` (the view the step holds) on ``inputs``."""
    return make_record(step, keys.result_digest(dict(cfg), step), inputs)


def to_json(record: Mapping[str, Any]) -> str:
    """The record as canonical JSON (the value of a Zarr or netCDF attribute)."""
    return json.dumps(dict(record), sort_keys=True)


def to_attrs(record: Mapping[str, Any]) -> dict[str, str]:
    """``{"provenance": <JSON string>}``, to merge into a dataset's attributes."""
    return {ATTR: to_json(record)}


def validate(value: Any, *, where: str, step: str | None) -> dict[str, Any]:
    """``value`` (a record, or its JSON string) checked: the fields of :data:`FIELDS`, the ``step``
    (any recording step when None), and a ``digest`` that matches the other fields.
    :class:`DataError` naming ``where`` and the step to rerun otherwise."""
    fix = rerun_advice(step) if step else "rerun the step that wrote it"
    if value is None:
        raise DataError(f"{where} has no provenance record (written by an older version of conv2dlstm); {fix}")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: its provenance record is not JSON ({exc}); {fix}") from exc
    if (
        not isinstance(value, Mapping)
        or any(k not in value for k in FIELDS)
        or not isinstance(value["inputs"], Mapping)
    ):
        raise DataError(f"{where}: its provenance record {value!r} lacks some of {list(FIELDS)}; {fix}")
    record = {k: value[k] for k in FIELDS}
    record["inputs"] = {str(k): str(v) for k, v in sorted(value["inputs"].items())}
    if step is not None and record["step"] != step:
        raise DataError(f"{where} was written by the {record['step']} step, not by {step}; {fix}")
    if record_digest(record["step"], record["config_digest"], record["inputs"]) != record["digest"]:
        raise DataError(f"{where}: its provenance digest does not match its fields (edited or corrupt); {fix}")
    return record


def from_attrs(attrs: Mapping[str, Any], *, where: str, step: str) -> dict[str, Any]:
    """The record in the attributes of a Zarr store or netCDF file written by ``step``."""
    return validate(attrs.get(ATTR), where=where, step=step)


def from_checkpoint(ckpt: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """The record of a checkpoint dict (written by the train step)."""
    return validate(ckpt.get(ATTR), where=where, step="train")


def read_zarr(path: str | os.PathLike, *, step: str) -> dict[str, Any]:
    """The record of the Zarr store ``path`` written by ``step`` (``regrid`` or ``windows``)."""
    import zarr

    path = Path(path)
    try:
        attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    except Exception as exc:
        raise DataError(f"{step} store {path} cannot be opened ({exc}); {rerun_advice(step)}") from exc
    return from_attrs(attrs, where=f"{step} store {path}", step=step)


def read_netcdf(path: str | os.PathLike, *, step: str = "normalize") -> dict[str, Any]:
    """The record in the global attributes of the netCDF file ``path`` written by ``step``."""
    import netCDF4

    path = Path(path)
    try:
        with netCDF4.Dataset(str(path), "r") as ds:
            attrs = {name: ds.getncattr(name) for name in ds.ncattrs()}
    except (OSError, RuntimeError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); {rerun_advice(step)}") from exc
    return from_attrs(attrs, where=str(path), step=step)


# --------------------------------------------------------------------------------------------------
# What differs

_ABSENT = "(absent)"
_MISSING = object()


def _show(value: Any) -> str:
    return _ABSENT if value is _MISSING else json.dumps(value, sort_keys=True, default=str)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for each leaf of two result configurations that differs, by key name."""
    a, b = flat_items(old), flat_items(new)
    return [
        f"{name}: {_show(a.get(name, _MISSING))} -> {_show(b.get(name, _MISSING))}"
        for name in sorted(set(a) | set(b))
        if a.get(name, _MISSING) != b.get(name, _MISSING)
    ]


def input_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"input <name> changed: <old digest> -> <new digest>"`` for each input of two records that differs."""
    a, b = old["inputs"], new["inputs"]
    return [
        f"input {name} changed: {a.get(name, _ABSENT)} -> {b.get(name, _ABSENT)}"
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name)
    ]


def differences(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    old_config: Mapping[str, Any] | None = None,
    new_config: Mapping[str, Any] | None = None,
) -> list[str]:
    """Why record ``old`` is not record ``new``, one phrase per cause; empty when the digests are equal.

    A changed ``config_digest`` is spelt out as the changed keys when both result configurations
    are given (:func:`config_changes`), else as the two digests; each changed input is named.
    """
    if old["digest"] == new["digest"]:
        return []
    out: list[str] = []
    if old["step"] != new["step"]:
        out.append(f"step {old['step']} -> {new['step']}")
    if old["config_digest"] != new["config_digest"]:
        changed = config_changes(old_config, new_config) if old_config is not None and new_config is not None else []
        out += changed or [f"result configuration {old['config_digest']} -> {new['config_digest']}"]
    out += input_changes(old, new)
    return out


def mlflow_tags(record: Mapping[str, Any], prefix: str = "provenance") -> dict[str, str]:
    """MLflow tags of a record: ``<prefix>.digest``, ``<prefix>.config_digest``, ``<prefix>.step``
    and ``<prefix>.inputs.<name>`` per input."""
    tags = {f"{prefix}.{field}": str(record[field]) for field in ("digest", "config_digest", "step")}
    tags.update({f"{prefix}.inputs.{name}": str(value) for name, value in record["inputs"].items()})
    return tags
