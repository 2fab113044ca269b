"""Seed ensembles: the probabilistic scores against cases with a known answer, which runs form an
ensemble, the ensemble step on a tiny store with members written by the project's PredictionsWriter,
and the ensemble mean in compare.csv."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats as scipy_stats

from conv2dlstm.artifacts import predictions as predictions_file
from conv2dlstm.artifacts import provenance
from conv2dlstm.config.ensembles import Ensemble, base_name, ensemble, ensembles
from conv2dlstm.config.keys import step_view
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError, DataError
from conv2dlstm.evaluation import ensemble as ens
from conv2dlstm.evaluation import inference, metrics
from conv2dlstm.evaluation.scores import CSV_COLUMNS
from conv2dlstm.steps import compare
from conv2dlstm.steps import ensemble as ensemble_step
from tests.support.cases import LAT, LON, MASK
from tests.support.windows_fixture import make_windows_store

WEIGHTS = metrics.area_weights(LAT, MASK)


def _cube(values: np.ndarray) -> xr.DataArray:
    """``(time, lead, variable=sst, lat, lon)`` on the 3 x 4 grid of tests.support.cases, NaN on land."""
    n, n_lead = values.shape[:2]
    init = pd.date_range("2021-07-01", periods=n, freq="D").values
    valid = init[:, None] + np.arange(1, n_lead + 1)[None, :] * np.timedelta64(1, "D")
    cube = inference.forecast_array(
        values[:, :, None], init_times=init, valid_times=valid, variables=["sst"], lat=LAT, lon=LON
    )
    return cube.where(MASK)


def _members(values: np.ndarray) -> xr.DataArray:
    """``(member, time, lead, variable, lat, lon)`` of ``(member, time, lead, lat, lon)`` values."""
    return xr.concat([_cube(v) for v in values], dim=ens.MEMBER)


def _gaussian_crps(y: np.ndarray, mu: np.ndarray, sigma: float) -> np.ndarray:
    """The CRPS of N(mu, sigma^2) at y in closed form (Gneiting et al. 2005, MWR 133, eq. 5)."""
    z = (y - mu) / sigma
    return sigma * (z * (2 * scipy_stats.norm.cdf(z) - 1) + 2 * scipy_stats.norm.pdf(z) - 1 / math.sqrt(math.pi))


# ---------------------------------------------------------------------------------------------
# (a) the probabilistic scores on cases with a known answer


def test_crps_of_a_one_member_ensemble_is_its_mae():
    rng = np.random.default_rng(0)
    truth = _cube(rng.normal(15.0, 2.0, size=(6, 2, LAT.size, LON.size)))
    forecast = _cube(rng.normal(15.0, 2.0, size=(6, 2, LAT.size, LON.size)))
    crps = ens.crps_per_time(forecast.expand_dims({ens.MEMBER: 1}), truth, WEIGHTS)
    mae = metrics.mae_per_time(forecast, truth, WEIGHTS)
    np.testing.assert_allclose(crps.transpose(*mae.dims).values, mae.values, rtol=1e-12)
    assert np.isfinite(crps.values).all()  # land (NaN) is left out of the area-weighted mean


def test_crps_of_a_gaussian_ensemble_is_the_closed_form():
    """An ensemble of 300 members at the quantiles (i - 1/2) / 300 of N(mu, sigma^2) at every cell (a
    Gaussian ensemble without sampling noise): its CRPS is that of the normal distribution, to 1%."""
    rng = np.random.default_rng(1)
    shape, sigma, m = (3, 1, LAT.size, LON.size), 1.5, 300
    mu = rng.normal(0.0, 2.0, size=shape)
    y = mu + rng.normal(0.0, 2.0, size=shape)  # truths near and far from the centre
    quantiles = scipy_stats.norm.ppf((np.arange(m) + 0.5) / m)
    members = _members(mu[None] + sigma * quantiles.reshape(m, 1, 1, 1, 1))
    expected = metrics.spatial_mean(_cube(_gaussian_crps(y, mu, sigma)), WEIGHTS)
    got = ens.crps_per_time(members, _cube(y), WEIGHTS)
    np.testing.assert_allclose(got.values, expected.transpose(*got.dims).values, rtol=0.01)
    wrong = metrics.spatial_mean(_cube(_gaussian_crps(y, mu, 2 * sigma)), WEIGHTS)
    assert not np.allclose(got.values, wrong.transpose(*got.dims).values, rtol=0.05)


def _synthetic(member_sigma: float, *, m: int = 3, n: int = 300, seed: int = 2) -> tuple[xr.DataArray, xr.DataArray]:
    """Members and truth around a common signal: truth = signal + N(0, 1), each member = signal +
    N(0, member_sigma^2). Calibrated (the truth is one more draw) for member_sigma = 1."""
    rng = np.random.default_rng(seed)
    shape = (n, 2, LAT.size, LON.size)
    signal = rng.normal(0.0, 2.0, size=shape)
    truth = _cube(signal + rng.standard_normal(shape))
    members = _members(signal[None] + member_sigma * rng.standard_normal((m, *shape)))
    return members, truth


def _scored(members: xr.DataArray, truth: xr.DataArray, batches: int = 1) -> ens.EnsembleScores:
    scores = ens.EnsembleScores(WEIGHTS, members.sizes[ens.MEMBER])
    for i, rows in enumerate(np.array_split(np.arange(truth.sizes["time"]), batches)):
        scores.add(members.isel(time=rows), truth.isel(time=rows), seed=i)
    return scores


def test_spread_skill_ratio_is_one_for_a_calibrated_ensemble_and_below_for_an_underdispersed_one():
    members, truth = _synthetic(1.0)
    calibrated = _scored(members, truth, batches=3).time_means()
    np.testing.assert_allclose(calibrated["spread_skill_ratio"].values, 1.0, atol=0.06)
    # without the finite-ensemble factor sqrt((M+1)/M) the ratio of 3 members would be sqrt(3/4)
    raw = calibrated["spread_skill_ratio"] / math.sqrt(4 / 3)
    np.testing.assert_allclose(raw.values, math.sqrt(3 / 4), atol=0.06)
    members, truth = _synthetic(0.3)
    narrow = _scored(members, truth).time_means()
    assert (narrow["spread_skill_ratio"] < 0.5).all()
    np.testing.assert_allclose(narrow["spread"].values, 0.3, rtol=0.1)


def test_streamed_scores_equal_the_scores_of_the_whole_period():
    members, truth = _synthetic(0.7, n=40)
    whole, streamed = _scored(members, truth).time_means(), _scored(members, truth, batches=4).time_means()
    for name in ("crps", "spread", "spread_skill_ratio"):
        np.testing.assert_allclose(streamed[name].values, whole[name].values, rtol=1e-10)
    mean = members.mean(ens.MEMBER)
    expected_rmse = metrics.rmse(mean, truth, WEIGHTS)
    ratio = math.sqrt(4 / 3) * whole["spread"] / expected_rmse.transpose(*whole["spread"].dims)
    np.testing.assert_allclose(whole["spread_skill_ratio"].values, ratio.values, rtol=1e-10)


def test_rank_histogram_is_flat_for_a_calibrated_ensemble_and_u_shaped_for_an_underdispersed_one():
    members, truth = _synthetic(1.0)
    flat = _scored(members, truth, batches=2).rank_histogram()
    assert list(flat.columns) == ens.RANK_COLUMNS
    assert sorted(set(flat["rank"])) == [1, 2, 3, 4]
    n_samples = truth.sizes["time"] * int(MASK.sum())  # every ocean cell and initial time, per lead
    assert (flat.groupby("lead")["count"].sum() == n_samples).all()
    np.testing.assert_allclose(flat["frequency"], 0.25, atol=0.03)
    members, truth = _synthetic(0.3)
    u = _scored(members, truth).rank_histogram().set_index(["lead", "rank"])["frequency"]
    for lead in (1, 2):
        assert u[lead, 1] > 0.35 and u[lead, 4] > 0.35, u
        assert u[lead, 2] < 0.15 and u[lead, 3] < 0.15, u


def test_rank_ties_are_broken_reproducibly():
    truth = _cube(np.zeros((4, 1, LAT.size, LON.size)))
    members = _members(np.zeros((2, 4, 1, LAT.size, LON.size)))  # every member ties with the truth
    first, again = ens.rank_counts(members, truth, seed=5), ens.rank_counts(members, truth, seed=5)
    xr.testing.assert_identical(first, again)
    assert int(first.sum()) == 4 * int(MASK.sum()) and (first > 0).all()  # ties spread over every rank
    state = np.random.get_state()[1].copy()
    ens.rank_counts(members, truth, seed=6)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global generator is left as it was


# ---------------------------------------------------------------------------------------------
# (b) which runs form an ensemble: the configuration alone


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"sweep": {"train.seed": [0, 1, 2, 3]}}, [("ensemble", ("seed0", "seed1", "seed2", "seed3"))]),
        ({"sweep": {"train.learning_rate": [0.001, 0.003]}}, []),
        ({}, []),
        (
            {"sweep": {"model.name": ["convlstm", "unet"], "train.seed": [0, 1]}},
            [
                ("convlstm-ens", ("convlstm-seed0", "convlstm-seed1")),
                ("unet-ens", ("unet-seed0", "unet-seed1")),
            ],
        ),
        (
            {"sweep": {"train.seed": [0, 1], "train.learning_rate": [0.001, 0.003]}},
            [("lr0.001-ens", ("seed0-lr0.001", "seed1-lr0.001")), ("lr0.003-ens", ("seed0-lr0.003", "seed1-lr0.003"))],
        ),
        # explicit runs: a runtime setting (the device) does not separate them; another epoch budget does
        (
            {
                "runs": [
                    {"name": "a", "train": {"seed": 3, "device": "cpu"}},
                    {"name": "b", "train": {"seed": 4}},
                    {"name": "c", "train": {"seed": 5, "epochs": 2}},
                ]
            },
            [("ensemble", ("a", "b"))],
        ),
        ({"runs": [{"name": "a"}, {"name": "b"}]}, []),  # the same seed twice is no ensemble
    ],
)
def test_runs_that_differ_only_in_the_seed_form_an_ensemble(given, expected):
    found = ensembles(validate_config(given))
    assert [(e.name, e.members) for e in found] == expected
    for e in found:
        assert len(set(e.seeds)) == len(e.seeds) >= 2


def test_ensemble_names_are_unique_and_the_unknown_is_named():
    cfg = validate_config(
        {
            "runs": [
                {"name": "ensemble", "train": {"epochs": 3}},  # a run already named like the default
                {"name": "x", "train": {"seed": 1}},
                {"name": "y", "train": {"seed": 2}},
            ]
        }
    )
    assert ensembles(cfg) == [Ensemble("ensemble-2", ("x", "y"), (1, 2))]
    assert base_name(["run-a", "run-b"], [0, 1]) == "run-ens"
    assert base_name(["convlstm-seed3", "convlstm-train.seed4"], [3, 4]) == "convlstm-ens"
    with pytest.raises(ConfigError, match=r"ensemble 'nope' is not formed.*ensemble-2 \(x, y\)"):
        ensemble(cfg, "nope")


# ---------------------------------------------------------------------------------------------
# (c) the step on a tiny store, its members written by the project's PredictionsWriter

MEMBERS = ("seed0", "seed1", "seed2")
MEMBER_SIGMA, MEMBER_BIAS = 0.4, (0.3, -0.1, 0.2)


def _write_member(path: Path, fx, run: str, values: np.ndarray, *, windows_digest: str) -> Path:
    starts = fx.starts["test"]
    init = fx.time.values[starts + fx.input_steps - 1]
    valid = fx.time.values[starts[:, None] + fx.input_steps - 1 + np.arange(1, fx.lead_steps + 1)[None, :]]
    record = provenance.make_record(
        "evaluate", "e" * 16, {"checkpoint": "c" * 16, "windows": windows_digest, "stats": fx.stats_digest}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {"run": run, "model_name": "convlstm", "mlflow_run_id": f"id-{run}", **provenance.to_attrs(record)}
    with predictions_file.PredictionsWriter(
        path,
        init_times=init,
        valid_times=valid,
        variables=["sst"],
        lat=fx.lat,
        lon=fx.lon,
        units={"sst": "degC"},
        attrs=attrs,
    ) as writer:
        writer.write(0, values[:2])  # two writes, as evaluate writes batch by batch
        writer.write(2, values[2:])
    return path


@pytest.fixture(scope="module")
def ensemble_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    fx = make_windows_store(root / "windows.zarr", n_time=60, height=5, width=6, seed=3)
    starts = fx.starts["test"]
    rows = starts[:, None] + fx.input_steps - 1 + np.arange(1, fx.lead_steps + 1)[None, :]
    truth = fx.physical[rows][:, :, :1]  # (N, T_out, 1, H, W) physical, NaN on land
    rng = np.random.default_rng(4)
    values = {
        run: (truth + bias + MEMBER_SIGMA * rng.standard_normal(truth.shape)).astype("float32")
        for run, bias in zip(MEMBERS, MEMBER_BIAS, strict=True)
    }
    paths = {
        run: _write_member(root / "evaluate" / run / "predictions.nc", fx, run, v, windows_digest=fx.windows_digest)
        for run, v in values.items()
    }
    cfg = validate_config(
        {
            "experiment": "ensembles",
            "sweep": {"train.seed": [0, 1, 2]},
            "variables": {"inputs": ["sst"], "targets": ["sst"]},
            "windows": {"input_steps": fx.input_steps, "lead_steps": fx.lead_steps},
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "log_model": False},
            "evaluate": {"batch_size": 3},  # fewer than the test windows: streamed
        }
    )
    return {"root": root, "fx": fx, "truth": truth, "values": values, "paths": paths, "cfg": step_view(cfg, "ensemble")}


def _run_step(inputs, out_dir: Path, paths=None) -> None:
    ensemble_step.main(
        inputs["cfg"],
        name="ensemble",
        predictions=list((paths or inputs["paths"]).values()),
        windows=inputs["fx"].store,
        stats=inputs["fx"].stats,
        out_dir=out_dir,
    )


def test_the_ensemble_step_scores_the_mean_the_members_and_the_spread(ensemble_inputs):
    import mlflow
    import xskillscore as xs

    p, fx = ensemble_inputs, ensemble_inputs["fx"]
    out = p["root"] / "out"
    _run_step(p, out)
    for name in ensemble_step.OUTPUT_FILES:
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == CSV_COLUMNS
    assert set(table["run"]) == {"ensemble"} and set(table["region"]) == set(table["season"]) == {"all"}
    assert set(table["model"]) == {"ensemble", *MEMBERS, "persistence", "climatology", "damped_persistence"} | {
        "training_mean"
    }

    def rows(model: str, metric: str) -> np.ndarray:
        sel = table[(table["model"] == model) & (table["metric"] == metric)].sort_values("lead")
        return sel["value"].to_numpy()

    # the ensemble mean's RMSE, each member's, and the CRPS equal a direct computation on the whole arrays
    mask = xr.DataArray(fx.mask, dims=("lat", "lon"), coords={"lat": fx.lat, "lon": fx.lon})
    weights = metrics.area_weights(fx.lat, mask)
    starts = fx.starts["test"]
    init = fx.time.values[starts + fx.input_steps - 1]
    valid = fx.time.values[starts[:, None] + fx.input_steps - 1 + np.arange(1, fx.lead_steps + 1)[None, :]]

    def cube(v: np.ndarray) -> xr.DataArray:
        return inference.forecast_array(
            v, init_times=init, valid_times=valid, variables=["sst"], lat=fx.lat, lon=fx.lon
        )

    truth = cube(p["truth"])
    members = xr.concat([cube(p["values"][run]) for run in MEMBERS], dim=ens.MEMBER)
    mean = cube(np.mean(np.stack([p["values"][run] for run in MEMBERS]), axis=0))
    np.testing.assert_allclose(rows("ensemble", "rmse"), metrics.rmse(mean, truth, weights).values[:, 0], rtol=1e-5)
    for run in MEMBERS:
        direct = metrics.rmse(cube(p["values"][run]), truth, weights).values[:, 0]
        np.testing.assert_allclose(rows(run, "rmse"), direct, rtol=1e-5)
    with warnings.catch_warnings():  # properscoring on land cells, where no member is finite
        warnings.simplefilter("ignore", RuntimeWarning)
        cells = xs.crps_ensemble(truth, members, member_dim=ens.MEMBER, dim=[])
    crps = metrics.spatial_mean(cells, weights).mean("time")
    np.testing.assert_allclose(rows("ensemble", "crps"), crps.transpose("lead", "variable").values[:, 0], rtol=1e-5)
    # a member's CRPS: xskillscore's of a one-member ensemble; a baseline's: its MAE, as the members'
    for i, run in enumerate(MEMBERS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            one = xs.crps_ensemble(truth, members.isel({ens.MEMBER: [i]}), member_dim=ens.MEMBER, dim=[])
        direct = metrics.spatial_mean(one, weights).mean("time").transpose("lead", "variable").values[:, 0]
        np.testing.assert_allclose(rows(run, "crps"), direct, rtol=1e-5)
    for baseline in ("persistence", "climatology", "damped_persistence", "training_mean"):
        assert len(rows(baseline, "crps")) == fx.lead_steps, baseline
        np.testing.assert_array_equal(rows(baseline, "crps"), rows(baseline, "mae"))
    # E|X - y| - E|X - X'| / 2 at every cell: at most the members' mean absolute error, by their spread
    assert (rows("ensemble", "crps") < np.mean([rows(r, "crps") for r in MEMBERS], axis=0)).all()
    assert (rows("ensemble", "rmse") ** 2 <= np.mean([rows(r, "rmse") ** 2 for r in MEMBERS], axis=0)).all()
    # members scattered around the truth (it is their centre, not one more draw): over-dispersed
    assert (rows("ensemble", "spread_skill_ratio") > 1).all()
    assert len(rows("ensemble", "skill_vs_persistence_lower")) == fx.lead_steps
    hist = pd.read_csv(out / "rank_histogram.csv")
    assert (hist.groupby("lead")["count"].sum() == starts.size * int(fx.mask.sum())).all()

    # its own MLflow run, tagged with the members' runs; a rerun logs into it again without duplicates
    client = mlflow.MlflowClient(p["cfg"]["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("ensembles")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.ensemble = 'ensemble'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["ensemble.members"] == ",".join(MEMBERS)
    assert run.data.tags["ensemble.member.seed1"] == "id-seed1" and run.data.tags["ensemble.seeds"] == "0,1,2"
    assert "train.seed" not in run.data.params and run.data.params["train.epochs"] == "10"
    assert run.data.metrics["test_crps_sst_lead1"] == pytest.approx(rows("ensemble", "crps")[0])
    assert run.data.metrics["seed2_rmse_sst_lead2"] == pytest.approx(rows("seed2", "rmse")[1])
    _run_step(p, out)
    assert (out / ensemble_step.RUN_ID_FILE).read_text().strip() == run.info.run_id
    assert len(client.search_runs([experiment.experiment_id], filter_string="tags.ensemble = 'ensemble'")) == 1
    assert len(client.get_metric_history(run.info.run_id, "test_crps_sst_lead1")) == 1


def test_the_step_refuses_other_members_or_other_windows(ensemble_inputs, tmp_path):
    p, fx = ensemble_inputs, ensemble_inputs["fx"]
    two = {run: path for run, path in p["paths"].items() if run != "seed2"}
    with pytest.raises(
        DataError, match=r"the run\(s\) \['seed0', 'seed1'\].*members are \['seed0', 'seed1', 'seed2'\]"
    ):
        _run_step(p, tmp_path / "out", paths=two)
    stale = _write_member(
        tmp_path / "stale" / "predictions.nc", fx, "seed2", p["values"]["seed2"], windows_digest="f" * 16
    )
    with pytest.raises(
        DataError, match=r"stale/predictions.nc \(ensemble member seed2\).*other inputs.*rerun the evaluate"
    ):
        _run_step(p, tmp_path / "out", paths={**two, "seed2": stale})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# the ensemble mean in compare.csv


def _rows(run: str, model: str, rmse: list[float]) -> list[dict]:
    return [
        {"run": run, "model": model, "variable": "sst", "lead": k, "metric": "rmse", "value": v}
        for k, v in enumerate(rmse, start=1)
    ]


def test_compare_lists_the_ensemble_mean_ranked_with_the_runs(tmp_path):
    files = {}
    for name, rows in {
        "evaluate/a": _rows("a", "convlstm", [1.0, 2.0]) + _rows("a", "persistence", [2.0, 4.0]),
        "evaluate/b": _rows("b", "convlstm", [1.2, 2.2]) + _rows("b", "persistence", [2.0, 4.0]),
        "ensemble/ab": _rows("ab", "ab", [0.9, 1.8])
        + _rows("ab", "persistence", [2.0, 4.0])
        + _rows("ab", "a", [1.0, 2.0])
        + _rows("ab", "b", [1.2, 2.2])
        + [{"run": "ab", "model": "ab", "variable": "sst", "lead": 1, "metric": "crps", "value": 0.5}],
    }.items():
        path = tmp_path / name / "metrics.csv"
        path.parent.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(path, index=False)
        files[name] = path
    out = tmp_path / "compare.csv"
    compare.main(
        metrics=[files["evaluate/a"], files["evaluate/b"]],
        ensembles=[files["ensemble/ab"]],
        out_csv=out,
        out_plot=tmp_path / "compare.png",
    )
    summary = pd.read_csv(out)
    assert list(summary["name"]) == ["a", "b", "ab", "persistence"]  # the members once each, as runs
    row = summary[summary["name"] == "ab"].iloc[0]
    assert row["kind"] == "ensemble" and row["rank"] == 1 and row["rmse_mean"] == pytest.approx(1.35)
    assert list(summary.loc[summary["kind"] == "run", "rank"]) == [2, 3]
