"""Compare step: summary rows per run and baseline, hand-checked scores, one plot."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conv2dlstm.errors import DataError
from conv2dlstm.evaluation.baselines import BASELINE_NAMES
from conv2dlstm.evaluation.scores import CSV_COLUMNS
from conv2dlstm.steps import compare

PERSISTENCE_RMSE = [2.0, 4.0]
CLIMATOLOGY_RMSE = [4.0, 4.0]


def _rows(run: str, model: str, scores: dict[str, list[float]], variable: str = "sst") -> list[dict]:
    return [
        {"run": run, "model": model, "variable": variable, "lead": lead, "metric": metric, "value": value}
        for metric, values in scores.items()
        for lead, value in enumerate(values, start=1)
    ]


def _metrics_csv(
    path: Path, run: str, model: str, rmse: list[float], acc: list[float], persistence_rmse=PERSISTENCE_RMSE
) -> Path:
    rows = _rows(
        run,
        model,
        {
            "rmse": rmse,
            "mae": [0.8 * v for v in rmse],
            "bias": [0.1, -0.1],
            "acc": acc,
            "skill_vs_persistence": [1 - m / p for m, p in zip(rmse, persistence_rmse, strict=True)],
            "skill_vs_climatology": [1 - m / c for m, c in zip(rmse, CLIMATOLOGY_RMSE, strict=True)],
        },
    )
    rows += _rows(
        run, "persistence", {"rmse": persistence_rmse, "mae": [1.5, 3.0], "bias": [0.0, 0.0], "acc": [0.9, 0.7]}
    )
    rows += _rows(run, "climatology", {"rmse": CLIMATOLOGY_RMSE, "mae": [3.0, 3.0], "bias": [0.2, 0.2]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)
    return path


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    return [
        _metrics_csv(tmp_path / "evaluate" / "a" / "metrics.csv", "a", "convlstm", rmse=[1.0, 2.0], acc=[0.95, 0.8]),
        _metrics_csv(tmp_path / "evaluate" / "b" / "metrics.csv", "b", "conv2d_lstm", rmse=[0.5, 1.5], acc=[0.97, 0.9]),
    ]


def test_compare_two_runs_two_baselines(two_runs, tmp_path):
    out_csv, out_plot = tmp_path / "compare.csv", tmp_path / "compare.png"
    compare.main(metrics=two_runs, out_csv=out_csv, out_plot=out_plot)
    table = pd.read_csv(out_csv)
    assert list(table.columns) == compare.SUMMARY_COLUMNS
    assert list(table["name"]) == ["b", "a", "persistence", "climatology"]  # runs by rank: b has the lower RMSE
    assert list(table["rank"].astype("Int64").astype(object).where(table["rank"].notna(), None)) == [1, 2, None, None]
    assert list(table["kind"]) == ["run", "run", "baseline", "baseline"]
    assert list(table["model"]) == ["conv2d_lstm", "convlstm", "persistence", "climatology"]
    row = table.set_index("name")
    assert row.loc["a", "leads"] == 2
    assert row.loc["a", "rmse_mean"] == pytest.approx(1.5)
    assert row.loc["a", "rmse_lead1"] == pytest.approx(1.0)
    assert row.loc["a", "rmse_last_lead"] == pytest.approx(2.0)
    assert row.loc["a", "mae_mean"] == pytest.approx(1.2)
    assert row.loc["a", "bias_mean"] == pytest.approx(0.0)
    assert row.loc["a", "acc_mean"] == pytest.approx(0.875)
    assert row.loc["a", "skill_vs_persistence_mean"] == pytest.approx(((1 - 1 / 2) + (1 - 2 / 4)) / 2)
    assert row.loc["a", "skill_vs_climatology_mean"] == pytest.approx(((1 - 1 / 4) + (1 - 2 / 4)) / 2)
    assert row.loc["b", "rmse_mean"] == pytest.approx(1.0)
    assert row.loc["b", "skill_vs_persistence_mean"] == pytest.approx(((1 - 0.5 / 2) + (1 - 1.5 / 4)) / 2)
    assert row.loc["persistence", "rmse_mean"] == pytest.approx(3.0)
    assert row.loc["persistence", "skill_vs_persistence_mean"] == pytest.approx(0.0)
    assert row.loc["persistence", "skill_vs_climatology_mean"] == pytest.approx(((1 - 2 / 4) + (1 - 4 / 4)) / 2)
    assert row.loc["climatology", "skill_vs_climatology_mean"] == pytest.approx(0.0)
    assert np.isnan(row.loc["climatology", "acc_mean"])
    assert out_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*partial"))


def test_compare_one_row_per_variable(tmp_path):
    rows = []
    for variable in ("sst", "no3"):
        rows += _rows("a", "convlstm", {"rmse": [1.0, 2.0]}, variable)
        rows += _rows("a", "persistence", {"rmse": [2.0, 2.0]}, variable)
        rows += _rows("a", "climatology", {"rmse": [4.0, 4.0]}, variable)
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    table = pd.read_csv(tmp_path / "c.csv")
    assert len(table) == 3 * 2
    assert set(zip(table["name"], table["variable"], strict=True)) == {
        (n, v) for n in ("a", "persistence", "climatology") for v in ("sst", "no3")
    }


def test_differing_baselines_warn_and_keep_the_first(tmp_path):
    paths = [
        _metrics_csv(tmp_path / "a.csv", "a", "convlstm", rmse=[1.0, 2.0], acc=[0.9, 0.8]),
        _metrics_csv(tmp_path / "b.csv", "b", "convlstm", rmse=[1.0, 2.0], acc=[0.9, 0.8], persistence_rmse=[3.0, 5.0]),
    ]
    with pytest.warns(UserWarning, match="baseline scores differ"):
        compare.main(metrics=paths, out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    table = pd.read_csv(tmp_path / "c.csv").set_index("name")
    assert table.loc["persistence", "rmse_mean"] == pytest.approx(3.0)


def test_identical_baselines_do_not_warn(two_runs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = compare.entries(compare.read_metrics(two_runs))
    assert (rows["name"] == "persistence").sum() == 4 * 2  # rmse, mae, bias, acc x 2 leads, once


@pytest.mark.parametrize(
    "problem",
    ["missing", "columns", "duplicate", "empty"],
)
def test_bad_inputs_raise_and_write_nothing(problem, two_runs, tmp_path):
    paths = list(two_runs)
    if problem == "missing":
        paths.append(tmp_path / "nope" / "metrics.csv")
        match = "does not exist"
    elif problem == "columns":
        bad = tmp_path / "bad.csv"
        pd.DataFrame({"run": ["x"], "score": [1.0]}).to_csv(bad, index=False)
        paths.append(bad)
        match = "columns"
    elif problem == "duplicate":
        paths.append(paths[0])
        match = "more than one"
    else:
        paths = []
        match = "no metrics.csv"
    out_csv, out_plot = tmp_path / "out" / "compare.csv", tmp_path / "out" / "compare.png"
    with pytest.raises(DataError, match=match):
        compare.main(metrics=paths, out_csv=out_csv, out_plot=out_plot)
    assert not out_csv.exists() and not out_plot.exists()


def test_run_skill_is_the_mean_of_its_metrics_csv_rows(tmp_path):
    # skill rows that are not 1 - RMSE / RMSE(baseline) of this file: the summary must average the
    # rows evaluate wrote, not recompute them
    rows = _rows("a", "convlstm", {"rmse": [1.0, 2.0], "skill_vs_persistence": [0.1, 0.3]})
    rows += _rows("a", "persistence", {"rmse": [2.0, 4.0]})
    rows += _rows("a", "climatology", {"rmse": [4.0, 4.0]})
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    table = pd.read_csv(tmp_path / "c.csv").set_index("name")
    assert table.loc["a", "skill_vs_persistence_mean"] == pytest.approx(0.2)
    assert np.isnan(table.loc["a", "skill_vs_climatology_mean"])  # no such rows in the file
    # baselines have no skill rows in metrics.csv: derived from their RMSE rows
    assert table.loc["persistence", "skill_vs_climatology_mean"] == pytest.approx(((1 - 2 / 4) + (1 - 4 / 4)) / 2)
    assert table.loc["climatology", "skill_vs_climatology_mean"] == pytest.approx(0.0)


def test_compare_discards_partials_of_a_killed_attempt(two_runs, tmp_path, caplog):
    import logging

    out_csv, out_plot = tmp_path / "compare.csv", tmp_path / "compare.png"
    (tmp_path / ".compare.csv.1234abcd.partial").write_text("half a table")
    (tmp_path / ".compare.png.deadbeef.partial").write_bytes(b"half a plot")
    with caplog.at_level(logging.INFO, logger="conv2dlstm"):
        compare.main(metrics=two_runs, out_csv=out_csv, out_plot=out_plot)
    assert not list(tmp_path.glob(".*.partial"))
    assert caplog.text.count("discarded") == 2


def _interval_rows(run: str, model: str, baseline: str, skill, lower, upper, meaningful=(1.0, 1.0)) -> list[dict]:
    prefix = f"skill_vs_{baseline}"
    significant = [float(lo > 0 or up < 0) for lo, up in zip(lower, upper, strict=True)]
    return _rows(
        run,
        model,
        {
            prefix: skill,
            f"{prefix}_lower": lower,
            f"{prefix}_upper": upper,
            f"{prefix}_significant": significant,
            f"{prefix}_meaningful": list(meaningful),
            f"{prefix}_block_length": [1.0, 1.0],
        },
    )


def test_better_only_where_the_interval_excludes_zero(tmp_path):
    """A run better than persistence at lead 1 only (interval above 0), indistinguishable from damped
    persistence (interval across 0), and against an unsupported climatology (not meaningful)."""
    rows = _rows("a", "convlstm", {"rmse": [1.0, 2.0]})
    rows += _interval_rows("a", "convlstm", "persistence", [0.5, 0.1], [0.3, -0.05], [0.7, 0.2])
    rows += _interval_rows("a", "convlstm", "damped_persistence", [0.05, 0.02], [-0.1, -0.1], [0.2, 0.1])
    rows += _interval_rows(
        "a", "convlstm", "climatology", [np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan], meaningful=(0.0, 0.0)
    )
    rows += _rows("a", "persistence", {"rmse": [2.0, 2.2]})
    rows += _interval_rows(
        "a", "persistence", "climatology", [np.nan, 0.4], [np.nan, 0.3], [np.nan, 0.5], meaningful=(0.0, 1.0)
    )
    rows += _rows("a", "climatology", {"rmse": [4.0, 4.0]})
    rows += _rows("a", "damped_persistence", {"rmse": [1.05, 2.05]})
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    table = pd.read_csv(tmp_path / "c.csv", dtype={"better_leads_vs_persistence": str}).set_index("name")
    assert list(table.index) == ["a", "persistence", "climatology", "damped_persistence"]
    run = table.loc["a"]
    assert run["better_than_persistence"] == "partly" and run["better_leads_vs_persistence"] == "1"
    assert run["skill_vs_persistence_mean"] == pytest.approx(0.3)
    assert run["better_than_damped_persistence"] == "no" and pd.isna(run["better_leads_vs_damped_persistence"])
    assert run["better_than_climatology"] == "not meaningful" and np.isnan(run["skill_vs_climatology_mean"])
    assert table.loc["persistence", "better_than_climatology"] == "not meaningful"
    assert np.isnan(table.loc["persistence", "skill_vs_climatology_mean"])  # not derived from the RMSE rows
    assert table.loc["persistence", "skill_vs_persistence_mean"] == pytest.approx(0.0)  # derived: no rows
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _predictions_beside(metrics_csv: Path, step: np.timedelta64, n_lead: int = 2) -> None:
    """The ``predictions.nc`` the evaluate step writes beside ``metrics.csv``, with leads ``step`` apart."""
    from conv2dlstm.artifacts import predictions as predictions_file

    init = np.datetime64("2021-07-01T00") + np.arange(3) * step
    with predictions_file.PredictionsWriter(
        metrics_csv.parent / predictions_file.FILENAME,
        init_times=init,
        valid_times=init[:, None] + np.arange(1, n_lead + 1)[None, :] * step,
        variables=["sst"],
        lat=np.array([20.0, 21.0]),
        lon=np.array([-60.0, -59.0]),
        units={"sst": "degC"},
    ):
        pass


def test_units_come_from_the_configuration():
    from conv2dlstm.config.validate import validate_config

    units = compare.units_of(validate_config({"harmonize": {"units": {"chl_a": {"unit": "mg m-3"}}}}))
    assert units["sst"] == "degC" and units["chl_a"] == "mg m-3"
    assert compare.units_of(None) == {}


def test_lead_step_is_read_beside_each_metrics_csv(two_runs):
    assert compare.lead_step_of(two_runs) is None  # no predictions.nc: unknown
    for path in two_runs:
        _predictions_beside(path, np.timedelta64(6, "h"))
    assert compare.lead_step_of(two_runs) == pd.Timedelta(hours=6)
    _predictions_beside(two_runs[1], np.timedelta64(1, "D"))
    assert compare.lead_step_of(two_runs) is None  # the runs disagree


def test_compare_plot_names_the_rmse_unit_and_the_lead_in_days(two_runs, tmp_path, monkeypatch):
    from conv2dlstm.config.validate import validate_config
    from conv2dlstm.evaluation import plots

    figures = []
    draw = plots.compare_figure
    monkeypatch.setattr(plots, "compare_figure", lambda *a, **k: figures.append(draw(*a, **k)))
    for path in two_runs:
        _predictions_beside(path, np.timedelta64(1, "D"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = validate_config({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    compare.main(metrics=two_runs, out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png", cfg=cfg)
    compare.main(metrics=two_runs, out_csv=tmp_path / "d.csv", out_plot=tmp_path / "d.png")  # no configuration
    (with_cfg, without) = [{ax.get_title(): ax for ax in fig.axes} for fig in figures]
    assert with_cfg["sst"].get_ylabel() == "area-weighted RMSE [degC]"
    assert without["sst"].get_ylabel() == "area-weighted RMSE (physical units)"
    assert {ax.get_xlabel() for ax in with_cfg.values()} == {"lead (days)"}


def _lead_rows(run: str, model: str, baseline: str, lower: list[float], meaningful: list[float] | None = None) -> list:
    """Interval rows of ``len(lower)`` leads (skill 0.1 above ``lower``, upper 0.1 above the skill)."""
    prefix = f"skill_vs_{baseline}"
    meaningful = meaningful or [1.0] * len(lower)
    return _rows(
        run,
        model,
        {
            prefix: [lo + 0.1 for lo in lower],
            f"{prefix}_lower": lower,
            f"{prefix}_upper": [lo + 0.2 for lo in lower],
            f"{prefix}_significant": [float(lo > 0 or lo + 0.2 < 0) for lo in lower],
            f"{prefix}_meaningful": meaningful,
            f"{prefix}_block_length": [1.0] * len(lower),
        },
    )


def test_skill_horizon_column_from_the_interval_rows(tmp_path):
    """A metrics.csv without ``skill_horizon_vs_<b>`` rows (written before they existed): the horizon is
    the last lead up to which the interval's lower bound stays above zero, per entry and variable."""
    rows = []
    for variable, lower in (("sst", [0.3, 0.1, -0.05, 0.2]), ("no3", [0.3, 0.2, 0.1, 0.05])):
        rows += _rows("a", "convlstm", {"rmse": [1.0, 2.0, 3.0, 4.0]}, variable)
        rows += [{**r, "variable": variable} for r in _lead_rows("a", "convlstm", "persistence", lower)]
        rows += [
            {**r, "variable": variable}
            for r in _lead_rows("a", "convlstm", "climatology", [np.nan, 0.3, 0.3, 0.3], [0.0, 1.0, 1.0, 1.0])
        ]
        rows += [{**r, "variable": variable} for r in _lead_rows("a", "convlstm", "damped_persistence", [0.1] * 4)]
        rows += _rows("a", "persistence", {"rmse": [2.0, 3.0, 4.0, 5.0]}, variable)
        rows += [{**r, "variable": variable} for r in _lead_rows("a", "persistence", "climatology", [-0.1] * 4)]
        rows += _rows("a", "climatology", {"rmse": [4.0] * 4}, variable)
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    table = pd.read_csv(tmp_path / "c.csv").set_index(["name", "variable"])
    assert table.loc[("a", "sst"), "skill_horizon_vs_persistence"] == 2  # lead 4 above zero does not extend it
    assert table.loc[("a", "no3"), "skill_horizon_vs_persistence"] == 4  # every lead
    assert table.loc[("a", "sst"), "skill_horizon_vs_climatology"] == 0  # lead 1 not meaningful
    assert table.loc[("a", "sst"), "skill_horizon_vs_damped_persistence"] == 4
    assert table.loc[("persistence", "sst"), "skill_horizon_vs_climatology"] == 0  # lead 1 fails
    assert np.isnan(table.loc[("persistence", "sst"), "skill_horizon_vs_persistence"])  # against itself
    assert np.isnan(table.loc[("climatology", "sst"), "skill_horizon_vs_persistence"])  # no interval rows
    # written as integers, empty without an interval
    header, *lines = (tmp_path / "c.csv").read_text().splitlines()
    column = header.split(",").index("skill_horizon_vs_persistence")
    assert sorted(line.split(",")[column] for line in lines) == ["", "", "", "", "2", "4"]


