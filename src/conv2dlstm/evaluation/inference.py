"""Inference: a checkpoint's network run over windows, and its output turned into physical fields.

One concern, shared by the evaluate step (:mod:`conv2dlstm.steps.evaluate`, every test window) and the
forecast step (:mod:`conv2dlstm.steps.forecast`, one initial time), so that both predict a window the
same way and forecasting a test day reproduces ``predictions.nc`` bit for bit:

- :func:`read_batch`: the normalized inputs, targets and last input step of windows of the
  windows store;
- :class:`Horizon`: a split's windows read to a longer horizon than the store's (config
  ``evaluate.max_lead``);
- :func:`predict_batch`: the network on each window on its own (a batch of one), so that a
  window's prediction does not depend on the other windows of its batch, rolled out on its own
  outputs past the leads it was trained for (:func:`rollout`, :func:`feedback_channels`);
- :func:`forecast_array`: ``(time, lead, variable, lat, lon)`` values with forecast coordinates;
- :func:`physical`: denormalized with the statistics, NaN on land; :func:`clip_nonnegative` with
  :func:`nonnegative_targets`: the checkpoint's floored target variables clipped at 0;
- :func:`climatology_at`: the training climatology at given times, float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from conv2dlstm.data.windowing import window_starts
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.evaluation import baselines


class Horizon:
    """A windows store whose windows of ``split`` are read to ``lead_steps`` leads, more than the store's.

    The windows are the store's windows of the split whose inputs and ``lead_steps`` following steps
    all lie in the split's period (the store's attribute ``<split>_period``, ``start..end``, whole
    days) and span no gap (:func:`conv2dlstm.data.windowing.window_starts`): the same windows when
    the store's horizon is kept, fewer at the end of the period otherwise. Nothing is written: the
    training windows and the store do not change. Every other attribute is the store's.
    """

    def __init__(self, store: Any, split: str, *, lead_steps: int) -> None:
        self._store = store
        self.split = split
        self.lead_steps = int(lead_steps)
        if self.lead_steps < int(store.lead_steps):
            raise ConfigError(
                f"config key evaluate.max_lead: {lead_steps} is below the windows' lead_steps {store.lead_steps}"
            )
        starts = np.asarray(store.starts(split), dtype=np.int64)
        if self.lead_steps > int(store.lead_steps):
            period = str(store.attrs.get(f"{split}_period", ""))
            start, sep, end = period.partition("..")
            if not (start and sep and end):
                raise DataError(
                    f"windows store {store.path} does not record its {split} period (attribute {split}_period), "
                    "which reading it to evaluate.max_lead needs; rebuild it with the windows step"
                )
            reach = window_starts(
                store.time, start=start, end=end, input_steps=int(store.input_steps), lead_steps=self.lead_steps
            )
            starts = starts[np.isin(starts, reach)]
        self._starts = starts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def starts(self, split: str) -> np.ndarray:
        """The windows of ``split`` (``(n,)`` int64 indices of their first input step)."""
        return self._starts if split == self.split else self._store.starts(split)

    def init_times(self, split: str) -> np.ndarray:
        """Initial time (last input step) of each window, ``(n,)``."""
        return self._store.time[self.starts(split) + self._store.input_steps - 1]

    def valid_times(self, split: str) -> np.ndarray:
        """Valid time of each lead ``1..lead_steps``, ``(n, lead_steps)``."""
        lead = np.arange(1, self.lead_steps + 1)
        return self._store.time[self.starts(split)[:, None] + self._store.input_steps - 1 + lead]


def feedback_channels(input_variables: Sequence[str], target_variables: Sequence[str]) -> list[int]:
    """For each input variable, its channel among the targets: what a rollout feeds back as input.

    A :class:`ConfigError` names the input variables that are not targets (nothing predicts them).
    """
    missing = [v for v in input_variables if v not in target_variables]
    if missing:
        raise ConfigError(
            f"config key evaluate.max_lead: rolling the network out past its trained leads needs every input "
            f"variable predicted, but {missing} are not targets ({list(target_variables)}); add them to "
            "variables.targets or set evaluate.max_lead to 0"
        )
    return [list(target_variables).index(v) for v in input_variables]


def forecast_array(
    values: np.ndarray,
    *,
    init_times: np.ndarray,
    valid_times: np.ndarray,
    variables: Sequence[str],
    lat: np.ndarray,
    lon: np.ndarray,
    name: str = "forecast",
) -> xr.DataArray:
    """Wrap ``(time, lead, variable, lat, lon)`` values with forecast coordinates.

    Coordinates: ``time`` (initial time), ``lead`` (1..T_out), ``lead_time(lead)`` (timedelta of the
    first window; windows span no gap so it is the same for all), ``valid_time(time, lead)``,
    ``variable``, ``lat``, ``lon``.
    """
    init_times = np.asarray(init_times, dtype="datetime64[ns]")
    valid_times = np.asarray(valid_times, dtype="datetime64[ns]")
    n, n_lead = valid_times.shape
    if values.shape[:3] != (n, n_lead, len(variables)):
        raise DataError(
            f"forecast values have shape {values.shape}; expected ({n}, {n_lead}, {len(variables)}, lat, lon)"
        )
    lead_time = (valid_times[0] - init_times[0]) if n else np.zeros(n_lead, dtype="timedelta64[ns]")
    return xr.DataArray(
        values,
        dims=("time", "lead", "variable", "lat", "lon"),
        coords={
            "time": init_times,
            "lead": np.arange(1, n_lead + 1, dtype="int64"),
            "lead_time": ("lead", np.asarray(lead_time, dtype="timedelta64[ns]")),
            "valid_time": (("time", "lead"), valid_times),
            "variable": list(variables),
            "lat": np.asarray(lat, dtype="float64"),
            "lon": np.asarray(lon, dtype="float64"),
        },
        name=name,
    )


def read_batch(store: Any, split: str, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized inputs, targets and the targets at the initial time of the windows ``indices``.

    Window ``i`` starts at ``t0 = store.starts(split)[i]`` (layout in ``docs/architecture.md``):
    ``x = data[t0 : t0+T_in, inputs]``, ``y = data[t0+T_in : t0+T_in+T_out, targets]`` and, for
    persistence, ``last = data[t0+T_in-1, targets]`` (a target need not be an input). The time
    range the windows span is read once with ``store.read_time_range`` when it is no longer than
    reading each window on its own (consecutive windows overlap), else window by window.

    Returns:
        ``x (B, T_in, C_in, H, W)``, ``y (B, T_out, C_out, H, W)``, ``last (B, C_out, H, W)``, float32.
    """
    n_in, n_out = int(store.input_steps), int(store.lead_steps)
    span = n_in + n_out
    t0 = np.asarray(store.starts(split), dtype="int64")[np.asarray(indices, dtype="int64")]  # (B,)
    lo, hi = int(t0.min()), int(t0.max()) + span
    if hi - lo <= t0.size * span:
        block = store.read_time_range(lo, hi)  # (hi - lo, V, H, W)
        windows = block[(t0 - lo)[:, None] + np.arange(span)[None, :]]  # (B, span, V, H, W)
    else:
        windows = np.stack([store.read_time_range(int(t), int(t) + span) for t in t0])  # (B, span, V, H, W)
    inputs, targets = list(store.input_channels), list(store.target_channels)
    x = np.ascontiguousarray(windows[:, :n_in][:, :, inputs], dtype="float32")
    y = np.ascontiguousarray(windows[:, n_in:][:, :, targets], dtype="float32")
    last = np.ascontiguousarray(windows[:, n_in - 1][:, targets], dtype="float32")
    return x, y, last


