"""The whole pipeline, run by the real Snakemake on the shipped configurations (minutes)."""

from __future__ import annotations

import shutil
import sqlite3
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
import zarr

from conv2dlstm.baselines import BASELINE_NAMES
from tests.conftest import DEFAULT_E2E, run_snakemake

pytestmark = pytest.mark.e2e


def model_beats_baselines(metrics: pd.DataFrame, variable: str, baselines: tuple[str, ...]) -> None:
    rmse = metrics[(metrics.metric == "rmse") & (metrics.variable == variable)]
    table = rmse.pivot_table(index="lead", columns="model", values="value")
    model = [c for c in table.columns if c not in BASELINE_NAMES]
    assert len(model) == 1, table
    for baseline in baselines:
        worse = table[table[model[0]] >= table[baseline]]
        assert worse.empty, f"model does not beat {baseline} at leads {list(worse.index)}:\n{table}"


def test_default_pipeline(local_default_run: Path):
    """The default configuration (4 epochs instead of 10: conftest.DEFAULT_E2E) from synthetic data
    to skill shown against every baseline, logged in MLflow, with nothing left to do on a rerun."""
    wf = local_default_run
    store = wf / "results/windows/oisst.zarr"
    group = zarr.open_group(store, mode="r")
    assert group["data"].ndim == 4
    ds = xr.open_zarr(store)
    assert ds["data"].dims == ("time", "variable", "lat", "lon")
    assert ds.sizes["lat"] == 25 and ds.sizes["lon"] == 25
    for split in ("train", "val", "test"):
        assert ds[f"{split}_start"].size > 0
    # chronological: every training window ends before the first validation input
    t = ds["time"].values
    tr_end = t[ds["train_start"].values.max() + ds.attrs["input_steps"] + ds.attrs["lead_steps"] - 1]
    assert tr_end < t[ds["val_start"].values.min()]

    # stored once: the store is not larger than 1.25x the normalized cube
    stored = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert stored <= 1.25 * ds["data"].nbytes

    assert (wf / "results/train/convlstm/model.pt").is_file()
    metrics = pd.read_csv(wf / "results/evaluate/convlstm/metrics.csv")
    assert list(metrics.columns) == ["run", "model", "variable", "lead", "metric", "value"]
    model_beats_baselines(metrics, "sst", ("persistence", "climatology"))
    compare = pd.read_csv(wf / "results/compare/conv2dlstm-sst.csv")
    assert {"convlstm", *BASELINE_NAMES} <= set(compare.iloc[:, :2].astype(str).values.ravel())
    # the gain is real: the 95% interval of the skill lies above zero at every lead
    run = compare.set_index("name").loc["convlstm"]
    assert run["better_than_persistence"] == "yes" and run["better_than_climatology"] == "yes", run
    assert (wf / "results/evaluate/convlstm/skill_vs_lead.png").is_file()

    # every job logged and the heavy ones benchmarked
    for rule in ("synth", "fetch", "regrid", "normalize", "windows", "compare/conv2dlstm-sst"):
        assert (wf / f"results/logs/{rule}.log").is_file(), rule
    for rule in ("regrid", "normalize", "windows"):
        assert (wf / f"results/benchmarks/{rule}.tsv").is_file(), rule
    assert (wf / "results/logs/train/convlstm.log").is_file()

    # MLflow: one run in the experiment, with params, metrics and the model
    with sqlite3.connect(wf / "mlflow.db") as db:
        runs = db.execute(
            "select r.run_uuid, r.status from runs r join experiments e on r.experiment_id = e.experiment_id"
            " where e.name = 'conv2dlstm-sst'"
        ).fetchall()
        assert len(runs) == 1 and runs[0][1] == "FINISHED"
        keys = {k for (k,) in db.execute("select key from params where run_uuid = ?", (runs[0][0],))}
        assert {"train.epochs", "model.name", "grid.method"} <= keys
        mkeys = {k for (k,) in db.execute("select key from metrics where run_uuid = ?", (runs[0][0],))}
        assert {"train_loss", "val_loss", "test_rmse_sst_lead1"} <= mkeys

    # a rerun has nothing to do
    proc = run_snakemake(wf, "--cores", "2", *DEFAULT_E2E)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_sweep_two_runs_in_mlflow_and_report(local_default_run: Path, tmp_path: Path):
    """Two runs of one config: two jobs each, two MLflow runs with the same keys, one comparison,
    and a Snakemake report with every plot."""
    wf = tmp_path / "wf"
    shutil.copytree(local_default_run, wf, symlinks=True)  # data steps are done: only runs execute
    sweep = wf / "sweep-test.yaml"
    sweep.write_text(
        "experiment: sweep-test\n"
        "runs:\n"
        "  - {name: small, model: {convlstm: {hidden_channels: [4]}}, train: {epochs: 2}}\n"
        "  - {name: notebook, model: {name: conv2d_lstm}, train: {epochs: 2}}\n"
    )
    proc = run_snakemake(wf, "--cores", "2", "--configfile", str(sweep))
    out = proc.stdout + proc.stderr
    for rule in ("synth", "fetch", "regrid", "normalize", "windows"):
        assert f"rule {rule}:" not in out, f"{rule} re-ran"
    compare = pd.read_csv(wf / "results/compare/sweep-test.csv")
    assert {"small", "notebook", *BASELINE_NAMES} == set(compare["name"])
    # the default configuration's summary, in its own experiment, is untouched
    default = wf / "results/compare/conv2dlstm-sst.csv"
    assert default.read_bytes() == (local_default_run / "results/compare/conv2dlstm-sst.csv").read_bytes()

    with sqlite3.connect(wf / "mlflow.db") as db:
        runs = db.execute(
            "select r.run_uuid, r.name from runs r join experiments e on r.experiment_id = e.experiment_id"
            " where e.name = 'sweep-test'"
        ).fetchall()
        assert sorted(name for _, name in runs) == ["notebook", "small"]
        params = [
            dict(db.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
            for run_id, _ in runs
        ]
        metrics = [
            {k for (k,) in db.execute("select distinct key from metrics where run_uuid = ?", (run_id,))}
            for run_id, _ in runs
        ]
    assert params[0].keys() == params[1].keys()  # comparable side by side
    assert {params[0]["model.name"], params[1]["model.name"]} == {"convlstm", "conv2d_lstm"}
    assert metrics[0] == metrics[1] and "test_rmse_sst_lead1" in metrics[0]

    run_snakemake(wf, "--configfile", str(sweep), "--report", "report.zip")
    with zipfile.ZipFile(wf / "report.zip") as report:
        names = report.namelist()
    for plot in ("rmse_vs_lead.png", "acc_vs_lead.png", "skill_vs_lead.png", "maps.png", "rmse_map.png", "compare.png"):
        assert any(n.endswith(plot) for n in names), plot
