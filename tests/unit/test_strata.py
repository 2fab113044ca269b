"""Scores by region and by season: the configuration's checks, the region masks and time groups, and
the stratified scores on cases whose answer is known by construction, streamed batch by batch equal
to the in-memory reference, the headline rows unchanged, MLflow names and compare.csv."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conv2dlstm.config.strata import region_mask_files, stratified_plots
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.evaluation import metrics, scores, strata
from conv2dlstm.steps import compare
from tests.support import reference as _reference
from tests.support.cases import LAT, LON, MASK, batch_slices, cube_shape, forecast_cube

# ---------------------------------------------------------------------------------------------
# the configuration: checked before any job

GRID = {"lat": {"start": 21.0, "stop": 45.0, "step": 1.0}, "lon": {"start": -79.0, "stop": -55.0, "step": 1.0}}


def _regions(regions: dict, **evaluate) -> dict:
    return validate_config({"grid": GRID, "evaluate": {"regions": regions, **evaluate}})


def test_regions_and_seasons_default_to_none() -> None:
    cfg = validate_config({})
    assert cfg["evaluate"]["regions"] == {} and cfg["evaluate"]["by_season"] == "none"
    assert region_mask_files(cfg) == [] and stratified_plots(cfg) == []


def test_valid_regions_and_what_the_workflow_derives() -> None:
    cfg = _regions(
        {
            "south": {"lat": [21.0, 30.0]},
            "gulf_stream": {"lat": [35.0, 42.0], "lon": [-75.0, -60.0]},
            "shelf": {"mask": "masks/shelf.nc"},
            "shelf-again": {"mask": "masks/shelf.nc"},
        },
        by_season="month",
    )
    assert list(cfg["evaluate"]["regions"]) == ["south", "gulf_stream", "shelf", "shelf-again"]
    assert region_mask_files(cfg) == ["masks/shelf.nc"]
    assert stratified_plots(cfg) == ["skill_by_region.png", "skill_by_season.png"]
    assert stratified_plots(_regions({}, by_season="season")) == ["skill_by_season.png"]


@pytest.mark.parametrize(
    ("regions", "fragment"),
    [
        ({"1box": {"lat": [30.0, 35.0]}}, "'1box' is not a region name"),
        ({"a b": {"lat": [30.0, 35.0]}}, "'a b' is not a region name"),
        ({"all": {"lat": [30.0, 35.0]}}, "'all' cannot name a region"),
        ({"NA": {"lat": [30.0, 35.0]}}, "'NA' cannot name a region"),
        ({"r": {}}, "evaluate.regions.r: give either a box"),
        ({"r": {"lat": [30.0, 35.0], "mask": "m.nc"}}, "not both"),
        ({"r": {"lat": [30.0, 95.0]}}, r"evaluate.regions.r.lat: \[30.0, 95.0\] lies outside -90..90"),
        ({"r": {"lat": [35.0, 30.0]}}, "south < north"),
        ({"r": {"lat": [30.0, 30.0]}}, "south < north"),
        ({"r": {"lon": [-60.0, -70.0]}}, "west < east"),
        ({"r": {"lon": [290.0, 300.0]}}, r"lies outside -180..180, the convention of harmonize.lon_convention"),
        ({"r": {"lat": [50.0, 60.0]}}, r"evaluate.regions.r.lat: \[50.0, 60.0\] holds no cell centre of the grid"),
        ({"r": {"lon": [-54.5, -50.0]}}, r"evaluate.regions.r.lon: .* holds no cell centre"),
        ({"r": {"lat": [30.2, 30.8]}}, "holds no cell centre"),  # between two centres
    ],
)
def test_bad_regions_are_refused_naming_the_key(regions, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _regions(regions)


def test_a_region_outside_the_data_region_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"evaluate.regions.r.lat: .* outside the data's region.lat"):
        validate_config(
            {"grid": GRID, "region": {"lat": [20.0, 40.0]}, "evaluate": {"regions": {"r": {"lat": [41.0, 44.0]}}}}
        )


@pytest.mark.parametrize(
    ("evaluate", "fragment"),
    [
        ({"by_season": "weekly"}, "evaluate.by_season: 'weekly' is not one of"),
        ({"regions": {"r": {"lat": [30.0]}}}, "evaluate.regions.r.lat"),
        ({"regions": {"r": {"box": [1, 2]}}}, "unknown key(s) 'box'"),
        ({"regions": {"r": {"mask": ""}}}, "evaluate.regions.r.mask"),
    ],
)
def test_schema_errors_of_the_strata_name_the_key(evaluate, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"evaluate": evaluate})
    assert fragment in str(info.value)


def test_a_0_360_grid_takes_boxes_in_its_convention() -> None:
    cfg = {
        "harmonize": {"lon_convention": "0..360"},
        "grid": {"lon": {"start": 281.0, "stop": 305.0, "step": 1.0}},
        "evaluate": {"regions": {"east": {"lon": [290.0, 300.0]}}},
    }
    assert validate_config(cfg)["evaluate"]["regions"]["east"]["lon"] == [290.0, 300.0]
    cfg["evaluate"]["regions"]["east"]["lon"] = [-70.0, -60.0]
    with pytest.raises(ConfigError, match="outside 0..360"):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------------
# region masks and time groups

WEST = {"lat": None, "lon": [-60.0, -59.0]}  # the two western columns of the 3 x 4 grid: 6 ocean cells
EAST = {"lon": [-58.0, -57.0]}  # the eastern two: 3 ocean cells, 3 land


def test_box_masks_hold_the_cell_centres_inside_inclusive() -> None:
    box = strata.box_mask(LAT, LON, {"lat": [21.0, 22.0], "lon": [-59.0, -58.0]})
    assert box.dims == ("lat", "lon")
    np.testing.assert_array_equal(box.values, [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]])
    masks = strata.region_masks({"west": WEST, "east": EAST}, MASK)
    assert list(masks) == ["west", "east"]
    assert int(masks["west"].sum()) == 6 and int(masks["east"].sum()) == 3
    assert not bool((masks["east"] & ~MASK).any())  # ocean cells only


def test_a_region_without_ocean_stops_naming_it() -> None:
    with pytest.raises(DataError, match=r"evaluate.regions.corner: the box .* holds no ocean cell .*move or enlarge"):
        strata.region_masks({"west": WEST, "corner": {"lat": [20.5, 21.5], "lon": [-58.0, -57.0]}}, MASK)


def _mask_field(values, lat=LAT, lon=LON, name="inside") -> xr.Dataset:
    return xr.Dataset({name: (("lat", "lon"), values)}, coords={"lat": lat, "lon": lon})


def test_mask_files_netcdf_and_zarr(tmp_path: Path) -> None:
    ones = np.zeros((3, 4))
    ones[2, :] = 1.0
    ones[0, 0] = np.nan  # outside
    _mask_field(ones).to_netcdf(tmp_path / "north.nc")
    flags = np.zeros((3, 4), dtype=bool)
    flags[:, 0] = True
    ds = _mask_field(flags, name="mask")
    ds["other"] = ds["mask"].astype("float64")  # a second variable: the one named mask is read
    ds.to_zarr(tmp_path / "west.zarr")
    masks = strata.region_masks(
        {"north": {"mask": str(tmp_path / "north.nc")}, "w": {"mask": tmp_path / "west.zarr"}}, MASK
    )
    np.testing.assert_array_equal(masks["north"].values, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(masks["w"].values, [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        (_mask_field(np.ones((3, 4)), lat=LAT + 0.5), r"its lat coordinate \(3 values 20.5..22.5\) is not the grid's"),
        (_mask_field(np.full((3, 4), 2.0)), r"values \[2.0\] are neither 0 nor 1"),
        (
            xr.Dataset({"a": (("lat", "lon"), np.ones((3, 4))), "b": (("lat", "lon"), np.ones((3, 4)))}),
            "holds the variables",
        ),
        (xr.Dataset({"m": (("y", "x"), np.ones((3, 4)))}), r"dimensions \('y', 'x'\); expected \(lat, lon\)"),
    ],
    ids=["off-grid", "values", "two-variables", "dimensions"],
)
def test_bad_mask_files_name_the_file_and_the_fix(tmp_path: Path, field, fragment) -> None:
    path = tmp_path / "m.nc"
    field.to_netcdf(path)
    with pytest.raises(DataError, match=rf"evaluate.regions.r: mask file {path}.*{fragment}"):
        strata.region_masks({"r": {"mask": str(path)}}, MASK)
    with pytest.raises(DataError, match=r"mask file .*nope.nc does not exist"):
        strata.region_masks({"r": {"mask": str(tmp_path / "nope.nc")}}, MASK)


def test_time_groups_of_the_first_valid_time() -> None:
    days = np.array(["2021-11-30", "2021-12-01", "2022-02-28", "2022-03-01", "2022-06-01", "2022-09-01"], "M8[ns]")
    assert list(strata.time_grouping("season").labels(days)) == ["SON", "DJF", "DJF", "MAM", "JJA", "SON"]
    assert list(strata.time_grouping("month").labels(days)) == ["Nov", "Dec", "Feb", "Mar", "Jun", "Sep"]
    assert strata.time_grouping("season").order == ("DJF", "MAM", "JJA", "SON")
    assert strata.time_grouping("month").order[:2] == ("Dec", "Jan")
    assert strata.time_grouping("none") is None
    cube = forecast_cube(np.zeros(cube_shape(n=3)), start="2021-11-29")  # first valid: Nov 30, Dec 1, Dec 2
    assert list(strata.time_grouping("season").of(cube)) == ["SON", "DJF", "DJF"]
    with pytest.raises(DataError, match="valid_time"):
        strata.time_grouping("season").of(cube.drop_vars("valid_time"))


# ---------------------------------------------------------------------------------------------
# stratified scores: known answers

SEASON_ERROR = {"SON": 1.0, "DJF": 2.0, "MAM": 3.0}
PERSISTENCE_ERROR = 8.0


def _weights_of(*regions: str) -> dict[str, xr.DataArray]:
    masks = strata.region_masks({"west": WEST, "east": EAST}, MASK)
    return {strata.ALL: metrics.area_weights(LAT, MASK), **{r: metrics.area_weights(LAT, masks[r]) for r in regions}}


def _known_case(n: int = 130, start: str = "2021-11-20"):
    """Initial times from 20 Nov: first valid times 21 Nov .. 30 Mar (10 in SON, 90 in DJF, 30 in MAM).
    The model's error is 0 in the west and, in the east, the error of the season of the forecast's first
    valid time at every lead (1 SON, 2 DJF, 3 MAM); persistence is off by 8 everywhere."""
    rng = np.random.default_rng(1)
    shape = cube_shape(n=n, n_lead=2, n_var=1)
    truth = forecast_cube(rng.normal(20, 1, size=shape), start=start).where(MASK)
    first_valid = pd.DatetimeIndex(truth["valid_time"].values[:, 0])
    season = np.array([{12: "DJF", 1: "DJF", 2: "DJF", 3: "MAM", 11: "SON"}[m] for m in first_valid.month])
    per_time = np.array([SEASON_ERROR[s] for s in season])
    east = strata.box_mask(LAT, LON, EAST).values
    model = (truth + per_time[:, None, None, None, None] * east).where(MASK)
    forecasts = {"model": model, "persistence": (truth + PERSISTENCE_ERROR).where(MASK)}
    return forecasts, truth, season


def _stream(forecasts, truth, weights, grouping, sizes) -> scores.StreamingScores:
    streaming = scores.StreamingScores(weights, grouping)
    n = truth.sizes["time"]
    for sl in batch_slices(n, sizes):
        part = truth.isel(time=sl)
        streaming.add({k: v.isel(time=sl) for k, v in forecasts.items()}, part, part - 1.0)
    return streaming


def _value(table: pd.DataFrame, region: str, season: str, metric: str, lead: int = 1, model: str = "m") -> float:
    rows = table[
        (table["model"] == model)
        & (table["region"] == region)
        & (table["season"] == season)
        & (table["metric"] == metric)
        & (table["lead"] == lead)
    ]
    assert len(rows) == 1, (region, season, metric, lead)
    return float(rows["value"].iloc[0])


def test_region_and_season_rmse_known_by_construction() -> None:
    """RMSE 0 in the west and the season's error in the east; the whole grid the area-weighted mix
    ``sqrt(W_east / W)`` of the east's, W the sum of cos(lat) over the ocean cells; the whole period
    the root mean square over the initial times of the seasons' errors."""
    forecasts, truth, season = _known_case()
    streaming = _stream(forecasts, truth, _weights_of("west", "east"), strata.time_grouping("season"), [32] * 5)
    table = scores.metrics_table(streaming.table(), run="r", model_name="m")
    assert list(table.columns) == scores.CSV_COLUMNS
    cos = np.cos(np.deg2rad(LAT))[:, None] * np.ones((1, LON.size))
    east = strata.box_mask(LAT, LON, EAST).values & MASK.values
    share = cos[east].sum() / cos[MASK.values].sum()  # the east's share of the area weights
    whole = math.sqrt(np.mean([SEASON_ERROR[s] ** 2 for s in season]))
    assert {(r, s) for r, s in zip(table["region"], table["season"], strict=True)} == {
        (r, s) for r in ("all", "west", "east") for s in ("all", "DJF", "MAM", "SON")
    }
    for lead in (1, 2):  # the season of the first valid time at every lead: a lead-2 valid day in Dec counts in SON
        for s, error in [("all", whole), *SEASON_ERROR.items()]:
            assert _value(table, "west", s, "rmse", lead) == pytest.approx(0.0, abs=1e-12)
            assert _value(table, "east", s, "rmse", lead) == pytest.approx(error, rel=1e-12)
            assert _value(table, "all", s, "rmse", lead) == pytest.approx(error * math.sqrt(share), rel=1e-12)
            assert _value(table, "east", s, "skill_vs_persistence", lead) == pytest.approx(1 - error / 8, rel=1e-12)
            assert _value(table, "west", s, "skill_vs_persistence", lead) == pytest.approx(1.0)
            assert _value(table, "all", s, "rmse", lead, model="persistence") == pytest.approx(8.0, rel=1e-12)
        for s, error in SEASON_ERROR.items():
            assert _value(table, "all", s, "bias", lead) == pytest.approx(error * share, rel=1e-12)
            # constant errors within a season and region: the interval is the point, significant
            for suffix in ("_lower", "_upper"):
                assert _value(table, "east", s, f"skill_vs_persistence{suffix}", lead) == pytest.approx(1 - error / 8)
            assert _value(table, "east", s, "skill_vs_persistence_significant", lead) == 1.0
    for region in ("all", "west", "east"):
        for s in ("all", *SEASON_ERROR):
            assert _value(table, region, s, "skill_horizon_vs_persistence", lead=0) == 2.0
    # the block bootstrap of a season resamples that season's initial times only: 10 in SON
    block = _value(table, "all", "SON", "skill_vs_persistence_block_length")
    assert 1 <= block <= 5  # at most half the season's 10 initial times