def rollout(model: Any, x: Any, *, leads: int, feedback: Sequence[int] | None, ocean: Any) -> Any:
    """``leads`` leads of ``model`` from ``x (B, T_in, C_in, H, W)`` (a torch tensor): ``(B, leads, C_out, H, W)``.

    The network predicts its trained ``T_out`` leads; while fewer than ``leads`` are predicted, its
    predictions (the target channels ``feedback`` of each input channel), land set to 0 by
    ``ocean (H, W)``, are appended to the inputs, the last ``T_in`` steps are fed to it again, and
    its next ``T_out`` leads are appended to the output. All in normalized units, as trained.
    """
    import torch

    out = model(x)  # (B, T_out, C_out, H, W)
    predicted = [out]
    have = out.shape[1]
    while have < leads:
        if feedback is None:
            raise ConfigError("a rollout past the trained leads needs the feedback channels (feedback_channels)")
        frames = out[:, :, list(feedback)] * ocean  # (B, T_out, C_in, H, W), land 0
        x = torch.cat([x, frames], dim=1)[:, -x.shape[1] :]  # (B, T_in, C_in, H, W)
        out = model(x)
        predicted.append(out)
        have += out.shape[1]
    return torch.cat(predicted, dim=1)[:, :leads]  # (B, leads, C_out, H, W)


