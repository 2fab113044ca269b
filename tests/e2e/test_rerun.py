"""Reruns you can trust, with the real Snakemake on a tiny complete pipeline.

- After a complete run, changing one key makes `snakemake --dry-run` plan exactly the steps its
  x-steps annotation names, and those downstream of them (tests/support/plan.py); a runtime key
  plans nothing. Run for every path key and one key of each kind of plan; every key's rule params
  are checked in tests/unit/test_workflow.py.
- A changed learning rate trains a new model, recorded in a new MLflow run with the new rate.
- Fixing the input data after a complete run retrains from scratch, and the result equals a run
  on the fixed data in another directory, bit for bit (windows store, weights, metrics.csv).
- A run interrupted during training and rerun equals an uninterrupted one.
- The files of a ``files`` source are the fetch rule's inputs: a file replaced in place, added or
  removed reruns fetch.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import xarray as xr
import yaml

from conv2dlstm.config import keys
from conv2dlstm.config.validate import validate_config
from conv2dlstm.errors import ConfigError
from conv2dlstm.fsutil import sha256_tree
from tests.support.changes import CHANGES, REFUSED, RUN_CHANGES, SWEEP_CHANGES, TINY, merge, tiny
from tests.support.plan import steps_planned_by
from tests.support.workflow import copy_workflow, job_env, run_snakemake

pytestmark = pytest.mark.e2e


def _dry_run(wf: Path, configfile: Path, *targets: str) -> str:
    """What `snakemake --dry-run [targets]` prints."""
    exe = Path(sys.executable).parent / "snakemake"
    proc = subprocess.run(
        [str(exe), *targets, "-n", "--cores", "2", "--configfile", str(configfile)],
        cwd=wf,
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def _planned(wf: Path, configfile: Path, *targets: str) -> set[str]:
    """The rules `snakemake --dry-run [targets]` would run (its job stats table), without `all`."""
    out = _dry_run(wf, configfile, *targets)
    if "Nothing to be done" in out:
        return set()
    table = out[out.index("Job stats:") :]
    rules = set()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        rules.add(parts[0])
    return rules - {"all"}


def test_every_kind_of_key_plans_exactly_its_steps(tiny_run: Path, tmp_path: Path):
    """The real Snakemake plans what the annotations say, for every path key and for one key of each
    kind of plan (the keys whose change must plan the same steps); that every other key's change
    changes exactly its steps' rule params, which is all Snakemake reads, is
    tests/unit/test_workflow.py::test_every_key_changes_exactly_its_steps_params."""
    specs = {s.name: s for s in keys.key_specs()}
    assert set(CHANGES) | set(REFUSED) == set(specs), "every schema key needs a row in CHANGES or REFUSED"
    for name, change in REFUSED.items():
        with pytest.raises(ConfigError, match=f"config key {name}:"):
            validate_config(merge(tiny(), change))
    base = tiny()
    cases, kinds = [], set()
    for name, change in CHANGES.items():
        changed = merge(base, change)
        assert keys.get(validate_config(changed), name) != keys.get(validate_config(base), name), name
        expected = steps_planned_by(specs[name], validate_config(base))
        kind = frozenset(expected)
        if specs[name].output_path or kind not in kinds:
            kinds.add(kind)
            cases.append((name, changed, expected))
    assert len(cases) >= 10, [name for name, _, _ in cases]
    for label, (runs, expected) in RUN_CHANGES.items():
        cases.append((f"runs: {label}", {**base, "runs": runs}, expected))
    for label, (sweep, expected) in SWEEP_CHANGES.items():
        cases.append((f"sweep: {label}", {**base, "sweep": sweep}, expected))
    # the changed configs live outside the workflow copy: the dry-runs leave tiny_run untouched
    files = []
    for i, (_, changed, _) in enumerate(cases):
        path = tmp_path / f"case{i}.yaml"
        path.write_text(yaml.safe_dump(changed))
        files.append(path)
    assert _planned(tiny_run, tiny_run / "tiny.yaml") == set(), "the complete run must have nothing to do"
    with ThreadPoolExecutor(2) as pool:
        planned = list(pool.map(lambda f: _planned(tiny_run, f), files))
    wrong = {
        name: (sorted(got), sorted(expected)) for (name, _, expected), got in zip(cases, planned) if got != expected
    }
    assert not wrong, f"key: (planned, expected) {wrong}"


def test_dry_run_reason_is_the_changed_value(tiny_run: Path, tmp_path: Path):
    """`snakemake -n` says why a step reruns in one line: the changed key, old and new value (one
    rule param per key, conv2dlstm.config.workflow.determines_params), not the step's whole configuration."""
    changed = tmp_path / "epochs.yaml"
    changed.write_text(yaml.safe_dump(merge(tiny(), {"train": {"epochs": 3}})))
    out = _dry_run(tiny_run, changed)
    reasons = [line.strip() for line in out.splitlines() if "reason: Params have changed" in line]
    assert reasons == [
        "reason: Params have changed since last execution: Union of exclusive params before and now across all "
        "output: before: 'train.epochs=4' now: 'train.epochs=3'"
    ], out


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = _model_state(a), _model_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _mlflow_runs(wf: Path, experiment: str = "tiny") -> list[tuple[str, str, dict[str, str], dict[str, str]]]:
    """(run id, status, params, tags) of every run of ``experiment`` in the workflow's mlflow.db."""
    with sqlite3.connect(wf / "mlflow.db") as db:
        runs = db.execute(
            "select r.run_uuid, r.status from runs r join experiments e on r.experiment_id = e.experiment_id"
            " where e.name = ? order by r.start_time",
            (experiment,),
        ).fetchall()
        return [
            (
                rid,
                status,
                dict(db.execute("select key, value from params where run_uuid = ?", (rid,)).fetchall()),
                dict(db.execute("select key, value from tags where run_uuid = ?", (rid,)).fetchall()),
            )
            for rid, status in runs
        ]