def test_months_group_the_same_case() -> None:
    forecasts, truth, _ = _known_case()
    streaming = _stream(forecasts, truth, _weights_of("east"), strata.time_grouping("month"), [130])
    table = scores.metrics_table(streaming.table(), run="r", model_name="m")
    assert list(dict.fromkeys(table["season"])) == ["all", "Dec", "Jan", "Feb", "Mar", "Nov"]  # calendar order from Dec
    for month, error in {"Nov": 1.0, "Dec": 2.0, "Jan": 2.0, "Feb": 2.0, "Mar": 3.0}.items():
        assert _value(table, "east", month, "rmse", 2) == pytest.approx(error, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# the streamed table equals the in-memory reference; the headline rows do not change


def _random_set(n: int = 40, start: str = "2021-11-10"):
    """Model, persistence and climatology forecasts with land, a missing observation and an undefined
    ACC, over SON and DJF initial times."""
    rng = np.random.default_rng(7)
    shape = cube_shape(n=n, n_lead=3, n_var=2)
    clim = forecast_cube(rng.normal(20, 1, size=shape), variables=("sst", "no3"), n_lead=3, start=start).where(MASK)
    truth = (clim + rng.normal(0, 1, size=shape)).where(MASK)
    truth[4, 0, 0, 0, 0] = np.nan
    model = (truth + rng.normal(0.3, 0.5, size=shape)).where(MASK)
    model[2] = clim[2]
    persistence = (truth + rng.normal(0, 2, size=shape)).where(MASK)
    return {"model": model, "persistence": persistence, "climatology": clim}, truth, clim


@pytest.mark.parametrize("sizes", [[40], [13, 13, 14]], ids=["one", "13-13-14"])
def test_streamed_strata_equal_the_reference(sizes) -> None:
    forecasts, truth, clim = _random_set()
    weights = _weights_of("west", "east")
    grouping = strata.time_grouping("season")
    reference = _reference.score_forecasts(forecasts, truth, clim, weights, grouping=grouping)
    assert set(reference["season"]) == {"all", "SON", "DJF"}
    streaming = scores.StreamingScores(weights, grouping)
    for sl in batch_slices(40, sizes):
        streaming.add({k: v.isel(time=sl) for k, v in forecasts.items()}, truth.isel(time=sl), clim.isel(time=sl))
    pd.testing.assert_frame_equal(streaming.table(), reference, check_exact=False, rtol=1e-12, atol=0)


def test_headline_rows_are_those_without_strata() -> None:
    """The rows of region all and season all are exactly the table of an evaluation without regions
    or seasons (the default configuration), in the same order, first in metrics.csv."""
    forecasts, truth, clim = _random_set()
    plain = scores.StreamingScores(metrics.area_weights(LAT, MASK))
    stratified = scores.StreamingScores(_weights_of("west", "east"), strata.time_grouping("month"))
    for streaming in (plain, stratified):
        for sl in batch_slices(40, [16, 16, 8]):
            streaming.add({k: v.isel(time=sl) for k, v in forecasts.items()}, truth.isel(time=sl), clim.isel(time=sl))
    before = scores.metrics_table(plain.table(), run="r", model_name="m")
    after = scores.metrics_table(stratified.table(), run="r", model_name="m")
    assert set(before["region"]) == set(before["season"]) == {"all"}
    assert len(after) > 3 * len(before)
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)
    pd.testing.assert_frame_equal(scores.headline(after).reset_index(drop=True), before)
    # MLflow: the headline names are those of the default, the strata add their own, no region x season
    names, plain_names = (scores.mlflow_metrics(t, model_name="m") for t in (after, before))
    headline = {k: v for k, v in names.items() if "_region_" not in k and "_season_" not in k}
    assert headline == plain_names
    assert not any("_region_" in k and "_season_" in k for k in names)
    for suffix in ("_region_west", "_region_east", "_season_Nov", "_season_Dec"):
        stratum = {k.removesuffix(suffix) for k in names if k.endswith(suffix)}
        assert stratum and stratum <= set(plain_names), suffix
    assert names["test_rmse_sst_lead1_region_east"] == pytest.approx(_value_of(after, "east", "all"))
    assert "skill_vs_persistence_no3_lead2_season_Dec" in names
    assert "skill_horizon_vs_persistence_sst_region_west" in names
    assert "test_rmse_no3_mean_season_Nov" in names


