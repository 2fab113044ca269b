"""Figure labels: every axis names its quantity and unit, and the lead in the data's time step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.evaluation import metrics, plots, scores
from tests.support.cases import MASK, cube_shape, forecast_cube

DAY = pd.Timedelta(days=1)


@pytest.mark.parametrize(
    ("step", "label"),
    [
        (DAY, "lead (days)"),
        (pd.Timedelta(hours=6), "lead (6-hour steps)"),
        (pd.Timedelta(days=2), "lead (2-day steps)"),
        (pd.Timedelta(hours=36), "lead (36-hour steps)"),
        (pd.Timedelta(hours=1), "lead (hours)"),
        (pd.Timedelta(minutes=90), "lead (90-minute steps)"),
        (None, "lead (steps after the initial time)"),
    ],
)
def test_lead_label_names_the_step(step, label):
    assert plots.lead_label(step) == label


def test_lead_step_of_regular_and_irregular_leads():
    init = pd.date_range("2021-07-01", periods=4, freq="6h").values
    valid = init[:, None] + np.arange(1, 4)[None, :] * np.timedelta64(6, "h")
    assert plots.lead_step(valid - init[:, None]) == pd.Timedelta(hours=6)
    assert plots.lead_step(np.array([1, 2, 3], dtype="timedelta64[D]")) == DAY  # one window's lead_time
    months = pd.to_datetime(["2021-01-31", "2021-03-03", "2021-03-31"]).values  # leads 1, 2 of a monthly series
    assert plots.lead_step(months[1:] - months[0]) is None  # 31 and 59 days: no one step
    assert plots.lead_step(np.zeros((0, 3), dtype="timedelta64[ns]")) is None


def test_quantity_label():
    assert plots.quantity_label("RMSE", "degC") == "RMSE [degC]"
    assert plots.quantity_label("RMSE", None) == "RMSE (physical units)"
    assert plots.quantity_label("RMSE", "") == "RMSE (physical units)"


def _rmse_rows() -> pd.DataFrame:
    rows = [
        {"label": label, "model": label, "variable": variable, "lead": lead, "value": value}
        for variable in ("sst", "chl_a")
        for label, value in (("convlstm", 0.5), ("persistence", 0.8))
        for lead in (1, 2, 3)
    ]
    return pd.DataFrame(rows)


def _skill_rows(labels=("convlstm",), baselines=("persistence",)) -> pd.DataFrame:
    rows = [
        {
            "label": label,
            "baseline": baseline,
            "variable": variable,
            "lead": lead,
            "skill": 0.2,
            "lower": 0.1,
            "upper": 0.3,
            "significant": True,
            "meaningful": True,
        }
        for label in labels
        for baseline in baselines
        for variable in ("sst", "chl_a")
        for lead in (1, 2, 3)
    ]
    return pd.DataFrame(rows)


def _panel(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_lines_vs_lead_name_each_panels_unit_and_the_lead_in_days(tmp_path):
    fig = plots.lines_vs_lead(
        _rmse_rows(),
        tmp_path / "rmse.png",
        ylabel="area-weighted RMSE",
        title="t",
        units={"sst": "degC"},
        lead_step=DAY,
    )
    assert _panel(fig, "sst").get_ylabel() == "area-weighted RMSE [degC]"
    assert _panel(fig, "chl_a").get_ylabel() == "area-weighted RMSE (physical units)"  # no unit known
    assert {ax.get_xlabel() for ax in fig.axes} == {"lead (days)"}
    acc = plots.lines_vs_lead(
        _rmse_rows(), tmp_path / "acc.png", ylabel="anomaly correlation (ACC)", title="t", lead_step=None
    )
    assert _panel(acc, "sst").get_ylabel() == "anomaly correlation (ACC)"  # no unit: the label as given
    assert _panel(acc, "sst").get_xlabel() == "lead (steps after the initial time)"


def test_skill_vs_lead_names_the_lead_step(tmp_path):
    fig = plots.skill_vs_lead(
        _skill_rows(labels=("vs persistence",)), tmp_path / "skill.png", title="t", lead_step=pd.Timedelta(hours=6)
    )
    assert _panel(fig, "sst").get_xlabel() == "lead (6-hour steps)"


def _horizon_rows(lower_by_label: dict[str, list[float]], meaningful: tuple[bool, ...] = ()) -> pd.DataFrame:
    rows = [
        {
            "label": label,
            "baseline": label.removeprefix("vs "),
            "variable": "sst",
            "lead": lead,
            "skill": lo + 0.1 if np.isfinite(lo) else np.nan,
            "lower": lo,
            "upper": lo + 0.2,
            "significant": lo > 0,
            "meaningful": meaningful[lead - 1] if meaningful else True,
        }
        for label, lower in lower_by_label.items()
        for lead, lo in enumerate(lower, start=1)
    ]
    return pd.DataFrame(rows)


def _dashed_verticals(ax) -> dict[str, float]:
    """Label -> x of each dashed vertical line of ``ax``."""
    out = {}
    for line in ax.get_lines():
        x = np.asarray(line.get_xdata(), dtype="float64")
        if line.get_linestyle() == "--" and x.size == 2 and x[0] == x[1]:
            out[line.get_label()] = float(x[0])
    return out


def test_skill_vs_lead_marks_the_skill_horizon(tmp_path):
    skills = _horizon_rows(
        {
            "vs persistence": [0.3, 0.1, -0.05, 0.2],  # lead 4 above zero again: the horizon stays lead 2
            "vs climatology": [-0.1, 0.2, 0.3, 0.3],
            "vs damped_persistence": [0.1, 0.1, 0.1, 0.1],
        }
    )
    fig = plots.skill_vs_lead(skills, tmp_path / "skill.png", title="t", lead_step=pd.Timedelta(hours=6))
    ax = _panel(fig, "sst")
    assert _dashed_verticals(ax) == {
        "skill horizon vs persistence: lead 2 (12 hours)": 2.0,
        "skill horizon vs damped_persistence: lead 4 (1 day), every lead": 4.0,
    }
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "skill horizon vs climatology: none (no skill at lead 1)" in legend
    assert "skill horizon vs persistence: lead 2 (12 hours)" in legend
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colours["skill horizon vs persistence: lead 2 (12 hours)"] == colours["vs persistence"]


def test_skill_horizon_ends_at_a_lead_not_meaningful(tmp_path):
    skills = _horizon_rows({"vs climatology": [0.3, np.nan, 0.3]}, meaningful=(True, False, True))
    ax = _panel(plots.skill_vs_lead(skills, tmp_path / "skill.png", title="t"), "sst")
    assert _dashed_verticals(ax) == {"skill horizon vs climatology: lead 1": 1.0}  # no step known: no duration
    no_interval = _horizon_rows({"vs persistence": [np.nan, np.nan]}).assign(skill=0.2)
    ax = _panel(plots.skill_vs_lead(no_interval, tmp_path / "bare.png", title="t"), "sst")
    assert not [t for t in ax.get_legend().get_texts() if "horizon" in t.get_text()]  # nothing to mark


@pytest.mark.parametrize(
    ("lead", "step", "text"),
    [
        (3, pd.Timedelta(hours=6), "18 hours"),
        (1, DAY, "1 day"),
        (2, pd.Timedelta(hours=36), "3 days"),
        (2, pd.Timedelta(minutes=90), "3 hours"),
        (3, None, None),
    ],
)
def test_lead_duration(lead, step, text):
    assert plots.lead_duration(lead, step) == text


def test_compare_figure_names_the_rmse_unit_per_variable_and_the_lead(tmp_path):
    fig = plots.compare_figure(
        _rmse_rows(), _skill_rows(), tmp_path / "compare.png", title="t", units={"sst": "degC"}, lead_step=DAY
    )
    assert _panel(fig, "sst").get_ylabel() == "area-weighted RMSE [degC]"
    assert _panel(fig, "chl_a").get_ylabel() == "area-weighted RMSE (physical units)"
    skill = _panel(fig, "sst: skill vs persistence (filled: 95% interval excludes 0)")
    assert skill.get_ylabel() == "RMSE skill" and skill.get_xlabel() == "lead (days)"
    bare = plots.compare_figure(_rmse_rows(), _skill_rows(), tmp_path / "bare.png", title="t")
    assert _panel(bare, "sst").get_ylabel() == "area-weighted RMSE (physical units)"
    assert _panel(bare, "sst").get_xlabel() == "lead (steps after the initial time)"


def _field() -> xr.DataArray:
    values = np.arange(2 * 3 * 4, dtype="float64").reshape(2, 3, 4)
    values[:, 0, 0] = np.nan  # land
    return xr.DataArray(
        values,
        dims=("variable", "lat", "lon"),
        coords={"variable": ["sst", "chl_a"], "lat": [20.0, 21.0, 22.0], "lon": [-60.0, -59.0, -58.0, -57.0]},
    )


def test_field_maps_colour_bar_names_quantity_and_unit(tmp_path):
    fig = plots.field_maps(_field(), tmp_path / "rmse_map.png", title="t", quantity="RMSE", units={"sst": "degC"})
    colour_bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert colour_bars == ["RMSE [degC]", "RMSE (physical units)"]


def test_forecast_maps_colour_bars_name_variable_and_unit(tmp_path):
    field = _field()
    fig = plots.forecast_maps(field, field + 1, tmp_path / "maps.png", title="t", units={"sst": "degC"})
    colour_bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert colour_bars == [
        "sst [degC]",
        "sst [degC]",
        "error [degC]",
        "chl_a (physical units)",
        "chl_a (physical units)",
        "error (physical units)",
    ]


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path, scored):
    from matplotlib.image import imread

    table = scores.metrics_table(scored, run="exp1", model_name="convlstm").assign(label=lambda t: t["model"])
    plots.lines_vs_lead(table[table["metric"] == "rmse"], tmp_path / "rmse.png", ylabel="RMSE", title="t")
    rng = np.random.default_rng(1)
    fc = forecast_cube(rng.normal(size=cube_shape(n_var=2)), variables=("sst", "no3")).where(MASK)
    plots.forecast_maps(
        fc.isel(time=0, lead=0), (fc + 1).isel(time=0, lead=0), tmp_path / "maps.png", title="t", units={"sst": "degC"}
    )
    plots.field_maps(
        metrics.rmse_per_cell(fc.sel(lead=1), fc.sel(lead=1) * 0, MASK),
        tmp_path / "rmse_map.png",
        title="t",
        quantity="RMSE",
    )
    for name in ("rmse.png", "maps.png", "rmse_map.png"):
        assert _is_png(tmp_path / name)
        height, width = imread(tmp_path / name).shape[:2]
        assert height > 100 and width > 100
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize(("height", "width"), [(48, 28), (25, 25), (10, 40)])
def test_maps_fill_their_figure(tmp_path, height: int, width: int) -> None:
    """A map figure is sized to its grid: the maps and colour bars span the figure's width (no blank
    margin left of a single map), and land stays grey in every panel, the error's included."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    lat, lon = np.arange(height) * 0.25, np.arange(width) * 0.25
    values = np.random.default_rng(0).random((1, height, width))
    values[:, :, :3] = np.nan  # land
    truth = xr.DataArray(values, dims=("variable", "lat", "lon"), coords={"variable": ["sst"], "lat": lat, "lon": lon})
    for fig in (
        plots.field_maps(abs(truth), tmp_path / "rmse_map.png", title="RMSE", quantity="RMSE"),
        plots.forecast_maps(truth, truth * 1.1, tmp_path / "maps.png", title="maps"),
    ):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        content = fig.get_tightbbox(canvas.get_renderer())  # every artist, labels included, in inches
        assert content.width > 0.8 * fig.get_figwidth(), (content.width, fig.get_figwidth())  # was 0.4 at 48 x 28
        maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert all(ax.get_facecolor()[:3] == pytest.approx((0.8, 0.8, 0.8)) for ax in maps)