def test_skill_horizon_column_without_intervals_is_empty(tmp_path):
    rows = _rows("a", "convlstm", {"rmse": [1.0, 2.0], "skill_vs_persistence": [0.1, 0.3]})  # no interval
    rows += _rows("a", "persistence", {"rmse": [2.0, 4.0]})
    path = tmp_path / "metrics.csv"
    pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    table = pd.read_csv(tmp_path / "c.csv").set_index("name")
    assert table[[f"skill_horizon_vs_{b}" for b in BASELINE_NAMES]].isna().all().all()


def test_skill_horizon_column_is_the_metrics_csv_row(tmp_path, scored):
    """The evaluate step's table (with its ``skill_horizon_vs_<b>`` rows, lead 0) read back: the column
    is that row, and the lead-0 rows change no other column."""
    from conv2dlstm.evaluation import scores

    table = scores.metrics_table(scored, run="exp1", model_name="convlstm")
    path = tmp_path / "metrics.csv"
    table.to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    summary = pd.read_csv(tmp_path / "c.csv").set_index(["name", "variable"])
    stored = table[table["metric"].str.startswith(scores.HORIZON_PREFIX)]
    assert len(stored) == 8
    for row in stored.itertuples():
        name = "exp1" if row.model == "convlstm" else row.model
        assert summary.loc[(name, row.variable), row.metric] == row.value
    assert summary.loc[("exp1", "sst"), "skill_horizon_vs_persistence"] == 2
    assert summary.loc[("climatology", "sst"), "skill_horizon_vs_persistence"] == 0
    assert summary.loc[("exp1", "sst"), "leads"] == 2  # the lead-0 rows are not a lead
    assert summary.loc[("exp1", "sst"), "skill_vs_persistence_mean"] == pytest.approx(0.5)
    assert summary.loc[("exp1", "sst"), "better_leads_vs_persistence"] == "1 2"
    # tampering with the stored row shows that it is the one read
    table.loc[(table["model"] == "convlstm") & (table["metric"] == "skill_horizon_vs_persistence"), "value"] = 1.0
    table.to_csv(path, index=False)
    compare.main(metrics=[path], out_csv=tmp_path / "c.csv", out_plot=tmp_path / "c.png")
    assert (
        pd.read_csv(tmp_path / "c.csv")
        .set_index(["name", "variable"])
        .loc[("exp1", "sst"), "skill_horizon_vs_persistence"]
        == 1
    )