def test_changed_learning_rate_trains_a_new_model_in_a_new_mlflow_run(tiny_run: Path, tmp_path: Path):
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    old_model = wf / "old-model.pt"
    shutil.copy(wf / "results/train/convlstm/model.pt", old_model)
    (wf / "lr.yaml").write_text(yaml.safe_dump(merge(tiny(), {"train": {"learning_rate": 0.0005}})))
    proc = run_snakemake(wf, "--cores", "2", "--configfile", "lr.yaml")
    out = proc.stdout + proc.stderr
    for rule in ("synth", "fetch", "regrid", "normalize", "windows"):
        assert f"rule {rule}:" not in out, f"{rule} re-ran"
    model = wf / "results/train/convlstm/model.pt"
    assert not _same_weights(model, old_model)
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "train.learning_rate" in log and "0.0005" in log, log[-3000:]
    assert list((wf / "results/train/convlstm/stale").glob("*/last.pt")), "the stale checkpoint is kept aside"
    runs = _mlflow_runs(wf)
    assert len(runs) == 2, runs
    (old_id, _, old_params, old_tags), (new_id, status, new_params, _) = runs
    assert old_params["train.learning_rate"] == "0.003" and new_params["train.learning_rate"] == "0.0005"
    assert status == "FINISHED" and old_tags.get("superseded_by") == new_id
    assert runs[1][3]["data.time_gaps"] == "0" and runs[1][3]["data.missing_dates"] == ""  # gaps of the data
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    assert ckpt["mlflow_run_id"] == new_id
    assert "test_rmse_sst_lead1" in {k for k in _metric_keys(wf, new_id)}


def _metric_keys(wf: Path, run_id: str) -> set[str]:
    with sqlite3.connect(wf / "mlflow.db") as db:
        return {k for (k,) in db.execute("select distinct key from metrics where run_uuid = ?", (run_id,))}


def _corrupt(path: Path) -> None:
    """Make one raw daily file readable but wrong: +5 degrees everywhere."""
    import xarray as xr

    with xr.open_dataset(path) as ds:
        bad = ds.load()
    bad["sst"] = bad["sst"] + 5.0
    bad["sst"].attrs = ds["sst"].attrs
    bad["sst"].encoding = ds["sst"].encoding
    path.unlink()
    bad.to_netcdf(path)


