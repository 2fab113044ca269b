"""config/zoo.yaml on the tiny configuration: every registered network trains, is scored to a lead
beyond the one it is trained for, and appears in compare.csv with its skill horizon; the results
tables compare them. Beside the zoo, one more ConvLSTM run that differs from the zoo's only in
train.seed forms a seed ensemble with it, which the ensemble rule scores and compare lists."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conv2dlstm.config import networks
from conv2dlstm.config.ensembles import ensembles
from conv2dlstm.config.validate import validate_config
from conv2dlstm.evaluation import results
from conv2dlstm.evaluation.baselines import BASELINE_NAMES
from tests.support.workflow import REPO, run_snakemake

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def zoo(tiny_run: Path, tmp_path_factory) -> tuple[Path, dict]:
    """The zoo's runs and horizon over tiny.yaml, each network at its registry entry's small size, a
    seed ensemble (the zoo's ConvLSTM and a second seed of it), a region, months and event scores, in
    a copy of the tiny run (its data steps are reused: the zoo changes no key of theirs)."""
    wf = tmp_path_factory.mktemp("zoo") / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    zoo_cfg = yaml.safe_load((REPO / "config" / "zoo.yaml").read_text())
    tiny = yaml.safe_load((wf / "tiny.yaml").read_text())
    merged = {**tiny, **{k: v for k, v in zoo_cfg.items() if k != "outdir"}}
    for run in merged["runs"]:  # each network at its small size, which the 5x5 grid takes
        name = run["model"]["name"]
        run["model"][name] = dict(networks.network(name).small)
    (convlstm,) = (run for run in merged["runs"] if run["name"] == "convlstm")
    # the ensemble convlstm-ens: the zoo's run (train.seed 0, the default) and this one
    merged["runs"].append({**convlstm, "name": "convlstm-seed1", "train": {"seed": 1}})
    merged["evaluate"] = {  # scores by region, by month and of events, from the configuration alone
        **merged["evaluate"],
        "regions": {"south": {"lat": [30.0, 32.0]}},
        "by_season": "month",
        "events": {"variables": ["sst"]},
    }
    (wf / "zoo.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    proc = run_snakemake(wf, "--cores", "2", "--configfile", "zoo.yaml")
    assert "rule regrid:" not in proc.stdout + proc.stderr
    return wf, validate_config(merged)


def test_every_network_trains_and_is_scored_past_its_trained_leads(zoo) -> None:
    wf, cfg = zoo
    models = {run["name"]: run.get("model", {}).get("name", cfg["model"]["name"]) for run in cfg["runs"]}
    assert set(models.values()) == set(networks.NETWORKS), "zoo.yaml must list every network"
    max_lead, trained = cfg["evaluate"]["max_lead"], cfg["windows"]["lead_steps"]
    assert max_lead > trained
    compare = pd.read_csv(wf / "results" / "compare" / f"{cfg['experiment']}.csv")
    for run in cfg["runs"]:
        metrics = pd.read_csv(wf / "results" / "evaluate" / run["name"] / "metrics.csv")
        metrics = metrics[(metrics["region"] == "all") & (metrics["season"] == "all")]  # the headline rows
        rmse = metrics[(metrics["model"] == models[run["name"]]) & (metrics["metric"] == "rmse")]
        assert sorted(rmse["lead"]) == list(range(1, max_lead + 1)), run["name"]
        assert rmse["value"].notna().all(), run["name"]
        rows = compare[compare["name"] == run["name"]]
        assert not rows.empty, run["name"]
        horizon = rows["skill_horizon_vs_persistence"].iloc[0]
        assert 0 <= horizon <= max_lead, (run["name"], horizon)


def test_the_tables_compare_the_networks(zoo, monkeypatch) -> None:
    wf, cfg = zoo
    monkeypatch.chdir(wf)
    table = results.markdown_tables(cfg, results.load(cfg))
    header = next(line for line in table.splitlines() if line.startswith("| sst"))
    assert "RMSE lead 10" in header and "skill horizon vs damped persistence" in header
    for run in cfg["runs"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| **{run['name']}"))
        n_params = int(row.rstrip(" |").rsplit("|", 1)[1].replace(",", ""))
        assert n_params > 0, run["name"]
    for baseline in ("persistence", "climatology", "damped persistence"):
        assert any(line.startswith(f"| {baseline} |") for line in table.splitlines()), baseline


def test_forecast_past_the_trained_leads_equals_evaluate_bit_for_bit(zoo, tmp_path, monkeypatch) -> None:
    """The forecast step rolls the network out as evaluate does: a test day's forecast to lead
    evaluate.max_lead equals that day's row of predictions.nc exactly."""
    import numpy as np
    import xarray as xr

    from conv2dlstm import cli
    from conv2dlstm.artifacts import predictions as predictions_file

    wf, cfg = zoo
    monkeypatch.chdir(wf)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for run in ("unet", "convlstm"):  # all leads at once; a recurrent forecaster
        with predictions_file.open(wf / "results" / "evaluate" / run / "predictions.nc") as ds:
            init = pd.Timestamp(ds["time"].values[ds.sizes["time"] // 2])
            expected = ds["sst"].sel(time=init).values  # (lead, lat, lon)
        out = tmp_path / run
        code = cli.main(
            [
                "forecast",
                "--config",
                "zoo.yaml",
                "--stats",
                "results/normalize/oisst.nc",
                "--checkpoint",
                f"results/train/{run}/model.pt",
                "--init-date",
                f"{init:%Y-%m-%d}",
                "--out-nc",
                str(out / "f.nc"),
                "--out-zarr",
                str(out / "f.zarr"),
            ]
        )
        assert code == 0
        with xr.open_dataset(out / "f.nc") as ds:
            assert ds.sizes["prediction_timedelta"] == cfg["evaluate"]["max_lead"] == expected.shape[0]
            np.testing.assert_array_equal(ds["sst"].values[0], expected)


def test_a_seed_ensemble_is_scored_against_its_members_and_the_baselines(zoo) -> None:
    """The two runs that differ only in train.seed form the ensemble convlstm-ens: the ensemble rule writes its
    scores (the baselines exactly as the members' evaluation scored them), compare lists its mean, and
    its own MLflow run names the members' runs."""
    import mlflow

    wf, cfg = zoo
    (spec,) = ensembles(cfg)
    assert (spec.name, spec.members) == ("convlstm-ens", ("convlstm", "convlstm-seed1"))
    out = wf / "results" / "ensemble" / spec.name
    assert (out / "rank_histogram.png").stat().st_size > 0
    table = pd.read_csv(out / "metrics.csv")
    max_lead = cfg["evaluate"]["max_lead"]
    for metric in ("rmse", "crps", "spread", "spread_skill_ratio"):
        rows = table[(table["model"] == spec.name) & (table["metric"] == metric)]
        assert sorted(rows["lead"]) == list(range(1, max_lead + 1)), metric
        assert (rows["value"] > 0).all(), metric
    keys = ["model", "variable", "region", "season", "lead", "metric"]
    baseline_rows = table[table["model"].isin(BASELINE_NAMES)]
    # a baseline's CRPS, beside the ensemble's, is its MAE (the evaluate step has no crps row)
    crps, mae = (baseline_rows[baseline_rows["metric"] == m].set_index(keys[:-1])["value"] for m in ("crps", "mae"))
    assert len(crps) == len(BASELINE_NAMES) * max_lead and crps.sort_index().equals(mae.sort_index())
    ours = baseline_rows[baseline_rows["metric"] != "crps"].set_index(keys)["value"].sort_index()
    rmse = {}
    for member in spec.members:
        theirs = pd.read_csv(wf / "results" / "evaluate" / member / "metrics.csv").set_index(keys)["value"]
        pd.testing.assert_series_equal(ours, theirs.reindex(ours.index), check_exact=False, rtol=1e-6)
        rmse[member] = table[(table["model"] == member) & (table["metric"] == "rmse")].sort_values("lead")["value"]
        own = theirs.xs(("convlstm", "rmse", "all", "all"), level=["model", "metric", "region", "season"])
        assert rmse[member].to_numpy() == pytest.approx(own.sort_index().to_numpy(), rel=1e-5), member
    mean_rmse = table[(table["model"] == spec.name) & (table["metric"] == "rmse")].sort_values("lead")["value"]
    member_mse = sum(r.to_numpy() ** 2 for r in rmse.values()) / len(rmse)
    assert (mean_rmse.to_numpy() ** 2 <= member_mse * (1 + 1e-6)).all()  # the mean's error: at most the members'
    hist = pd.read_csv(out / "rank_histogram.csv")
    assert sorted(set(hist["rank"])) == [1, 2, 3] and hist.groupby("lead")["frequency"].sum().round(9).eq(1).all()

    compare = pd.read_csv(wf / "results" / "compare" / f"{cfg['experiment']}.csv")
    row = compare[compare["name"] == spec.name]
    assert list(row["kind"]) == ["ensemble"] and row["rmse_mean"].iloc[0] == pytest.approx(mean_rmse.mean())

    client = mlflow.MlflowClient(f"sqlite:///{wf / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg["experiment"])
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.ensemble = '{spec.name}'")
    for member in spec.members:
        run_id = (wf / "results" / "train" / member / "mlflow_run_id.txt").read_text().strip()
        assert run.data.tags[f"ensemble.member.{member}"] == run_id
    assert run.data.metrics["test_crps_sst_lead1"] == pytest.approx(
        table[(table["model"] == spec.name) & (table["metric"] == "crps") & (table["lead"] == 1)]["value"].iloc[0]
    )


def test_every_run_is_scored_by_region_month_and_event_and_animated_into_mlflow(zoo) -> None:
    """evaluate.regions, by_season and events on every network's run: the region's and each month's
    rows at every lead beside the headline rows (which stay first), the event rows flagged not
    meaningful (tiny.yaml trains on 3.5 months, the day-of-year percentile needs 2 years), the
    stratified plots, and the animation in the run's MLflow artifacts."""
    import mlflow

    wf, cfg = zoo
    client = mlflow.MlflowClient(f"sqlite:///{wf / 'mlflow.db'}")
    max_lead = cfg["evaluate"]["max_lead"]
    for run in cfg["runs"]:
        out = wf / "results" / "evaluate" / run["name"]
        metrics = pd.read_csv(out / "metrics.csv")
        assert (metrics.iloc[0][["region", "season"]] == ["all", "all"]).all(), run["name"]
        assert set(metrics["region"]) == {"all", "south"}, run["name"]
        months = set(metrics["season"]) - {"all"}
        assert months and months <= {"May", "Jun", "Jul"}, (run["name"], months)
        rmse = metrics[(metrics["metric"] == "rmse") & (metrics["region"] == "south") & (metrics["season"] == "all")]
        for model in rmse["model"].unique():
            leads = rmse[rmse["model"] == model]
            assert sorted(leads["lead"]) == list(range(1, max_lead + 1)) and leads["value"].notna().all(), model
        flags = metrics[metrics["metric"] == "event_meaningful"]
        assert not flags.empty and (flags["value"] == 0).all(), run["name"]
        assert metrics[metrics["metric"] == "event_sedi"]["value"].isna().all(), run["name"]
        for plot in ("skill_by_region.png", "skill_by_season.png", "animation.gif"):
            assert (out / plot).stat().st_size > 0, (run["name"], plot)
        run_id = (wf / "results" / "train" / run["name"] / "mlflow_run_id.txt").read_text().strip()
        logged = {a.path for a in client.list_artifacts(run_id, "evaluate")}
        assert {"evaluate/animation.gif", "evaluate/skill_by_region.png"} <= logged, (run["name"], logged)
