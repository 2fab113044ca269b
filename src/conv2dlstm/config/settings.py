"""A typed, read-only view of a validated configuration: one frozen dataclass per schema object.

The schema (``workflow/schemas/config.schema.yaml``) stays the single source of defaults,
descriptions and validation; this module gives the validated dict attribute access with types,
so a typo in a key is an ``AttributeError`` at the line that makes it (and a mypy error) instead of
a ``KeyError`` deep in a step, and an enum is a ``Literal`` a type checker can follow::

    from conv2dlstm.config.settings import Settings
    s = Settings.from_config(validate_config(raw))
    s.train.lr_schedule        # 'cosine' | 'plateau' | 'constant'
    s.grid.lat.step            # float

:func:`conv2dlstm.config.validate.validate_config` builds the view of every configuration it validates, so a
configuration that passes the schema but not these types fails there. ``tests/unit/test_settings.py``
checks that every object of the schema has exactly these fields and
that every enum of the schema equals its ``Literal`` here (and the code's own tuple of choices), so
the view cannot drift from the schema: a new key needs a field here, a new choice a new literal.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

SyntheticKind = Literal["none", "oisst", "cmems_bgc"]
SourceKind = Literal["url", "files", "zarr", "copernicus"]
LonConvention = Literal["-180..180", "0..360"]
DuplicatePolicy = Literal["error", "first", "last"]
GridMethod = Literal["conservative", "linear", "nearest"]
ModelName = Literal["convlstm", "conv2d_lstm"]
LrSchedule = Literal["cosine", "plateau", "constant"]
Device = Literal["auto", "cpu", "cuda"]
DataOnDevice = Literal["auto", "always", "never"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type, in order: ``choices(LrSchedule) == ('cosine', 'plateau', 'constant')``."""
    return tuple(get_args(literal))


@dataclass(frozen=True)
class Synthetic:
    kind: SyntheticKind
    start: str
    end: str
    lat: tuple[float, float] | None  # the schema's range allows null; the synth step then refuses it
    lon: tuple[float, float] | None
    resolution: float
    seed: int


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    url: str
    start: str
    end: str
    frequency: str
    paths: tuple[str, ...]
    store: str
    dataset_id: str
    variables: tuple[str, ...]
    checksums: Mapping[str, str]
    max_missing: int
    parallel: int
    retries: int
    backoff_s: float
    timeout_s: float


@dataclass(frozen=True)
class UnitRange:
    unit: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Harmonize:
    level: int
    lon_convention: LonConvention
    rename: Mapping[str, str]
    duplicates: DuplicatePolicy
    units: Mapping[str, UnitRange]


@dataclass(frozen=True)
class Region:
    lat: tuple[float, float] | None
    lon: tuple[float, float] | None


@dataclass(frozen=True)
class Axis:
    start: float
    stop: float
    step: float


@dataclass(frozen=True)
class Grid:
    method: GridMethod
    lat: Axis
    lon: Axis
    min_ocean_fraction: float


@dataclass(frozen=True)
class Variables:
    inputs: tuple[str, ...]
    targets: tuple[str, ...]
    nonnegative: tuple[str, ...]


@dataclass(frozen=True)
class Period:
    start: str
    end: str


@dataclass(frozen=True)
class Splits:
    train: Period
    val: Period
    test: Period


@dataclass(frozen=True)
class Normalize:
    per_pixel: bool
    climatology_window: int


@dataclass(frozen=True)
class Windows:
    input_steps: int
    lead_steps: int
    stride: int
    time_chunk: int


@dataclass(frozen=True)
class Dask:
    scheduler_address: str


@dataclass(frozen=True)
class ConvLSTM:
    hidden_channels: tuple[int, ...]
    kernel_size: int


@dataclass(frozen=True)
class Conv2DLSTM:
    filters: tuple[int, ...]
    kernel_size: int
    lstm_units: int
    dense_units: int
    max_parameters: int


@dataclass(frozen=True)
class Model:
    name: ModelName
    convlstm: ConvLSTM
    conv2d_lstm: Conv2DLSTM


@dataclass(frozen=True)
class Train:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    lr_schedule: LrSchedule
    grad_clip: float
    patience: int
    seed: int
    device: Device
    bf16: bool
    compile: bool
    latitude_weighted_loss: bool
    num_workers: int
    data_on_device: DataOnDevice
    gpus: int
    max_batches_per_epoch: int


@dataclass(frozen=True)
class Mlflow:
    tracking_uri: str
    log_model: bool


@dataclass(frozen=True)
class Evaluate:
    plot_date: str
    batch_size: int


@dataclass(frozen=True)
class Run:
    """One entry of ``runs``: a name and the model / train keys it overrides (partial sections)."""

    name: str
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    experiment: str
    name: str
    outdir: str
    resources_dir: str
    synthetic: Synthetic
    source: Source
    harmonize: Harmonize
    region: Region
    grid: Grid
    variables: Variables
    splits: Splits
    normalize: Normalize
    windows: Windows
    dask: Dask
    model: Model
    train: Train
    mlflow: Mlflow
    evaluate: Evaluate
    runs: tuple[Run, ...]
    sweep: Mapping[str, tuple[Any, ...]]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Settings:
        """The view of a configuration validated by :func:`conv2dlstm.config.validate.validate_config` (defaults
        filled in). A missing or extra key raises ``TypeError`` naming it: the dict was not validated."""
        return build(cls, cfg, "config")


T = TypeVar("T")


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        return None if value is None else _convert(options[0], value, where)
    if origin is tuple:
        item = get_args(hint)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or origin is dict:
        _, item = get_args(hint)
        return types.MappingProxyType({k: _convert(item, v, f"{where}.{k}") for k, v in value.items()})
    if origin is Literal:
        if value not in get_args(hint):
            raise ValueError(f"config key {where}: {value!r} is not one of {list(get_args(hint))}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """An instance of the dataclass ``cls`` from the mapping ``data`` (recursively)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"config key {where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = sorted(set(data) - names)
    if extra:
        raise TypeError(f"config key {where}: unknown key(s) {extra} for {cls.__name__}; validate the config first")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)