def test_fixed_input_data_retrains_from_scratch_and_equals_a_fresh_run(tiny_run: Path, tmp_path: Path):
    """A second directory: first a complete run on bad data, then the data is fixed and the
    pipeline rerun. Everything from fetch on is rebuilt, training starts from scratch, and the
    results equal those of tiny_run (the same config on good data) bit for bit."""
    wf = copy_workflow(tmp_path / "wf")
    shutil.copy(TINY, wf / "tiny.yaml")
    run_snakemake(wf, "synth", "--cores", "1", "--configfile", "tiny.yaml")
    raw = sorted((wf / "resources/synthetic/oisst").rglob("*.nc"))[40]  # a training day
    good = tmp_path / "good.nc"
    shutil.copy(raw, good)
    _corrupt(raw)
    run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml")
    bad_model = tmp_path / "bad-model.pt"
    shutil.copy(wf / "results/train/convlstm/model.pt", bad_model)
    assert not _same_weights(bad_model, tiny_run / "results/train/convlstm/model.pt")

    # The data is fixed upstream. The fetched copy is deleted, as after any bad download (fetch
    # keeps verified copies), and the fetch forced: Snakemake cannot see into the source.
    shutil.copy(good, raw)
    fetched = wf / "resources/raw/oisst" / raw.name
    fetched.unlink()
    (fetched.parent / f".{raw.name}.sha256").unlink(missing_ok=True)
    proc = run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml", "--forcerun", "fetch")
    out = proc.stdout + proc.stderr
    for rule in ("regrid", "normalize", "windows", "train", "evaluate"):
        assert f"rule {rule}:" in out, f"{rule} did not rerun"
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "resuming" not in log.lower() and "starting fresh" in log.lower(), log[-3000:]

    # two directories, one config, the same data: identical windows, weights and metrics
    assert sha256_tree(wf / "results/windows/oisst.zarr") == sha256_tree(tiny_run / "results/windows/oisst.zarr")
    assert _same_weights(wf / "results/train/convlstm/model.pt", tiny_run / "results/train/convlstm/model.pt")
    assert (wf / "results/evaluate/convlstm/metrics.csv").read_bytes() == (
        tiny_run / "results/evaluate/convlstm/metrics.csv"
    ).read_bytes()


def test_interrupted_training_rerun_equals_an_uninterrupted_run(tiny_run: Path, tmp_path: Path):
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    for out in ("results/train", "results/evaluate", "results/compare", "mlflow.db"):
        target = wf / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    exe = Path(sys.executable).parent / "snakemake"
    proc = subprocess.Popen(
        [str(exe), "--cores", "2", "--configfile", "tiny.yaml"],
        cwd=wf,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    history = wf / "results/train/convlstm/history.csv"
    deadline = time.monotonic() + 600
    while not (history.is_file() and len(history.read_text().splitlines()) >= 2):  # one epoch done
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it was interrupted"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=300)
    assert not (wf / "results/train/convlstm/model.pt").exists()
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "rerun resumes" in log.lower(), log[-3000:]

    run_snakemake(wf, "--cores", "2", "--configfile", "tiny.yaml")
    log = (wf / "results/logs/train/convlstm.log").read_text()
    assert "resuming" in log.lower(), log[-3000:]
    assert _same_weights(wf / "results/train/convlstm/model.pt", tiny_run / "results/train/convlstm/model.pt")
    assert (wf / "results/evaluate/convlstm/metrics.csv").read_bytes() == (
        tiny_run / "results/evaluate/convlstm/metrics.csv"
    ).read_bytes()


def test_a_files_source_reruns_fetch_when_a_file_is_replaced_added_or_removed(tiny_run: Path, tmp_path: Path):
    """Data fixed in place reruns: with ``source.kind: files`` (no generation) a file replaced by
    another at the same path, a file added to the glob or one removed plans fetch again (and with it
    everything downstream); an untouched set plans nothing."""
    wf = tmp_path / "wf"
    shutil.copytree(tiny_run, wf, symlinks=True)
    data = wf / "mydata"
    data.mkdir()
    files = sorted((wf / "resources" / "synthetic").rglob("*.nc"))
    assert len(files) > 100, files[:3]
    for f in files:
        shutil.copy2(f, data / f.name)
    cfg = merge(tiny(), {"synthetic": {"kind": "none"}, "source": {"kind": "files", "paths": ["mydata/*.nc"]}})
    config = tmp_path / "files.yaml"
    config.write_text(yaml.safe_dump(cfg))
    manifest = "resources/raw/oisst/manifest.json"
    run_snakemake(wf, manifest, "--cores", "1", "--configfile", str(config))
    assert _planned(wf, config, manifest) == set()
    names = sorted(p.name for p in data.iterdir())
    time.sleep(1.1)  # a new modification time on file systems with 1 s resolution
    replaced = data / names[10]
    replaced.write_bytes(replaced.read_bytes())  # touched, same content: Snakemake compares checksums
    assert _planned(wf, config, manifest) == set()
    with xr.open_dataset(replaced) as ds:
        fixed = ds.load()
    fixed["sst"] = fixed["sst"] + 0.5  # fixed in place: the same path, other values
    fixed.to_netcdf(data / "fixed.tmp")
    os.replace(data / "fixed.tmp", replaced)
    assert _planned(wf, config, manifest) == {"fetch"}
    run_snakemake(wf, manifest, "--cores", "1", "--configfile", str(config))
    assert _planned(wf, config, manifest) == set()
    (data / names[-1]).unlink()  # removed from the glob
    assert _planned(wf, config, manifest) == {"fetch"}
    shutil.copy2(files[-1], data / "extra.nc")  # added (an old modification time: the set changed)
    assert _planned(wf, config, manifest) == {"fetch"}