def _value_of(table: pd.DataFrame, region: str, season: str) -> float:
    rows = table[
        (table["model"] == "m")
        & (table["variable"] == "sst")
        & (table["region"] == region)
        & (table["season"] == season)
        & (table["metric"] == "rmse")
        & (table["lead"] == 1)
    ]
    return float(rows["value"].iloc[0])


def test_older_tables_read_as_headline_rows(tmp_path: Path) -> None:
    legacy = pd.DataFrame(
        {"run": ["r"], "model": ["m"], "variable": ["sst"], "lead": [1], "metric": ["rmse"], "value": [1.5]}
    )
    legacy.to_csv(tmp_path / "metrics.csv", index=False)
    table = scores.read_metrics_csv(tmp_path / "metrics.csv")
    assert list(table.columns) == scores.CSV_COLUMNS
    assert table[["region", "season"]].values.tolist() == [["all", "all"]]
    pd.DataFrame({"run": ["r"], "score": [1.0]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="bad.csv has columns"):
        scores.read_metrics_csv(tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------
# compare.csv


def test_compare_has_a_row_per_stratum_after_the_headline(tmp_path: Path) -> None:
    forecasts, truth, season = _known_case()
    paths = {}
    for label, weights, grouping in (
        ("plain", metrics.area_weights(LAT, MASK), None),
        ("strata", _weights_of("west", "east"), strata.time_grouping("season")),
    ):
        table = scores.metrics_table(
            _stream(forecasts, truth, weights, grouping, [65, 65]).table(), run="a", model_name="m"
        )
        paths[label] = tmp_path / label / "metrics.csv"
        paths[label].parent.mkdir()
        table.to_csv(paths[label], index=False)
        compare.main(metrics=[paths[label]], out_csv=tmp_path / f"{label}.csv", out_plot=tmp_path / f"{label}.png")
    plain, strat = (pd.read_csv(tmp_path / f"{label}.csv", keep_default_na=False) for label in ("plain", "strata"))
    assert list(strat.columns) == compare.SUMMARY_COLUMNS
    assert compare.SUMMARY_COLUMNS[:6] == ["name", "kind", "model", "variable", "region", "season"]
    pd.testing.assert_frame_equal(strat.iloc[: len(plain)], plain)  # the headline rows as without strata
    assert len(strat) == len(plain) * 3 * 4
    rows = strat.set_index(["name", "region", "season"])
    assert float(rows.loc[("a", "east", "DJF"), "rmse_mean"]) == pytest.approx(2.0)
    assert float(rows.loc[("a", "west", "all"), "rmse_mean"]) == pytest.approx(0.0, abs=1e-12)
    assert rows.loc[("a", "east", "MAM"), "better_than_persistence"] == "yes"
    assert int(rows.loc[("a", "east", "MAM"), "rank"]) == 1


# ---------------------------------------------------------------------------------------------
# the workflow: a mask file is an input of evaluate, the figures of the strata its outputs


def test_the_evaluate_rule_reads_the_mask_files_and_writes_the_figures(workflow_copy) -> None:
    from tests.support.workflow import dry_run

    lat, lon = np.arange(21.0, 45.5), np.arange(-79.0, -54.5)
    _mask_field((lat[:, None] > 35) & (lon[None, :] < -70), lat=lat, lon=lon, name="mask").to_netcdf(
        workflow_copy / "shelf.nc"
    )
    (workflow_copy / "strata.yaml").write_text(
        "evaluate:\n  regions:\n    south: {lat: [21.0, 30.0]}\n    shelf: {mask: shelf.nc}\n  by_season: season\n"
    )
    out = dry_run(workflow_copy, workflow_copy / "strata.yaml")
    block = out[out.index("rule evaluate:") :]
    inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
    outputs = next(line for line in block.splitlines() if line.strip().startswith("output:"))
    assert inputs.rstrip().endswith(", shelf.nc"), inputs
    for name in ("skill_by_region.png", "skill_by_season.png"):
        assert f"results/evaluate/convlstm/{name}" in outputs, name
