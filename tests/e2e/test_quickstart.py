"""The whole default pipeline as the README's Quick start runs it (``make run`` and the commands after
it, each as written), by the real make and Snakemake (minutes)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr
import yaml
import zarr

from conv2dlstm.evaluation.baselines import BASELINE_NAMES
from tests.support.mlflow_server import free_port
from tests.support.workflow import REPO, job_env, run_make, run_snakemake

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
    """The default configuration (``make run``) from synthetic data to skill shown against every
    baseline, logged in MLflow, with nothing left to do on a rerun."""
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
    assert list(metrics.columns) == ["run", "model", "variable", "region", "season", "lead", "metric", "value"]
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
    proc = run_snakemake(wf, "--cores", "2")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _quick_start_commands() -> list[str]:
    """The commands of the README's Quick start code blocks, as written (comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def _try_yaml() -> str:
    """The README's example of trying a setting on its own (the Quick start's YAML block)."""
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    return block


COVERED_ELSEWHERE = {
    "make test": "this suite",
    "make run-seed": "tests/e2e/test_seed.py runs the seed configuration (25 of its 60 epochs)",
    "make run-zoo": "tests/e2e/test_zoo.py runs config/zoo.yaml's networks and horizon on the tiny configuration",
}
"""Quick start commands the walkthrough does not run, and where they are tested instead."""


def test_quick_start_walkthrough(local_default_run: Path, tmp_path: Path):
    """Every command of the README's Quick start, as written, in a fresh copy after ``make run``:
    the summary names the results, the README's table is what this run produced, the UI address
    is printed and served on MLFLOW_PORT, the forecast and the report are written."""
    wf = tmp_path / "wf"
    shutil.copytree(local_default_run, wf, symlinks=True)
    commands = _quick_start_commands()
    assert commands[:2] == ["make run", "make test"], commands
    ran = []

    # make run (the fixture) ended with the summary
    summary = (wf / "make-run.log").read_text()
    for expected in (
        "results/evaluate/convlstm/",
        "results/train/convlstm/model.pt",
        "results/compare/conv2dlstm-sst.csv",
        "models:/conv2dlstm-sst@champion",
        "http://127.0.0.1:5000/#/experiments/",
        "177 initial times",
        "better than persistence, climatology, damped persistence, training mean at every lead",
    ):
        assert expected in summary, (expected, summary)
    ran.append("make run")

    for command in commands[2:]:
        if command in COVERED_ELSEWHERE:
            continue
        words = command.split()
        assert words[0] == "make", command
        if words[1] == "mlflow-ui":
            _check_mlflow_ui(wf)
        else:
            proc = run_make(wf, *words[1:])
            if words[1] == "summary":
                assert proc.stdout and summary.endswith(proc.stdout)  # make run ended with it
            elif words[1] == "tables-check":
                assert "README.md: the results of experiment 'conv2dlstm-sst' match" in proc.stdout
            elif words[1] == "forecast":
                with xr.open_dataset(wf / "results/forecast/latest.nc") as ds:
                    assert ds["sst"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
            elif words[1] == "report":
                with zipfile.ZipFile(wf / "report.zip") as report:
                    names = report.namelist()
                for plot in (
                    "rmse_vs_lead.png",
                    "acc_vs_lead.png",
                    "skill_vs_lead.png",
                    "maps.png",
                    "rmse_map.png",
                    "animation.gif",
                    "conv2dlstm-sst.png",
                ):
                    assert any(n.endswith(plot) for n in names), plot
            else:
                pytest.fail(f"the Quick start's {command!r} is neither checked here nor in COVERED_ELSEWHERE")
        ran.append(command)
    assert set(ran) | set(COVERED_ELSEWHERE) == set(commands)

    # a README table that differs from the results fails the check, naming the line
    readme = wf / "README.md"
    readme.write_text(readme.read_text().replace("| **convlstm** | **0.", "| **convlstm** | **9.", 1))
    proc = subprocess.run(["make", "tables-check"], cwd=wf, capture_output=True, text=True, env=job_env())
    assert proc.returncode != 0 and "differ from what the pipeline produced" in proc.stderr, proc.stderr


def _check_mlflow_ui(wf: Path) -> None:
    """``make mlflow-ui MLFLOW_PORT=<free port>`` prints the labelled address on that port and serves it."""
    port = free_port()
    proc = subprocess.Popen(
        ["make", "mlflow-ui", f"MLFLOW_PORT={port}"],
        cwd=wf,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=job_env(),
        start_new_session=True,
    )
    try:
        first = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not first.startswith("MLflow UI:"):
            first = proc.stdout.readline()
            assert first or proc.poll() is None, "make mlflow-ui ended"
        assert first.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments/"), first
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the MLflow UI did not answer on port {port}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_trying_a_setting_keeps_the_current_results(local_default_run: Path, tmp_path: Path):
    """The README's way to try a setting (its own experiment and run name): the data steps are not
    rerun, the trial gets its own summary and champion, and the default's stay as they were."""
    wf = tmp_path / "wf"
    shutil.copytree(local_default_run, wf, symlinks=True)
    (wf / "try.yaml").write_text(_try_yaml())
    before = {p: (wf / p).read_bytes() for p in ("results/compare/conv2dlstm-sst.csv", "mlflow.db")}
    champion = _champion(wf, "conv2dlstm-sst")

    proc = run_make(wf, "run", "CONFIG=try.yaml")
    for rule in ("synth", "fetch", "regrid", "normalize", "windows"):
        assert f"rule {rule}:" not in proc.stdout + proc.stderr, f"{rule} re-ran"
    run = yaml.safe_load(_try_yaml())["runs"][0]["name"]
    assert "results/compare/sst-try.csv" in proc.stdout and f"{run}:" in proc.stdout
    trial = pd.read_csv(wf / "results/compare/sst-try.csv")
    assert {run, *BASELINE_NAMES} == set(trial["name"])
    assert (wf / "results/compare/conv2dlstm-sst.csv").read_bytes() == before["results/compare/conv2dlstm-sst.csv"]
    assert _champion(wf, "conv2dlstm-sst") == champion
    assert _champion(wf, "sst-try")[1] != champion[1]

    # the two experiments' runs line up in the MLflow compare view: the same parameter keys
    with sqlite3.connect(wf / "mlflow.db") as db:
        runs = db.execute(
            "select r.run_uuid, e.name from runs r join experiments e on r.experiment_id = e.experiment_id"
        ).fetchall()
        assert sorted(name for _, name in runs) == ["conv2dlstm-sst", "sst-try"]
        keys = [{k for (k,) in db.execute("select key from params where run_uuid = ?", (r,))} for r, _ in runs]
    assert keys[0] == keys[1] and "train.epochs" in keys[0]


def _champion(wf: Path, experiment: str) -> tuple[str, str]:
    """(version, run id) of ``models:/<experiment>@champion`` in the copy's mlflow.db."""
    with sqlite3.connect(wf / "mlflow.db") as db:
        ((version, run_id),) = db.execute(
            "select a.version, v.run_id from registered_model_aliases a join model_versions v"
            " on a.name = v.name and a.version = v.version where a.name = ? and a.alias = 'champion'",
            (experiment,),
        ).fetchall()
    return str(version), run_id