def _pixels(fig) -> np.ndarray:
    """The figure drawn, ``(height, width, 3)`` RGB bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _cell_block(fig, ax, pixels: np.ndarray, lat: float, lon: float) -> np.ndarray:
    """The pixels of the middle of the cell centred on ``lat``, ``lon`` in the map ``ax``, ``(n, 3)``."""
    x, y = ax.transData.transform((lon, lat))
    row, col = int(round(pixels.shape[0] - y)), int(round(x))
    return pixels[row - 3 : row + 4, col - 3 : col + 4].reshape(-1, 3).astype(int)


def test_maps_draw_land_grey_and_a_cell_without_score_hatched(tmp_path):
    """Every map panel, the error and the RMSE map included, draws land in grey and an ocean cell
    without a finite value (no score) hatched, told apart in the legend; a scored cell is neither."""
    lat, lon = np.arange(20.0, 26.0), np.arange(-60.0, -52.0)
    ocean = xr.DataArray(np.ones((lat.size, lon.size), bool), dims=("lat", "lon"), coords={"lat": lat, "lon": lon})
    ocean[0, 0] = False  # land
    values = np.random.default_rng(2).normal(20.0, 1.0, (1, lat.size, lon.size))
    values[:, ~ocean.values] = np.nan
    values[:, 3, 4] = np.nan  # ocean, NaN all along: no score
    coords = {"variable": ["sst"], "lat": lat, "lon": lon}
    truth = xr.DataArray(values, dims=("variable", "lat", "lon"), coords=coords)
    land_grey = np.array([204, 204, 204])  # plots.LAND_COLOR "0.8"
    for fig in (
        plots.forecast_maps(truth, truth + 0.5, tmp_path / "maps.png", title="t", ocean=ocean),
        plots.field_maps(abs(truth - 20), tmp_path / "rmse_map.png", title="t", quantity="RMSE", ocean=ocean),
    ):
        pixels = _pixels(fig)
        maps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert len(maps) in (1, 3)
        for ax in maps:
            land = _cell_block(fig, ax, pixels, lat[0], lon[0])
            assert (land == land_grey).all(), ax.get_title()
            hatched = _cell_block(fig, ax, pixels, lat[3], lon[4])
            grey = (hatched[:, 0] == hatched[:, 1]) & (hatched[:, 1] == hatched[:, 2])
            assert grey.all() and (hatched.max(axis=1) >= 250).any(), ax.get_title()  # white ground
            assert (hatched.max(axis=1) < 170).any(), ax.get_title()  # dark stripes: not land, not a colour
            scored = _cell_block(fig, ax, pixels, lat[4], lon[2])
            assert not (scored == land_grey).all(axis=1).any() and len(np.unique(scored, axis=0)) == 1, ax.get_title()
        legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert legend == ["land", plots.NO_SCORE_LABEL]
    # without a cell lacking a score there is no legend, and without the mask every NaN is land
    plain = plots.field_maps(abs(truth - 20).fillna(1.0).where(ocean), tmp_path / "a.png", title="t", quantity="RMSE")
    assert not plain.legends
    bare = plots.field_maps(abs(truth - 20), tmp_path / "b.png", title="t", quantity="RMSE")
    ax = next(a for a in bare.axes if a.get_label() != "<colorbar>")
    assert (_cell_block(bare, ax, _pixels(bare), lat[3], lon[4]) == land_grey).all()