def predict_batch(
    model: Any,
    x: np.ndarray,
    *,
    device: Any,
    leads: int | None = None,
    feedback: Sequence[int] | None = None,
    ocean: np.ndarray | None = None,
) -> np.ndarray:
    """Run ``model`` (on ``device``, eval mode) on ``x (B, T_in, C_in, H, W)``; returns ``(B, leads, C_out, H, W)``.

    With ``feedback`` (:func:`feedback_channels`), the network is rolled out on its own outputs to
    ``leads`` leads (:func:`rollout`; ``ocean`` the ``(H, W)`` ocean mask); without it the result is
    the network's own ``T_out`` leads, whatever ``leads`` says (the caller checks the shape).

    Each window is predicted on its own (a batch of one): the floating-point result of convolution
    and matrix kernels depends on the batch size (oneDNN and cuBLAS choose algorithms by shape), and
    a window's prediction must not depend on which windows share its batch, so that the forecast
    step (:mod:`conv2dlstm.steps.forecast`), which predicts one initial time, reproduces it exactly.
    """
    import torch

    inputs = torch.from_numpy(np.ascontiguousarray(x, dtype="float32")).to(device)  # (B, T_in, C_in, H, W)
    if ocean is None:
        ocean = np.ones(inputs.shape[-2:], dtype=bool)
    sea = torch.from_numpy(np.asarray(ocean, dtype="float32")).to(device)  # (H, W), 1 on ocean
    with torch.inference_mode():
        if leads is None or feedback is None:
            y = torch.cat([model(inputs[i : i + 1]) for i in range(inputs.shape[0])])  # (B, T_out, C_out, H, W)
        else:
            y = torch.cat(
                [
                    rollout(model, inputs[i : i + 1], leads=leads, feedback=feedback, ocean=sea)
                    for i in range(len(inputs))
                ]
            )  # (B, leads, C_out, H, W)
    return y.float().cpu().numpy()


def nonnegative_targets(ckpt: Mapping[str, Any]) -> list[str]:
    """The target variables whose output the checkpoint's model floors at 0 (``nonnegative_channels``)."""
    targets = [str(v) for v in ckpt.get("target_variables") or []]
    channels = (ckpt.get("model_kwargs") or {}).get("nonnegative_channels") or []
    return [targets[c] for c in channels if 0 <= c < len(targets)]


def physical(da: xr.DataArray, stats: xr.Dataset, mask: xr.DataArray) -> xr.DataArray:
    """Normalized ``da`` (with a ``variable`` dimension) in physical units, NaN on land, dims kept."""
    from conv2dlstm.artifacts import stats as stats_file

    return stats_file.denormalize(da, stats).where(mask).transpose(*da.dims)


def clip_nonnegative(da: xr.DataArray, nonnegative: Sequence[str]) -> xr.DataArray:
    """``da`` with negative values of the variables ``nonnegative`` set to 0 (NaN stays NaN).

    The network's output floor (:class:`conv2dlstm.training.models.OutputFloor`) keeps such predictions at
    or above 0 up to float rounding of ``-mean / std``; this removes the rounding. Damped
    persistence, which can undershoot 0 (``clim(valid) < rho * clim(initial)``), is clipped too.
    """
    names = [v for v in nonnegative if v in set(map(str, da["variable"].values))]
    if not names:
        return da
    negative = (da < 0) & da["variable"].isin(names)
    return da.where(~negative, 0).astype(da.dtype)


def climatology_at(valid_times: xr.DataArray, stats: xr.Dataset, variables: Sequence[str]) -> xr.DataArray:
    """Climatology forecast at ``valid_times`` as float32 (:func:`conv2dlstm.evaluation.baselines.climatology`)."""
    return baselines.climatology(valid_times, stats, variables).astype("float32")


def batch_forecasts(
    pred: np.ndarray | None,
    y: np.ndarray,
    last: np.ndarray,
    *,
    init_times: np.ndarray,
    valid_times: np.ndarray,
    variables: Sequence[str],
    mask: xr.DataArray,
    stats: xr.Dataset,
    rho: xr.DataArray | None = None,
    cell_mean: xr.DataArray | None = None,
    nonnegative: Sequence[str] = (),
) -> tuple[dict[str, xr.DataArray], xr.DataArray]:
    """One batch in physical units (float32, NaN on land): the forecasts and the truth. The evaluate
    step scores the network and the baselines with it, the ensemble step (``pred`` None) the baselines.

    Args:
        pred: normalized model prediction ``(B, T_out, C_out, H, W)``, or None for the baselines only.
        y: normalized targets ``(B, T_out, C_out, H, W)``.
        last: normalized targets at the initial times, ``(B, C_out, H, W)`` (persistence).
        init_times, valid_times: ``(B,)`` and ``(B, T_out)`` datetimes of the batch's windows.
        variables: the ``C_out`` target names.
        mask: ``(lat, lon)`` ocean mask with the grid's coordinates.
        stats: statistics from :func:`conv2dlstm.artifacts.stats.open_lazy`.
        rho: ``(lag, variable)`` damping of damped persistence (:func:`conv2dlstm.evaluation.baselines.fit_damping`);
            without it there is no damped persistence forecast.
        cell_mean: ``(variable, lat, lon)`` training mean of each cell
            (:func:`conv2dlstm.evaluation.baselines.training_mean`); without it there is no
            ``training_mean`` forecast.
        nonnegative: target variables that cannot be negative; the model's prediction and damped
            persistence are clipped at 0 there (:func:`clip_nonnegative`).

    Returns:
        The forecasts ``model`` (with ``pred``) and those of :data:`conv2dlstm.evaluation.baselines.BASELINE_NAMES`
        (damped persistence with ``rho``, the training mean with ``cell_mean``), and the truth, each
        ``(time, lead, variable, lat, lon)`` with the coordinates of :func:`forecast_array`.
    """
    lat, lon = mask["lat"].values, mask["lon"].values
    coords: dict[str, Any] = {
        "init_times": init_times,
        "valid_times": valid_times,
        "variables": variables,
        "lat": lat,
        "lon": lon,
    }
    truth = physical(forecast_array(y, name="truth", **coords), stats, mask)
    out: dict[str, xr.DataArray] = {}
    if pred is not None:
        prediction = physical(forecast_array(pred, name="prediction", **coords), stats, mask)
        out["model"] = clip_nonnegative(prediction, nonnegative)
    at_init = physical(
        xr.DataArray(
            last,
            dims=("time", "variable", "lat", "lon"),
            coords={"time": truth["time"], "variable": list(variables), "lat": lat, "lon": lon},
        ),
        stats,
        mask,
    )
    out["persistence"] = baselines.persistence(at_init, truth.sizes["lead"]).assign_coords(
        lead_time=truth["lead_time"], valid_time=truth["valid_time"]
    )
    clim = climatology_at(truth["valid_time"], stats, variables).where(mask)
    out["climatology"] = clim
    if rho is not None:
        clim_initial = climatology_at(truth["time"], stats, variables).where(mask)
        damped = baselines.damped_persistence(at_init, clim_initial, clim, rho.astype("float32"))
        out["damped_persistence"] = clip_nonnegative(damped.astype("float32"), nonnegative)
    if cell_mean is not None:
        mean = cell_mean.sel(variable=list(variables)).broadcast_like(truth)  # the same field at every lead
        out["training_mean"] = mean.transpose(*truth.dims)
    return out, truth
